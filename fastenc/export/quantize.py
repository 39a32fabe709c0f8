"""int8 on CPU: ONNX Runtime's dynamic quantization of the linear layers, with an accuracy report against fp32.

    export_onnx(model, path, quantize="int8-dynamic")          -> ExportReport with .quantization (a dict of the below)
    quantization_report(tower, fp32_path, int8_path)           -> QuantizationReport

What is quantized. `onnxruntime.quantization.quantize_dynamic` with int8 weights (QInt8, per output channel) on the
MatMuls whose second input is a weight (the linear layers: q/k/v/o projections, MLP, the final projections); the
attention products (activation x activation), embeddings, norms and softmax stay fp32. At run time ORT quantizes each
activation per tensor on the fly (DynamicQuantizeLinear -> MatMulInteger), so no calibration data is needed.

Accuracy report (always computed on export; `QuantizationReport`). A fixed synthetic probe set: PROBE_QUERIES inputs
(queries) and PROBE_CLASSES inputs (classes) from the tower's own input generator (fixed seeds; token ids with EOS at
varying positions, random pixels). Both graphs embed both sets; the report gives
  - cosine similarity, int8 vs fp32, of each query's pooled embedding (text_embeds / image_embeds, else
    pooler_output, else the masked mean of last_hidden_state for T5): min and mean;
  - top-1 zero-shot agreement: the fraction of queries whose nearest class (cosine) is the same under int8 as under
    fp32. The joint CLIP / SigLIP models classify the probe images against the probe texts (logits_per_image).
The export is refused (InputError, nothing written) when the min cosine is below `min_cosine` (default
MIN_COSINE), and up front for tower kinds listed in REFUSED with the measured reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InputError

QUANTIZE_MODES = ("int8-dynamic",)
MIN_COSINE = 0.99  # pooled-embedding cosine (int8 vs fp32) below which the export is refused
PROBE_QUERIES = 16
PROBE_CLASSES = 8
PROBE_SEQ = 16

# tower kind -> why int8-dynamic is refused before anything is exported
REFUSED: dict[str, str] = {}


def check_quantize(quantize, out_dtype: torch.dtype, optimize: bool, kind: str) -> str | None:
    if quantize is None:
        return None
    if quantize not in QUANTIZE_MODES:
        raise InputError(f"quantize must be None or one of {QUANTIZE_MODES}, got {quantize!r}")
    if out_dtype != torch.float32:
        raise InputError(f"quantize={quantize!r} quantizes an fp32 graph; got dtype {out_dtype} (use dtype=None or "
                         "torch.float32)")  # fmt: skip
    if optimize:
        raise InputError(f"quantize={quantize!r} runs on the plain graph; pass optimize=False")
    if kind in REFUSED:
        raise InputError(f"quantize={quantize!r} is refused for {kind} towers: {REFUSED[kind]}")
    return quantize


def quantize_int8_dynamic(src: Path, dst: Path, external: bool) -> tuple[int, list[Path]]:
    """int8 weights for the linear layers' MatMuls of the ONNX file `src`, written to `dst`. Returns (number of
    MatMuls quantized, files written)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice: shape inference adds nothing on these graphs
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
            quantize_dynamic(
                str(src),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul"],
                use_external_data_format=external,
                extra_options={"MatMulConstBOnly": True},
            )
    finally:
        root.setLevel(level)
    proto = onnx.load(str(dst), load_external_data=False)
    n = sum(1 for node in proto.graph.node if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
    files = [dst] + ([dst.parent / f for f in os.listdir(dst.parent) if f != dst.name] if external else [])
    return n, files


@dataclass
class QuantizationReport:
    mode: str
    probe: str  # what was embedded: "16 queries x 8 classes (input_ids at sequence 16)"
    embedding: str  # the output compared ("text_embeds", "pooler_output", "mean(last_hidden_state)", ...)
    cosine_min: float
    cosine_mean: float
    top1_agreement: float
    quantized_matmuls: int = 0
    min_cosine: float = MIN_COSINE

    @property
    def ok(self) -> bool:
        return self.cosine_min >= self.min_cosine

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _pooled(outs: dict, feed: dict, field: str | None = None):
    """(name, pooled embeddings (N, D) as float64 numpy) from one graph's outputs."""
    import numpy as np

    for name in ([field] if field else []) + ["text_embeds", "image_embeds", "pooler_output"]:
        if name in outs:
            return name, outs[name].astype(np.float64).reshape(len(outs[name]), -1)
    h = outs["last_hidden_state"].astype(np.float64)
    mask = feed.get("attention_mask")
    if mask is None:
        mask = np.ones(h.shape[:2])
    m = mask.astype(np.float64)[..., None]
    return "mean(last_hidden_state)", (h * m).sum(1) / np.maximum(m.sum(1), 1.0)


def _cosine_rows(a, b):
    import numpy as np

    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-30)


def _normed(x):
    import numpy as np

    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def quantization_report(tower, fp32_path, int8_path, *, min_cosine: float = MIN_COSINE, quantized_matmuls: int = 0,
                        mode: str = "int8-dynamic") -> QuantizationReport:  # fmt: skip
    """int8 vs fp32 on the fixed synthetic probe set (see the module docstring)."""
    import numpy as np

    s32, s8 = _session(fp32_path), _session(int8_path)
    names = [i.name for i in s32.get_inputs()]
    out_names = [o.name for o in s32.get_outputs()]

    def feed_for(batch: int, seed: int, image_batch: int | None = None) -> dict:
        inputs = tower.make_inputs(batch, PROBE_SEQ, image_batch=image_batch, seed=seed)
        return {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in names}

    def run(sess, feed) -> dict:
        return dict(zip(out_names, sess.run(out_names, feed), strict=True))

    if tower.kind in ("clip", "siglip"):  # images (queries) against texts (classes), as zero-shot classification does
        feed = feed_for(PROBE_CLASSES, 101, image_batch=PROBE_QUERIES)
        o32, o8 = run(s32, feed), run(s8, feed)
        cos = np.concatenate([_cosine_rows(*(o[k].astype(np.float64) for o in (o32, o8)))
                              for k in ("image_embeds", "text_embeds")])  # fmt: skip
        agree = float((o32["logits_per_image"].argmax(1) == o8["logits_per_image"].argmax(1)).mean())
        embedding = "image_embeds + text_embeds"
    else:
        fq, fc = feed_for(PROBE_QUERIES, 101), feed_for(PROBE_CLASSES, 202)
        embedding, q32 = _pooled(run(s32, fq), fq)
        _, q8 = _pooled(run(s8, fq), fq, embedding if not embedding.startswith("mean") else None)
        _, c32 = _pooled(run(s32, fc), fc)
        _, c8 = _pooled(run(s8, fc), fc)
        cos = _cosine_rows(q32, q8)
        top32 = (_normed(q32) @ _normed(c32).T).argmax(1)
        top8 = (_normed(q8) @ _normed(c8).T).argmax(1)
        agree = float((top32 == top8).mean())
    what = "pixel_values" if "input_ids" not in names else f"input_ids at sequence {PROBE_SEQ}"
    if tower.kind in ("clip", "siglip"):
        what = f"pixel_values vs input_ids at sequence {PROBE_SEQ}"
    return QuantizationReport(
        mode=mode,
        probe=f"{PROBE_QUERIES} queries x {PROBE_CLASSES} classes ({what}; fixed seeds)",
        embedding=embedding,
        cosine_min=float(cos.min()),
        cosine_mean=float(cos.mean()),
        top1_agreement=agree,
        quantized_matmuls=quantized_matmuls,
        min_cosine=min_cosine,
    )
