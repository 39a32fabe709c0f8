"""Exporters: ONNX (with ONNX Runtime's transformer fusions and a parity check), TensorRT engines, Triton Inference
Server model repositories, and the `fastenc export` command (`cli.add_export_parser`).

    to_onnx(model, path, *, opset=None, dtype=None, optimize=False, exporter="torchscript", attention_mask=None)
    export_onnx(model, path, ..., quantize=None | "int8-dynamic", nested_outputs=False) -> ExportReport
                                                         same export, with the fusions fired and the I/O written; int8:
                                                         the accuracy report vs fp32 (see quantize.py)
    onnx_parity(model, path, *, sizes=None) -> OnnxParityReport
    to_tensorrt(onnx_path, engine_path, *, fp16=True, bf16=False, profiles=None, timing_cache=None) -> Path
    to_triton_repository(model, repo_dir, name, *, backend="onnxruntime" | "tensorrt", ...) -> Path

onnx / onnxruntime (the `export` extra) and tensorrt are imported only when used. Running the exported files as
drop-in encoders: fastenc.runtime (`load`, and `fastenc.optimize(model, backend="onnxruntime")`)."""

from .onnx_export import (
    ExportReport,
    OnnxParityReport,
    TensorSpec,
    export_onnx,
    onnx_parity,
    read_io,
    to_onnx,
)
from .tensorrt_engine import resolve_profiles, to_tensorrt
from .towers import supported_classes
from .triton_repo import to_triton_repository, triton_config

__all__ = [
    "ExportReport",
    "OnnxParityReport",
    "TensorSpec",
    "export_onnx",
    "onnx_parity",
    "read_io",
    "resolve_profiles",
    "supported_classes",
    "to_onnx",
    "to_tensorrt",
    "to_triton_repository",
    "triton_config",
]
