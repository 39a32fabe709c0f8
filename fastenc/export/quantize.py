"""int8 on CPU: ONNX Runtime's dynamic quantization of the linear layers, with an accuracy report against fp32.

    export_onnx(model, path, quantize="int8-dynamic")          -> ExportReport with .quantization (a dict of the below)
    quantization_report(tower, fp32_path, int8_path)           -> QuantizationReport

What is quantized. `onnxruntime.quantization.quantize_dynamic` on the MatMuls whose second input is a weight (the
linear layers: q/k/v/o projections, MLP, the final projections), weights per output channel; the attention products
(activation x activation), embeddings, norms and softmax stay fp32. At run time ORT quantizes each activation per
tensor to uint8 on the fly (DynamicQuantizeLinear -> MatMulInteger), so no calibration data is needed.

The weight format depends on the CPU (`int8_format="auto"`, the default; `choose_int8_format`). ORT's u8s8 GEMM
(uint8 activations x int8 weights) runs on x86 without VNNI through VPMADDUBSW, which adds pairs of u8*s8 products
into int16 and saturates (255*127*2 > 32767): on an AVX2-only AMD EPYC the pooled cosine of full-range int8 weights
fell to 0.986 (CLIP text), 0.953 (T5), 0.638 (SigLIP). ORT's documentation advises reduce_range (7-bit weights) or
U8U8 there; VNNI / AMX (VPDPBUSD, 32-bit accumulation) and ARM do not saturate. INT8_FORMATS:
  - "s8": int8 weights, full range, per channel: CPUs with AVX512-VNNI, AVX-VNNI or AMX-INT8 (ORT's fast u8s8
    path), and ARM (aarch64);
  - "u8": uint8 weights per channel (ORT's U8U8 kernel, which widens to int16 before multiplying: no saturation on
    any ISA, full 8 bits): x86 without VNNI (AVX2, AVX-512 without VNNI) and CPUs whose features could not be read.
    On the AVX2-only EPYC it kept the highest min cosine of every candidate on all five towers, at the speed of s8;
  - "s8-reduce-range": int8 weights in [-64, 63] (u8 x s7 pairs fit int16: no saturation), per channel: ORT's other
    advice, one bit less of weight precision (forced only).
`int8_format=` (export_onnx) or the FASTENC_INT8_FORMAT environment variable (also for optimize(backend=
"onnxruntime", quantize=...)) forces one. The format, the reason and the CPU features it was chosen from go into the
report (`QuantizationReport.int8_format`, `.cpu`, ...) and the ONNX metadata ("fastenc.int8_format",
"fastenc.int8_cpu"). A graph runs on any CPU; one quantized as "s8" on a VNNI machine saturates on an AVX2 one.

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
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.errors import InputError

QUANTIZE_MODES = ("int8-dynamic",)
MIN_COSINE = 0.99  # pooled-embedding cosine (int8 vs fp32) below which the export is refused
PROBE_QUERIES = 16
PROBE_CLASSES = 8
PROBE_SEQ = 16

# tower kind -> why int8-dynamic is refused before anything is exported
REFUSED: dict[str, str] = {}


@dataclass(frozen=True)
class Int8Format:
    """How quantize_dynamic stores the linear layers' weights (activations are uint8 per tensor in every format)."""

    name: str
    weight_type: str  # "int8" (QInt8) or "uint8" (QUInt8)
    reduce_range: bool  # 7-bit weights
    per_channel: bool  # one scale (and zero point) per output channel


INT8_FORMATS = {
    "s8": Int8Format("s8", "int8", reduce_range=False, per_channel=True),
    "s8-reduce-range": Int8Format("s8-reduce-range", "int8", reduce_range=True, per_channel=True),
    "u8": Int8Format("u8", "uint8", reduce_range=False, per_channel=True),
}
INT8_FORMAT_CHOICES = ("auto", *INT8_FORMATS)
INT8_FORMAT_ENV = "FASTENC_INT8_FORMAT"
# /proc/cpuinfo flags of the int8 dot-product instructions that accumulate u8*s8 in 32 bits (no int16 saturation)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# the flags recorded with the choice
REPORTED_FLAGS = ("avx2", "avx512f", "avx512bw", *VNNI_FLAGS, "asimd", "asimddp")


@dataclass(frozen=True)
class CpuFeatures:
    machine: str  # platform.machine(): "x86_64", "aarch64", ...
    flags: frozenset  # /proc/cpuinfo "flags" (x86) / "Features" (ARM) of the first processor; empty if unknown
    source: str  # where the flags came from: "/proc/cpuinfo", or "unknown"

    def describe(self) -> str:
        shown = [f for f in REPORTED_FLAGS if f in self.flags]
        return f"{self.machine} [{' '.join(shown) or 'no avx2/avx512/vnni flags'}] (from {self.source})"


def parse_cpuinfo(text: str) -> frozenset:
    """The feature flags of the first processor in a /proc/cpuinfo text (x86 "flags", ARM "Features")."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """This machine's CPU features (Linux: /proc/cpuinfo; elsewhere the flags are unknown)."""
    machine = platform.machine().lower() or "unknown"
    try:
        flags = parse_cpuinfo(Path(cpuinfo).read_text(errors="replace"))
    except OSError:
        flags = frozenset()
    return CpuFeatures(machine, flags, str(cpuinfo) if flags else "unknown")


def choose_int8_format(flags, machine: str = "x86_64") -> tuple[Int8Format, str]:
    """(format, reason) for a CPU with these feature flags: a pure function of its arguments (see the module
    docstring). Unknown flags on x86 get "u8", which does not saturate anywhere."""
    flags = frozenset(flags)
    machine = machine.lower()
    if machine in ("aarch64", "arm64") or machine.startswith("armv8"):
        return INT8_FORMATS["s8"], "ARM: ORT's int8 GEMM does not saturate"
    vnni = [f for f in VNNI_FLAGS if f in flags]
    if vnni:
        return INT8_FORMATS["s8"], f"{'/'.join(vnni)}: u8s8 accumulates in 32 bits (no saturation)"
    if not flags:
        return INT8_FORMATS["u8"], "CPU features unknown: u8u8 does not saturate on any ISA"
    isa = "AVX-512" if "avx512bw" in flags else "AVX2" if "avx2" in flags else "x86 without AVX2"
    return INT8_FORMATS["u8"], f"{isa} without VNNI: ORT's u8s8 GEMM saturates in int16 (VPMADDUBSW); u8u8 does not"


def resolve_int8_format(int8_format: str | None = None, cpu: CpuFeatures | None = None) -> tuple[Int8Format, str]:
    """The format to quantize with: `int8_format` if given and not "auto", else $FASTENC_INT8_FORMAT if set, else
    choose_int8_format for this CPU. Returns (format, reason)."""
    source = "int8_format"
    if int8_format is None or int8_format == "auto":
        env = os.environ.get(INT8_FORMAT_ENV, "").strip()
        if env and env != "auto":
            int8_format, source = env, INT8_FORMAT_ENV
    if int8_format is not None and int8_format != "auto":
        if int8_format not in INT8_FORMATS:
            raise InputError(f"{source} must be one of {INT8_FORMAT_CHOICES}, got {int8_format!r}")
        return INT8_FORMATS[int8_format], f"forced by {source}={int8_format!r}"
    cpu = cpu or cpu_features()
    return choose_int8_format(cpu.flags, cpu.machine)


class Int8FormatWarning(UserWarning):
    """An int8 graph is about to run on a CPU where its weight format saturates ONNX Runtime's int8 GEMM."""


def int8_saturation_risk(meta: dict, where: str, cpu: CpuFeatures | None = None) -> str | None:
    """The warning for a graph (its ONNX metadata `meta`) quantized with full-range int8 weights ("s8", chosen on a
    VNNI / ARM CPU or forced) that is to run on a CPU where u8s8 saturates (x86 without VNNI); None otherwise."""
    if meta.get("fastenc.int8_format") != "s8":
        return None
    cpu = cpu or cpu_features()
    fmt, reason = choose_int8_format(cpu.flags, cpu.machine)
    if fmt.name == "s8":
        return None
    return (f"{where}: quantized with int8_format 's8' (full-range int8 weights; "
            f"{meta.get('fastenc.int8_cpu', 'CPU not recorded')}), run on {cpu.describe()}: {reason}, so the "
            f"embeddings can be far from fp32 (SigLIP pooled cosine 0.64 measured on an AVX2-only EPYC); re-export "
            f"on this machine (int8_format='auto' picks {fmt.name!r})")  # fmt: skip


def warn_if_int8_saturates(meta: dict, path) -> None:
    """fastenc.runtime's CPU sessions: one Int8FormatWarning when `int8_saturation_risk` says so."""
    import warnings

    message = int8_saturation_risk(meta, f"path {str(path)!r}")
    if message:
        warnings.warn(message, Int8FormatWarning, stacklevel=4)


def int8_cache_token(quantize: str | None) -> str | None:
    """What a cache key of a quantized export must hold: the mode and the format this machine would quantize
    with now (a cache shared between an AVX2 and a VNNI machine keeps one graph per format)."""
    if quantize is None:
        return None
    return f"{quantize}/{resolve_int8_format()[0].name}"


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


def check_int8_format(quantize: str | None, int8_format) -> tuple[Int8Format, str, CpuFeatures] | None:
    """export_onnx's `int8_format` argument: None when not quantizing, else (format, reason, this CPU's features)."""
    if int8_format is not None and (not isinstance(int8_format, str) or int8_format not in INT8_FORMAT_CHOICES):
        raise InputError(f"int8_format must be None or one of {INT8_FORMAT_CHOICES}, got {int8_format!r}")
    if quantize is None:
        if int8_format is not None:
            raise InputError(f"int8_format={int8_format!r} applies to quantize='int8-dynamic'; got quantize=None")
        return None
    cpu = cpu_features()
    fmt, reason = resolve_int8_format(int8_format, cpu)
    return fmt, reason, cpu


def quantize_int8_dynamic(src: Path, dst: Path, external: bool,
                          fmt: Int8Format | None = None) -> tuple[int, list[Path]]:  # fmt: skip
    """int8 weights (in `fmt`, default: resolve_int8_format() for this CPU) for the linear layers' MatMuls of the
    ONNX file `src`, written to `dst`. Returns (number of MatMuls quantized, files written)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fmt = fmt or resolve_int8_format()[0]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice: shape inference adds nothing on these graphs
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
            quantize_dynamic(
                str(src),
                str(dst),
                weight_type=QuantType.QInt8 if fmt.weight_type == "int8" else QuantType.QUInt8,
                per_channel=fmt.per_channel,
                reduce_range=fmt.reduce_range,
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
    int8_format: str = ""  # INT8_FORMATS key
    weight_type: str = ""  # "int8" / "uint8"
    reduce_range: bool = False
    per_channel: bool = True
    format_reason: str = ""  # why this format: the CPU features, or "forced by ..."
    cpu: str = ""  # CpuFeatures.describe() of the machine that quantized and measured

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


def _pooled_embeddings(outs: dict, feed: dict, field: str | None = None):
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
                        mode: str = "int8-dynamic", fmt: Int8Format | None = None, format_reason: str = "",
                        cpu: CpuFeatures | None = None) -> QuantizationReport:  # fmt: skip
    """int8 vs fp32 on the fixed synthetic probe set (see the module docstring); `fmt`, `format_reason` and `cpu`
    (what the graph was quantized with, and why) are recorded as given."""
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
        embedding, q32 = _pooled_embeddings(run(s32, fq), fq)
        _, q8 = _pooled_embeddings(run(s8, fq), fq, embedding if not embedding.startswith("mean") else None)
        _, c32 = _pooled_embeddings(run(s32, fc), fc)
        _, c8 = _pooled_embeddings(run(s8, fc), fc)
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
        int8_format=fmt.name if fmt else "",
        weight_type=fmt.weight_type if fmt else "",
        reduce_range=fmt.reduce_range if fmt else False,
        per_channel=fmt.per_channel if fmt else True,
        format_reason=format_reason,
        cpu=(cpu or cpu_features()).describe(),
    )
