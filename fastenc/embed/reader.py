"""Input sources of `fastenc embed` and the per-sample work done in loader workers (decode, preprocess, tokenize).

Sources, listed once in a stable order (the order fixes every sample's global index, hence its shard and row):
- a folder of images (recursive, sorted by relative path; `<name>.txt` next to `<name>.<ext>` is its caption);
  id = the relative path;
- WebDataset tar shards (img2dataset's layout: `<key>.jpg|png|webp`, `<key>.txt`, `<key>.json` in `NNNNN.tar`):
  a folder of `*.tar` (sorted by name) or one `.tar` file; members in tar order, grouped by key; id = the key.
  Only headers and captions are read while listing; an image is read by offset in the worker (uncompressed tars);
- a Parquet or CSV table: a caption column and/or an image column (paths, relative to the table's folder, or
  bytes, or HF datasets' {"bytes", "path"} structs); id = the id column or the row number.

Image preprocessing follows the checkpoint's preprocessor_config.json with the PIL image processors' semantics
(CLIPImageProcessor / SiglipImageProcessor, PIL backend): convert to RGB (transformers' own convert_to_rgb), resize
(shortest edge keeping the aspect ratio, or a fixed height x width) with the configured PIL filter, center crop,
rescale (in float64, then float32), normalize in float32. tests/test_embed.py holds it to the processors' own output.
"""

from __future__ import annotations

import csv
import functools
import inspect
import io
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_COLS = ("caption", "text", "TEXT", "prompt")
IMAGE_COLS = ("image", "image_path", "path", "filepath", "file", "jpg", "png")
ID_COLS = ("id", "key", "uid")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC == transformers' PILImageResampling.BICUBIC


@dataclass
class SampleTable:
    """Every sample of a source in its stable order. image_refs[i]: ("file", path) | ("tar", tar, offset, size) |
    ("bytes", data) | None; captions[i]: str | None; paths[i]: what the metadata shows as the sample's origin."""

    kind: str
    source: str
    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    image_refs: list[tuple | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, id_: str, path: str, caption: str | None, ref: tuple | None) -> None:
        self.ids.append(id_)
        self.paths.append(path)
        self.captions.append(caption)
        self.image_refs.append(ref)

    def check(self) -> SampleTable:
        if not self.ids:
            raise InputError(f"--input {self.source!r}: no samples found ({self.kind})")
        seen: set[str] = set()
        for i in self.ids:
            if i in seen:
                raise InputError(f"--input {self.source!r}: sample id {i!r} occurs more than once; ids must be unique")
            seen.add(i)
        return self


def list_samples(
    src: str, *, caption_col: str | None = None, image_col: str | None = None, id_col: str | None = None
) -> SampleTable:
    """The SampleTable of `src` (a folder of images, a folder of .tar shards, a .tar, .parquet or .csv file)."""
    if not os.path.exists(src):
        raise InputError(f"--input {src!r} does not exist")
    if os.path.isdir(src):
        tars = sorted(f for f in os.listdir(src) if f.endswith(".tar"))
        if tars:
            return _list_tars(src, [os.path.join(src, t) for t in tars]).check()
        return _list_folder(src).check()
    low = src.lower()
    if low.endswith(".tar"):
        return _list_tars(src, [src]).check()
    if low.endswith((".parquet", ".csv")):
        return _list_table(src, caption_col, image_col, id_col).check()
    raise InputError(f"--input {src!r}: expected a folder, a .tar shard, a .parquet or a .csv file")


def _list_folder(root: str) -> SampleTable:
    table = SampleTable("folder", root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_EXTS):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            txt = os.path.splitext(path)[0] + ".txt"
            caption = _read_text(txt) if os.path.isfile(txt) else None
            table.add(rel, rel, caption, ("file", path))
    table_order = sorted(range(len(table.ids)), key=lambda i: table.ids[i])  # os.walk order is per folder
    for name in ("ids", "paths", "captions", "image_refs"):
        col = getattr(table, name)
        setattr(table, name, [col[i] for i in table_order])
    return table


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def _list_tars(src: str, tars: list[str]) -> SampleTable:
    table = SampleTable("webdataset", src)
    for tar_path in tars:
        base = os.path.basename(tar_path)
        try:
            tf = tarfile.open(tar_path, "r:")  # uncompressed: images are read by offset in the workers
        except (tarfile.TarError, OSError) as e:
            raise InputError(f"--input: {tar_path!r} is not a readable uncompressed tar ({e})") from None
        groups: dict[str, dict] = {}
        order: list[str] = []
        with tf:
            for m in tf:
                if not m.isfile():
                    continue
                folder, member = posixpath.split(m.name)  # WebDataset key: the path up to the basename's first dot
                stem, dot, ext = member.partition(".")
                if not dot or not stem:
                    continue
                key = stem if folder in ("", ".") else posixpath.join(folder.removeprefix("./"), stem)
                ext = "." + ext.lower()  # WebDataset field, e.g. ".jpg", ".seg.jpg": images match on the last part
                g = groups.get(key)
                if g is None:
                    g = groups[key] = {}
                    order.append(key)
                if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTS and "image" not in g:
                    g["image"] = ("tar", tar_path, m.offset_data, m.size)
                    g["name"] = m.name
                elif ext == ".txt":
                    g["caption"] = tf.extractfile(m).read().decode("utf-8", errors="replace").strip()
        for key in order:
            g = groups[key]
            if "image" not in g and "caption" not in g:
                continue  # only a .json: nothing to embed
            table.add(key, f"{base}/{g.get('name', key)}", g.get("caption"), g.get("image"))
    return table


def _pick(cols: list[str], given: str | None, defaults: tuple[str, ...], flag: str, src: str) -> str | None:
    if given is not None:
        if given not in cols:
            raise InputError(f"{flag} {given!r} is not a column of {src!r} (columns: {', '.join(cols)})")
        return given
    return next((c for c in defaults if c in cols), None)


def _list_table(src: str, caption_col, image_col, id_col) -> SampleTable:
    if src.lower().endswith(".csv"):
        with open(src, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        cols = list(rows[0].keys()) if rows else []
        data = {c: [r[c] for r in rows] for c in cols}
    else:
        pq = _pyarrow_parquet()
        t = pq.read_table(src)
        cols = t.column_names
        data = {c: t.column(c).to_pylist() for c in cols}
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
        caption = None if caption is None else str(caption)
        ref, path = None, ""
        if img:
            v = data[img][r]
            if isinstance(v, dict):  # HF datasets Image feature
                v = v.get("bytes") or v.get("path")
            if isinstance(v, (bytes, bytearray)):
                ref, path = ("bytes", bytes(v)), f"{os.path.basename(src)}[{r}]"
            elif isinstance(v, str) and v:
                ref, path = ("file", v if os.path.isabs(v) else os.path.join(root, v)), v
        table.add(id_, path, caption, ref)
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


def read_image_bytes(ref: tuple) -> bytes:
    kind = ref[0]
    if kind == "file":
        with open(ref[1], "rb") as f:
            return f.read()
    if kind == "tar":
        with open(ref[1], "rb") as f:
            f.seek(ref[2])
            data = f.read(ref[3])
        if len(data) != ref[3]:
            raise OSError(f"tar member truncated: {len(data)} of {ref[3]} bytes")
        return data
    return ref[1]


def decode_image(ref: tuple):
    """The PIL image of a reference, fully decoded (a corrupt or truncated file raises here, in the worker)."""
    from PIL import Image

    img = Image.open(io.BytesIO(read_image_bytes(ref)))
    img.load()
    return img
