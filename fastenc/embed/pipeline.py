"""`fastenc embed` on one machine: a DataLoader whose workers read, decode, preprocess and tokenize whole model
batches (pinned), the optimized model at a fixed batch (CUDA graphs on CUDA), shards written as they complete.

    from fastenc.embed import EmbedConfig, embed
    report = embed(EmbedConfig(model="ckpt/", input="images/", out="emb/", tower="image"))

Overlap: workers prepare up to `prefetch` batches ahead; the host copies a pinned batch with non_blocking=True,
launches the model, and only then waits for the previous batch's embeddings (copied device -> pinned host
asynchronously), so reading, decoding, the model and writing run at the same time. `report.model_s` is the time
the model itself ran (CUDA events around each batch on CUDA), so model_s / wall_s is the accelerator's busy share.
A sample that cannot be read, decoded or tokenized (or has no caption for the text tower) is recorded with its
error in the shard's metadata and errors.jsonl and skipped; it never stops the run.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError, UnsupportedModelError
from .reader import ImagePreprocessor, SampleTable, decode_image, list_samples
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
    progress: bool = True

    def check(self) -> None:
        if self.tower not in TOWERS:
            raise InputError(f"--tower must be one of {', '.join(TOWERS)}, got {self.tower!r}")
        for name in ("batch", "shard_size", "prefetch"):
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


@dataclass
class EmbedReport:
    samples: int = 0
    rows: int = 0
    errors: int = 0
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
        return (
            f"{self.rows} embeddings of {self.samples} samples in {self.shards} shards ({self.shards_skipped} already "
            f"done), {self.errors} failed samples; this run: {self.samples_run} samples in {self.wall_s:.1f} s = "
            f"{self.samples_per_s:.1f} samples/s on {self.device}{busy} -> {self.out}"
        )


# ---------------------------------------------------------------------------------------------- sample -> arrays


class SampleSource:
    """Everything a worker needs to turn sample indices into one model batch; plain data, pickled to workers and
    Ray actors (the tokenizer is loaded lazily in each process)."""

    def __init__(self, table: SampleTable, towers: tuple[str, ...], model_dir: str, batch: int, preprocess, text_len):
        self.table, self.towers, self.model_dir, self.batch = table, towers, model_dir, batch
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
                if "text" in self.towers:
                    cap = self.table.captions[i]
                    if cap is None:
                        raise ValueError("no caption")
                if "image" in self.towers:
                    ref = self.table.image_refs[i]
                    if ref is None:
                        raise ValueError("no image")
                    px = self.preprocess.geometry(decode_image(ref))
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


def checkpoint_digest(model_dir: str) -> str:
    """sha256 of config.json plus the names and sizes of the weight files (cheap; recorded in run.json)."""
    h = hashlib.sha256()
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{os.path.getsize(os.path.join(model_dir, name))}".encode())
    return h.hexdigest()[:16]


def text_length(config) -> int:
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
        model = load_checkpoint(model_dir)
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


def _features(out):
    return getattr(out, "pooler_output", out)


def to_host(t, n: int) -> np.ndarray:
    """First n rows of a (B, dim) device tensor as float32 numpy (synchronizes on that tensor only)."""
    return t[:n].float().cpu().numpy()


# --------------------------------------------------------------------------------------------- shard assembly


class ShardAssembler:
    """Collects finished batches (in order) per shard and writes each shard when its last batch is in."""

    def __init__(self, writer: ShardWriter, table: SampleTable, shards: list[Shard], towers, dims: dict):
        self.writer, self.table, self.towers, self.dims = writer, table, towers, dims
        self.left = {s.index: len(s.batches()) for s in shards}
        self.by_index = {s.index: s for s in shards}
        self.acc: dict[int, dict] = {}

    def add(self, shard: int, index: np.ndarray, n: int, errors: dict, emb: dict[str, np.ndarray]) -> bool:
        a = self.acc.setdefault(shard, {"ok": [], "errors": {}, **{t: [] for t in self.towers}})
        a["ok"].extend(int(i) for i in index[:n])
        a["errors"].update({int(k): v for k, v in errors.items()})
        for t in self.towers:
            a[t].append(np.asarray(emb[t][:n], dtype=np.float32) if n else np.zeros((0, self.dims[t]), np.float32))
        self.left[shard] -= 1
        if self.left[shard]:
            return False
        del self.acc[shard]
        emb_all = {t: np.concatenate(a[t]) if a[t] else np.zeros((0, self.dims[t]), np.float32) for t in self.towers}
        self.writer.write(self.by_index[shard], self.table, np.array(a["ok"], dtype=np.int64), a["errors"], emb_all)
        return True


# ------------------------------------------------------------------------------------------------- the run


def prepare_run(cfg: EmbedConfig, model_on_cuda: bool):
    """Checks, the sample table, the shard plan, the writer and run.json: what the local and Ray runs share.
    run.json records the dtype the model runs in (cfg.dtype, else fp16 on CUDA / fp32 on CPU), so resuming a GPU
    run on a CPU machine without --dtype is refused instead of mixing fp16 and fp32 results."""
    from transformers import AutoConfig

    from .._cli_common import check_checkpoint_dir

    cfg.check()
    check_checkpoint_dir(cfg.model)
    towers = TOWERS[cfg.tower]
    model_config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    table = list_samples(cfg.input, caption_col=cfg.caption_col, image_col=cfg.image_col, id_col=cfg.id_col)
    pre = ImagePreprocessor.from_checkpoint(cfg.model, model_config) if "image" in towers else None
    if pre is not None:
        pre.out_hw  # noqa: B018 - raises for settings that give unbatchable sizes
    tlen = text_length(model_config) if "text" in towers else None
    source = SampleSource(table, towers, cfg.model, cfg.batch, pre, tlen)
    run = {
        "model": os.path.abspath(cfg.model),
        "model_digest": checkpoint_digest(cfg.model),
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
    }
    writer = ShardWriter(cfg.out, towers, cfg.store, cfg.format)
    writer.start(run)
    shards = plan(len(table), cfg.shard_size, cfg.batch)
    todo = [s for s in shards if not writer.done(s)]
    return source, run, writer, shards, todo


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
        asm.add(shard, prepared["index"].numpy(), prepared["n"], prepared["errors"], emb)
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
    manifest = writer.finish(run, shards)
    report.rows, report.errors = manifest["rows"], manifest["errors"]
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
