"""TensorRT engines from the exported ONNX files, through TensorRT's Python API (imported only here, when called).

    to_tensorrt(onnx_path, engine_path, *, fp16=True, bf16=False, profiles=None, timing_cache=None,
                workspace_gib=None) -> Path
    resolve_profiles(onnx_path, profiles) -> list[dict[input name, (min shape, opt shape, max shape)]]

Optimisation profiles say which input shapes the engine accepts. `profiles` is a list (one engine profile each) of
dicts keyed either by axis name -> (min, opt, max) sizes, e.g. {"batch": (1, 8, 64), "sequence": (1, 77, 77)},
or by input name -> (min shape, opt shape, max shape) tuples; a dict may mix both (input names win). Axes not given
take DEFAULT_AXES (sequence capped at the model's position limit, which to_onnx records in the file's metadata).
Fixed dimensions must be given as themselves. None: one profile from the defaults.

The graph must hold plain ONNX ops: export with optimize=False (ORT's fused com.microsoft ops do not parse).
fp16 / bf16 set the builder flags that let TensorRT pick half-precision kernels per layer (weights stay as in the
file; an fp32 ONNX file is the usual input). The timing cache (a file path) is read if it exists and written back,
so rebuilding for the same GPU skips kernel timing. The engine file is written atomically, with
`<engine>.fastenc.json` beside it (the model class, output class and axis names `fastenc.runtime.load` reads).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import BackendUnavailableError, InputError
from .onnx_export import check_output_path, need_package, read_io

# axis name -> (min, opt, max)
DEFAULT_AXES = {
    "batch": (1, 8, 64),
    "text_batch": (1, 8, 64),
    "image_batch": (1, 8, 64),
    "sequence": (1, 128, 512),
}


def _metadata(onnx_path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _triple(value, what: str) -> tuple:
    if not (isinstance(value, (tuple, list)) and len(value) == 3):
        raise InputError(f"profiles: {what} must be (min, opt, max), got {value!r}")
    return tuple(value)


def resolve_profiles(onnx_path, profiles=None) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """Explicit (min, opt, max) shapes for every input of the ONNX file, per profile (see the module docstring);
    InputError for a malformed or inconsistent profile."""
    if not Path(onnx_path).is_file():
        raise InputError(f"onnx_path {str(onnx_path)!r} is not a file")
    inputs, _ = read_io(onnx_path)
    meta = _metadata(onnx_path)
    defaults = dict(DEFAULT_AXES)
    if meta.get("fastenc.max_sequence"):
        top = int(meta["fastenc.max_sequence"])
        defaults["sequence"] = (1, min(defaults["sequence"][1], top), top)
    if profiles is None:
        profiles = [{}]
    if isinstance(profiles, dict):
        profiles = [profiles]
    if not isinstance(profiles, (list, tuple)) or not profiles:
        raise InputError(f"profiles must be None, a dict or a non-empty list of dicts, got {profiles!r}")
    names = {i.name for i in inputs}
    out = []
    for k, prof in enumerate(profiles):
        if not isinstance(prof, dict):
            raise InputError(f"profiles[{k}] must be a dict, got {type(prof).__name__}")
        axes = dict(defaults)
        by_input = {}
        for key, value in prof.items():
            if key in names:
                by_input[key] = _triple(value, f"profiles[{k}][{key!r}]")
            elif key in DEFAULT_AXES or any(key in i.dims for i in inputs):
                axes[key] = _triple(value, f"profiles[{k}][{key!r}]")
            else:
                raise InputError(
                    f"profiles[{k}]: {key!r} is neither an input ({sorted(names)}) nor a dynamic axis of this model"
                )
        shapes = {}
        for spec in inputs:
            if spec.name in by_input:
                triple = tuple(tuple(int(d) for d in s) for s in by_input[spec.name])
            else:
                missing = [d for d in spec.dims if isinstance(d, str) and d not in axes]
                if missing:
                    raise InputError(f"profiles[{k}]: no sizes for axis {missing[0]!r} of input {spec.name!r}")
                triple = tuple(tuple(d if isinstance(d, int) else int(axes[d][j]) for d in spec.dims) for j in range(3))
            lo, opt, hi = triple
            label = f"profiles[{k}] input {spec.name!r}"
            if not (len(lo) == len(opt) == len(hi) == len(spec.dims)):
                raise InputError(f"{label}: shapes must have {len(spec.dims)} dims like {spec.dims}, got {triple}")
            for d, want in enumerate(spec.dims):
                if isinstance(want, int) and not lo[d] == opt[d] == hi[d] == want:
                    raise InputError(f"{label}: dim {d} is fixed at {want}, got min/opt/max {lo[d]}/{opt[d]}/{hi[d]}")
                if not 1 <= lo[d] <= opt[d] <= hi[d]:
                    raise InputError(f"{label}: dim {d} needs 1 <= min <= opt <= max, got {lo[d]}/{opt[d]}/{hi[d]}")
            shapes[spec.name] = triple
        out.append(shapes)
    return out


def _check_tensorrt():
    trt = need_package("tensorrt", "to_tensorrt (NVIDIA TensorRT 10)", "tensorrt")
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        has_cuda = True
    if not has_cuda:
        raise BackendUnavailableError("to_tensorrt needs a CUDA GPU: TensorRT builds engines for the GPU it runs on")
    return trt


def to_tensorrt(
    onnx_path,
    engine_path,
    *,
    fp16: bool = True,
    bf16: bool = False,
    profiles=None,
    timing_cache=None,
    workspace_gib: float | None = None,
) -> Path:
    """Build a serialized TensorRT engine (a `.plan`) from an ONNX file (see the module docstring). Returns its
    Path. BackendUnavailableError without tensorrt or a CUDA GPU; InputError for bad paths, profiles, or a graph
    TensorRT's ONNX parser rejects (its messages are included)."""
    for name, flag in (("fp16", fp16), ("bf16", bf16)):
        if not isinstance(flag, bool):
            raise InputError(f"{name} must be a bool, got {type(flag).__name__}")
    shapes = resolve_profiles(onnx_path, profiles)
    out = check_output_path(engine_path)
    cache_path = None if timing_cache is None else check_output_path(timing_cache)
    trt = _check_tensorrt()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x; implied (and deprecated) in 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(Path(onnx_path).resolve())):  # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(
            f"onnx_path {str(onnx_path)!r}: TensorRT's ONNX parser failed ({errors}); export with optimize=False "
            "(ORT-fused com.microsoft ops are not TensorRT ops)"
        )
    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if bf16:
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise BackendUnavailableError(f"this TensorRT {trt.__version__} has no BF16 builder flag (needs >= 9)")
        config.set_flag(trt.BuilderFlag.BF16)
    for prof_shapes in shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof_shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise InputError(f"onnx_path {str(onnx_path)!r}: TensorRT could not build an engine (see its log above)")
    _write_atomic(out, bytes(engine))
    _write_atomic(out.with_name(out.name + ".fastenc.json"), _sidecar(onnx_path).encode())
    if cache_path is not None:
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return out


def _sidecar(onnx_path) -> str:
    """What fastenc.runtime.load needs to run the engine as the exported model (the engine keeps no metadata): the
    ONNX file's fastenc metadata and each input's named axes (dim index -> axis name)."""
    import json

    meta = {k: v for k, v in _metadata(onnx_path).items() if k.startswith("fastenc.")}
    inputs, _ = read_io(onnx_path)
    meta["input_axes"] = {i.name: {str(d): a for d, a in enumerate(i.dims) if isinstance(a, str)} for i in inputs}
    return json.dumps(meta, indent=1)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
