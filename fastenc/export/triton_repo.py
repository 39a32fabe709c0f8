"""Triton Inference Server model repositories for the supported towers.

    to_triton_repository(model, repo_dir, name, *, backend="onnxruntime", ...) -> Path of repo_dir/name
    triton_config(name, backend, inputs, outputs, *, max_batch_size, ...) -> config.pbtxt text

Layout written (the folder appears complete or not at all: it is built in a hidden `.fastenc-export-*` folder inside
repo_dir and renamed into place; one left by a killed export is removed by the next export into repo_dir):

    repo_dir/name/config.pbtxt
    repo_dir/name/<version>/model.onnx   (+ model.onnx.data for weights over ~1.8 GB)   backend="onnxruntime"
    repo_dir/name/<version>/model.plan                                                   backend="tensorrt"

config.pbtxt lists every input and output with its Triton data type and dims (-1 for a dynamic axis). One tower
(all inputs and outputs batch-major): max_batch_size > 0, the batch dimension left out of dims, and
dynamic_batching on. The joint CLIP / SigLIP models have two independent batches (texts and images; their logits are
image_batch x text_batch), which Triton's batcher cannot split, so they get max_batch_size 0, full dims and no
dynamic batching.

backend="onnxruntime" exports with ORT's fusions by default (optimize=True; the Triton ORT backend runs them on CPU
and CUDA). backend="tensorrt" exports plain ONNX and builds the engine with `to_tensorrt` (needs tensorrt and a GPU,
checked before anything is written); its profiles' largest batch is the default max_batch_size.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..core.errors import InputError
from .onnx_export import TensorSpec, export_onnx, read_io, staging
from .tensorrt_engine import DEFAULT_AXES, _check_tensorrt, resolve_profiles, to_tensorrt

BACKENDS = ("onnxruntime", "tensorrt")
TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
DEFAULT_MAX_BATCH = 64


def _batch_major(specs: list[TensorSpec]) -> bool:
    """Every tensor's first dim is the same dynamic axis: Triton may batch requests along it."""
    firsts = {s.dims[0] if s.dims else None for s in specs}
    return len(firsts) == 1 and isinstance(next(iter(firsts)), str)


def _tensor_block(specs: list[TensorSpec], drop_batch: bool) -> str:
    items = []
    for s in specs:
        if s.dtype not in TRITON_TYPES:
            raise InputError(f"tensor {s.name!r} has element type {s.dtype}, which has no Triton data type")
        dims = s.dims[1:] if drop_batch else s.dims
        dims_text = ", ".join(str(d) if isinstance(d, int) else "-1" for d in dims)
        items.append(
            f'  {{\n    name: "{s.name}"\n    data_type: {TRITON_TYPES[s.dtype]}\n    dims: [ {dims_text} ]\n  }}'
        )
    return "[\n" + ",\n".join(items) + "\n]"


def triton_config(
    name: str,
    backend: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    *,
    max_batch_size: int,
    dynamic_batching: bool = True,
    max_queue_delay_us: int = 100,
    instance_count: int = 1,
) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig)."""
    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {max_batch_size}"]
    lines.append("input " + _tensor_block(inputs, max_batch_size > 0))
    lines.append("output " + _tensor_block(outputs, max_batch_size > 0))
    lines.append(f"instance_group [\n  {{\n    count: {instance_count}\n    kind: KIND_AUTO\n  }}\n]")
    if dynamic_batching and max_batch_size > 0:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    return "\n".join(lines) + "\n"


def to_triton_repository(
    model,
    repo_dir,
    name: str,
    *,
    backend: str = "onnxruntime",
    max_batch_size: int | None = None,
    version: int = 1,
    opset: int | None = None,
    dtype=None,
    optimize: bool | None = None,
    attention_mask: bool | None = None,
    fp16: bool = True,
    profiles=None,
    dynamic_batching: bool = True,
    max_queue_delay_us: int = 100,
    instance_count: int = 1,
    overwrite: bool = False,
    progress=None,
) -> Path:
    """Write a Triton model repository entry for `model` (see the module docstring); returns repo_dir/name.

    max_batch_size: None -> 64 for onnxruntime, the profiles' largest batch for tensorrt; ignored (0) for the joint
    models. optimize: None -> True for onnxruntime, must be False for tensorrt. attention_mask: as `to_onnx` (None:
    Optimum's inputs, so CLIP text and T5 take input_ids only; config.pbtxt lists exactly the graph's inputs).
    fp16 / profiles: TensorRT builder settings. overwrite=False refuses an existing repo_dir/name."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"name must be a model name of letters, digits, '_', '.', '-' (not starting with '.'), got "
                         f"{name!r}")  # fmt: skip
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"version must be an int >= 1, got {version!r}")
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 0):  # fmt: skip
        raise InputError(f"max_batch_size must be None or an int >= 0, got {max_batch_size!r}")
    if optimize is None:
        optimize = backend == "onnxruntime"
    if backend == "tensorrt" and optimize:
        raise InputError("optimize=True makes ORT-only (com.microsoft) ops, which TensorRT cannot parse")
    if backend == "tensorrt":
        _check_tensorrt()  # before writing anything
    if not isinstance(repo_dir, (str, os.PathLike)):
        raise InputError(f"repo_dir must be a str or os.PathLike, got {type(repo_dir).__name__}")
    repo = Path(repo_dir).expanduser()
    if repo.exists() and not repo.is_dir():
        raise InputError(f"repo_dir {str(repo)!r} exists and is not a directory")
    if not repo.exists():
        if not repo.parent.is_dir():
            raise InputError(f"repo_dir {str(repo)!r}: its parent {str(repo.parent)!r} does not exist")
        try:
            repo.mkdir()
        except OSError as e:
            raise InputError(f"repo_dir {str(repo)!r} cannot be created: {e}") from e
    if not os.access(repo, os.W_OK | os.X_OK):
        raise InputError(f"repo_dir {str(repo)!r} is not writable")
    target = repo / name
    if target.exists() and not overwrite:
        raise InputError(f"{str(target)!r} exists; pass overwrite=True to replace it")

    with staging(repo) as stage:  # also removes what killed exports into repo_dir left behind
        entry = stage / name
        vdir = entry / str(version)
        vdir.mkdir(parents=True)
        onnx_file = (vdir if backend == "onnxruntime" else stage) / "model.onnx"
        export_onnx(model, onnx_file, opset=opset, dtype=dtype, optimize=optimize, attention_mask=attention_mask,
                    progress=progress)  # fmt: skip
        inputs, outputs = read_io(onnx_file)
        batched = _batch_major(inputs + outputs)
        if backend == "tensorrt":
            shapes = resolve_profiles(onnx_file, profiles)
            if batched and max_batch_size is None:
                max_batch_size = min(p[inputs[0].name][2][0] for p in shapes)
            to_tensorrt(onnx_file, vdir / "model.plan", fp16=fp16, profiles=profiles)
        mbs = (DEFAULT_MAX_BATCH if max_batch_size is None else max_batch_size) if batched else 0
        text = triton_config(
            name,
            backend,
            inputs,
            outputs,
            max_batch_size=mbs,
            dynamic_batching=dynamic_batching,
            max_queue_delay_us=max_queue_delay_us,
            instance_count=instance_count,
        )
        (entry / "config.pbtxt").write_text(text)
        if target.exists():  # overwrite: move the old entry aside first, delete it once the new one is in place
            old = stage / (name + ".old")
            os.replace(target, old)
        os.replace(entry, target)
    return target


__all__ = ["BACKENDS", "DEFAULT_AXES", "TRITON_TYPES", "to_triton_repository", "triton_config"]
