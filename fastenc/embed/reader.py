"""Input sources of `fastenc embed` and the per-sample work done in loader workers (decode, preprocess, tokenize).

Sources, listed once in a stable order (the order fixes every sample's global index, hence its shard and row):
- a folder of images (recursive, sorted by relative path; `<name>.txt` next to `<name>.<ext>` is its caption);
  id = the relative path;
- WebDataset tar shards (img2dataset's layout: `<key>.jpg|png|webp`, `<key>.txt`, `<key>.json` in `NNNNN.tar`):
  a folder of `*.tar` (sorted by name) or one `.tar` file; consecutive members of one key make a sample; the image
  is the first field of `--image-key` (default jpg;jpeg;png;webp) it has; id = the key. Only headers and captions
  are read while listing; an image is read by offset in the worker (uncompressed tars);
- a Parquet or CSV table: a caption column and/or an image column (paths, relative to the table's folder, or
  bytes, or HF datasets' {"bytes", "path"} structs); id = the id column or the row number.

Only regular files are read (a FIFO, device or socket, or a symlink to one, fails its sample without blocking), and
never more than `--max-image-bytes` of one; PIL's decompression-bomb limit stays on (its warning fails the sample).

Image preprocessing follows the checkpoint's preprocessor_config.json with the PIL image processors' semantics
(CLIPImageProcessor / SiglipImageProcessor, PIL backend): convert to RGB (transformers' own convert_to_rgb), resize
(shortest edge keeping the aspect ratio, or a fixed height x width) with the configured PIL filter, center crop,
rescale (in float64, then float32), normalize in float32. tests/test_embed.py holds it to the processors' own output.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import io
import json
import os
import posixpath
import stat
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.errors import InputError

if TYPE_CHECKING:  # numpy is imported where it is used: embed's parser (`fastenc embed --help`) reads this module
    import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = "jpg;jpeg;png;webp"  # WebDataset image fields, in order of preference (webdataset's "a;b" convention)
CAPTION_KEY = "txt"
MAX_IMAGE_BYTES = 64 << 20  # --max-image-bytes: no image (or caption) file is read past this
CAPTION_COLS = ("caption", "text", "TEXT", "prompt")
IMAGE_COLS = ("image", "image_path", "path", "filepath", "file", "jpg", "png")
ID_COLS = ("id", "key", "uid")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC == transformers' PILImageResampling.BICUBIC
_BLOCK = 512  # tar block size
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass
class SampleTable:
    """Every sample of a source in its stable order. image_refs[i]: ("file", path) | ("tar", tar, offset, size) |
    ("bytes", data) | None; captions[i]: str | None; paths[i]: what the metadata shows as the sample's origin;
    records[i]: the sample's members as listed (sizes and mtimes of files, tar member offsets and sizes, a digest of
    inline bytes), stored with each finished shard so a resume can prove the input did not change; errors[i]: why
    the listing already knows the sample cannot be embedded (a duplicate WebDataset key, a tar cut inside one of its
    members, a caption that is not a regular file); warnings: input problems that did not fail a sample (a caption
    that is not valid UTF-8, a tar cut between samples), as {"index", "id", "path", "warning"} dicts."""

    kind: str
    source: str
    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    image_refs: list[tuple | None] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    warnings: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(
        self, id_: str, path: str, caption: str | None, ref: tuple | None, record: str = "", error: str | None = None
    ) -> int:
        self.ids.append(id_)
        self.paths.append(path)
        self.captions.append(caption)
        self.image_refs.append(ref)
        self.records.append(record)
        if error is not None:
            self.errors[len(self.ids) - 1] = error
        return len(self.ids) - 1

    def warn(self, index: int | None, path: str, message: str, kind: str) -> None:
        """kind: "cut" (a tar cut inside a member or a header), "skipped" (an input file not read), "caption"."""
        id_ = self.ids[index] if index is not None else None
        self.warnings.append({"index": index, "id": id_, "path": path, "kind": kind, "warning": message})

    def check(self) -> SampleTable:
        if not self.ids:
            raise InputError(f"--input {self.source!r}: no samples found ({self.kind})")
        seen: set[str] = set()
        for i in self.ids:
            if i in seen:
                raise InputError(f"--input {self.source!r}: sample id {i!r} occurs more than once; ids must be unique")
            seen.add(i)
        return self


def parse_image_keys(spec: str) -> tuple[str, ...]:
    """`--image-key jpg;jpeg;png;webp` -> ("jpg", "jpeg", "png", "webp"): WebDataset fields (the member name after
    the key's first dot, case-insensitive), the first one a sample has is its image."""
    keys = tuple(k.strip().lower().removeprefix(".") for k in str(spec).split(";") if k.strip())
    if not keys:
        raise InputError(f"--image-key must list WebDataset fields separated by ';' (e.g. {IMAGE_KEYS}), got {spec!r}")
    return keys


def list_samples(
    src: str,
    *,
    caption_col: str | None = None,
    image_col: str | None = None,
    id_col: str | None = None,
    image_key: str = IMAGE_KEYS,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> SampleTable:
    """The SampleTable of `src` (a folder of images, a folder of .tar shards, a .tar, .parquet or .csv file)."""
    if not os.path.exists(src):
        raise InputError(f"--input {src!r} does not exist")
    if os.path.isdir(src):
        tars = sorted(f for f in os.listdir(src) if f.endswith(".tar"))
        if tars:
            return _list_tars(src, [os.path.join(src, t) for t in tars], parse_image_keys(image_key), max_bytes).check()
        return _list_folder(src, max_bytes).check()
    st = os.stat(src)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"--input {src!r} is a {_file_kind(st.st_mode)}, not a regular file or a folder")
    low = src.lower()
    if low.endswith(".tar"):
        return _list_tars(src, [src], parse_image_keys(image_key), max_bytes).check()
    if low.endswith((".parquet", ".csv")):
        return _list_table(src, caption_col, image_col, id_col).check()
    raise InputError(f"--input {src!r}: expected a folder, a .tar shard, a .parquet or a .csv file")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):  # fmt: skip
        if test(mode):
            return name
    return "special file"


def _stat_record(path: str) -> tuple[str, os.stat_result | None]:
    """(record, stat) of a file as listed: "size:mtime_ns" of a regular file, else what it is (never opened here)."""
    try:
        st = os.stat(path)  # follows symlinks: a link to /dev/zero is a character device
    except OSError as e:
        return f"unreadable:{e.errno}", None
    if not stat.S_ISREG(st.st_mode):
        return f"not-regular:{_file_kind(st.st_mode)}", st
    return f"{st.st_size}:{st.st_mtime_ns}", st


def _decode_caption(data: bytes, table: SampleTable, index_hint: int, path: str) -> str:
    """UTF-8 captions; anything else is decoded with U+FFFD replacement and logged in the table's warnings."""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        table.warnings.append({"index": index_hint, "id": None, "path": path, "kind": "caption",
                               "warning": f"caption is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
                                          f"{e.start}); decoded with U+FFFD replacement characters"})  # fmt: skip
        return data.decode("utf-8", errors="replace").strip()


def _fill_warning_ids(table: SampleTable, first: int) -> None:
    for w in table.warnings[first:]:
        if w["index"] is not None and w["id"] is None:
            w["id"] = table.ids[w["index"]]


def _list_folder(root: str, max_bytes: int) -> SampleTable:
    table = SampleTable("folder", root)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_EXTS):
                continue
            path = os.path.join(dirpath, name)
            entries.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    entries.sort()  # os.walk order is per folder
    for rel, path in entries:
        record, _ = _stat_record(path)
        txt = os.path.splitext(path)[0] + ".txt"
        caption, error = None, None
        if os.path.lexists(txt):
            txt_record, txt_st = _stat_record(txt)
            record += f";txt={txt_record}"
            name = os.path.basename(txt)
            if txt_st is None:
                error = f"caption {name!r} cannot be read ({txt_record})"
            elif not stat.S_ISREG(txt_st.st_mode):
                error = f"caption {name!r} is a {_file_kind(txt_st.st_mode)}, not a regular file; not read"
            else:
                try:
                    data = read_regular(txt, max_bytes, "caption")
                except (OSError, ValueError) as e:
                    error = f"caption {name!r}: {e}"
                else:
                    caption = _decode_caption(data, table, len(table), rel)
        table.add(rel, rel, caption, ("file", path), record, error)
    _fill_warning_ids(table, 0)
    return table


def _check_not_compressed(tar_path: str) -> None:
    with open(tar_path, "rb") as f:
        head = f.read(6)
    for magic, name in _COMPRESSED.items():
        if head.startswith(magic):
            raise InputError(
                f"--input: {tar_path!r} is a {name}-compressed tar; decompress it (images are read by offset)"
            )


def _list_tars(src: str, tars: list[str], image_keys: tuple[str, ...], max_bytes: int) -> SampleTable:
    """WebDataset semantics: a sample is a run of consecutive members sharing a key (the member path up to the
    basename's first dot); its fields are what follows that dot (`k.seg.png` has field "seg.png", not "png"). The
    image is the first of `image_keys` the sample has, the caption its "txt" field. A key seen again later (in this
    tar or another), or a field twice within a sample, fails that sample with both members named, never pairs one
    member's image with the other's caption. A tar cut inside a member fails the sample of that member; a tar cut
    inside a header (or without its end-of-archive blocks) keeps the samples before the cut; both are warnings."""
    table = SampleTable("webdataset", src)
    where: dict[str, tuple[int, str]] = {}  # key -> (table index, "tar/member" of its first member)
    for tar_path in tars:
        _list_tar(table, tar_path, image_keys, max_bytes, where)
    _fill_warning_ids(table, 0)
    return table


def _list_tar(table: SampleTable, tar_path: str, image_keys, max_bytes: int, where: dict) -> None:
    base = os.path.basename(tar_path)
    try:
        st = os.stat(tar_path)
    except OSError as e:
        table.warn(None, base, f"{base} cannot be read ({e}); skipped", "skipped")
        return
    if not stat.S_ISREG(st.st_mode):
        table.warn(None, base, f"{base} is a {_file_kind(st.st_mode)}, not a regular file; skipped", "skipped")
        return
    _check_not_compressed(tar_path)
    size = st.st_size
    tar_record = f"{base}:{size}:{st.st_mtime_ns}"
    members: list[tuple[str, str, str, int, int]] = []  # (key, field, name, offset_data, size)
    failed, end, last_name, cut_inside = None, 0, None, None
    try:
        tf = tarfile.open(tar_path, "r:")  # uncompressed: images are read by offset in the workers
    except (tarfile.TarError, OSError, EOFError) as e:
        table.warn(None, base, f"{base} is not a tar or is cut inside its first header ({e}); no samples read", "cut")
        return
    with tf:
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                failed = str(e)
                break
            if m is None:
                break
            end, last_name = m.offset_data + -(-m.size // _BLOCK) * _BLOCK, m.name
            if m.offset_data + m.size > size:
                cut_inside = m
            if m.isfile():
                folder, member = posixpath.split(m.name)
                stem, dot, ext = member.partition(".")
                if dot and stem:
                    key = stem if folder in ("", ".") else posixpath.join(folder.removeprefix("./"), stem)
                    members.append((key, ext.lower(), m.name, m.offset_data, m.size))
            if cut_inside is not None:
                break
    if cut_inside is not None:
        cut_msg = (f"{base} is cut inside member {cut_inside.name!r} ({max(0, size - cut_inside.offset_data)} of "
                   f"{cut_inside.size} bytes); the samples after it are lost")  # fmt: skip
    else:
        with open(tar_path, "rb") as f:
            f.seek(end)
            tail = f.read(_BLOCK)
        cut_msg = None
        if failed is not None or len(tail) < _BLOCK or any(tail):  # a tar ends with zero blocks
            after = f" after member {last_name!r}" if last_name else ""
            why = f" ({failed})" if failed else ""
            cut_msg = (f"{base} is cut at byte {size}{after}: inside a header or without its end-of-archive blocks"
                       f"{why}; any samples after the cut are lost")  # fmt: skip
    runs: list[list[tuple]] = []  # WebDataset samples: runs of consecutive members with one key
    for mem in members:
        if runs and runs[-1][0][0] == mem[0]:
            runs[-1].append(mem)
        else:
            runs.append([mem])
    last = None
    with open(tar_path, "rb") as f:  # captions are read by offset
        for run_ in runs:
            key = run_[0][0]
            first = f"{base}/{run_[0][2]}"
            if key in where:
                index, other = where[key]
                table.errors[index] = (
                    f"duplicate WebDataset key {key!r}: members {other!r} and {first!r} (a key must appear once; "
                    "neither is embedded)"
                )
                continue
            fields: dict[str, tuple] = {}
            error = None
            for _, fld, name, off, n in run_:
                if fld in fields and error is None:
                    error = (f"duplicate WebDataset key {key!r}: members {base + '/' + fields[fld][0]!r} and "
                             f"{base + '/' + name!r} (field {fld!r} twice; neither is embedded)")  # fmt: skip
                fields.setdefault(fld, (name, off, n))
                if off + n > size:
                    error = f"{base} is cut inside member {name!r} ({max(0, size - off)} of {n} bytes)"
            image = next((k for k in image_keys if k in fields), None)
            record = tar_record + "|" + ";".join(f"{name}@{off}+{n}" for _, _, name, off, n in run_)
            caption = None
            if error is None and CAPTION_KEY in fields:
                name, off, n = fields[CAPTION_KEY]
                if n > max_bytes:
                    error = f"caption {name!r} is {n} bytes, over --max-image-bytes {max_bytes}"
                else:
                    f.seek(off)
                    caption = _decode_caption(f.read(n), table, len(table), f"{base}/{name}")
            ref, shown = None, first
            if image is not None:
                name, off, n = fields[image]
                ref, shown = ("tar", tar_path, off, n), f"{base}/{name}"
            if error is None and image is None and caption is None:
                error = (f"no image (--image-key {';'.join(image_keys)}) or caption ({CAPTION_KEY}) field; has: "
                         f"{', '.join(sorted(fields))}")  # fmt: skip
            last = table.add(key, shown, caption, ref, record, error)
            where[key] = (last, first)
    if cut_msg is not None:
        table.warn(last, base, cut_msg, "cut")


def _pick(cols: list[str], given: str | None, defaults: tuple[str, ...], flag: str, src: str) -> str | None:
    if given is not None:
        if given not in cols:
            raise InputError(f"{flag} {given!r} is not a column of {src!r} (columns: {', '.join(cols)})")
        return given
    return next((c for c in defaults if c in cols), None)


def _read_csv(src: str) -> tuple[list[str], dict]:
    try:
        with open(src, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise InputError(
            f"--input {src!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "save the CSV as UTF-8"
        ) from None
    except csv.Error as e:
        raise InputError(f"--input {src!r} is not a readable CSV file ({e})") from None
    cols = list(rows[0].keys()) if rows else []
    return cols, {c: [r[c] for r in rows] for c in cols}


def _read_parquet(src: str) -> tuple[list[str], dict]:
    pq = _pyarrow_parquet()
    import pyarrow as pa

    try:
        t = pq.read_table(src)
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--input {src!r} is not a readable Parquet file ({first})") from None
    return t.column_names, {c: t.column(c).to_pylist() for c in t.column_names}


def _list_table(src: str, caption_col, image_col, id_col) -> SampleTable:
    cols, data = _read_csv(src) if src.lower().endswith(".csv") else _read_parquet(src)
    cap = _pick(cols, caption_col, CAPTION_COLS, "--caption-col", src)
    img = _pick(cols, image_col, IMAGE_COLS, "--image-col", src)
    idc = _pick(cols, id_col, ID_COLS, "--id-col", src)
    if cap is None and img is None:
        raise InputError(
            f"--input {src!r} has neither a caption column ({', '.join(CAPTION_COLS)}) nor an image column "
            f"({', '.join(IMAGE_COLS)}); name them with --caption-col / --image-col (columns: {', '.join(cols)})"
        )
    root = os.path.dirname(os.path.abspath(src))
    n = len(data[cols[0]]) if cols else 0
    table = SampleTable("table", src)
    for r in range(n):
        id_ = str(data[idc][r]) if idc else str(r)
        caption = data[cap][r] if cap else None
        if isinstance(caption, (bytes, bytearray)):
            caption = _decode_caption(bytes(caption), table, r, f"{os.path.basename(src)}[{r}]")
        caption = None if caption is None else str(caption)
        ref, path, record = None, "", ""
        if img:
            v = data[img][r]
            if isinstance(v, dict):  # HF datasets Image feature
                v = v.get("bytes") or v.get("path")
            if isinstance(v, (bytes, bytearray)):
                ref, path = ("bytes", bytes(v)), f"{os.path.basename(src)}[{r}]"
                record = f"bytes:{len(v)}:{hashlib.blake2b(v, digest_size=8).hexdigest()}"
            elif isinstance(v, str) and v:
                ref, path = ("file", v if os.path.isabs(v) else os.path.join(root, v)), v
                record = _stat_record(ref[1])[0]
        table.add(id_, path, caption, ref, record)
    _fill_warning_ids(table, 0)
    return table


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet needs pyarrow: pip install 'fastenc[embed]'") from None
    return pq


# ------------------------------------------------------------------------------------------------ preprocessing


@dataclass(frozen=True)
class ImagePreprocessor:
    """The PIL image processors' pipeline from a checkpoint's preprocessor settings (plain data: pickles to workers).
    size: ("shortest_edge", s) or ("hw", h, w); crop: (h, w) or None."""

    size: tuple
    crop: tuple | None
    resample: int
    rescale: float | None
    mean: tuple | None
    std: tuple | None
    convert_rgb: bool = True

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop
        if self.size[0] == "hw":
            return self.size[1], self.size[2]
        raise InputError("a shortest-edge resize without a center crop gives images of varying size; not batchable")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_settings(cls, s: dict, model_config=None) -> ImagePreprocessor:
        """From preprocessor_config.json's keys (missing keys: the CLIP processor's defaults, image size from the
        model config)."""
        vision = getattr(model_config, "vision_config", model_config)
        image_size = getattr(vision, "image_size", 224)
        kind = f"{getattr(model_config, 'model_type', '')} {s.get('image_processor_type', '')}".lower()
        siglip = "siglip" in kind  # SigLIP: fixed-size resize, no crop, mean = std = 0.5
        size = s.get("size", {"height": image_size, "width": image_size} if siglip else {"shortest_edge": image_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        do_resize = s.get("do_resize", True)
        if not do_resize:
            size_t: tuple = ("none",)
        elif "shortest_edge" in size:
            size_t = ("shortest_edge", int(size["shortest_edge"]))
        elif "height" in size and "width" in size:
            size_t = ("hw", int(size["height"]), int(size["width"]))
        else:
            raise InputError(f"preprocessor size {size!r} is not supported (shortest_edge or height/width)")
        crop = None
        if s.get("do_center_crop", not siglip) or False:
            c = s.get("crop_size", {"height": image_size, "width": image_size})
            c = {"height": c, "width": c} if isinstance(c, int) else c
            crop = (int(c["height"]), int(c["width"]))
        default_mean, default_std = ((0.5,) * 3, (0.5,) * 3) if siglip else (CLIP_MEAN, CLIP_STD)
        mean = tuple(float(x) for x in s.get("image_mean", default_mean)) if s.get("do_normalize", True) else None
        std = tuple(float(x) for x in s.get("image_std", default_std)) if s.get("do_normalize", True) else None
        rescale = float(s.get("rescale_factor", 1 / 255)) if s.get("do_rescale", True) else None
        resample = s.get("resample", BICUBIC)
        return cls(size_t, crop, int(resample), rescale, mean, std, bool(s.get("do_convert_rgb", True)))

    @classmethod
    def from_checkpoint(cls, model_dir: str, model_config=None) -> ImagePreprocessor:
        path = os.path.join(model_dir, "preprocessor_config.json")
        settings = {}
        if os.path.isfile(path):
            with open(path) as f:
                settings = json.load(f)
        return cls.from_settings(settings, model_config)

    def __call__(self, image) -> np.ndarray:
        """PIL image -> (3, H, W) float32 (the processor's pixel_values row)."""
        return self.normalize(self.geometry(image))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(C, H, W) uint8 -> float32: rescale in float64 then float32, normalize in float32 (the processors' order)."""
        import numpy as np

        if self.rescale is not None:
            x = (x.astype(np.float64) * self.rescale).astype(np.float32)
        elif not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        if self.mean is not None:
            mean = np.array(self.mean, dtype=x.dtype)
            std = np.array(self.std, dtype=x.dtype)
            x = ((x.T - mean) / std).T
        return np.ascontiguousarray(x, dtype=np.float32)

    def normalize_torch(self, x):
        """normalize() on a (B, C, H, W) uint8 torch tensor on any device, the same IEEE operations in the same
        order, so the result equals the host path bit for bit; lets workers ship uint8 (4x fewer bytes)."""
        import torch

        x = x.to(torch.float64)
        if self.rescale is not None:
            x = x * self.rescale
        x = x.to(torch.float32)
        if self.mean is not None:
            key = (str(x.device), self.mean, self.std)
            if key not in _MEAN_STD:  # once per device: a pageable host->device copy per batch would block the host
                _MEAN_STD[key] = tuple(
                    torch.tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
                    for v in (self.mean, self.std)
                )
            mean, std = _MEAN_STD[key]
            x = (x - mean) / std
        return x

    def geometry(self, image) -> np.ndarray:
        """PIL image -> (C, H, W) uint8 after RGB conversion, resize and center crop (before rescale / normalize)."""
        import numpy as np
        from PIL import Image

        if self.convert_rgb:
            image = _to_rgb(image)
        if self.size[0] == "shortest_edge":
            w, h = image.size
            s = self.size[1]
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            new_h, new_w = (new_long, s) if w <= h else (s, new_long)
            image = image.resize((new_w, new_h), resample=Image.Resampling(self.resample))
        elif self.size[0] == "hw":
            image = image.resize((self.size[2], self.size[1]), resample=Image.Resampling(self.resample))
        x = np.asarray(image)
        x = x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)  # (C, H, W)
        if self.crop is not None:
            x = _center_crop(x, *self.crop)
        return x


_MEAN_STD: dict = {}


def _to_rgb(image):
    """The installed transformers' convert_to_rgb, so the result matches its processors (5.2x composites an alpha
    channel on white, 5.17 drops it); RGB images pass through. Without it: composite on white, else convert."""
    if image.mode == "RGB":
        return image
    import numpy as np
    from PIL import Image

    convert = _hf_convert_to_rgb()
    if convert is not None:
        fn, numpy_kw = convert
        out = fn(image, return_numpy=True) if numpy_kw else fn(image)
        return Image.fromarray(out) if isinstance(out, np.ndarray) else out
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        a = np.asarray(image.convert("RGBA"))
        alpha = a[..., 3:4] / 255
        comp = alpha * a[..., :3] + (1 - alpha) * 255
        return Image.fromarray(np.round(comp).astype(np.uint8))
    return image.convert("RGB")


@functools.cache
def _hf_convert_to_rgb():
    try:
        from transformers.image_transforms import convert_to_rgb
    except ImportError:
        return None
    return convert_to_rgb, "return_numpy" in inspect.signature(convert_to_rgb).parameters


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """(C, H, W) center crop as transformers' center_crop (zero-padded when the image is smaller)."""
    import numpy as np

    _, h, w = x.shape
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return x[:, top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    out = np.zeros((x.shape[0], nh, nw), dtype=x.dtype)
    ty, tx = (nh - h + 1) // 2, (nw - w + 1) // 2
    out[:, ty : ty + h, tx : tx + w] = x
    top, left = (nh - ch) // 2, (nw - cw) // 2
    return out[:, top : top + ch, left : left + cw]


def read_regular(path: str, limit: int = MAX_IMAGE_BYTES, what: str = "image") -> bytes:
    """The bytes of a regular file, at most `limit` of them. A FIFO, device or socket (or a symlink to one, such as
    /dev/zero) is refused without blocking: opened O_NONBLOCK and checked with fstat before anything is read."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = _file_kind(st.st_mode)
        raise ValueError(f"{what} {os.path.basename(path)!r} is a {kind}, not a regular file; not read")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # what was opened (the path may have been swapped since the stat)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{what} {os.path.basename(path)!r} is a {_file_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{what} is {st.st_size} bytes, over --max-image-bytes {limit}; not read")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} is over --max-image-bytes {limit} bytes; not read")
    return data


def read_image_bytes(ref: tuple, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The encoded image of a reference, never more than `limit` bytes read (--max-image-bytes)."""
    kind = ref[0]
    if kind == "file":
        return read_regular(ref[1], limit)
    if kind == "tar":
        if ref[3] > limit:
            raise ValueError(f"image is {ref[3]} bytes, over --max-image-bytes {limit}; not read")
        data = read_regular_range(ref[1], ref[2], ref[3])
        if len(data) != ref[3]:
            raise OSError(f"tar member truncated: {len(data)} of {ref[3]} bytes")
        return data
    if len(ref[1]) > limit:
        raise ValueError(f"image is {len(ref[1])} bytes, over --max-image-bytes {limit}; not decoded")
    return ref[1]


def read_regular_range(path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a regular file (a tar member), refusing anything else without blocking."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{os.path.basename(path)!r} is a {_file_kind(st.st_mode)}, not a regular file")
        f.seek(offset)
        return f.read(size)


def decode_image(ref: tuple, limit: int = MAX_IMAGE_BYTES):
    """The PIL image of a reference, fully decoded (a corrupt or truncated file raises here, in the worker). PIL's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS) stays on, and its warning is an error here: an image past the
    limit fails its sample instead of being decoded."""
    from PIL import Image

    data = read_image_bytes(ref, limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
    return img
