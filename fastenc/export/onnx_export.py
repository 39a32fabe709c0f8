"""ONNX export of the supported towers, ONNX Runtime's transformer fusions, and parity of the exported graph.

    to_onnx(model, path, *, opset=None, dtype=None, optimize=False, exporter="torchscript", attention_mask=None) -> Path
    export_onnx(model, path, ...)  -> ExportReport   (same export; the report lists I/O, fusions fired, files written)
    onnx_parity(model, path, sizes=None) -> OnnxParityReport   (ORT vs transformers at several batch/sequence sizes)
    read_io(path) -> (inputs, outputs)                          (names, ONNX element types, dims with axis names)

What is traced. A fastenc-optimized model is exported as its transformers class over the same weights, so the graph
holds plain ONNX ops only. Attention is traced with transformers' eager implementation (explicit MatMul / Softmax,
the pattern ORT's Attention fusion matches; numerically the same as SDPA to ~1e-6). Tracing runs in fp32 (a
half-precision model is copied to fp32 for it); dtype=torch.float16 converts the traced graph with ORT's float16
converter (inputs and outputs become fp16 as well; int64 token inputs stay int64).

Exporters. "torchscript" (default) is torch.onnx's tracer (`dynamo=False`): present in torch 2.11 and 2.13 (where it
prints a DeprecationWarning), ~20x faster to export, and its graphs are what ORT's fusions were written against.
"dynamo" is torch.export-based (`dynamo=True`, needs onnxscript, opset >= 18). Both give graphs that hold for any
batch and sequence size: they are checked at sizes other than the traced example (EOS pooling and T5's
relative-position buckets included) by `onnx_parity` and tests/test_export.py.

Writing. Nothing appears at `path` until the graph has been exported, post-processed and passed `onnx.checker`: work
happens in a hidden temporary folder beside `path` (`.fastenc-export-*`, same filesystem) and the files are renamed into
place at the end (the folder is removed on any failure). An export killed outright (kill -9) cannot remove its folder;
the next export into the same folder does (`remove_stale_staging`: a lock file held while an export runs tells a
killed export's folder from a running one's). Models whose weights exceed ~1.8 GB (e.g. a T5-XXL encoder) are saved
with ONNX external data: all weights in one `<name>.data` file next to `<name>`, which must travel with it (checked at
full scale: a 2.84 GB fp32 T5 encoder of T5-XXL width, 3 layers, exported in ~1 min with ~6.6 GB peak RSS, ORT parity
1.3e-6).

optimize=True runs `onnxruntime.transformers.optimizer.optimize_model` (opt_level 0: only its pattern fusions, no
ORT-runtime-specific graph rewrites) with the model_type that suits the tower (towers.ORT_MODEL_TYPE) and records
`get_fused_operator_statistics()` in the report. Fused nodes (Attention, SkipLayerNormalization, QuickGelu,
BiasGelu, SkipSimplifiedLayerNormalization, ...) live in the com.microsoft domain: the graph then runs on ONNX
Runtime only (use optimize=False for TensorRT).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.errors import BackendUnavailableError, InputError
from .towers import Tower, eager_attention, tower_of

DEFAULT_OPSET = 18
MIN_OPSET = {"torchscript": 17, "dynamo": 18}  # 17: first opset with LayerNormalization; dynamo emits >= 18
EXPORTERS = ("torchscript", "dynamo")
LARGE_BYTES = int(1.8e9)  # above this the weights go to external data (protobuf's hard limit is 2 GiB)
FP32_TOLERANCE = 1e-4  # max |ort - ref| / max |ref| per output
FP16_TOLERANCE = 2e-2  # fp16 graph vs the fp32 transformers model

_ELEM = {1: "float32", 7: "int64", 6: "int32", 10: "float16", 16: "bfloat16", 9: "bool", 11: "float64"}


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "float32", "float16", "int64"
    dims: list  # int for a fixed size, str (the axis name) for a dynamic one


@dataclass
class ExportReport:
    path: str
    model: str  # transformers class name
    kind: str
    exporter: str
    opset: int
    dtype: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    optimized: bool = False
    ort_model_type: str | None = None
    fusions: dict[str, int] = field(default_factory=dict)  # fused operator -> count (zero counts left out)
    files: list[str] = field(default_factory=list)
    external_data: bool = False
    seconds: float = 0.0
    quantize: str | None = None  # "int8-dynamic": the linear layers' MatMuls run in int8 (ORT dynamic quantization)
    quantization: dict | None = None  # QuantizationReport.to_dict(): int8 vs fp32 on the probe set

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.model} -> {self.path} (opset {self.opset}, {self.dtype}, exporter {self.exporter})"]
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            for s in specs:
                lines.append(f"  {kind:<6} {s.name:<20} {s.dtype:<8} [{', '.join(map(str, s.dims))}]")
        if self.optimized:
            fired = ", ".join(f"{k}: {v}" for k, v in sorted(self.fusions.items())) or "none"
            lines.append(f"  ORT optimizer (model_type={self.ort_model_type}) fusions fired: {fired}")
        else:
            lines.append("  ORT optimizer not run (plain ONNX ops)")
        if self.external_data:
            lines.append(f"  weights in external data: {', '.join(self.files[1:])}")
        if self.quantization:
            q = self.quantization
            lines.append(f"  {self.quantize}: {q['quantized_matmuls']} MatMuls in int8; vs fp32 on {q['probe']}: "
                         f"cosine min {q['cosine_min']:.6f} mean {q['cosine_mean']:.6f}, top-1 agreement "
                         f"{q['top1_agreement']:.3f}")  # fmt: skip
            lines.append(f"  int8_format {q['int8_format']!r} ({q['format_reason']}) on {q['cpu']}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ arguments


def need_package(module: str, what: str = "fastenc.export", extra: str = "export"):
    """The optional package `module` (onnx, onnxruntime, onnxscript, tensorrt), imported; BackendUnavailableError
    naming `what` needs it and the extra that installs it when it is missing. fastenc.runtime uses it too."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(
            f"{what} needs the `{module}` package (pip install 'fastenc[{extra}]'): {e}"
        ) from e


def check_dtype(dtype, model_dtype: torch.dtype) -> torch.dtype:
    """None -> fp16 for an fp16 model, else fp32 (bf16 models export as fp32: ORT's CPU bf16 coverage is thin)."""
    if dtype is None:
        return torch.float16 if model_dtype == torch.float16 else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    if isinstance(dtype, str) and dtype in names:
        return names[dtype]
    if dtype in (torch.float32, torch.float16):
        return dtype
    raise InputError(f"dtype must be None, torch.float32 or torch.float16 (or 'fp32' / 'fp16'), got {dtype!r}")


def check_opset(opset, exporter: str) -> int:
    onnx = need_package("onnx")
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise InputError(f"opset must be an int, got {type(opset).__name__}")
    low = MIN_OPSET[exporter]
    if opset < low:
        raise InputError(
            f"opset {opset} is too old: the {exporter} exporter needs opset >= {low} "
            f"(LayerNormalization is opset 17); default {DEFAULT_OPSET}"
        )
    if opset > newest:
        raise InputError(f"opset {opset} is newer than this onnx {onnx.__version__} knows (<= {newest})")
    return opset


def check_output_path(path) -> Path:
    """Resolve `path`, raising InputError (naming it) if it cannot be written: a folder, a missing or read-only
    parent folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"path {str(p)!r} is a directory; give a file name such as {str(p / 'model.onnx')!r}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"path {str(p)!r}: its directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"path {str(p)!r}: directory {str(parent)!r} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"path {str(p)!r} exists and is not writable")
    return p.resolve()


STAGING_PREFIX = ".fastenc-export-"
_LOCK = ".lock"  # inside a staging folder: flock()ed by the exporting process for as long as it runs
UNLOCKED_STALE_S = 3600.0  # a staging folder without a lock file (an older fastenc's) is stale after an hour


def _lock_held(lock: Path) -> bool | None:
    """True if a live process holds `lock` (flock), False if nobody does, None if this cannot be told here (no
    fcntl, as on Windows: such folders are left alone)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK: held; ENOLCK and the like (some network filesystems): treated as held
        return True
    finally:
        os.close(fd)  # also releases the probe's own lock
    return False


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the temporary folders that exports into `parent` left when they were killed (kill -9, OOM killer, power
    loss: no `finally` ran). A folder is stale when no process holds its lock file; a folder without one (written by
    an older fastenc) when it is older than UNLOCKED_STALE_S. Folders of exports still running are never touched.
    Returns the folders removed."""
    removed = []
    try:
        candidates = [d for d in Path(parent).glob(STAGING_PREFIX + "*") if d.is_dir() and not d.is_symlink()]
    except OSError:
        return removed
    for d in candidates:
        lock = d / _LOCK
        if lock.exists():
            stale = _lock_held(lock) is False
        else:
            try:
                stale = time.time() - d.stat().st_mtime > UNLOCKED_STALE_S
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
    return removed


@contextlib.contextmanager
def staging(parent: Path):
    """A hidden temporary folder in `parent` (same filesystem, so renames are atomic), removed on exit.

    Stale folders of killed exports into `parent` are removed first (`remove_stale_staging`). This one holds a lock
    file, flock()ed for as long as the export runs (released by the kernel when the process dies, however it dies),
    so a later export can tell it from a live one. The lock file is locked under a temporary name and renamed into
    place, so no other process ever sees it unlocked while this one lives."""
    parent = Path(parent)
    remove_stale_staging(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    except OSError as e:
        raise InputError(f"cannot write in {str(parent)!r}: {e}") from e
    fd = None
    try:
        pending = tmp / (_LOCK + ".new")
        fd = os.open(pending, os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (ImportError, OSError):  # no flock here: the folder is then never judged stale (see _lock_held)
            pass
        os.replace(pending, tmp / _LOCK)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def commit_files(staged: list[Path], dest_dir: Path) -> list[Path]:
    """Rename staged files into dest_dir: external data first, the model file (staged[0]) last."""
    out = []
    umask = os.umask(0)
    os.umask(umask)
    for f in staged[1:] + staged[:1]:
        target = dest_dir / f.name
        os.chmod(f, 0o666 & ~umask)  # as a plain open() would have made it (some writers use 0600)
        os.replace(f, target)
        out.append(target)
    return [out[-1]] + out[:-1]


# ------------------------------------------------------------------------------------------------- metadata


def check_metadata(metadata) -> dict[str, str]:
    """export_onnx's `metadata`: extra str -> str entries for the file's metadata_props (None: none)."""
    if metadata is None:
        return {}
    ok = isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    if not ok:
        raise InputError(f"metadata must be a dict of str -> str, got {metadata!r}")
    return dict(metadata)


def token_rows(module: torch.nn.Module, kind: str) -> int | None:
    """The number of rows of a text tower's token embedding table (what transformers' lookup indexes; ids outside
    [0, rows) raise there), None for a vision tower."""
    if kind not in ("clip", "clip_text", "siglip", "siglip_text", "t5"):
        return None
    table = None
    if kind in ("clip", "siglip"):  # the joint models: their text tower's table
        table = getattr(getattr(getattr(module, "text_model", None), "embeddings", None), "token_embedding", None)
    if table is None:
        try:
            table = module.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            table = None
    weight = getattr(table, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    cfg = module.config
    return getattr(getattr(cfg, "text_config", None) or cfg, "vocab_size", None)


def export_record(tower: Tower, *, opset: int, dtype: torch.dtype, optimize: bool) -> dict[str, str]:
    """What every export records beside the class and I/O names (ONNX metadata_props): fastenc's version, the export
    options that shape the graph and, for text towers, the token-id bound the runtime checks inputs against."""
    from .._version import __version__

    meta = {"fastenc.version": __version__, "fastenc.opset": str(opset),
            "fastenc.dtype": str(dtype).replace("torch.", ""), "fastenc.optimized": str(bool(optimize)).lower(),
            "fastenc.nested_outputs": str(bool(tower.nested)).lower()}  # fmt: skip
    rows = token_rows(tower.module, tower.kind)
    if rows:
        meta["fastenc.vocab_size"] = str(rows)
    return meta


def read_metadata(path) -> dict[str, str]:
    """The metadata_props of an ONNX file (weights not read). InputError naming the path when it is not one."""
    onnx = need_package("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: not an ONNX file
        raise InputError(f"path {str(path)!r} is not an ONNX model ({type(e).__name__}: {e})") from e
    return {p.key: p.value for p in proto.metadata_props}


# ------------------------------------------------------------------------------------------------- export


def _param_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * size
    return n


def _field(out, name: str):
    """out["a.b"] -> out["a"]["b"] (nested outputs of the joint models)."""
    for part in name.split("."):
        out = out[part]
    return out


class _Wrapper(torch.nn.Module):
    """Positional inputs -> the tower's output fields as a tuple, in `outputs` order."""

    def __init__(self, module, inputs: list[str], outputs: list[str]):
        super().__init__()
        self.module, self.input_names, self.output_names = module, inputs, outputs

    def forward(self, *args):
        out = self.module(**dict(zip(self.input_names, args, strict=True)), return_dict=True)
        return tuple(_field(out, k) for k in self.output_names)


def _trace(tower: Tower, file: Path, opset: int, exporter: str, external: bool) -> None:
    example = tower.inputs_for_sizes(tower.example_sizes())
    args = tuple(example[n] for n in tower.inputs)
    wrapper = _Wrapper(tower.module, tower.inputs, tower.outputs).eval()
    with torch.no_grad(), eager_attention(tower.module), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message="The feature will be removed")
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis.*")
        # EOS pooling gathers with argmax indices, never negative
        warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
        if exporter == "torchscript":
            torch.onnx.export(
                wrapper,
                args,
                str(file),
                dynamo=False,
                input_names=tower.inputs,
                output_names=tower.outputs,
                dynamic_axes={**tower.input_axes, **tower.output_axes},
                opset_version=opset,
                do_constant_folding=True,
            )
        else:
            need_package("onnxscript", extra="export-dynamo")
            dims = {}
            for axes in tower.input_axes.values():
                for name in axes.values():
                    top = tower.max_sequence if name == "sequence" else None
                    dims.setdefault(name, torch.export.Dim(name, min=1, max=top) if top else torch.export.Dim(name))
            # forward(*args): one entry, the tuple of per-input specs
            shapes = (tuple({d: dims[a] for d, a in tower.input_axes[n].items()} for n in tower.inputs),)
            with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 - the exporter prints progress
                program = torch.onnx.export(
                    wrapper,
                    args,
                    dynamo=True,
                    input_names=tower.inputs,
                    output_names=tower.outputs,
                    dynamic_shapes=shapes,
                    opset_version=opset,
                    external_data=external,
                )
            program.save(str(file), external_data=external)


def _name_axes(proto, tower: Tower) -> None:
    """Give every dynamic dimension of the graph's inputs and outputs its axis name ("batch", "sequence", ...) and
    every other output dimension its fixed size (the tracer leaves some as generated names)."""
    axes = {**tower.input_axes, **tower.output_axes}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        shape = tower.output_shapes.get(vi.name)
        for d, dim in enumerate(vi.type.tensor_type.shape.dim):
            name = axes.get(vi.name, {}).get(d)
            if name is not None:
                dim.ClearField("dim_value")
                dim.dim_param = name
            elif shape is not None:
                dim.ClearField("dim_param")
                dim.dim_value = shape[d]


def _save(proto, file: Path, external: bool) -> list[Path]:
    import onnx

    if external:
        location = file.name + ".data"
        onnx.save_model(proto, str(file), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
        return [file, file.parent / location]
    onnx.save_model(proto, str(file))
    return [file]


def shape_logic_nodes(graph) -> list[str]:
    """Names of the nodes that compute from shapes, integer inputs and scalar constants only: positions, T5's
    relative-position buckets (log-spaced: fp16 rounding moves tokens to the wrong bucket), attention masks.
    The fp16 conversion keeps them in fp32; everything downstream of a weight or a float input becomes fp16."""
    weights = {i.name for i in graph.initializer if i.data_type in (1, 10, 11, 16) and math.prod(i.dims) > 1}
    tainted = weights | {i.name for i in graph.input if i.type.tensor_type.elem_type in (1, 10, 11, 16)}
    keep, constants = [], {}
    for i, node in enumerate(graph.node):  # topologically sorted, as ONNX requires
        if not node.name:
            node.name = f"fastenc_node_{i}"
        if node.op_type in ("Shape", "Size"):  # shapes of activations carry no activation values
            continue
        if any(x in tainted for x in node.input if x):
            tainted.update(node.output)
        elif node.op_type == "Constant":
            constants[node.output[0]] = node.name
        else:
            keep.append(node.name)
    # a scalar constant read by kept logic stays fp32 too (log(max_distance / max_exact) in fp16 moves buckets)
    kept = set(keep)
    used = {x for node in graph.node if node.name in kept for x in node.input}
    return keep + [name for out, name in constants.items() if out in used]


def to_fp16(proto, scratch: Path | None = None):
    """fp32 graph -> fp16 weights, activations, float inputs and outputs (shape logic stays fp32), through ORT's
    converter. scratch: a file path for graphs over 2 GB (the converter's shape inference then runs on a file)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    block = shape_logic_nodes(proto.graph)  # also names unnamed nodes, before any save
    source = proto
    if scratch is not None:
        _save(proto, scratch, True)
        source = str(scratch)
    proto = convert_float_to_float16(source, keep_io_types=False, node_block_list=block)
    model = OnnxModel(proto)
    model.topological_sort()  # the converter appends its Cast nodes at the end
    return model.model


def _optimize(tower: Tower, src: Path, dst: Path, fp16: bool, external: bool) -> tuple[dict, list[Path]]:
    need_package("onnxruntime")
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = tower.heads_and_hidden
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
        om = optimize_model(str(src), model_type=tower.ort_model_type, num_heads=heads, hidden_size=hidden, opt_level=0)
    fusions = {k: int(v) for k, v in om.get_fused_operator_statistics().items() if v}
    if fp16:
        om.convert_float_to_float16(keep_io_types=False, node_block_list=shape_logic_nodes(om.model.graph))
        om.topological_sort()
    domains = {op.domain for op in om.model.opset_import}
    if "com.microsoft" not in domains and any(n.domain == "com.microsoft" for n in om.model.graph.node):
        om.model.opset_import.add(domain="com.microsoft", version=1)
    return fusions, _save(om.model, dst, external)


def _ort_session(path, providers=None):
    ort = need_package("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def export_onnx(
    model,
    path,
    *,
    opset: int | None = None,
    dtype=None,
    optimize: bool = False,
    exporter: str = "torchscript",
    attention_mask: bool | None = None,
    progress: Callable[[str], None] | None = None,
    quantize: str | None = None,
    min_cosine: float | None = None,
    nested_outputs: bool = False,
    int8_format: str | None = None,
    metadata: dict[str, str] | None = None,
) -> ExportReport:
    """Export `model` to ONNX at `path` and return what was written (see the module docstring).

    quantize="int8-dynamic": the linear layers' MatMuls get int8 weights (ORT dynamic quantization, CPU); the
    report's `quantization` holds the int8-vs-fp32 accuracy on a fixed probe set, and the export is refused
    (InputError, nothing written) when the pooled-embedding cosine falls below `min_cosine` (default 0.99); see
    fastenc/export/quantize.py. int8_format: "auto" (None: the CPU's, see quantize.choose_int8_format), "s8",
    "s8-reduce-range" or "u8". nested_outputs=True (joint CLIP / SigLIP models): the nested text_model_output /
    vision_model_output tensors become outputs too, named "text_model_output.pooler_output" and so on (what
    fastenc.runtime needs to return complete CLIPOutput / SiglipOutput objects). Every file records in its
    metadata_props the class, its ModelOutput class, the input / output names, fastenc's version, the opset, dtype,
    whether ORT's fusions ran, the text position limit and token-id bound (`export_record`); `metadata` adds str ->
    str entries (fastenc.runtime's cache stores the weights' fingerprint and the export options there)."""
    from .quantize import MIN_COSINE, check_int8_format, check_quantize, quantization_report, quantize_int8_dynamic

    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    if exporter not in EXPORTERS:
        raise InputError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if not isinstance(optimize, bool):
        raise InputError(f"optimize must be a bool, got {type(optimize).__name__}")
    opset = check_opset(opset, exporter)
    tower = tower_of(model, attention_mask)
    if not isinstance(nested_outputs, bool):
        raise InputError(f"nested_outputs must be a bool, got {type(nested_outputs).__name__}")
    tower.nested = nested_outputs
    extra = check_metadata(metadata)
    out_path = check_output_path(path)
    onnx = need_package("onnx")
    model_dtype = next(tower.module.parameters()).dtype
    out_dtype = check_dtype(dtype, model_dtype)
    quantize = check_quantize(quantize, out_dtype, optimize, tower.kind)
    int8 = check_int8_format(quantize, int8_format)  # (format, reason, cpu) or None
    if min_cosine is None:
        min_cosine = MIN_COSINE
    if isinstance(min_cosine, bool) or not isinstance(min_cosine, (int, float)) or not -1.0 <= min_cosine <= 1.0:
        raise InputError(f"min_cosine must be a number in [-1, 1], got {min_cosine!r}")
    if model_dtype != torch.float32:
        say(f"copying the {model_dtype} model to fp32 for tracing")
        tower.module = copy.deepcopy(tower.module).float()
    external = _param_bytes(tower.module, out_dtype) > LARGE_BYTES  # the file written
    external_fp32 = _param_bytes(tower.module, torch.float32) > LARGE_BYTES  # the traced graph
    say("finding output fields and dynamic axes")
    tower.infer_outputs()
    with staging(out_path.parent) as tmp:
        traced = tmp / "traced" / out_path.name
        traced.parent.mkdir()
        say(f"tracing {tower.class_name} ({exporter} exporter, opset {opset})")
        _trace(tower, traced, opset, exporter, external_fp32)
        proto = onnx.load(str(traced), load_external_data=True)
        _name_axes(proto, tower)
        proto.doc_string = f"{tower.class_name} exported by fastenc.export"
        meta = {"fastenc.class": tower.class_name, "fastenc.kind": tower.kind, "fastenc.exporter": exporter,
                "fastenc.output_class": tower.output_class, "fastenc.outputs": ",".join(tower.outputs),
                "fastenc.inputs": ",".join(tower.inputs)}  # fmt: skip
        if quantize:
            meta["fastenc.quantize"] = quantize
            meta["fastenc.int8_format"], meta["fastenc.int8_cpu"] = int8[0].name, f"{int8[2].describe()}: {int8[1]}"
        if tower.nested_classes:
            meta["fastenc.nested_classes"] = ",".join(f"{k}={v}" for k, v in tower.nested_classes.items())
        if tower.max_sequence:
            meta["fastenc.max_sequence"] = str(tower.max_sequence)
        meta.update(export_record(tower, opset=opset, dtype=out_dtype, optimize=optimize))
        clash = sorted(set(meta) & set(extra))
        if clash:
            raise InputError(f"metadata: {clash} are written by the export itself; choose other keys")
        meta.update(extra)
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        final = tmp / "final" / out_path.name
        final.parent.mkdir()
        fusions, quant = {}, None
        if quantize or optimize:  # a checked fp32 graph first, which int8 quantization or ORT's fusions rewrite
            plain = tmp / "plain" / out_path.name
            plain.parent.mkdir()
            _save(proto, plain, external_fp32)
            del proto
            say("onnx.checker (fp32 graph)" if quantize else "onnx.checker (graph before fusion)")
            onnx.checker.check_model(str(plain))
        if quantize:
            say(f"quantizing the linear layers ({quantize})")
            n, staged = quantize_int8_dynamic(plain, final, external, int8[0])
            say("int8 vs fp32 on the probe set")
            quant = quantization_report(tower, plain, final, min_cosine=float(min_cosine), quantized_matmuls=n,
                                        fmt=int8[0], format_reason=int8[1], cpu=int8[2])  # fmt: skip
            if not quant.ok:
                raise InputError(
                    f"quantize={quantize!r} breaks parity for this {tower.class_name}: pooled-embedding cosine vs "
                    f"fp32 min {quant.cosine_min:.5f} < min_cosine {min_cosine} (mean {quant.cosine_mean:.5f}, "
                    f"top-1 agreement {quant.top1_agreement:.3f} on {quant.probe}; int8_format {int8[0].name!r}: "
                    f"{int8[1]}); nothing was written"
                )
        elif optimize:
            say(f"ORT transformer optimizer (model_type={tower.ort_model_type})")
            fusions, staged = _optimize(tower, plain, final, out_dtype == torch.float16, external)
            say("loading the fused graph in ONNX Runtime")  # com.microsoft / ORT-only ops: onnx.checker cannot judge
            _ort_session(final)
        else:
            if out_dtype == torch.float16:
                say("converting to fp16")
                scratch = None
                if external_fp32:
                    (tmp / "fp32").mkdir()
                    scratch = tmp / "fp32" / out_path.name
                proto = to_fp16(proto, scratch)
            staged = _save(proto, final, external)
            del proto
            say("onnx.checker")
            onnx.checker.check_model(str(final))
        inputs, outputs = read_io(final)
        written = commit_files(staged, out_path.parent)
    return ExportReport(
        path=str(written[0]),
        model=tower.class_name,
        kind=tower.kind,
        exporter=exporter,
        opset=opset,
        dtype=str(out_dtype).replace("torch.", ""),
        inputs=inputs,
        outputs=outputs,
        optimized=optimize,
        ort_model_type=tower.ort_model_type if optimize else None,
        fusions=fusions,
        files=[str(f) for f in written],
        external_data=external,
        seconds=time.perf_counter() - t0,
        quantize=quantize,
        quantization=quant.to_dict() if quant is not None else None,
    )


def to_onnx(
    model,
    path,
    *,
    opset: int | None = None,
    dtype=None,
    optimize: bool = False,
    exporter="torchscript",
    attention_mask: bool | None = None,
    quantize: str | None = None,
):
    """Export `model` (a supported transformers tower, or its fastenc-optimized twin) to ONNX; returns the Path.

    Dynamic "batch" / "sequence" axes (joint models: "text_batch", "image_batch", "sequence"), transformers' input
    names, output names = the ModelOutput fields; the inputs and outputs of Optimum's ONNX config for the same tower.
    attention_mask: None -> as Optimum: CLIP text, SigLIP and T5 encoders take input_ids only (what diffusers feeds;
    the graph computes transformers' forward without a mask), the joint CLIPModel also takes attention_mask; True /
    False -> the mask is / is not an input. opset: default 18, at least 17 (18 for exporter="dynamo").
    dtype: None (the model's: fp16 stays fp16, anything else fp32), torch.float32 or torch.float16.
    optimize: run ONNX Runtime's transformer fusions (the graph then needs ONNX Runtime). `export_onnx` takes the
    same arguments and returns an ExportReport (fusions fired, inputs / outputs, files written).
    quantize="int8-dynamic": int8 linear layers for ONNX Runtime on CPU (see `export_onnx`)."""
    report = export_onnx(
        model,
        path,
        opset=opset,
        dtype=dtype,
        optimize=optimize,
        exporter=exporter,
        attention_mask=attention_mask,
        quantize=quantize,
    )
    return Path(report.path)


def read_io(path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file: name, element type, dims (int or axis name; "?" if unnamed)."""
    onnx = need_package("onnx")
    proto = onnx.load(str(path), load_external_data=False)

    def spec(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return TensorSpec(vi.name, _ELEM.get(tt.elem_type, str(tt.elem_type)), dims)

    init = {i.name for i in proto.graph.initializer}
    return [spec(v) for v in proto.graph.input if v.name not in init], [spec(v) for v in proto.graph.output]


# ------------------------------------------------------------------------------------------------- parity


@dataclass
class ParityRow:
    sizes: dict  # axis name -> size
    output: str
    shape: tuple
    max_abs: float
    max_rel: float  # max |ort - ref| / max |ref|
    ok: bool
    feed: str = ""  # the inputs fed, "+"-joined: "input_ids" (transformers called without a mask) or with the mask


@dataclass
class OnnxParityReport:
    model: str
    path: str
    provider: str
    tolerance_rel: float
    rows: list[ParityRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def worst_rel(self) -> float:
        return max((r.max_rel for r in self.rows), default=math.inf)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def table(self) -> str:
        lines = [f"parity of {self.path} ({self.provider}) vs transformers {self.model}:"]
        lines.append(f"  {'feed':<29} {'sizes':<34} {'output':<20} {'shape':<14} {'max abs err':>12} "
                     f"{'max rel err':>12}  ok")  # fmt: skip
        for r in self.rows:
            sizes = " ".join(f"{k}={v}" for k, v in r.sizes.items())
            shape = "x".join(map(str, r.shape))
            ok = "yes" if r.ok else "NO"
            lines.append(f"  {r.feed:<29} {sizes:<34} {r.output:<20} {shape:<14} {r.max_abs:>12.3e} "
                         f"{r.max_rel:>12.3e}  {ok}")  # fmt: skip
        lines.append(f"  result: {'PASS' if self.ok else 'FAIL'} (max rel err {self.worst_rel:.3e}, tolerance "
                     f"{self.tolerance_rel:g})")  # fmt: skip
        return "\n".join(lines)


def default_sizes(tower: Tower) -> list[dict[str, int]]:
    """Sizes unlike the traced example (batch 2 / 3, sequence 7): batch 1, odd batches, short and long sequences
    (up to the position limit; 48 for T5, past its example and into the log-spaced relative buckets)."""
    longest = min(tower.max_sequence, 40) if tower.max_sequence else 48
    names = {n for axes in tower.input_axes.values() for n in axes.values()}
    out = []
    for batch, seq in ((1, 5), (3, 16), (4, longest)):
        sizes = {}
        for n in names:
            sizes[n] = {"batch": batch, "text_batch": batch, "image_batch": batch + 1, "sequence": seq}[n]
        out.append(dict(sorted(sizes.items())))
    return out


def onnx_parity(
    model,
    path,
    *,
    sizes: list[dict[str, int]] | None = None,
    tolerance_rel: float | None = None,
    providers: list[str] | None = None,
) -> OnnxParityReport:
    """Run the ONNX file with ONNX Runtime and the transformers model (fp32 reference) on the same random inputs
    at each entry of `sizes` (axis name -> size; default `default_sizes`), and report every output's error.

    The feed is what the file takes: with an "attention_mask" input, padded rows and their mask against transformers
    called with the same mask; without one, input_ids alone against transformers called without a mask (each row's
    `feed` says which)."""
    import numpy as np

    sess = _ort_session(path, providers)
    types = {i.name: i.type for i in sess.get_inputs()}
    tower = tower_of(model, attention_mask="attention_mask" in types)
    if next(tower.module.parameters()).dtype != torch.float32:
        tower.module = copy.deepcopy(tower.module).float()
    missing = set(tower.inputs) - set(types)
    if missing:
        raise InputError(f"path {str(path)!r}: ONNX inputs {sorted(types)} lack {sorted(missing)} for this model")
    fp16 = any("float16" in t for t in types.values()) or any("float16" in o.type for o in sess.get_outputs())
    tol = tolerance_rel if tolerance_rel is not None else (FP16_TOLERANCE if fp16 else FP32_TOLERANCE)
    report = OnnxParityReport(tower.class_name, str(path), sess.get_providers()[0], tol)
    names = [o.name for o in sess.get_outputs()]
    for i, sz in enumerate(sizes or default_sizes(tower)):
        inputs = tower.inputs_for_sizes(sz, seed=i + 1)
        ref = tower.run(inputs)
        feed = {}
        for k, v in inputs.items():
            a = v.detach().cpu().numpy()
            feed[k] = a.astype(np.float16) if "float16" in types[k] else a
        got = dict(zip(names, sess.run(names, feed), strict=True))
        for name in names:
            r = ref[name].detach().float().cpu().numpy()
            g = got[name].astype(np.float32)
            if g.shape != r.shape:
                report.rows.append(ParityRow(sz, name, tuple(r.shape), math.inf, math.inf, False, "+".join(feed)))
                continue
            max_abs = float(np.abs(g - r).max()) if r.size else 0.0
            scale = float(np.abs(r).max()) if r.size else 0.0
            rel = max_abs / scale if scale > 0 else max_abs
            ok = bool(np.isfinite(g).all()) and rel <= tol
            report.rows.append(ParityRow(sz, name, tuple(r.shape), max_abs, rel, ok, "+".join(feed)))
    return report
