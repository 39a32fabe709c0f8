"""fastenc.runtime: exported engines as drop-in encoders, and the ONNX Runtime backend of `fastenc.optimize`.

    enc = fastenc.runtime.load("clip_text.onnx")                       # ONNX Runtime, CPU
    enc = fastenc.runtime.load("clip_text.onnx", device="cuda")        # CUDA execution provider, IO binding
    enc = fastenc.runtime.load("clip_text.plan", device="cuda")        # a TensorRT engine from fastenc.export
    out = enc(input_ids=ids)        # the ModelOutput class of the exported model (CLIPTextModelOutput, ...)
    fast = fastenc.optimize(model, backend="onnxruntime")             # export once (cached), run through the above

What a file carries. `fastenc.export` records in the ONNX metadata the transformers class ("fastenc.class"), its
ModelOutput class ("fastenc.output_class", "module:qualname"), the input and output names and the text position limit;
`to_tensorrt` writes the same beside the engine (`<engine>.fastenc.json`). The encoder takes the exported class's
forward arguments (positional in its order, or by name) and returns its ModelOutput with the exported fields (the nested
`*_model_output` of the joint models, `hidden_states` and `attentions` are not in the graph: None). Bad calls raise
InputError before anything runs: a missing input, an argument the graph does not take (output_attentions=True,
position_ids, ...), a shape that does not match the graph (rank, fixed dims, the same axis differing between inputs,
text longer than the position limit, an empty batch or sequence, a token id outside [0, vocab): transformers raises on
those too), or, for TensorRT, a shape outside every optimisation profile (the profiles' ranges are in the message). A
file that is empty, not an ONNX model, one ONNX Runtime cannot load, or whose metadata does not describe its graph
(a class whose forward lacks the graph's inputs, a ModelOutput class lacking its outputs) raises InputError naming the
path at load. An omitted attention_mask of a graph that takes one is all ones, as in transformers; a mask given
to a graph without one must be all ones (such a graph computes transformers' forward without a mask).

ONNX Runtime (`OrtEncoder`). Providers: default ["CPUExecutionProvider"] on CPU, ["CUDAExecutionProvider",
"CPUExecutionProvider"] on CUDA (TensorrtExecutionProvider when asked for in `providers`); a provider that is not
installed raises BackendUnavailableError. Inputs and outputs go through IO binding on every device: torch tensors are
bound by pointer and the outputs are allocated by torch on the encoder's device (shapes from the graph's named axes),
so CUDA inputs and outputs never leave the GPU. Session options: intra-op threads (default torch.get_num_threads()),
graph optimisation level ("all" by default), and `optimized_model_cache=True` (or a path): the optimised graph is
saved once (atomically) beside the model and later sessions load it with optimisations off (ORT's caveat applies: a
graph optimised at level "all" may hold layouts specific to this machine's CPU; the file name carries the provider,
level and ORT version, not the CPU).

TensorRT (`TensorRTEncoder`, needs tensorrt and a GPU): the first profile whose (min, max) range holds every input
shape is selected (switched on torch's current CUDA stream), outputs are torch tensors, and the engine runs on torch's
current stream (`execute_async_v3`), so no synchronisation is added.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import operator
import os
import threading
import warnings
from pathlib import Path

import torch

from .core.errors import BackendUnavailableError, FastencError, InputError
from .core.files import atomic_write_bytes, file_digest, human_bytes
from .core.trace import fall_back, record
from .models._base import structure_generation

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_LEVELS = ("disabled", "basic", "extended", "all")
# ONNX Runtime session config entries every OrtEncoder gets (load(session_config=...) adds to them). E.g.
# {"session.intra_op.allow_spinning": "0"}: ORT's idle threads stop spin-waiting after a run, which matters when torch
# work shares the cores (bench/bench_onnx.py interleaves ORT and torch calls and sets it).
SESSION_CONFIG: dict[str, str] = {}
_CALL_OPTIONS = ("return_dict", "output_attentions", "output_hidden_states")


def _need(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(f"{what} needs the `{module}` package: {e}") from e


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if d.type not in ("cpu", "cuda"):
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device!r}: no CUDA device is visible to torch")
        d = torch.device("cuda", torch.cuda.current_device() if d.index is None else d.index)
    return d


def _output_class(spec: str, fields: list[str]):
    """The ModelOutput class named by "module:qualname" (recorded at export), else a ModelOutput dataclass with
    exactly the graph's output fields."""
    if spec and ":" in spec:
        module, _, qual = spec.partition(":")
        try:
            obj = importlib.import_module(module)
            for part in qual.split("."):
                obj = getattr(obj, part)
            return obj
        except (ImportError, AttributeError):
            pass
    from transformers.utils import ModelOutput

    spec = [(f, torch.Tensor | None, dataclasses.field(default=None)) for f in fields]
    return dataclasses.make_dataclass("EngineOutput", spec, bases=(ModelOutput,))


def _forward_params(class_name: str) -> list[str] | None:
    """The forward argument names of the transformers class `class_name`, in order (None if unknown)."""
    try:
        import transformers

        cls = getattr(transformers, class_name)
    except (ImportError, AttributeError):
        return None
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)]


def _int_meta(path: Path, meta: dict, key: str) -> int | None:
    value = meta.get(key)
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"path {str(path)!r}: metadata {key}={value!r} is not a positive integer")
    return n


def check_token_ids(ids: torch.Tensor, vocab: int | None, what: str) -> None:
    """InputError when a token id is outside [0, vocab) (negative only, when vocab is unknown): transformers' embedding
    lookup raises IndexError for them, ONNX's Gather would read row vocab + id for a negative one."""
    if ids.numel() == 0 or ids.dtype == torch.bool:
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        bound = f"[0, {vocab})" if vocab is not None else ">= 0"
        raise InputError(f"input_ids: token id {bad} is outside {bound}, the vocabulary of {what} (transformers raises "
                         "IndexError for it)")  # fmt: skip


def check_not_empty(name: str, t: torch.Tensor, what: str) -> None:
    """InputError for an input with an empty axis (batch 0, sequence 0): transformers' encoders raise on them (their
    attention reshapes 0 elements), so no output is defined."""
    if t.numel() == 0:
        raise InputError(f"{name}: shape {tuple(t.shape)} is empty (batch and sequence must be >= 1): {what} "
                         "computes no output for it, as transformers raises")  # fmt: skip


@dataclasses.dataclass
class _Spec:
    name: str
    dtype: str
    dims: list  # int (fixed) or str (axis name; "?" unnamed)


class Encoder(torch.nn.Module):
    """What the ONNX Runtime and TensorRT encoders share: argument binding and checks, output packing."""

    def __init__(self, path: Path, device: torch.device, meta: dict, inputs: list[_Spec], outputs: list[_Spec]):
        super().__init__()
        self.path, self.device, self.metadata = path, device, meta
        self.inputs, self.outputs = inputs, outputs
        self.input_names = [s.name for s in inputs]
        self.output_names = [s.name for s in outputs]
        self.class_name = meta.get("fastenc.class", "")
        self.output_class = _output_class(meta.get("fastenc.output_class", ""), self.output_names)
        self._params = _forward_params(self.class_name) if self.class_name else None
        self.max_sequence = _int_meta(path, meta, "fastenc.max_sequence")
        self.vocab_size = _int_meta(path, meta, "fastenc.vocab_size")
        self._check_metadata()
        self.eval()

    def _check_metadata(self) -> None:
        """The recorded class and ModelOutput class must describe this graph: InputError naming the path and the key
        when they do not (a file whose metadata was edited, or copied from another export)."""
        where = f"path {str(self.path)!r}: metadata"
        if self.class_name:
            if self._params is None:
                raise InputError(f"{where} fastenc.class={self.class_name!r} is not a transformers class here")
            lacking = [n for n in self.input_names if n not in self._params]
            if lacking:
                graph = ", ".join(self.input_names)
                raise InputError(f"{where} fastenc.class={self.class_name!r} does not describe this graph: its "
                                 f"forward takes no {', '.join(lacking)} (graph inputs: {graph})")  # fmt: skip
            kind = self.metadata.get("fastenc.kind")
            if kind:
                from .export.towers import _classes

                known = {c.__name__: k for c, k in _classes().items()}
                if known.get(self.class_name, kind) != kind:
                    raise InputError(f"{where} fastenc.class={self.class_name!r} is a {known[self.class_name]} tower, "
                                     f"but fastenc.kind says {kind!r}")  # fmt: skip
        fields = getattr(self.output_class, "__dataclass_fields__", None)
        if fields is not None:
            heads = {n.partition(".")[0] for n in self.output_names}
            lacking = sorted(heads - set(fields))
            if lacking:
                spec = self.metadata.get("fastenc.output_class", "")
                raise InputError(f"{where} fastenc.output_class={spec!r} has no field {', '.join(lacking)} for this "
                                 f"graph's outputs ({', '.join(self.output_names)})")  # fmt: skip

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, model={self.class_name or '?'}, device={self.device}"

    # ------------------------------------------------------------------------------------------------ arguments
    def bind(self, args: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor], bool]:
        """(graph input name -> tensor on self.device in the graph's dtype, return_dict); InputError on a bad call."""
        kwargs = dict(kwargs)
        if args:
            names = self._params or self.input_names
            if len(args) > len(names):
                raise InputError(f"{self.class_name or 'encoder'} takes at most {len(names)} positional arguments "
                                 f"({', '.join(names)}), got {len(args)}")  # fmt: skip
            for name, value in zip(names, args, strict=False):
                if name in kwargs:
                    raise InputError(f"argument {name!r} given both positionally and by name")
                kwargs[name] = value
        return_dict = kwargs.pop("return_dict", None)
        for opt in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(opt, None):
                raise InputError(f"{opt}=True: {self.path.name} was exported without them (only "
                                 f"{', '.join(self.output_names)}); run the transformers model for them")  # fmt: skip
        feed = {}
        for name, value in kwargs.items():
            if name in self.input_names:
                if value is not None:
                    feed[name] = value
            elif name == "attention_mask" and value is not None:
                mask = torch.as_tensor(value)
                if not bool((mask != 0).all()):
                    raise InputError(f"attention_mask: {self.path.name} takes no mask (it computes the unmasked "
                                     "forward); export with attention_mask=True for padded batches")  # fmt: skip
            elif value is not None and value is not False:
                raise InputError(f"argument {name!r} is not an input of {self.path.name} (inputs: "
                                 f"{', '.join(self.input_names)})")  # fmt: skip
        if "attention_mask" in self.input_names and "attention_mask" not in feed and "input_ids" in feed:
            ids = torch.as_tensor(feed["input_ids"])
            feed["attention_mask"] = torch.ones(ids.shape, dtype=torch.int64, device=ids.device)
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise InputError(f"missing input {missing[0]!r}: {self.path.name} takes {', '.join(self.input_names)}")
        sizes: dict[str, tuple[int, str]] = {}
        out = {}
        for spec in self.inputs:
            t = feed[spec.name]
            if not isinstance(t, torch.Tensor):
                try:
                    t = torch.as_tensor(t)
                except (TypeError, ValueError, RuntimeError) as e:
                    raise InputError(f"{spec.name} must be a tensor, got {type(t).__name__}") from e
            if t.device != self.device:
                raise InputError(f"{spec.name} is on {t.device}; this encoder runs on {self.device}")
            if t.dim() != len(spec.dims):
                raise InputError(f"{spec.name} must have {len(spec.dims)} dims {spec.dims}, got shape {tuple(t.shape)}")
            for d, want in enumerate(spec.dims):
                got = int(t.shape[d])
                if isinstance(want, int):
                    if got != want:
                        raise InputError(f"{spec.name}: dim {d} must be {want} (shape {spec.dims}), got "
                                         f"{tuple(t.shape)}")  # fmt: skip
                elif want != "?":
                    seen = sizes.setdefault(want, (got, spec.name))
                    if seen[0] != got:
                        raise InputError(f"{spec.name}: axis {want!r} is {got} but {seen[1]} has {seen[0]}")
            want_dtype = _TORCH_DTYPES.get(spec.dtype)
            if want_dtype is not None and t.dtype != want_dtype:
                if want_dtype.is_floating_point != t.dtype.is_floating_point and t.dtype != torch.bool:
                    raise InputError(f"{spec.name} must be {spec.dtype}, got {t.dtype}")
                t = t.to(want_dtype)
            check_not_empty(spec.name, t, self.path.name)
            if spec.name == "input_ids":
                check_token_ids(t, self.vocab_size, self.path.name)
            out[spec.name] = t.contiguous()
        seq = sizes.get("sequence", (0,))[0]
        if self.max_sequence and seq > self.max_sequence:
            raise InputError(f"input_ids: sequence {seq} is longer than the model's {self.max_sequence} positions")
        self._sizes = {k: v[0] for k, v in sizes.items()}
        return out, return_dict is not False

    def output_shape(self, spec: _Spec) -> tuple[int, ...] | None:
        shape = []
        for d in spec.dims:
            if isinstance(d, int):
                shape.append(d)
            elif d in self._sizes:
                shape.append(self._sizes[d])
            else:
                return None
        return tuple(shape)

    def pack(self, outs: dict[str, torch.Tensor], return_dict: bool):
        nested: dict[str, dict] = {}
        for name in [n for n in outs if "." in n]:
            head, _, tail = name.partition(".")
            nested.setdefault(head, {})[tail] = outs.pop(name)
        if nested:
            listed = self.metadata.get("fastenc.nested_classes", "").split(",")
            spec = dict(item.split("=", 1) for item in listed if item)
            for head, fields in nested.items():
                outs[head] = _output_class(spec.get(head, ""), list(fields))(**fields)
        result = self.output_class(**outs)
        return result if return_dict else result.to_tuple()

    def forward(self, *args, **kwargs):
        feed, return_dict = self.bind(args, kwargs)
        return self.pack(self.run(feed), return_dict)

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # a forward runs no autograd: the engine is not differentiable
    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return super().__call__(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ ONNX Runtime


_ID_OPS = ("Reshape", "Cast", "Identity", "Flatten", "Squeeze", "Unsqueeze")  # keep token ids' values


def _ort_metadata(path: Path) -> tuple[dict, list[_Spec], list[_Spec]]:
    """(metadata, inputs, outputs) of an ONNX file; InputError naming the path for an empty file, bytes that are not
    an ONNX model, or a model without a graph."""
    from .export.onnx_export import read_io

    onnx = _need("onnx", "fastenc.runtime.load")
    if path.stat().st_size == 0:
        raise InputError(f"path {str(path)!r} is empty (0 bytes), not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        ins, outs = read_io(path)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and the like: not an ONNX file
        raise InputError(f"path {str(path)!r} is not an ONNX model ({type(e).__name__}: {e})") from e
    if not proto.HasField("graph") or not proto.graph.node or not ins or not outs:
        raise InputError(f"path {str(path)!r} is not an ONNX model of an encoder (no graph, nodes, inputs or outputs)")
    meta = {p.key: p.value for p in proto.metadata_props}
    if "fastenc.vocab_size" not in meta:  # an older export: the rows of the table input_ids index, if it is plain
        tables, ids = {i.name: i.dims for i in proto.graph.initializer}, {"input_ids"}
        for node in proto.graph.node:  # the ids reshaped / cast on their way to the embedding Gather
            if node.op_type in _ID_OPS and node.input[0] in ids:
                ids.update(node.output)
            elif node.op_type == "Gather" and node.input[1:2] and node.input[1] in ids and node.input[0] in tables:
                meta["fastenc.vocab_size"] = str(tables[node.input[0]][0])
                break
    return meta, *([_Spec(s.name, s.dtype, list(s.dims)) for s in specs] for specs in (ins, outs))


class OrtEncoder(Encoder):
    """An ONNX file run by ONNX Runtime (see the module docstring)."""

    def __init__(self, path: Path, device: torch.device, providers=None, *, threads: int | None = None,
                 graph_optimization_level: str = "all", optimized_model_cache=False,
                 session_config: dict | None = None):  # fmt: skip
        ort = _need("onnxruntime", "fastenc.runtime.load of an .onnx file")
        meta, ins, outs = _ort_metadata(path)
        super().__init__(path, device, meta, ins, outs)
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if device.type == "cuda":
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if isinstance(providers, str) or not isinstance(providers, (list, tuple)) or not providers:
            raise InputError(f"providers must be a non-empty list of ONNX Runtime provider names, got {providers!r}")
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        for n in names:
            if n not in available:
                raise BackendUnavailableError(f"providers: {n} is not available in this onnxruntime "
                                              f"{ort.__version__} (available: {', '.join(available)})")  # fmt: skip
        if device.type == "cuda" and not ({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(names)):
            raise InputError(f"device {device} needs CUDAExecutionProvider or TensorrtExecutionProvider in providers")
        if device.type == "cpu" and names[0] != "CPUExecutionProvider":
            raise InputError(f"device cpu runs CPUExecutionProvider; got providers {names} (pass device='cuda')")
        if device.type == "cpu":  # an int8 graph quantized for a VNNI CPU saturates on one without
            from .export.quantize import warn_if_int8_saturates

            warn_if_int8_saturates(meta, path)
        provs = []
        for p in providers:
            name, opts = p if isinstance(p, tuple) else (p, {})
            if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") and "device_id" not in opts:
                opts = {**opts, "device_id": device.index or 0}
            provs.append((name, opts))
        if threads is None:
            threads = torch.get_num_threads()
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads must be an int >= 1, got {threads!r}")
        if graph_optimization_level not in _LEVELS:
            raise InputError(f"graph_optimization_level must be one of {_LEVELS}, got {graph_optimization_level!r}")
        level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization_level]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = level
        config = {**SESSION_CONFIG, **(session_config or {})}
        for k, v in config.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InputError(f"session_config entries must be str -> str, got {k!r}: {v!r}")
            opts.add_session_config_entry(k, v)
        source, save_to = str(path), None
        cache = self._cache_path(optimized_model_cache, names[0], graph_optimization_level, ort.__version__)
        if cache is not None and cache.is_file():
            source = str(cache)  # optimised already: load as is
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        elif cache is not None:
            save_to = cache.with_name(f".{cache.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            opts.optimized_model_filepath = str(save_to)
        try:
            self.session = ort.InferenceSession(source, opts, providers=provs)
        except Exception as e:  # noqa: BLE001 - ORT's pybind errors (InvalidProtobuf, InvalidGraph, Fail, ...)
            if type(e).__module__.startswith("onnxruntime"):
                raise InputError(f"path {str(path)!r}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from e
            raise
        finally:
            if save_to is not None and save_to.exists():
                os.replace(save_to, cache)
        self.optimized_model = cache
        self.providers = self.session.get_providers()
        self.threads = threads
        self.graph_optimization_level = graph_optimization_level
        self._np = importlib.import_module("numpy")

    def _cache_path(self, cache, provider: str, level: str, version: str) -> Path | None:
        if cache is False or cache is None:
            return None
        if cache is True:
            if any(self.path.parent.glob(self.path.name + ".data")):
                return None  # external data: ORT would rewrite the weights file; load the original instead
            tag = f"{provider.replace('ExecutionProvider', '').lower()}-{level}-ort{version}"
            return self.path.with_name(f"{self.path.stem}.{tag}.optimized.onnx")
        if isinstance(cache, (str, os.PathLike)):
            p = Path(cache)
            if not p.parent.is_dir():
                raise InputError(f"optimized_model_cache {str(p)!r}: its directory does not exist")
            return p
        raise InputError(f"optimized_model_cache must be a bool or a path, got {cache!r}")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", providers={self.providers}"

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        np = self._np
        dev = "cuda" if self.device.type == "cuda" else "cpu"
        idx = self.device.index or 0
        binding = self.session.io_binding()
        for spec in self.inputs:
            t = feed[spec.name]
            binding.bind_input(spec.name, dev, idx, np.dtype(spec.dtype) if spec.dtype != "bool" else np.bool_,
                               tuple(t.shape), t.data_ptr())  # fmt: skip
        outs, unbound = {}, []
        for spec in self.outputs:
            shape = self.output_shape(spec)
            if shape is None or spec.dtype not in _TORCH_DTYPES:
                binding.bind_output(spec.name, dev, idx)  # ORT allocates (unnamed dims); copied out below
                unbound.append(spec.name)
                continue
            t = torch.empty(shape, dtype=_TORCH_DTYPES[spec.dtype], device=self.device)
            binding.bind_output(spec.name, dev, idx, np.dtype(spec.dtype), shape, t.data_ptr())
            outs[spec.name] = t
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch's stream are complete
            binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        if self.device.type == "cuda":
            binding.synchronize_outputs()
        if unbound:
            values = binding.copy_outputs_to_cpu()
            for spec, v in zip(self.outputs, values, strict=True):
                if spec.name in unbound:
                    outs[spec.name] = torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
        return {n: outs[n] for n in self.output_names}


# ------------------------------------------------------------------------------------------------ TensorRT


def _trt_dtype(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}  # fmt: skip
    for name, td in (("int64", torch.int64), ("bf16", torch.bfloat16)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = td
    return table[dt]


def sidecar_path(engine_path) -> Path:
    """Where `to_tensorrt` writes the exported model's metadata for an engine: `<engine>.fastenc.json`."""
    p = Path(engine_path)
    return p.with_name(p.name + ".fastenc.json")


class TensorRTEncoder(Encoder):
    """A serialized TensorRT engine (see the module docstring); CUDA only."""

    def __init__(self, path: Path, device: torch.device):
        trt = _need("tensorrt", "fastenc.runtime.load of a TensorRT engine")
        if device.type != "cuda":
            raise InputError(f"a TensorRT engine runs on a CUDA device; got device {device}")
        self._trt = trt
        side = sidecar_path(path)
        meta = json.loads(side.read_text()) if side.is_file() else {}
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise InputError(f"path {str(path)!r}: TensorRT could not deserialize the engine (built by another "
                                 "TensorRT version or for another GPU?)")  # fmt: skip
            self.context = self.engine.create_execution_context()
        ins, outs = [], []
        axes = {**meta.get("input_axes", {})}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = list(self.engine.get_tensor_shape(name))
            named = axes.get(name, {})
            dims = [int(d) if d >= 0 else named.get(str(k), "?") for k, d in enumerate(shape)]
            dtype = str(_trt_dtype(trt, self.engine.get_tensor_dtype(name))).replace("torch.", "")
            spec = _Spec(name, dtype, dims)
            (ins if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outs).append(spec)
        order = meta.get("fastenc.inputs", "").split(",")
        ins.sort(key=lambda s: order.index(s.name) if s.name in order else len(order))
        super().__init__(path, device, meta, ins, outs)
        self._profile = 0

    def profiles(self) -> list[dict[str, tuple]]:
        """Per optimisation profile: input name -> (min shape, opt shape, max shape)."""
        out = []
        for p in range(self.engine.num_optimization_profiles):
            out.append({s.name: tuple(tuple(x) for x in self.engine.get_tensor_profile_shape(s.name, p))
                        for s in self.inputs})  # fmt: skip
        return out

    def select_profile(self, shapes: dict[str, tuple]) -> int:
        profiles = self.profiles()
        for p, prof in enumerate(profiles):
            if all(all(lo <= s <= hi for s, lo, hi in zip(shapes[n], prof[n][0], prof[n][2], strict=True))
                   for n in shapes):  # fmt: skip
                return p
        ranges = "; ".join(f"profile {p}: " + ", ".join(f"{n} {list(r[0])}..{list(r[2])}" for n, r in prof.items())
                           for p, prof in enumerate(profiles))  # fmt: skip
        got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise InputError(f"input shapes {got} are outside every optimisation profile of {self.path.name} ({ranges}); "
                         "rebuild with to_tensorrt(..., profiles=...) covering them")  # fmt: skip

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {n: tuple(t.shape) for n, t in feed.items()}
        p = self.select_profile(shapes)
        stream = torch.cuda.current_stream(self.device)
        if p != self._profile:
            self.context.set_optimization_profile_async(p, stream.cuda_stream)
            self._profile = p
        for name, t in feed.items():
            self.context.set_input_shape(name, shapes[name])
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for spec in self.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            t = torch.empty(shape, dtype=_TORCH_DTYPES[spec.dtype], device=self.device)
            self.context.set_tensor_address(spec.name, t.data_ptr())
            outs[spec.name] = t
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise InputError(f"TensorRT failed to run {self.path.name} at shapes {shapes}")
        for t in feed.values():  # the engine reads the inputs on `stream`: keep their memory until it is done
            t.record_stream(stream)
        return outs


# ------------------------------------------------------------------------------------------------ load


def load(path, device=None, providers=None, *, threads: int | None = None, graph_optimization_level: str = "all",
         optimized_model_cache=False, session_config: dict | None = None) -> Encoder:  # fmt: skip
    """An encoder module for an exported `.onnx` file (ONNX Runtime) or a TensorRT `.plan` / `.engine` (see the
    module docstring). device: "cpu" (default) or "cuda[:N]"; providers, threads, graph_optimization_level,
    optimized_model_cache, session_config (extra `SessionOptions.add_session_config_entry` pairs): ONNX Runtime session
    settings."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"path {str(p)!r} is not a file")
    dev = _device(device)
    if p.suffix in (".plan", ".engine", ".trt"):
        if providers is not None:
            raise InputError("providers applies to ONNX files; a TensorRT engine runs on its own runtime")
        return TensorRTEncoder(p.resolve(), dev)
    if p.suffix != ".onnx":
        raise InputError(f"path {str(p)!r}: expected an .onnx file or a TensorRT .plan / .engine")
    return OrtEncoder(p.resolve(), dev, providers, threads=threads, graph_optimization_level=graph_optimization_level,
                      optimized_model_cache=optimized_model_cache, session_config=session_config)  # fmt: skip


# ------------------------------------------------------------------------------------------------ optimize backend
#
# fastenc.optimize(model, backend="onnxruntime") returns the fused model (torch backend) of a subclass whose forward
# runs the exported graph when the call is one the graph computes, and the fused torch path otherwise, recorded as a
# fall-back. Export happens on the first call ORT can serve, into a cache folder keyed by the weights' content, the
# export options and the versions; weight edits after that are noticed (see OrtState.current) and re-export.
# A cached file is trusted only if it proves it is this model's (see trust): `model.onnx.sha256` (written after the
# export is complete) matches its bytes, and its metadata holds the weights' fingerprint, the export options and
# fastenc's version; anything else is set aside with a CacheWarning and exported again. The folder is flock()ed
# while one process checks / exports it. Every export written there is announced (CacheWarning: paths and sizes).

ENV_CACHE = "FASTENC_CACHE"


def cache_dir() -> Path:
    """$FASTENC_CACHE, else ~/.cache/fastenc (XDG_CACHE_HOME respected)."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastenc"


def _tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen, out = set(), []
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def weights_fingerprint(model: torch.nn.Module) -> str:
    """blake2b of every parameter's and buffer's name, dtype, shape and bytes, plus the config: a content key (the
    same weights loaded twice give the same key; any edited value gives another)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, t in _tensors(model):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        data = t.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.contiguous().reshape(-1)
        if data.numel():
            h.update(memoryview(data.view(torch.uint8).numpy()))
    return h.hexdigest()


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

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _sample_views(tensors) -> list:
    """Per CPU weight, a numpy view of its memory as it is laid out now (no copy; strided weights too) and the
    indices of _SAMPLE evenly spaced values, read as raw integers so the comparison is exact and NaN-safe."""
    import numpy as np

    views = []
    for _, t in tensors:
        a = t.detach()
        as_int = _INT_OF_SIZE.get(a.element_size())
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

        from ._version import __version__
        from .export.quantize import int8_cache_token

        return {"class": model._fastenc_base.__name__, "weights": fingerprint,
                "quantize": int8_cache_token(self.quantize), "mask": self._mask(model), "opset": 18, "nested": True,
                "dtype": "float32", "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
                "fastenc": __version__}  # fmt: skip

    def cache_key(self, model, fingerprint: str) -> str:
        parts = self.export_options(model, fingerprint)
        return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=12).hexdigest()

    @staticmethod
    def _mask(model) -> bool | None:
        """Text towers export the mask as an input (padded batches give transformers' masked result); the joint
        CLIPModel has it already; vision towers have none."""
        from .export.towers import OPTIMUM_MASK, _classes

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
        from .export import export_onnx
        from .export.towers import _classes

        nested = _classes().get(model._fastenc_base) in ("clip", "siglip")  # complete CLIPOutput / SiglipOutput
        parts = self.export_options(model, fingerprint)
        key = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=12).hexdigest()
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
    from .export.onnx_export import read_metadata

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
    from .export.towers import OPTIMUM_MASK, _classes

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
        from .export.onnx_export import token_rows
        from .export.towers import _classes

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


__all__ = [
    "ENV_CACHE",
    "CacheWarning",
    "Encoder",
    "OrtEncoder",
    "TensorRTEncoder",
    "cache_dir",
    "check_digest",
    "load",
    "refresh",
    "sidecar_path",
    "weights_fingerprint",
    "write_digest",
]
