"""The ONNX Runtime backend of `fastenc.optimize` (backend="onnxruntime"; the public names are in fastenc.runtime).

fastenc.optimize(model, backend="onnxruntime") returns the fused model (torch backend) of a subclass whose forward
runs the exported graph when the call is one the graph computes, and the fused torch path otherwise, recorded as a
fall-back. Export happens on the first call ORT can serve, into a cache folder keyed by the weights' fingerprint
(fastenc/core/fingerprint.py), the export options and the versions; weight edits after that are noticed (see
OrtState.current) and re-export. A cached file is trusted only if it proves it is this model's (see trust):
`model.onnx.sha256` (written after the export is complete) matches its bytes, and its metadata holds the weights'
fingerprint, the export options and fastenc's version; anything else is set aside with a CacheWarning and exported
again. The folder is flock()ed while one process checks / exports it. Every export written there is announced
(CacheWarning: paths and sizes).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import operator
import os
import threading
import warnings
from pathlib import Path

import torch

from ..core.errors import BackendUnavailableError, FastencError, InputError
from ..core.files import ENV_CACHE, atomic_write_bytes, cache_dir, file_digest, human_bytes
from ..core.fingerprint import INT_OF_SIZE, weights_fingerprint
from ..core.trace import fall_back, record
from ..models._base import structure_generation
from .engines import Encoder, check_not_empty, check_token_ids, load


def _tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen, out = set(), []
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


_SAMPLE = 64  # evenly spaced values per weight compared on every call (see OrtState.current)


def _pointer_key(tensors) -> tuple:
    """Per tensor what an in-place edit or a `.data` replacement changes: data pointer (storage and offset), version
    counter, strides, shape and dtype (`p.data = p.data.t()` keeps the pointer and the version; the device is
    checked on every call by why_not_ort)."""
    ts = [t for _, t in tensors]
    try:
        versions = tuple(map(_VERSION, ts))
    except RuntimeError:  # inference tensors keep no version counter
        versions = tuple(-1 if t.is_inference() else t._version for t in ts)
    return (*map(_PTR, ts), *versions, *map(_STRIDE, ts), *map(_SHAPE, ts), *map(_DTYPE, ts))


_PTR, _STRIDE, _SHAPE = torch.Tensor.data_ptr, torch.Tensor.stride, torch.Tensor.size
_VERSION, _DTYPE = operator.attrgetter("_version"), operator.attrgetter("dtype")


def _sample_views(tensors) -> list:
    """Per CPU weight, a numpy view of its memory as it is laid out now (no copy; strided weights too) and the
    indices of _SAMPLE evenly spaced values, read as raw integers so the comparison is exact and NaN-safe."""
    import numpy as np

    views = []
    for _, t in tensors:
        a = t.detach()
        as_int = INT_OF_SIZE.get(a.element_size())
        if a.device.type != "cpu" or a.numel() == 0 or as_int is None or a.is_complex():
            continue
        arr = (a.reshape(1) if a.dim() == 0 else a).view(as_int).numpy()  # same shape and strides as the weight
        n = a.numel()
        idx = np.unravel_index(np.arange(0, n, max(1, n // _SAMPLE)), arr.shape)
        views.append((arr, idx))
    return views


def _sample(views) -> bytes:
    return b"".join(arr[idx].tobytes() for arr, idx in views)


class CacheWarning(UserWarning):
    """fastenc wrote a file into its cache (announced once, with its path and size), or set aside a cached file that
    failed its checks (another model's export, a truncated or edited file) and exports it again."""


DIGEST_SUFFIX = ".sha256"


def _cached_files(file: Path) -> list[Path]:
    """The files of one cached export: the model, its external data if any."""
    data = file.with_name(file.name + ".data")
    return [file, data] if data.exists() else [file]


def write_digest(file: Path) -> Path:
    """Write `<file>.sha256` (sha256sum's format: one "<hex>  <name>" line per file of the export), atomically, after
    the export is complete: a cached export without it (an export killed before it) is never trusted."""
    side = file.with_name(file.name + DIGEST_SUFFIX)
    text = "".join(f"{file_digest(f)}  {f.name}\n" for f in _cached_files(file))
    atomic_write_bytes(side, text.encode())
    return side


def check_digest(file: Path) -> str | None:
    """None when every file of the export matches `<file>.sha256`; else why not."""
    side = file.with_name(file.name + DIGEST_SUFFIX)
    if not side.is_file():
        return f"it has no {side.name} (an export that did not finish, or a file fastenc did not write)"
    try:
        listed = dict(reversed(line.split("  ", 1)) for line in side.read_text().splitlines() if line)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"its {side.name} cannot be read ({type(e).__name__}: {e})"
    for f in _cached_files(file):
        if f.name not in listed:
            return f"{f.name} is not in its {side.name}"
        got = file_digest(f)
        if got != listed[f.name]:
            want = listed[f.name]
            return f"{f.name}'s sha256 is {got[:16]}…, its {side.name} says {want[:16]}… (truncated or changed)"
    return None


def announce_write(files: list[Path], what: str) -> None:
    """Say once, with paths and sizes, that fastenc wrote `files` outside the user's named outputs (a CacheWarning)."""
    listed = ", ".join(f"{f} ({human_bytes(f.stat().st_size)})" for f in files if f.exists())
    warnings.warn(f"fastenc: wrote {what} into the cache (${ENV_CACHE} moves it): {listed}", CacheWarning, stacklevel=2)


def _options_key(parts: dict) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=12).hexdigest()


class OrtState:
    """The ONNX Runtime half of a model optimized with backend="onnxruntime": export options, the current encoder and
    the weight key it was exported from. Shared by nothing (re-optimizing makes a new one)."""

    def __init__(self, *, explicit: bool, strict: bool, quantize: str | None, threads: int | None):
        self.explicit, self.strict, self.quantize, self.threads = explicit, strict, quantize, threads
        self.encoder: Encoder | None = None
        self.key = None  # (pointer key, sample) of the weights the encoder was exported from
        self.fingerprint: str | None = None
        self.failed: str | None = None  # export error: later calls run torch without retrying (until refresh())
        self.exports = 0  # graphs exported by this model (cache misses)
        self.lock = threading.Lock()

    def __getstate__(self):
        state = dict.fromkeys(("encoder", "key", "fingerprint", "failed", "_tensors"))
        return {**state, "explicit": self.explicit, "strict": self.strict, "quantize": self.quantize,
                "threads": self.threads, "exports": 0}  # fmt: skip

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def tensors(self, model) -> list[tuple[str, torch.Tensor]]:
        """The model's parameters and buffers, walked again only when something was registered somewhere."""
        generation = structure_generation()
        cached = getattr(self, "_tensors", None)
        if cached is None or cached[0] != generation:
            cached = self._tensors = (generation, _tensors(model))
        return cached[1]

    def export_options(self, model, fingerprint: str) -> dict:
        """Everything the cached graph depends on: the class, the weights' fingerprint, the export options and the
        versions. Hashed into the cache key and stored in the file's metadata (checked before a session is built)."""
        import onnx
        import onnxruntime
        import transformers

        from .._version import __version__
        from ..export.quantize import int8_cache_token

        return {"class": model._fastenc_base.__name__, "weights": fingerprint,
                "quantize": int8_cache_token(self.quantize), "mask": self._mask(model), "opset": 18, "nested": True,
                "dtype": "float32", "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
                "fastenc": __version__}  # fmt: skip

    def cache_key(self, model, fingerprint: str) -> str:
        """The cache folder's key: a blake2b of export_options."""
        return _options_key(self.export_options(model, fingerprint))

    @staticmethod
    def _mask(model) -> bool | None:
        """Text towers export the mask as an input (padded batches give transformers' masked result); the joint
        CLIPModel has it already; vision towers have none."""
        from ..export.towers import OPTIMUM_MASK, _classes

        kind = _classes().get(model._fastenc_base)
        return True if kind in OPTIMUM_MASK else None

    def current(self, model) -> Encoder:
        """The encoder for the model's weights as they are now: exported (or found in the cache) on first use and
        again after any weight change. A change is seen by parameter identity, data pointer, version counter (every
        in-place op outside `.data`, optimizers' foreach steps, load_state_dict, assign, .to), shape, strides, storage
        offset, dtype and device (`p.data = ...`, `p.data = p.data.t()`) and by 64 evenly spaced values of every
        weight (`.data` edits, fused optimizers). An edit that keeps all of those (a few values of a large weight
        through `.data`) is not seen: call `fastenc.runtime.refresh(model)` after such edits."""
        key = self.key
        tensors = self.tensors(model)
        if self.encoder is not None and key is not None and key[0] is tensors:
            if _pointer_key(tensors) == key[2] and _sample(key[1]) == key[3]:
                return self.encoder
        if self.encoder is not None and key is not None and [id(t) for _, t in tensors] == [id(t) for _, t in key[0]]:
            if _pointer_key(tensors) == key[2] and _sample(key[1]) == key[3]:  # re-walked: the same tensors
                self.key = (tensors, *key[1:])
                return self.encoder
        with self.lock:
            views = _sample_views(tensors)
            pointers, sample = _pointer_key(tensors), _sample(views)
            fingerprint = weights_fingerprint(model)
            if self.encoder is None or fingerprint != self.fingerprint:
                self.encoder = self._load(model, fingerprint)
                self.fingerprint = fingerprint
            self.key = (tensors, views, pointers, sample)
            return self.encoder

    def _load(self, model, fingerprint: str) -> Encoder:
        """The encoder of this model's export: the cached file if it proves it is this model's (its digest file
        matches every byte, and its metadata holds this model's class, weights' fingerprint, export options and
        fastenc version), else a new export (a rejected file is replaced, with a CacheWarning saying why)."""
        from ..export import export_onnx
        from ..export.towers import _classes

        nested = _classes().get(model._fastenc_base) in ("clip", "siglip")  # complete CLIPOutput / SiglipOutput
        parts = self.export_options(model, fingerprint)
        key = _options_key(parts)
        folder = cache_dir() / "onnx" / f"{model._fastenc_base.__name__}-{key}"
        file = folder / "model.onnx"
        own = {"fastenc.weights": fingerprint, "fastenc.export_options": json.dumps(parts, sort_keys=True),
               "fastenc.cache_key": key}  # fmt: skip
        expected = {"fastenc.class": model._fastenc_base.__name__, "fastenc.version": parts["fastenc"], **own}
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):  # another process exporting this key finishes (model, then digest) before we look
            why = trust(file, expected)
            if why is None:
                try:
                    return load(file, "cpu", threads=self.threads)
                except InputError as e:  # passed its checks, yet ORT cannot build a session on it
                    why = str(e)
            side = file.with_name(file.name + DIGEST_SUFFIX)
            if why != "absent":
                name = model._fastenc_base.__name__
                warnings.warn(f"fastenc: the cached ONNX export {file} is not trusted for this {name} ({why}); "
                              "exporting it again", CacheWarning, stacklevel=4)  # fmt: skip
                for f in (side, *_cached_files(file)):
                    f.unlink(missing_ok=True)
            with torch.inference_mode(False):
                report = export_onnx(model, file, attention_mask=self._mask(model), quantize=self.quantize,
                                     nested_outputs=nested, metadata=own)  # fmt: skip
            written = [Path(f) for f in report.files]
            written.append(write_digest(file))
            self.exports += 1
            record("onnxruntime", "export")
            announce_write(written, f"the ONNX export of this {model._fastenc_base.__name__}")
            # no optimized_model_cache here: a graph optimised at level "all" may hold CPU-specific layouts, and the
            # cache folder may be shared between machines; the session is built once per optimized model anyway
            return load(file, "cpu", threads=self.threads)


def trust(file: Path, expected: dict) -> str | None:
    """None when the cached export `file` proves it is the one `expected` describes: its digest file matches every
    byte of it (and of its external data), and its metadata holds each expected entry (class, weights' fingerprint,
    export options, fastenc version). Else why not; "absent" when there is nothing there."""
    from ..export.onnx_export import read_metadata

    side = file.with_name(file.name + DIGEST_SUFFIX)
    if not file.exists() and not side.exists():
        return "absent"
    why = check_digest(file) if file.is_file() else f"{file.name} is missing"
    if why is None:
        try:
            why = _metadata_mismatch(read_metadata(file), expected)
        except InputError as e:
            why = str(e)
    return why


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive flock on the cache folder itself (no lock file is written): the check, export and digest of one
    cache key run in one process at a time. Where flock is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock: unlocked, as on Windows
            pass
        yield
    finally:
        os.close(fd)


def _metadata_mismatch(meta: dict, expected: dict) -> str | None:
    for k, want in expected.items():
        got = meta.get(k)
        if got != want:
            if k == "fastenc.export_options" and got:
                try:
                    a, b = json.loads(got), json.loads(want)
                    diff = sorted(x for x in set(a) | set(b) if a.get(x) != b.get(x))
                    return f"it was exported with other options: {', '.join(f'{x}={a.get(x)!r}' for x in diff)}"
                except (ValueError, AttributeError):
                    pass
            shown = got if got is None or len(got) <= 40 else got[:40] + "…"
            return f"its metadata {k} is {shown!r}, this model's is {want[:40]!r}"
    return None


def refresh(model) -> None:
    """Make a model optimized with backend="onnxruntime" re-read its weights on the next call (after edits that the
    per-call check cannot see; see OrtState.current), and try ONNX Runtime again after a failed export (once its
    cause, a full disk or an unwritable cache folder, is gone)."""
    state = getattr(model, "_fastenc_ort", None)
    if state is None:
        raise InputError("refresh: model was not optimized with backend='onnxruntime'")
    state.key = None
    state.failed = None


def why_not_ort(model, bound: dict) -> str | None:
    """None if the exported graph computes this call (CPU tensors, eval mode, no autograd, fp32 weights, only the
    graph's inputs, no attentions / hidden states / loss); else the reason, for the fall-back record."""
    state = model._fastenc_ort
    if state.failed:
        return state.failed
    if model.training:
        return "the model is in training mode (the graph has no dropout)"
    tensors = [v for v in bound.values() if isinstance(v, torch.Tensor)]
    weights = [t for _, t in state.tensors(model)]
    if torch.is_grad_enabled() and (any(t.requires_grad for t in tensors) or any(w.requires_grad for w in weights)):
        return "autograd is recording (call under torch.no_grad() or torch.inference_mode())"
    if any(t.device.type != "cpu" for t in tensors):
        return "inputs are not on the CPU (optimize's ONNX Runtime backend runs on the CPU provider)"
    if any(w.device.type != "cpu" for w in weights):
        return "the weights are not on the CPU (optimize's ONNX Runtime backend runs on the CPU provider)"
    dtypes = {w.dtype for w in weights if w.is_floating_point()}
    if dtypes != {torch.float32}:
        return f"ONNX Runtime runs fp32 models here; the weights are {sorted(map(str, dtypes))}"
    cfg = model.config
    for opt in ("output_attentions", "output_hidden_states"):
        value = bound.get(opt)
        if value or (value is None and getattr(cfg, opt, False)):
            return f"{opt} is not in the exported graph"
    if bound.get("return_loss"):
        return "return_loss is not in the exported graph"
    from ..export.towers import OPTIMUM_MASK, _classes

    kind = _classes().get(model._fastenc_base)
    if kind is None:
        return f"fastenc.export has no ONNX export for {model._fastenc_base.__name__}"
    graph_inputs = {"input_ids", "pixel_values"} | ({"attention_mask"} if kind in OPTIMUM_MASK else set())
    for name, value in bound.items():
        if name in graph_inputs or name in ("return_dict", "output_attentions", "output_hidden_states", "return_loss"):
            continue
        if value is not None and value is not False:
            return f"argument {name!r} is not an input of the exported graph"
    needed = {"input_ids", "pixel_values"} & graph_inputs
    if kind in ("clip", "siglip"):
        if not needed <= {k for k, v in bound.items() if v is not None}:
            return "the joint graph needs both input_ids and pixel_values"
    elif not any(bound.get(n) is not None for n in needed):
        return "no input the graph takes was given"
    ids = bound.get("input_ids")
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point:
            return "input_ids are not integers"
        text = getattr(cfg, "text_config", cfg)
        top = getattr(text, "max_position_embeddings", None) if kind != "t5" else None
        if top and ids.shape[-1] > top:
            return f"sequence {ids.shape[-1]} is longer than the model's {top} positions"
        if ids.dim() != 2:
            return f"input_ids must be (batch, sequence), got shape {tuple(ids.shape)}"
    px = bound.get("pixel_values")
    if isinstance(px, torch.Tensor) and px.dtype != torch.float32:
        return f"pixel_values are {px.dtype}; the graph takes float32"
    return None


def check_ort_call(model, bound: dict) -> None:
    """The inputs transformers raises on, as InputError, for a call ONNX Runtime serves: an empty batch or sequence,
    token ids outside [0, vocab) (ONNX's Gather would read row vocab + id for a negative id)."""
    name = model._fastenc_base.__name__
    for arg in ("input_ids", "attention_mask", "pixel_values"):
        t = bound.get(arg)
        if isinstance(t, torch.Tensor):
            check_not_empty(arg, t, name)
    ids = bound.get("input_ids")
    if isinstance(ids, torch.Tensor):
        from ..export.onnx_export import token_rows
        from ..export.towers import _classes

        check_token_ids(ids, token_rows(model, _classes().get(model._fastenc_base, "")), name)


_ORT_CLASSES: dict[type, type] = {}


def ort_class(fused: type, base: type) -> type:
    """A subclass of the fused class whose forward runs the exported graph through ONNX Runtime when it can (see
    why_not_ort) and the fused torch path otherwise, with a fall-back record."""
    cls = _ORT_CLASSES.get(fused)
    if cls is not None:
        return cls
    sig = inspect.signature(base.forward)

    def forward(self, *args, **kwargs):
        try:
            bound = sig.bind(self, *args, **kwargs).arguments
        except TypeError as e:
            raise InputError(f"{base.__name__}.forward: {e}") from e
        bound.pop("self", None)
        extra = bound.pop("kwargs", None) or {}
        bound.update(extra)
        state = self._fastenc_ort
        why = why_not_ort(self, bound)
        if why is None:
            if state.encoder is None:  # bad input raises, as in transformers, before the first export; once an
                check_ort_call(self, bound)  # encoder exists, its bind makes the same checks against the export's bound
            try:
                encoder = state.current(self)
            except Exception as e:  # noqa: BLE001 - any export / session failure: reported, then torch runs
                failed = f"the ONNX export failed ({type(e).__name__}: {e})"
                if state.strict and isinstance(e, FastencError):
                    raise
                if state.strict:
                    raise BackendUnavailableError(f"{base.__name__}: {failed}; strict=True forbids falling back to "
                                                  "torch (fastenc.runtime.refresh(model) retries)") from e  # fmt: skip
                state.failed = failed + "; fastenc.runtime.refresh(model) retries"
                why = state.failed
            else:
                record("onnxruntime", "forward")
                feed = {k: v for k, v in bound.items() if k in ("input_ids", "attention_mask", "pixel_values")}
                return encoder(return_dict=bound.get("return_dict", None), **feed)
        fall_back("forward", "onnxruntime", "torch", why, strict=state.strict and state.explicit)
        return fused.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(fused.forward)
    forward.__doc__ = fused.forward.__doc__
    ns = {"__module__": __name__, "__qualname__": f"{fused.__name__}OnnxRuntime", "forward": forward}
    cls = type(f"{fused.__name__}OnnxRuntime", (fused,), ns)
    _ORT_CLASSES[fused] = cls
    return cls
