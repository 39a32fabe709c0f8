"""`fastenc embed` on one machine: a DataLoader whose workers read, decode, preprocess and tokenize whole model
batches (pinned), the optimized model at a fixed batch (CUDA graphs on CUDA), shards written as they complete.

    from fastenc.embed import EmbedConfig, embed
    report = embed(EmbedConfig(model="ckpt/", input="images/", out="emb/", tower="image"))

Overlap: workers prepare up to `prefetch` batches ahead; the host copies a pinned batch with non_blocking=True,
launches the model, and only then waits for the previous batch's embeddings (copied device -> pinned host
asynchronously), so reading, decoding, the model and writing run at the same time. `report.model_s` is the time
the model itself ran (CUDA events around each batch on CUDA), so model_s / wall_s is the accelerator's busy share.
A sample that cannot be read, decoded or tokenized (or has no caption for the text tower), and one whose embedding
is not finite in the stored dtype, is recorded with its error in the shard's metadata and errors.jsonl and skipped;
it never stops the run. A resume is refused, never mixed, when the checkpoint's files (their contents: a streamed
digest, cached by file identity) or a finished shard's input members changed since the run started.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..core.errors import InputError, UnsupportedModelError
from ..core.files import atomic_write_bytes, file_digest
from .reader import (
    IMAGE_KEYS,
    MAX_IMAGE_BYTES,
    ImagePreprocessor,
    SampleTable,
    decode_image,
    list_samples,
    parse_image_keys,
)
from .shards import Shard, ShardWriter, plan

_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")
MAX_LOGGED = 20  # failed samples printed as they happen; errors.jsonl lists them all
TOWERS = {"image": ("image",), "text": ("text",), "both": ("image", "text")}


@dataclass
class EmbedConfig:
    model: str
    input: str
    out: str
    tower: str = "image"  # image | text | both
    batch: int = 256
    shard_size: int = 10000
    dtype: str | None = None  # fp16 | bf16 | fp32; None: fp16 on CUDA, fp32 on CPU
    store: str = "fp16"  # dtype of the stored embeddings: fp16 | fp32
    format: str = "npy"  # npy | parquet
    backend: str = "auto"
    device: str | None = None
    workers: int | None = None  # loader worker processes; None: min(8, cpus - 1)
    prefetch: int = 4  # batches each worker prepares ahead
    cuda_graphs: bool = True
    caption_col: str | None = None
    image_col: str | None = None
    id_col: str | None = None
    image_key: str = IMAGE_KEYS  # WebDataset image fields in order of preference
    max_image_bytes: int = MAX_IMAGE_BYTES  # no image file is read past this many bytes
    progress: bool = True

    def check(self) -> None:
        if self.tower not in TOWERS:
            raise InputError(f"--tower must be one of {', '.join(TOWERS)}, got {self.tower!r}")
        for name in ("batch", "shard_size", "prefetch", "max_image_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"--workers must be >= 0, got {self.workers}")
        if self.dtype not in (None, "fp16", "bf16", "fp32"):
            raise InputError(f"--dtype must be fp16, bf16 or fp32, got {self.dtype!r}")
        if self.store not in ("fp16", "fp32"):
            raise InputError(f"--store must be fp16 or fp32, got {self.store!r}")
        if self.format not in ("npy", "parquet"):
            raise InputError(f"--format must be npy or parquet, got {self.format!r}")
        parse_image_keys(self.image_key)


@dataclass
class EmbedReport:
    samples: int = 0
    rows: int = 0
    errors: int = 0
    warnings: int = 0  # input problems that failed no sample (warnings.jsonl): non-UTF-8 captions, cut tars
    input_cuts: int = 0  # tars cut inside a member or a header
    shards: int = 0
    shards_skipped: int = 0
    samples_run: int = 0  # samples processed by this run (the skipped shards' not counted)
    wall_s: float = 0.0
    model_s: float = 0.0
    device: str = ""
    out: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples_run / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def model_samples_per_s(self) -> float:
        return self.samples_run / self.model_s if self.model_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(samples_per_s=self.samples_per_s, model_samples_per_s=self.model_samples_per_s)
        return d

    def summary(self) -> str:
        busy = f", model busy {100 * self.model_s / self.wall_s:.0f}%" if self.wall_s > 0 and self.model_s > 0 else ""
        warned = ""
        if self.warnings:
            cuts = f", {self.input_cuts} cut tar(s)" if self.input_cuts else ""
            warned = f", {self.warnings} input warnings{cuts} (warnings.jsonl)"
        return (
            f"{self.rows} embeddings of {self.samples} samples in {self.shards} shards ({self.shards_skipped} already "
            f"done), {self.errors} failed samples{warned}; this run: {self.samples_run} samples in "
            f"{self.wall_s:.1f} s = "
            f"{self.samples_per_s:.1f} samples/s on {self.device}{busy} -> {self.out}"
        )


# ---------------------------------------------------------------------------------------------- sample -> arrays


class SampleSource:
    """Everything a worker needs to turn sample indices into one model batch; plain data, pickled to workers and
    Ray actors (the tokenizer is loaded lazily in each process)."""

    def __init__(
        self,
        table: SampleTable,
        towers: tuple[str, ...],
        model_dir: str,
        batch: int,
        preprocess,
        text_len,
        max_bytes: int = MAX_IMAGE_BYTES,
    ):
        self.table, self.towers, self.model_dir, self.batch = table, towers, model_dir, batch
        self.max_bytes = max_bytes
        self.preprocess: ImagePreprocessor | None = preprocess
        self.text_len: int | None = text_len
        # True when the model runs on CUDA: ship resized uint8 and normalize there (4x fewer bytes through shared and
        # pinned memory); on the CPU the workers normalize, so the model's process does not (same values either way)
        self.ship_uint8 = False
        self._tok = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_tok"] = None
        return d

    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            except (OSError, ValueError) as e:
                raise InputError(f"--model {self.model_dir!r}: no tokenizer for the text tower ({e})") from None
        return self._tok

    def prepare(self, start: int, stop: int) -> dict:
        """Samples [start, stop) -> {"index": (B,) int64 (-1 = padding), "n": valid rows, "errors": {index: msg},
        "pixel_values": (B, 3, H, W) float32, or uint8 with ship_uint8 (resized and cropped; rescale / normalize
        then run on the model's device, ImagePreprocessor.normalize_torch), "input_ids" / "attention_mask": (B, L)
        int64}; failed samples are dropped, the batch is padded to B with copies of its first row (rows are
        independent in every tower)."""
        ok, errors, pixels = [], {}, []
        captions = []
        for i in range(start, stop):
            try:
                if i in self.table.errors:  # known when listing: a duplicate key, a cut tar member, ...
                    raise ValueError(self.table.errors[i])
                if "text" in self.towers:
                    cap = self.table.captions[i]
                    if cap is None:
                        raise ValueError("no caption")
                if "image" in self.towers:
                    ref = self.table.image_refs[i]
                    if ref is None:
                        raise ValueError("no image")
                    px = self.preprocess.geometry(decode_image(ref, self.max_bytes))
                    if px.shape[0] != 3 or px.dtype != np.uint8:
                        raise ValueError(f"decoded to {px.shape[0]} channels of {px.dtype}, expected 3 of uint8")
            except Exception as e:  # noqa: BLE001 - any failure of one sample is recorded, never fatal
                errors[i] = _ADDRESS.sub("", f"{type(e).__name__}: {e}")[:500]  # no object addresses: reruns match
                continue
            ok.append(i)
            if "image" in self.towers:
                pixels.append(px)
            if "text" in self.towers:
                captions.append(cap)
        n, B = len(ok), self.batch
        out = {"index": np.array(ok + [-1] * (B - n), dtype=np.int64), "n": n, "errors": errors}
        if "image" in self.towers:
            h, w = self.preprocess.out_hw
            x = np.zeros((B, 3, h, w), dtype=np.uint8)
            if n:
                x[:n] = np.stack(pixels)
                x[n:] = x[0]
            if not self.ship_uint8:
                x = np.stack([self.preprocess.normalize(row) for row in x])
            out["pixel_values"] = x
        if "text" in self.towers:
            enc = self.tokenizer()(
                captions or [""], padding="max_length", max_length=self.text_len, truncation=True, return_tensors="np"
            )
            for key in ("input_ids", "attention_mask"):
                if key in enc:
                    a = np.asarray(enc[key], dtype=np.int64)
                    full = np.repeat(a[:1], B, axis=0)
                    full[: len(a)] = a
                    out[key] = full
        return out


class _BatchDataset:
    """torch Dataset over model batches: item j = SampleSource.prepare of batch j, as torch tensors (pinnable)."""

    def __init__(self, source: SampleSource, batches: list[tuple[int, int, int]]):
        self.source, self.batches = source, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, j):
        import torch

        shard, a, b = self.batches[j]
        d = self.source.prepare(a, b)
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in d.items()} | {"batch": j}


# ------------------------------------------------------------------------------------------------- the model


DIGEST_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".tiktoken")
DIGEST_CACHE = "digests/files.json"  # under fastenc.runtime.cache_dir()
DIGEST_CACHE_ENTRIES = 4096


def checkpoint_digest(model_dir: str) -> str:
    """Digest of a checkpoint folder: the name, size and content hash (blake2b, streamed) of each of its weight,
    config, tokenizer and preprocessor files (top level, suffixes DIGEST_SUFFIXES, sorted by name). Recorded in
    run.json, so a resume after new weights were copied into the same folder is refused. The content hashes are
    cached by file identity (path, size, mtime_ns, ctime_ns, inode) in <fastenc cache>/digests/files.json: a resume
    of an unchanged 20 GB checkpoint re-reads nothing. A cache that does not parse is ignored and rewritten."""
    h = hashlib.sha256(b"fastenc-checkpoint/2\n")
    cache = _DigestCache()
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(DIGEST_SUFFIXES) or name.startswith("."):
            continue
        path = os.path.join(model_dir, name)
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"--model {model_dir!r}: {name!r} is not a regular file (a FIFO, device or socket)")
        h.update(f"{name}:{st.st_size}:{cache.file_hash(path, st)}\n".encode())
    cache.save()
    return h.hexdigest()[:32]


def _file_key(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class _DigestCache:
    """{abspath: {"key": [size, mtime_ns, ctime_ns, inode], "blake2b": hex}} in a small JSON file. An entry is used
    only when its key equals the file's stat now; anything malformed is dropped, never trusted."""

    def __init__(self):
        from ..runtime import cache_dir

        self.path = os.path.join(str(cache_dir()), DIGEST_CACHE)
        self.entries: dict[str, dict] = {}
        self.dirty = False
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            entries = data.get("entries", {}) if isinstance(data, dict) and data.get("version") == 1 else {}
        except (OSError, ValueError, UnicodeDecodeError):
            entries = {}
        for p, e in entries.items() if isinstance(entries, dict) else ():
            if self._valid(e):
                self.entries[p] = e

    @staticmethod
    def _valid(e) -> bool:
        if not isinstance(e, dict) or not isinstance(e.get("blake2b"), str) or len(e["blake2b"]) != 64:
            return False
        key = e.get("key")
        if not isinstance(key, list) or len(key) != 4 or not all(type(k) is int for k in key):
            return False
        return all(c in "0123456789abcdef" for c in e["blake2b"])

    def file_hash(self, path: str, st: os.stat_result) -> str:
        path = os.path.abspath(path)
        key = _file_key(st)
        e = self.entries.get(path)
        if e is not None and e["key"] == key:
            return e["blake2b"]
        digest = hash_file(path)
        self.entries.pop(path, None)
        self.entries[path] = {"key": key, "blake2b": digest}  # insertion order: most recent last
        self.dirty = True
        return digest

    def save(self) -> None:
        """Write the cache atomically (best effort: a read-only or full cache folder only costs re-hashing)."""
        if not self.dirty:
            return
        entries = dict(list(self.entries.items())[-DIGEST_CACHE_ENTRIES:])
        data = (json.dumps({"version": 1, "entries": entries}, indent=0, sort_keys=True) + "\n").encode()
        new = not os.path.exists(self.path)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            atomic_write_bytes(self.path, data)
        except OSError:
            return
        if new:
            print(f"fastenc embed: caching weight-file digests in {self.path} ({len(data)} bytes; "
                  "$FASTENC_CACHE moves it)", file=sys.stderr)  # fmt: skip


def hash_file(path: str) -> str:
    """blake2b-256 of a weight, config or tokenizer file's contents: the checkpoint digest's unit."""
    return file_digest(path, "blake2b")


def text_positions(config) -> int:
    """The text tower's positions (the length every text batch is padded to); 77 when the config has none."""
    text = getattr(config, "text_config", config)
    return int(getattr(text, "max_position_embeddings", 77))


class TowerRunner:
    """The optimized model on one device: run(batch) -> {tower: (B, dim) device tensor} at a fixed batch."""

    def __init__(
        self, model_dir: str, towers, *, device=None, dtype=None, backend="auto", cuda_graphs=True, preprocess=None
    ):
        import torch

        import fastenc

        from .._cli_common import DTYPES, load_checkpoint, parse_device

        self.device = parse_device(device)
        if dtype is None:
            dtype = "fp16" if self.device.type == "cuda" else "fp32"
        self.dtype = getattr(torch, DTYPES[dtype])
        model = _load_model_dir(model_dir, load_checkpoint)
        for t in towers:
            if not hasattr(model, f"get_{t}_features"):
                raise UnsupportedModelError(
                    f"--model {model_dir!r} is a {type(model).__name__}; --tower {t} needs a CLIPModel or SiglipModel "
                    f"checkpoint (get_{t}_features)"
                )
        self.config = model.config
        model = model.to(device=self.device, dtype=self.dtype).eval()
        graphs = cuda_graphs and self.device.type == "cuda"
        self.model = fastenc.optimize(model, backend=backend, cuda_graphs=graphs)
        self.towers = tuple(towers)
        self.preprocess = preprocess  # normalizes uint8 pixel batches on the device
        self.model_s = 0.0
        self._events: list = []

    def run(self, batch: dict) -> dict:
        """Launch the towers on one prepared batch (tensors on the host, pinned or not); returns device tensors."""
        import torch

        dev = self.device
        t0 = time.perf_counter()
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        out = {}
        with torch.inference_mode():
            if "image" in self.towers:
                px = batch["pixel_values"].to(dev, non_blocking=True)
                if px.dtype == torch.uint8:
                    if self.preprocess is None:
                        raise InputError("uint8 pixel_values need the ImagePreprocessor (TowerRunner(preprocess=...))")
                    px = self.preprocess.normalize_torch(px)
                px = px.to(self.dtype)
                out["image"] = _features(self.model.get_image_features(pixel_values=px))
            if "text" in self.towers:
                kw = {k: batch[k].to(dev, non_blocking=True) for k in ("input_ids", "attention_mask") if k in batch}
                out["text"] = _features(self.model.get_text_features(**kw))
        if dev.type == "cuda":
            end.record()
            self._events.append((start, end))
        else:
            self.model_s += time.perf_counter() - t0
        return out

    def warm_up(self, source: SampleSource, batch: int) -> None:
        """One untimed forward of each tower at the run's batch shape (captures the CUDA graphs)."""
        import torch

        fake = {}
        if "image" in self.towers:
            h, w = source.preprocess.out_hw
            fake["pixel_values"] = torch.zeros((batch, 3, h, w), dtype=torch.uint8)
        if "text" in self.towers:
            ids = torch.zeros((batch, source.text_len), dtype=torch.int64)
            fake |= {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.run(fake)
        self.model_seconds()
        self.model_s = 0.0

    def model_seconds(self) -> float:
        """Seconds the model ran so far (CUDA: event pairs, after a synchronize)."""
        if self._events:
            import torch

            torch.cuda.synchronize(self.device)
            self.model_s += sum(s.elapsed_time(e) for s, e in self._events) / 1000
            self._events.clear()
        return self.model_s


def _load_model_dir(model_dir: str, load_checkpoint):
    """load_checkpoint, with a corrupt weight file (safetensors' or torch.load's own errors) as one InputError."""
    import pickle

    bad: tuple = (pickle.UnpicklingError, EOFError)
    try:
        from safetensors import SafetensorError

        bad += (SafetensorError,)
    except ImportError:
        pass
    try:
        return load_checkpoint(model_dir)
    except bad as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--model {model_dir!r}: a weight file is corrupt or truncated ({first})") from None


def _features(out):
    return getattr(out, "pooler_output", out)


def to_host(t, n: int) -> np.ndarray:
    """First n rows of a (B, dim) device tensor as float32 numpy (synchronizes on that tensor only)."""
    return t[:n].float().cpu().numpy()


# --------------------------------------------------------------------------------------------- shard assembly


class ShardAssembler:
    """Collects finished batches (in order) per shard and writes each shard when its last batch is in. A row that is
    not finite in the stored dtype (NaN, inf, or past fp16's range with --store fp16) is refused here: its sample is
    a failed sample (in every tower, so rows stay aligned) and never stored."""

    def __init__(self, writer: ShardWriter, table: SampleTable, shards: list[Shard], towers, dims: dict):
        self.writer, self.table, self.towers, self.dims = writer, table, towers, dims
        self.left = {s.index: len(s.batches()) for s in shards}
        self.by_index = {s.index: s for s in shards}
        self.acc: dict[int, dict] = {}

    def add(self, shard: int, index: np.ndarray, n: int, errors: dict, emb: dict[str, np.ndarray]) -> dict | None:
        """None while the shard is incomplete; once written, the samples refused at write time {index: error}."""
        a = self.acc.setdefault(shard, {"ok": [], "errors": {}, **{t: [] for t in self.towers}})
        a["ok"].extend(int(i) for i in index[:n])
        a["errors"].update({int(k): v for k, v in errors.items()})
        for t in self.towers:
            a[t].append(np.asarray(emb[t][:n], dtype=np.float32) if n else np.zeros((0, self.dims[t]), np.float32))
        self.left[shard] -= 1
        if self.left[shard]:
            return None
        del self.acc[shard]
        ok = np.array(a["ok"], dtype=np.int64)
        emb_all = {t: np.concatenate(a[t]) if a[t] else np.zeros((0, self.dims[t]), np.float32) for t in self.towers}
        refused = nonfinite_rows(ok, emb_all, self.writer.store)
        if refused:
            keep = np.array([int(i) not in refused for i in ok], dtype=bool)
            ok = ok[keep]
            emb_all = {t: x[keep] for t, x in emb_all.items()}
            a["errors"].update(refused)
        self.writer.write(self.by_index[shard], self.table, ok, a["errors"], emb_all)
        return refused


def nonfinite_rows(ok: np.ndarray, emb: dict[str, np.ndarray], store: str) -> dict[int, str]:
    """{sample index: error} of the rows that are not finite once cast to the stored dtype, any tower."""
    dtype = np.float16 if store == "fp16" else np.float32
    out: dict[int, str] = {}
    for t, x in emb.items():
        if not len(x):
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            y = x.astype(dtype)
        bad = ~np.isfinite(y).all(axis=1)
        for r in np.flatnonzero(bad):
            src = x[r]
            nan, inf = int(np.isnan(src).sum()), int(np.isinf(src).sum())
            what = f"{nan} NaN, {inf} inf" if nan or inf else f"past the range of --store {store}: max |x| "
            what += f"{np.abs(src).max():.3g}" if not (nan or inf) else ""
            msg = f"non-finite {t} embedding ({what}); not stored"
            i = int(ok[r])
            out[i] = out[i] + "; " + msg if i in out else msg
    return out


# ------------------------------------------------------------------------------------------------- the run


def prepare_run(cfg: EmbedConfig, model_on_cuda: bool):
    """Checks, the sample table, the shard plan, the writer and run.json: what the local and Ray runs share.
    run.json records the dtype the model runs in (cfg.dtype, else fp16 on CUDA / fp32 on CPU), so resuming a GPU
    run on a CPU machine without --dtype is refused instead of mixing fp16 and fp32 results."""
    from transformers import AutoConfig

    from .._cli_common import check_checkpoint_dir

    cfg.check()
    check_checkpoint_dir(cfg.model)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise InputError(f"--out {cfg.out!r} is a file; expected a folder (created if missing)")
    towers = TOWERS[cfg.tower]
    try:
        model_config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--model {cfg.model!r}: config.json cannot be read ({first})") from None
    digest = checkpoint_digest(cfg.model)
    table = list_samples(cfg.input, caption_col=cfg.caption_col, image_col=cfg.image_col, id_col=cfg.id_col,
                         image_key=cfg.image_key, max_bytes=cfg.max_image_bytes)  # fmt: skip
    pre = ImagePreprocessor.from_checkpoint(cfg.model, model_config) if "image" in towers else None
    if pre is not None:
        pre.out_hw  # noqa: B018 - raises for settings that give unbatchable sizes
    tlen = text_positions(model_config) if "text" in towers else None
    source = SampleSource(table, towers, cfg.model, cfg.batch, pre, tlen, cfg.max_image_bytes)
    if "text" in towers:
        source.tokenizer()  # a missing tokenizer is one error line here, not a traceback out of a loader worker
    run = {
        "model": os.path.abspath(cfg.model),
        "model_digest": digest,
        "input": os.path.abspath(cfg.input),
        "input_kind": table.kind,
        "samples": len(table),
        "tower": cfg.tower,
        "batch": cfg.batch,
        "shard_size": cfg.shard_size,
        "dtype": cfg.dtype or ("fp16" if model_on_cuda else "fp32"),
        "store": cfg.store,
        "format": cfg.format,
        "backend": cfg.backend,
        "preprocess": pre.to_dict() if pre else None,
        "text_length": tlen,
        "max_image_bytes": cfg.max_image_bytes,
    }
    if table.kind == "webdataset":
        run["image_key"] = ";".join(parse_image_keys(cfg.image_key))
    writer = ShardWriter(cfg.out, towers, cfg.store, cfg.format)
    writer.start(run)
    shards = plan(len(table), cfg.shard_size, cfg.batch)
    todo = [s for s in shards if not writer.done(s)]
    writer.verify([s for s in shards if s not in todo], table)  # the finished shards' inputs are unchanged
    log_warnings(table)
    return source, run, writer, shards, todo


def log_warnings(table: SampleTable) -> None:
    """One stderr line per input warning (a cut tar, a caption that is not UTF-8), the first MAX_LOGGED."""
    for n, w in enumerate(table.warnings[:MAX_LOGGED], 1):
        who = f"sample {w['index']} {w['id']!r}: " if w["index"] is not None else ""
        more = " (further warnings: warnings.jsonl)" if n == MAX_LOGGED < len(table.warnings) else ""
        print(f"fastenc embed: warning: {who}{w['path']}: {w['warning']}{more}", file=sys.stderr)


def log_failures(report: EmbedReport, table: SampleTable, errors: dict, bar) -> None:
    """One stderr line per failed sample (id and error), the first MAX_LOGGED of a run; errors.jsonl has them all."""
    for i, msg in sorted(errors.items()):
        report.extra["failed_this_run"] = n = report.extra.get("failed_this_run", 0) + 1
        if n <= MAX_LOGGED:
            more = " (further failures: errors.jsonl)" if n == MAX_LOGGED else ""
            bar.write(f"fastenc embed: skipped sample {i} {table.ids[i]!r}: {msg}{more}", file=sys.stderr)


def _progress(cfg: EmbedConfig, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", unit_scale=True, disable=not cfg.progress, smoothing=0.1, desc="embed")


def embed(cfg: EmbedConfig) -> EmbedReport:
    """Embed every sample of cfg.input into sharded files under cfg.out; resumes a run killed in the same folder."""
    import torch

    t_start = time.perf_counter()
    from .._cli_common import parse_device

    source, run, writer, shards, todo = prepare_run(cfg, parse_device(cfg.device).type == "cuda")
    runner = TowerRunner(
        cfg.model,
        source.towers,
        device=cfg.device,
        dtype=cfg.dtype,
        backend=cfg.backend,
        cuda_graphs=cfg.cuda_graphs,
        preprocess=source.preprocess,
    )
    dims = _dims(runner, source)
    cuda = runner.device.type == "cuda"
    source.ship_uint8 = cuda
    asm = ShardAssembler(writer, source.table, todo, source.towers, dims)
    batches = [(s.index, a, b) for s in todo for a, b in s.batches()]
    workers = cfg.workers if cfg.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    workers = min(workers, len(batches))
    loader = torch.utils.data.DataLoader(
        _BatchDataset(source, batches),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=cfg.prefetch if workers else None,
    )
    report = EmbedReport(
        samples=len(source.table),
        shards=len(shards),
        shards_skipped=len(shards) - len(todo),
        device=str(runner.device),
        out=cfg.out,
    )
    bar = _progress(cfg, sum(b - a for _, a, b in batches))
    pending = None

    def finish(p):
        (shard, a, b), prepared, out = p
        log_failures(report, source.table, prepared["errors"], bar)
        emb = {t: to_host(out[t], prepared["n"]) for t in source.towers} if prepared["n"] else {}
        refused = asm.add(shard, prepared["index"].numpy(), prepared["n"], prepared["errors"], emb)
        if refused:
            log_failures(report, source.table, refused, bar)
        bar.update(b - a)
        report.samples_run += b - a

    if batches and cuda:  # capture the CUDA graphs before the clock starts (the first real batch would pay it)
        runner.warm_up(source, cfg.batch)
    t_loop = time.perf_counter()
    t_first = None
    for prepared in loader:
        spec = batches[prepared["batch"]]
        if t_first is None:  # steady state: from the first batch's arrival (workers started, first decode done)
            t_first, first_n = time.perf_counter(), spec[2] - spec[1]
        out = runner.run(prepared) if prepared["n"] else {}
        if pending is not None:
            finish(pending)
        pending = (spec, prepared, out)
    if pending is not None:
        finish(pending)
    bar.close()
    report.model_s = runner.model_seconds()
    t_end = time.perf_counter()
    report.wall_s = t_end - t_loop
    if t_first is not None and report.samples_run > first_n and t_end > t_first:
        report.extra["steady_samples_per_s"] = (report.samples_run - first_n) / (t_end - t_first)
    manifest = writer.finish(run, shards, source.table)
    report.rows, report.errors = manifest["rows"], manifest["errors"]
    report.warnings, report.input_cuts = manifest["warnings"], manifest["input_cuts"]
    report.extra["total_s"] = time.perf_counter() - t_start
    report.extra["workers"] = workers
    return report


def _dims(runner: TowerRunner, source: SampleSource) -> dict:
    """Embedding width per tower from the model config (a shard whose samples all failed still has a shape)."""
    cfg = runner.config
    proj = getattr(cfg, "projection_dim", None)
    dims = {}
    for t in source.towers:
        sub = getattr(cfg, f"{'vision' if t == 'image' else 'text'}_config", cfg)
        dims[t] = int(proj if proj is not None else getattr(sub, "projection_size", None) or sub.hidden_size)
    return dims
