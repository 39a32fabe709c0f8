"""Exported engines as drop-in encoders: `fastenc.runtime.load` and the ONNX Runtime / TensorRT encoder modules.

    enc = fastenc.runtime.load("clip_text.onnx")                       # ONNX Runtime, CPU
    enc = fastenc.runtime.load("clip_text.onnx", device="cuda")        # CUDA execution provider, IO binding
    enc = fastenc.runtime.load("clip_text.plan", device="cuda")        # a TensorRT engine from fastenc.export
    out = enc(input_ids=ids)        # the ModelOutput class of the exported model (CLIPTextModelOutput, ...)

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

import dataclasses
import importlib
import inspect
import json
import os
import threading
from pathlib import Path

import torch

from ..core.errors import BackendUnavailableError, InputError

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


def _load_device(device) -> torch.device:
    """The torch.device `load(device=...)` names (default cpu; cuda gets its index); InputError for anything else."""
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
                from ..export.towers import _classes

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
    from ..export.onnx_export import need_package, read_io

    onnx = need_package("onnx", "fastenc.runtime.load")
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
        from ..export.onnx_export import need_package

        ort = need_package("onnxruntime", "fastenc.runtime.load of an .onnx file")
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
            from ..export.quantize import warn_if_int8_saturates

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
        from ..export.onnx_export import need_package

        trt = need_package("tensorrt", "fastenc.runtime.load of a TensorRT engine", "tensorrt")
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
    dev = _load_device(device)
    if p.suffix in (".plan", ".engine", ".trt"):
        if providers is not None:
            raise InputError("providers applies to ONNX files; a TensorRT engine runs on its own runtime")
        return TensorRTEncoder(p.resolve(), dev)
    if p.suffix != ".onnx":
        raise InputError(f"path {str(p)!r}: expected an .onnx file or a TensorRT .plan / .engine")
    return OrtEncoder(p.resolve(), dev, providers, threads=threads, graph_optimization_level=graph_optimization_level,
                      optimized_model_cache=optimized_model_cache, session_config=session_config)  # fmt: skip
