"""fastenc for diffusers pipelines: `fastenc.optimize(pipe)` swaps every supported encoder component of a
`DiffusionPipeline` (text_encoder, text_encoder_2, text_encoder_3, image_encoder, prior / decoder text encoders) for its
fused tower, in place, sharing weights; denoisers and VAEs are untouched. `PromptCache` caches the encoders' outputs per
prompt, so repeated prompts skip the encoders.

    pipe = fastenc.optimize(pipe, prompt_cache=fastenc.PromptCache(max_entries=512, path="embeds/"))

Nothing here imports diffusers: a pipeline object exists only once the caller imported it.

The cache sits at the encoder call (`text_encoder(input_ids, attention_mask=..., output_hidden_states=...)`), so each
pipeline's own `encode_prompt` (clip_skip, negative prompts, max_sequence_length, num_images_per_prompt, prompt
weighting of `prompt_embeds`) runs unchanged on top of it. One entry is one row of input_ids (one prompt), keyed by

    (weights fingerprint of the encoder, token ids, attention-mask row, output_hidden_states, device, autocast dtype)

where the fingerprint (`weights_fingerprint`, from fastenc/core/fingerprint.py, the same key the ONNX Runtime
backend's export cache uses) covers the encoder's class, config, every parameter's and buffer's name, dtype, device,
shape and content (an integer checksum of its bits) and the state of any PEFT/LoRA layer (active adapters, scaling,
merged). A batch runs the encoder only on its rows that miss, then stores them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from .core.errors import InputError, UnsupportedModelError
from .core.files import TMP_SUFFIX, atomic_write_bytes
from .core.fingerprint import weights_fingerprint
from .core.trace import FallbackWarning


def is_pipeline(obj) -> bool:
    """True for a diffusers DiffusionPipeline (without importing diffusers: such an object implies it is loaded)."""
    diffusers = sys.modules.get("diffusers")
    if diffusers is None:
        return False
    try:
        return isinstance(obj, diffusers.DiffusionPipeline)
    except AttributeError:  # a partly imported or unusual diffusers
        return False


def _is_diffusers_model(module) -> bool:
    diffusers = sys.modules.get("diffusers")
    mixin = getattr(diffusers, "ModelMixin", None) if diffusers is not None else None
    return mixin is not None and isinstance(module, mixin)


def optimize_pipeline(pipe, backend: str = "auto", strict: bool = False, *, cuda_graphs=False, prompt_cache=None):
    """`fastenc.optimize(pipe, ...)` for a DiffusionPipeline: returns `pipe` itself with its encoder components
    swapped (see the module docstring). A torch component that is neither a diffusers model (denoiser, VAE) nor a
    supported encoder is reported with a FallbackWarning, or UnsupportedModelError when strict=True.

    prompt_cache: None (none; an existing one is removed), True (a new `PromptCache()`), or a `PromptCache`
    (shareable between pipelines: its keys carry the weights' fingerprint). The pipeline's cache is
    `pipe._fastenc_prompt_cache`."""
    from ._optimize_model import optimize_model
    from .core.dispatch import check_backend_name
    from .models import FUSED_CLASSES

    backend = check_backend_name(backend)
    if prompt_cache is True:
        prompt_cache = PromptCache()
    elif prompt_cache is False:
        prompt_cache = None
    elif prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise InputError(f"prompt_cache must be None, True or a fastenc.PromptCache, got {type(prompt_cache).__name__}")
    components = pipe.components
    swaps, unsupported = {}, []
    for name, comp in components.items():
        if not isinstance(comp, torch.nn.Module) or _is_diffusers_model(comp):
            continue
        base = getattr(comp, "_fastenc_base", type(comp))
        if base not in FUSED_CLASSES:
            unsupported.append(f"{name} ({type(comp).__name__})")
            continue
        if hasattr(comp, "_hf_hook"):
            raise InputError(
                f"pipeline component {name!r} carries an accelerate hook (enable_model_cpu_offload / "
                "enable_sequential_cpu_offload / device_map): call fastenc.optimize(pipe) before enabling offload"
            )
        swaps[name] = comp
    if unsupported:
        msg = (
            f"fastenc.optimize({type(pipe).__name__}): no fused implementation for {', '.join(unsupported)}; "
            "these components run unchanged"
        )
        if strict:
            raise UnsupportedModelError(msg)
        warnings.warn(msg, FallbackWarning, stacklevel=3)
    originals = pipe.__dict__.setdefault("_fastenc_originals", {})  # name -> (what optimize found, what it set)
    for name, comp in swaps.items():
        _unwrap_cache(comp)
        fast = optimize_model(comp, backend=backend, strict=strict, cuda_graphs=cuda_graphs)
        found, installed = originals.get(name, (None, None))
        # the component an earlier optimize installed keeps that optimize's original; anything else (the caller
        # swapped it: `pipe.text_encoder = other`) is itself what restore_pipeline puts back
        originals[name] = (found if comp is installed else comp, fast)
        if prompt_cache is not None:
            prompt_cache.attach(fast, name)
        _set_component(pipe, name, fast)
    pipe.__dict__["_fastenc_prompt_cache"] = prompt_cache
    pipe.__dict__["_fastenc_components"] = tuple(swaps)
    return pipe


def _set_component(pipe, name: str, module) -> None:
    """pipe.<name> = module, keeping model_index.json's (library, class) entry of the original component, so
    `pipe.save_pretrained` writes a checkpoint plain diffusers loads (fused classes save as their original class)."""
    entry = pipe.config.get(name) if hasattr(pipe, "config") else None
    setattr(pipe, name, module)
    if entry is not None:
        pipe.register_to_config(**{name: tuple(entry)})


def restore_pipeline(pipe):
    """Undo `optimize_pipeline`: put back the components optimize found (their weights were shared, so every change
    made meanwhile is kept). Only a component that still is the fused tower optimize installed is put back: one the
    caller swapped meanwhile (`pipe.text_encoder = other`) stays, and after a re-optimize of a swapped pipeline the
    swap (`other`) is what comes back. Returns pipe."""
    originals = pipe.__dict__.pop("_fastenc_originals", {})
    for name, (found, installed) in originals.items():
        if getattr(pipe, name, None) is installed:
            _set_component(pipe, name, found)
    pipe.__dict__.pop("_fastenc_prompt_cache", None)
    pipe.__dict__.pop("_fastenc_components", None)
    return pipe


# ---------------------------------------------------------------------------------------------------- prompt cache


DEFAULT_MAX_DISK_BYTES = 10 * 2**30  # PromptCache's default bound of its folder
_ENTRY_SUFFIX = ".safetensors"
_STALE_TMP_NS = 3600 * 10**9  # a temporary file this old is a crashed writer's
_RESCAN_EVERY = 64  # writes between two scans of the folder (other processes write to it too)


class PromptCacheWarning(UserWarning):
    """The prompt cache's disk side could not be used as asked (an entry failed its check and was recomputed, the
    folder is not writable or full); the encode itself went on and returned the encoder's own output."""


class PromptCache:
    """Per-prompt cache of encoder outputs, in memory (LRU over at most `max_entries` entries and `max_bytes` bytes of
    tensors, kept on the encoder's device) and optionally on disk (`path`: one safetensors file per prompt and
    encoder, read back on a memory miss, so it survives the process). One entry is one prompt through one encoder;
    a call with output_hidden_states=True (SD / SDXL / SD3 always ask) stores every layer's hidden states, e.g.
    SDXL's OpenCLIP bigG 33 x 77 x 1280 fp16 = 6.5 MB per prompt, CLIP-L 13 x 77 x 768 = 1.5 MB.

    Attach it with `fastenc.optimize(pipe, prompt_cache=cache)` (or `cache.attach(module)` for a single encoder).
    `cache.stats` -> {"hits", "misses", "disk_hits", "bypassed", "entries", "bytes", "fingerprint_s", "disk_bytes",
    "disk_evicted", "disk_rejected", "disk_write_errors"}; `cache.clear()` empties memory (and the folder with
    disk=True). Keys carry the weights' fingerprint, so a changed weight never serves a stale entry (old entries age
    out of the LRU); `check_weights=False` skips the fingerprint (keyed by the parameters' identity instead: faster,
    but in-place weight edits then go unseen).

    The disk side serves only what it wrote: each file records its key and a digest (BLAKE2b) of its metadata and of
    every tensor's name, dtype, shape and bytes, both checked on every read. A file that fails (a flipped byte,
    truncated, garbage, another entry's file under this name) is a miss: it is removed, recomputed and rewritten,
    with one `PromptCacheWarning` per file. Files are written atomically (a unique temporary name, fsync, rename):
    a crash never leaves a partial file under an entry's name. A folder that cannot be written (read-only, full,
    missing) leaves the encode uncached on disk with one warning (again after a write succeeded). The folder is bounded
    by `max_disk_bytes` (default 10 GiB, None: unbounded): least recently used files (by access time, set on every
    read and hit) are removed until it fits; an entry larger than the bound is not written. The bound is enforced by
    this process after its writes (other processes sharing the folder enforce their own).

    Calls the cache cannot key (output_attentions=True, extra positional or keyword arguments, inputs_embeds, a
    module in training mode or autograd recording into its weights) run the encoder and count as `bypassed`."""

    def __init__(
        self,
        max_entries: int = 1024,
        path: str | Path | None = None,
        *,
        max_bytes: int = 2**30,
        max_disk_bytes: int | None = DEFAULT_MAX_DISK_BYTES,
        check_weights: bool = True,
    ):
        for arg, value in (("max_entries", max_entries), ("max_bytes", max_bytes), ("max_disk_bytes", max_disk_bytes)):
            if arg == "max_disk_bytes" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{arg} must be a positive int{' or None' * (arg == 'max_disk_bytes')}, got {value!r}")
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes
        self.nbytes = 0
        if not isinstance(check_weights, bool):
            raise InputError(f"check_weights must be a bool, got {check_weights!r}")
        self.max_entries = max_entries
        self.path = None if path is None else Path(path)
        if self.path is not None:
            if self.path.exists() and not self.path.is_dir():
                raise InputError(f"path {str(self.path)!r} exists and is not a directory")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError:  # read-only or under a file: the first write says so (once) and the cache stays in memory
                pass
        self.check_weights = check_weights
        self._mem: OrderedDict[str, tuple[type, dict]] = OrderedDict()
        self._lock = threading.Lock()
        self._warned: set[str] = set()  # disk files already warned about (one warning per file)
        self._write_warned = False  # a failed write warned; re-armed by the next successful write
        self._disk_bytes: int | None = None  # bytes of entry files in `path` as last scanned, plus this process' writes
        self._writes_since_scan = 0
        self.hits = self.misses = self.disk_hits = self.bypassed = 0
        self.disk_evicted = self.disk_rejected = self.disk_write_errors = 0
        self.fingerprint_s = 0.0

    # -- bookkeeping
    @property
    def stats(self) -> dict:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "disk_hits": self.disk_hits,
            "bypassed": self.bypassed,
            "entries": len(self._mem),
            "bytes": self.nbytes,
            "fingerprint_s": round(self.fingerprint_s, 6),
            "disk_bytes": self._disk_bytes,
            "disk_evicted": self.disk_evicted,
            "disk_rejected": self.disk_rejected,
            "disk_write_errors": self.disk_write_errors,
        }

    def __len__(self) -> int:
        return len(self._mem)

    def __repr__(self) -> str:
        return f"PromptCache(max_entries={self.max_entries}, path={self.path}, stats={self.stats})"

    def clear(self, disk: bool = False) -> None:
        with self._lock:
            self._mem.clear()
            self.nbytes = 0
        if disk and self.path is not None:
            for pattern in ("*.safetensors", f".*{TMP_SUFFIX}"):
                for f in self.path.glob(pattern):
                    f.unlink(missing_ok=True)
            self._disk_bytes = None

    def reset_stats(self) -> None:
        self.hits = self.misses = self.disk_hits = self.bypassed = 0
        self.disk_evicted = self.disk_rejected = self.disk_write_errors = 0
        self.fingerprint_s = 0.0

    # -- attaching
    def attach(self, module: torch.nn.Module, name: str | None = None) -> torch.nn.Module:
        """Route `module`'s calls through this cache (an instance-level `forward`); returns module."""
        if not isinstance(module, torch.nn.Module):
            raise InputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        _unwrap_cache(module)
        module.forward = _CachedForward(self, module, name or type(module).__name__)
        return module

    # -- storage
    def _file(self, key: str) -> Path:
        return self.path / f"{key}{_ENTRY_SUFFIX}"

    def _get(self, key: str, device: torch.device):
        with self._lock:
            hit = self._mem.get(key)
            if hit is not None:
                self._mem.move_to_end(key)
        if hit is not None:
            if self.path is not None:
                _touch(self._file(key))  # an access: the disk LRU sees it too
            return hit, False
        if self.path is None:
            return None, False
        f = self._file(key)
        try:
            st = f.stat()
            if self.max_disk_bytes is not None and st.st_size > self.max_disk_bytes:
                raise _BadEntry(f"{st.st_size} bytes, more than max_disk_bytes={self.max_disk_bytes} (never written)")
            data = f.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None, False  # not cached (or removed meanwhile by another process's eviction; no folder)
        except (OSError, _BadEntry) as e:
            self._reject(f, e)
            return None, False
        try:
            entry = _decode_entry(data, key, device)
        except _BadEntry as e:
            self._reject(f, e)
            return None, False
        _touch(f)
        self._put(key, entry, write=False)
        return entry, True

    def _reject(self, f: Path, why: BaseException) -> None:
        """An entry file that is not what this cache wrote under that name: removed (it is recomputed and rewritten
        by the miss), one warning per file."""
        self.disk_rejected += 1
        with contextlib.suppress(OSError):
            f.unlink()
        with self._lock:
            first = f.name not in self._warned
            self._warned.add(f.name)
        if first and not (isinstance(why, _BadEntry) and why.legacy):
            warnings.warn(
                f"PromptCache: ignored and removed {str(f)!r} ({why}); the entry is recomputed",
                PromptCacheWarning,
                stacklevel=5,
            )

    def _put(self, key: str, entry, write: bool = True) -> None:
        size = sum(t.numel() * t.element_size() for t in entry[1].values())
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self.nbytes -= sum(t.numel() * t.element_size() for t in old[1].values())
            self._mem[key] = entry
            self.nbytes += size
            while len(self._mem) > 1 and (len(self._mem) > self.max_entries or self.nbytes > self.max_bytes):
                _, dropped = self._mem.popitem(last=False)
                self.nbytes -= sum(t.numel() * t.element_size() for t in dropped[1].values())
        if write and self.path is not None:
            self._write(key, entry)

    def _write(self, key: str, entry) -> None:
        """Store one entry on disk, atomically; a failure (read-only or full folder) warns once and is otherwise
        ignored: the entry stays in memory and the encode goes on."""
        data = _encode_entry(key, entry)
        if self.max_disk_bytes is not None and len(data) > self.max_disk_bytes:
            return  # larger than the whole folder's bound: never stored
        f = self._file(key)
        try:
            try:
                atomic_write_bytes(f, data)
            except FileNotFoundError:  # the folder was removed meanwhile: make it again, once
                self.path.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(f, data)
        except OSError as e:
            self.disk_write_errors += 1
            with self._lock:
                first, self._write_warned = not self._write_warned, True
            if first:
                warnings.warn(
                    f"PromptCache: cannot write to {str(self.path)!r} ({e.strerror or e}); entries stay in memory "
                    "only, the encode is not cached on disk",
                    PromptCacheWarning,
                    stacklevel=5,
                )
            return
        with self._lock:
            self._write_warned = False
            self._writes_since_scan += 1
            if self._disk_bytes is not None:
                self._disk_bytes += len(data)
            scan = self.max_disk_bytes is not None and (
                self._disk_bytes is None
                or self._disk_bytes > self.max_disk_bytes
                or self._writes_since_scan >= _RESCAN_EVERY
            )
        if scan:
            self._evict(keep=f)

    def _evict(self, keep: Path | None = None) -> None:
        """Scan the folder and remove least recently used entry files (oldest access or modification time first)
        until their total is at most max_disk_bytes; temporary files of crashed writers older than an hour go too."""
        files, total, now = [], 0, time.time_ns()
        try:
            with os.scandir(self.path) as it:
                for e in it:
                    try:
                        if e.name.endswith(_ENTRY_SUFFIX) and e.is_file(follow_symlinks=False):
                            st = e.stat(follow_symlinks=False)
                            files.append((max(st.st_atime_ns, st.st_mtime_ns), e.name, st.st_size))
                            total += st.st_size
                        elif e.name.endswith(TMP_SUFFIX) and now - e.stat().st_mtime_ns > _STALE_TMP_NS:
                            os.unlink(e.path)
                    except OSError:  # removed meanwhile
                        continue
        except OSError:
            return
        files.sort()
        evicted = 0
        for _, name, size in files:
            if total <= self.max_disk_bytes:
                break
            if keep is not None and name == keep.name:
                continue
            try:
                os.unlink(self.path / name)
                evicted += 1
            except FileNotFoundError:  # another process removed it
                pass
            except OSError:  # cannot be removed: it stays counted
                continue
            total -= size
        with self._lock:
            self._disk_bytes, self._writes_since_scan = total, 0
            self.disk_evicted += evicted


def _unwrap_cache(module) -> None:
    fwd = module.__dict__.get("forward")
    if isinstance(fwd, _CachedForward):
        del module.__dict__["forward"]


_OUTPUT_MODULE_PREFIX = "transformers."
_FORMAT = "fastenc.PromptCache/2"  # the metadata's "format"; files without one are an older fastenc's (a miss)


class _BadEntry(Exception):
    """A disk entry that fails its checks (the reason is the message); legacy: written by an older fastenc."""

    def __init__(self, why: str, legacy: bool = False):
        super().__init__(why)
        self.legacy = legacy


def _touch(f: Path) -> None:
    """Set f's access and modification times to now (the disk LRU's clock); a vanished file is fine."""
    with contextlib.suppress(OSError):
        os.utime(f)


def _tensor_bytes(t: torch.Tensor):
    """t's bytes (a CPU contiguous tensor) as a numpy uint8 array, any dtype (bf16 too)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _entry_digest(meta: dict, tensors: dict) -> str:
    """BLAKE2b-256 over the entry's metadata (format, key, output class, field list, tuple lengths) and, in field
    order, every tensor's name, dtype, shape and bytes; each part length-prefixed."""
    h = hashlib.blake2b(digest_size=32)

    def part(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for k in ("format", "key", "class", "fields", "tuples"):
        part(f"{k}={meta[k]}".encode())
    for name in json.loads(meta["fields"]):
        t = tensors[name]
        part(repr((name, str(t.dtype), tuple(t.shape))).encode())
        part(_tensor_bytes(t).tobytes())
    return h.hexdigest()


def _encode_entry(key: str, entry) -> bytes:
    """The safetensors bytes of one entry: its tensors (on the CPU) and metadata {format, key, class, fields,
    tuples, digest}."""
    from safetensors.torch import save

    cls, fields, tuples = entry
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in fields.items()}
    meta = {
        "format": _FORMAT,
        "key": key,
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "fields": json.dumps(list(fields)),
        "tuples": json.dumps(tuples),
    }
    meta["digest"] = _entry_digest(meta, tensors)
    return save(tensors, metadata=meta)


def _decode_entry(data: bytes, key: str, device: torch.device):
    """(output class, fields, tuples) from an entry file's bytes, checked: _BadEntry unless it is a well-formed file
    of this format, records `key`, and its tensors match the digest it carries."""
    import importlib

    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        if len(data) < 8:
            raise _BadEntry(f"{len(data)} bytes, shorter than a safetensors header")
        n = int.from_bytes(data[:8], "little")
        if n > len(data) - 8:
            raise _BadEntry(f"truncated: header of {n} bytes in a {len(data)}-byte file")
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        if meta.get("format") != _FORMAT:
            legacy = "format" not in meta and "class" in meta and "fields" in meta
            raise _BadEntry(f"not a {_FORMAT} entry", legacy=legacy)
        if meta.get("key") != key:
            raise _BadEntry(f"the entry of key {str(meta.get('key'))[:16]}..., not of this file's key")
        tensors = load(data)
        names = json.loads(meta["fields"])
        if not isinstance(names, list) or sorted(names) != sorted(tensors):
            raise _BadEntry("its tensors are not the fields its metadata lists")
        if meta.get("digest") != _entry_digest(meta, tensors):
            raise _BadEntry("its tensors do not match the digest written with them")
        mod, _, qual = meta["class"].partition(":")
        if not mod.startswith(_OUTPUT_MODULE_PREFIX):
            raise _BadEntry(f"output class {meta['class']!r} is not a transformers output")
        cls = importlib.import_module(mod)
        for part in qual.split("."):
            cls = getattr(cls, part)
        tuples = {str(k): int(v) for k, v in json.loads(meta["tuples"]).items()}
    except _BadEntry:
        raise
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, ImportError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise _BadEntry(f"not a readable entry: {type(e).__name__}: {first}") from None
    return cls, {k: tensors[k].to(device) for k in names}, tuples


class _CachedForward:
    """The instance-level forward of a cached encoder: keys each row of input_ids, runs the class's forward on the
    rows that miss, assembles the output object from cached rows."""

    _KNOWN = ("attention_mask", "output_hidden_states", "output_attentions", "return_dict")

    def __init__(self, cache: PromptCache, module: torch.nn.Module, name: str):
        self.cache, self.name = cache, name
        self.forward = type(module).forward.__get__(module)  # the class's forward, bound
        self.module = module
        self.warned = False

    def __call__(self, *args, **kwargs):
        module = self.module
        if args:
            if len(args) > 2 or "input_ids" in kwargs:
                return self._bypass(args, kwargs)
            kwargs = {**dict(zip(("input_ids", "attention_mask"), args, strict=False)), **kwargs}
            args = ()
        ids = kwargs.get("input_ids")
        extra = set(kwargs) - {"input_ids", *self._KNOWN}
        if (
            extra
            or not isinstance(ids, torch.Tensor)
            or ids.dim() != 2
            or ids.shape[0] == 0
            or kwargs.get("output_attentions")
            or module.training
        ):
            return self._bypass(args, kwargs)
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            if not self.warned:  # a hit would cut the graph to the weights: run the encoder, and say so once
                self.warned = True
                warnings.warn(
                    f"PromptCache ({self.name}): autograd records into the encoder's weights, so its calls bypass the "
                    "cache; call encode_prompt under torch.no_grad() / torch.inference_mode() (pipe(...) does) or "
                    "requires_grad_(False) the encoder",
                    FallbackWarning,
                    stacklevel=3,
                )
            return self._bypass(args, kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
            return self._bypass(args, kwargs)
        ohs = kwargs.get("output_hidden_states")
        if ohs is None:
            ohs = bool(getattr(module.config, "output_hidden_states", False))
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = bool(getattr(module.config, "return_dict", True))
        device = ids.device
        fp = self._fingerprint(module)
        autocast = torch.is_autocast_enabled(device.type)
        amp = str(torch.get_autocast_dtype(device.type)) if autocast else None
        opts = repr((ohs if not isinstance(ohs, (list, tuple)) else list(ohs), str(device), amp))
        ids_cpu = ids.detach().to("cpu", torch.int64)
        mask_cpu = None if mask is None else mask.detach().to("cpu", torch.int64)
        keys = []
        for b in range(ids.shape[0]):
            h = hashlib.sha256(fp.encode())
            h.update(opts.encode())
            h.update(repr(tuple(ids_cpu.shape[1:])).encode())
            h.update(ids_cpu[b].numpy().tobytes())
            h.update(b"m" + (b"-" if mask_cpu is None else mask_cpu[b].numpy().tobytes()))
            keys.append(h.hexdigest())
        rows, miss = [None] * len(keys), []
        for b, key in enumerate(keys):
            entry, from_disk = self.cache._get(key, device)
            if entry is None:
                miss.append(b)
            else:
                rows[b] = entry
                self.cache.hits += 1
                self.cache.disk_hits += from_disk
        if miss:
            self.cache.misses += len(miss)
            sel = torch.tensor(miss, device=device)
            run_kwargs = dict(kwargs)
            run_kwargs.update(
                input_ids=ids.index_select(0, sel),
                attention_mask=None if mask is None else mask.index_select(0, sel),
                return_dict=True,
            )
            out = self.forward(**run_kwargs)
            cls, fields, tuples = _entry_from_output(out)
            for i, b in enumerate(miss):
                entry = (cls, {k: v[i : i + 1].clone() for k, v in fields.items()}, tuples)
                rows[b] = entry
                self.cache._put(keys[b], entry)
        return _assemble(rows, return_dict)

    def _fingerprint(self, module) -> str:
        t0 = time.perf_counter()
        if self.cache.check_weights:
            fp = weights_fingerprint(module)
        else:
            base = getattr(module, "_fastenc_base", type(module))
            fp = repr((base.__qualname__, [(n, id(p), p.dtype, p.data_ptr()) for n, p in module.named_parameters()]))
            fp = hashlib.sha256(fp.encode()).hexdigest()
        self.cache.fingerprint_s += time.perf_counter() - t0
        return fp

    def _bypass(self, args, kwargs):
        self.cache.bypassed += 1
        return self.forward(*args, **kwargs)


def _entry_from_output(out) -> tuple[type, dict, dict]:
    """(output class, {field or "field.i": tensor (B, ...)}, {tuple field: its length}) of a ModelOutput; None fields
    and None entries of tuples (hidden states not asked for) are left out."""
    fields, tuples = {}, {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            fields[k] = v
        elif isinstance(v, tuple):
            tuples[k] = len(v)
            for i, t in enumerate(v):
                if isinstance(t, torch.Tensor):
                    fields[f"{k}.{i}"] = t
    return type(out), fields, tuples


def _assemble(rows: list, return_dict: bool):
    """The output object of a batch from its rows' entries (row order kept); tensors are fresh copies."""
    cls, names, tuples = rows[0][0], list(rows[0][1]), rows[0][2]
    cat = {}
    for k in names:
        parts = [r[1][k] for r in rows]
        cat[k] = parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=0)
    values = {k: v for k, v in cat.items() if "." not in k}
    for field, n in tuples.items():
        values[field] = tuple(cat.get(f"{field}.{i}") for i in range(n))
    out = cls(**values)
    return out if return_dict else out.to_tuple()


# ---------------------------------------------------------------------------------------------------- CLI helpers

# what each pipeline's encode_prompt returns, in order (others are named output_0, output_1, ...)
_OUTPUT_NAMES = {
    "StableDiffusionPipeline": ("prompt_embeds", "negative_prompt_embeds"),
    "StableDiffusionXLPipeline": (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    ),
    "StableDiffusion3Pipeline": (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    ),
    "FluxPipeline": ("prompt_embeds", "pooled_prompt_embeds", "text_ids"),
}


def load_pipeline(path, *, dtype: torch.dtype = torch.float32, device=None, flag: str = "--pipeline"):
    """DiffusionPipeline.from_pretrained of a local folder (never downloads); InputError naming `flag` when diffusers
    is missing or the folder is not a saved pipeline."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{flag} {str(path)!r} is not a directory (a local DiffusionPipeline.save_pretrained folder)")
    if not (path / "model_index.json").is_file():
        raise InputError(f"{flag} {str(path)!r} has no model_index.json (a diffusers pipeline folder is expected)")
    try:
        import diffusers
    except ImportError:
        raise InputError(f"{flag} needs diffusers: pip install 'fastenc[diffusers]'") from None
    from diffusers.utils import logging as dlog
    from safetensors import SafetensorError
    from transformers.utils import logging as tlog

    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.disable_progress_bar()  # a CLI prints its own lines
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # newer diffusers deprecate torch_dtype= in favour of dtype=; older lack it
            warnings.filterwarnings("ignore", message=".*torch_dtype.*")
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:  # e.g. a cut weight file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{flag} {str(path)!r} could not be loaded as a diffusers pipeline: {first}") from None
    finally:
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()
    if device is not None:
        pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def check_clip_skip(pipe, clip_skip, flag: str = "clip_skip") -> None:
    """InputError naming `flag` unless `clip_skip` is None or a layer count the pipeline's encode_prompt can skip:
    an int in [0, L] for SD 1.x-style pipelines (they read hidden_states[-(clip_skip + 1)]), [0, L - 1] for SDXL /
    SD3-style ones (a text_encoder_2 component: hidden_states[-(clip_skip + 2)]), L the fewest layers of the
    pipeline's CLIP text encoders. A pipeline whose encode_prompt takes no clip_skip is left to `encode_prompt`."""
    import inspect

    if clip_skip is None or not hasattr(pipe, "encode_prompt"):
        return
    if "clip_skip" not in inspect.signature(pipe.encode_prompt).parameters:
        return
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
        raise InputError(f"{flag} must be an int (layers to skip from the end), got {clip_skip!r}")
    components = getattr(pipe, "components", {})
    offset = 2 if "text_encoder_2" in components else 1
    layers = {}
    for name in ("text_encoder", "text_encoder_2"):
        config = getattr(components.get(name), "config", None)
        n = getattr(config, "num_hidden_layers", None)
        if isinstance(n, int) and "clip" in str(getattr(config, "model_type", "")):
            layers[name] = n
    hi = min((n + 1 - offset for n in layers.values()), default=None)
    if clip_skip < 0 or (hi is not None and clip_skip > hi):
        where = ", ".join(f"{k} has {n} layers" for k, n in layers.items()) or "its text encoders"
        bound = f"[0, {hi}]" if hi is not None else ">= 0"
        raise InputError(f"{flag} must be in {bound} for {type(pipe).__name__} ({where}), got {clip_skip}")
    te = components.get("text_encoder")
    if offset == 1 and te is not None and not hasattr(te, "text_model"):
        import transformers

        raise InputError(
            f"{flag}: {type(pipe).__name__}.encode_prompt applies clip_skip through text_encoder.text_model, which "
            f"{getattr(te, '_fastenc_base', type(te)).__name__} of transformers {transformers.__version__} does not "
            f"have (a diffusers / transformers mismatch); leave {flag} out"
        )


def encode_prompt(
    pipe,
    prompt,
    *,
    negative_prompt=None,
    num_images_per_prompt: int = 1,
    clip_skip: int | None = None,
    max_sequence_length: int | None = None,
    device=None,
) -> dict[str, torch.Tensor]:
    """The pipeline's own `encode_prompt` with the options it takes, outputs by name ({"prompt_embeds": ...}).
    Classifier-free guidance (negative embeddings) is on when `negative_prompt` is given."""
    import inspect

    if not hasattr(pipe, "encode_prompt"):
        raise UnsupportedModelError(f"{type(pipe).__name__} has no encode_prompt")
    check_clip_skip(pipe, clip_skip)
    params = inspect.signature(pipe.encode_prompt).parameters
    device = device if device is not None else getattr(pipe, "_execution_device", None)
    options = {
        "device": device,
        "num_images_per_prompt": num_images_per_prompt,
        "do_classifier_free_guidance": negative_prompt is not None,
        "negative_prompt": negative_prompt,
        "clip_skip": clip_skip,
        "max_sequence_length": max_sequence_length,
    }
    kwargs = {}
    for name, value in options.items():
        if name in params:
            if value is not None or name == "clip_skip":
                kwargs[name] = value
        elif value is not None and name not in ("device", "do_classifier_free_guidance", "num_images_per_prompt"):
            raise InputError(f"{type(pipe).__name__}.encode_prompt takes no {name}")
    for name in ("prompt_2", "prompt_3"):  # required positionally by SD3 / FLUX; None: the main prompt
        if name in params:
            kwargs[name] = None
    with torch.no_grad():
        out = pipe.encode_prompt(prompt, **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    names = _OUTPUT_NAMES.get(type(pipe).__name__, ())
    return {
        (names[i] if i < len(names) else f"output_{i}"): t for i, t in enumerate(out) if isinstance(t, torch.Tensor)
    }


class EncoderTimer:
    """Context manager timing every call of a pipeline's encoder components (forward hooks; CUDA synchronized):
    `timer.seconds` -> {component: total seconds}, `timer.calls` -> {component: calls}."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._handles = []

    def __enter__(self):
        import time

        for name, comp in self.pipe.components.items():
            if not isinstance(comp, torch.nn.Module) or _is_diffusers_model(comp):
                continue

            def pre(_m, _args, name=name):
                _sync()
                self._t0 = time.perf_counter()

            def post(_m, _args, _out, name=name):
                _sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._t0
                self.calls[name] = self.calls.get(name, 0) + 1

            self._handles += [comp.register_forward_pre_hook(pre), comp.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


__all__ = [
    "DEFAULT_MAX_DISK_BYTES",
    "EncoderTimer",
    "PromptCache",
    "PromptCacheWarning",
    "check_clip_skip",
    "encode_prompt",
    "is_pipeline",
    "load_pipeline",
    "optimize_pipeline",
    "restore_pipeline",
    "weights_fingerprint",
]
