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

from ..core.lazy import lazy_names

_LAZY = {  # public name -> its module, imported on first use (they import torch; `fastenc export --help` does not)
    "ExportReport": ".onnx_export",
    "OnnxParityReport": ".onnx_export",
    "TensorSpec": ".onnx_export",
    "export_onnx": ".onnx_export",
    "onnx_parity": ".onnx_export",
    "read_io": ".onnx_export",
    "to_onnx": ".onnx_export",
    "resolve_profiles": ".tensorrt_engine",
    "to_tensorrt": ".tensorrt_engine",
    "supported_classes": ".towers",
    "to_triton_repository": ".triton_repo",
    "triton_config": ".triton_repo",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY)


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
