"""export_onnx(quantize="int8-dynamic"): ORT dynamic quantization of the linear layers, the accuracy report on the fixed
probe set (pooled-embedding cosine and top-1 zero-shot agreement against fp32), the refusal when int8 breaks parity
(nothing written), the weight format chosen from the CPU's features (int8_format) and recorded, and
optimize(backend="onnxruntime", quantize=...). The parity tests assert the contract on whatever CPU runs them: the
format chosen for it meets the bar, and a forced format meets it or is refused."""

import os
import re
import warnings

import pytest
import torch
import transformers as tf

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

import fastenc  # noqa: E402
from fastenc import runtime  # noqa: E402
from fastenc.core.errors import InputError  # noqa: E402
from fastenc.export import export_onnx  # noqa: E402
from fastenc.export.quantize import (  # noqa: E402
    INT8_FORMAT_ENV,
    INT8_FORMATS,
    MIN_COSINE,
    CpuFeatures,
    Int8FormatWarning,
    choose_int8_format,
    cpu_features,
    int8_saturation_risk,
    parse_cpuinfo,
    resolve_int8_format,
)
from tests.test_export import clip_config, siglip_config, t5_config  # noqa: E402


def _model(kind):
    torch.manual_seed(0)
    cfg = clip_config(layers=2, width=64)
    return {
        "clip_text": lambda: tf.CLIPTextModelWithProjection(cfg.text_config),
        "clip_vision": lambda: tf.CLIPVisionModelWithProjection(cfg.vision_config),
        "clip": lambda: tf.CLIPModel(cfg),
        "siglip": lambda: tf.SiglipModel(siglip_config(2)),
        "t5": lambda: tf.T5EncoderModel(t5_config(layers=2)),
    }[kind]().eval()


def cosine_rows(a, b):
    return torch.nn.functional.cosine_similarity(a.detach().double(), b.detach().double(), dim=-1)


# any number the refusal may print: a negative cosine, an exponent, nan
FLOAT = r"(?:[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
REFUSAL = rf"breaks parity .* cosine vs fp32 min {FLOAT} < min_cosine {FLOAT}"
WEIGHT_DTYPE = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8}


@pytest.fixture(autouse=True)
def _auto_format(monkeypatch):
    monkeypatch.delenv(INT8_FORMAT_ENV, raising=False)  # the format chosen for this CPU unless a test forces one


def _quantized_weight_types(proto) -> set[int]:
    """Element types of the weights (second inputs) of the MatMulInteger nodes."""
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    return {inits[n.input[1]] for n in proto.graph.node if n.op_type == "MatMulInteger"}


@pytest.mark.parametrize("kind", ["clip_text", "clip_vision", "clip", "siglip", "t5"])
def test_int8_export_report_and_graph(tmp_path, kind):
    """The format chosen for the CPU running the test meets the parity bar on every tower, and the report and the
    ONNX metadata say which format it was, why, and from which CPU features."""
    model = _model(kind)
    fmt, reason = resolve_int8_format()
    report = export_onnx(model, tmp_path / "m.onnx", quantize="int8-dynamic")
    q = report.quantization
    assert report.quantize == "int8-dynamic" and q["ok"] and q["mode"] == "int8-dynamic", q
    assert (q["int8_format"], q["format_reason"], q["cpu"]) == (fmt.name, reason, cpu_features().describe())
    assert (q["weight_type"], q["reduce_range"], q["per_channel"]) == (fmt.weight_type, fmt.reduce_range,
                                                                      fmt.per_channel)  # fmt: skip
    assert MIN_COSINE <= q["cosine_min"] <= q["cosine_mean"] <= 1.0 + 1e-9
    assert 0.0 <= q["top1_agreement"] <= 1.0 and "16 queries x 8 classes" in q["probe"]
    proto = onnx.load(report.path)
    ops = [n.op_type for n in proto.graph.node]
    weights = {i.name for i in proto.graph.initializer}
    # every linear layer's MatMul became int8; only activation x activation MatMuls (attention) stay fp32
    assert ops.count("MatMulInteger") == q["quantized_matmuls"] > 0
    assert not [n for n in proto.graph.node if n.op_type == "MatMul" and any(x in weights for x in n.input)]
    assert _quantized_weight_types(proto) == {WEIGHT_DTYPE[fmt.weight_type]}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fastenc.quantize"] == "int8-dynamic" and meta["fastenc.int8_format"] == fmt.name
    assert meta["fastenc.int8_cpu"] == f"{cpu_features().describe()}: {reason}"
    assert "int8-dynamic: " in report.summary() and f"int8_format {fmt.name!r}" in report.summary()


@pytest.mark.parametrize("name", sorted(INT8_FORMATS))
@pytest.mark.parametrize("kind", ["siglip", "t5"])
def test_forced_int8_format_meets_the_bar_or_is_refused(tmp_path, monkeypatch, kind, name):
    """int8_format= forces a format (over $FASTENC_INT8_FORMAT): the graph holds it and the report says it was forced;
    on a CPU where it breaks parity (full-range "s8" saturates without VNNI) the export is refused, nothing written."""
    model, fmt = _model(kind), INT8_FORMATS[name]
    monkeypatch.setenv(INT8_FORMAT_ENV, next(n for n in INT8_FORMATS if n != name))  # the argument wins
    try:
        report = export_onnx(model, tmp_path / "m.onnx", quantize="int8-dynamic", int8_format=name)
    except InputError as e:
        assert re.search(REFUSAL, str(e)) and f"int8_format {name!r}: forced by int8_format" in str(e), e
        assert os.listdir(tmp_path) == []
        return
    q = report.quantization
    assert q["ok"] and q["cosine_min"] >= MIN_COSINE and q["int8_format"] == name, q
    assert q["format_reason"] == f"forced by int8_format={name!r}"
    proto = onnx.load(report.path)
    assert _quantized_weight_types(proto) == {WEIGHT_DTYPE[fmt.weight_type]}
    assert {p.key: p.value for p in proto.metadata_props}["fastenc.int8_format"] == name


# /proc/cpuinfo flags of real CPUs (trimmed to what matters and a few neighbours)
EPYC_AVX2 = ("fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c hypervisor bmi1 avx2 smep bmi2 sha_ni xsaves clzero vaes "
             "vpclmulqdq rdpid fsrm")  # the AVX2-only AMD EPYC this issue was found on  # fmt: skip
SKYLAKE_SP = "sse4_2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl"  # AVX-512 without VNNI
CASCADE_LAKE = SKYLAKE_SP + " avx512_vnni"
ZEN4 = EPYC_AVX2 + " avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni avx512_bitalg"
ALDER_LAKE = EPYC_AVX2 + " avx_vnni"  # AVX-VNNI, no AVX-512
SAPPHIRE_RAPIDS = CASCADE_LAKE + " avx512_bf16 amx_bf16 amx_tile amx_int8"
GRAVITON3 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp sve"


def test_int8_format_is_chosen_from_the_cpu_flags():
    """A pure function of the flags: without VNNI, x86 gets the format that cannot saturate ORT's u8s8 int16 path."""
    for flags, machine, name, why in (
        (EPYC_AVX2, "x86_64", "u8", "AVX2 without VNNI"),
        (SKYLAKE_SP, "x86_64", "u8", "AVX-512 without VNNI"),
        (CASCADE_LAKE, "x86_64", "s8", "avx512_vnni"),
        (ZEN4, "x86_64", "s8", "avx512_vnni"),
        (ALDER_LAKE, "AMD64", "s8", "avx_vnni"),
        (SAPPHIRE_RAPIDS, "x86_64", "s8", "avx512_vnni/amx_int8"),
        ("avx2 amx_int8", "x86_64", "s8", "amx_int8"),
        ("", "x86_64", "u8", "unknown"),
        (GRAVITON3, "aarch64", "s8", "ARM"),
        ("", "arm64", "s8", "ARM"),
    ):
        fmt, reason = choose_int8_format(frozenset(flags.split()), machine)
        assert (fmt.name, fmt) == (name, INT8_FORMATS[name]) and why in reason, (flags, machine, fmt, reason)
    assert INT8_FORMATS["u8"].weight_type == "uint8" and not INT8_FORMATS["u8"].reduce_range
    assert INT8_FORMATS["s8-reduce-range"].reduce_range and INT8_FORMATS["s8"].weight_type == "int8"


def test_cpu_features_read_from_cpuinfo(tmp_path, monkeypatch):
    x86 = f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {EPYC_AVX2}\n\nprocessor\t: 1\nflags\t: avx512_vnni\n"
    assert parse_cpuinfo(x86) == frozenset(EPYC_AVX2.split())  # the first processor's
    assert parse_cpuinfo(f"processor\t: 0\nFeatures\t: {GRAVITON3}\nCPU implementer\t: 0x41\n") == frozenset(
        GRAVITON3.split())  # fmt: skip
    assert parse_cpuinfo("garbage\n\x00\n") == frozenset()
    (tmp_path / "cpuinfo").write_text(x86)
    cpu = cpu_features(tmp_path / "cpuinfo")
    assert cpu.flags == frozenset(EPYC_AVX2.split()) and cpu.source == str(tmp_path / "cpuinfo")
    assert "[avx2]" in cpu.describe() and "AVX2 without VNNI" in resolve_int8_format(None, cpu)[1]
    missing = cpu_features(tmp_path / "nope")
    assert missing.flags == frozenset() and missing.source == "unknown" and "unknown" in missing.describe()
    vnni = CpuFeatures("x86_64", frozenset(CASCADE_LAKE.split()), "test")
    assert resolve_int8_format(None, vnni)[0].name == resolve_int8_format("auto", vnni)[0].name == "s8"
    assert resolve_int8_format("u8", vnni) == (INT8_FORMATS["u8"], "forced by int8_format='u8'")
    monkeypatch.setenv(INT8_FORMAT_ENV, "s8-reduce-range")
    assert resolve_int8_format(None, vnni) == (INT8_FORMATS["s8-reduce-range"],
                                               f"forced by {INT8_FORMAT_ENV}='s8-reduce-range'")  # fmt: skip
    assert resolve_int8_format("u8", vnni)[0].name == "u8"  # the argument wins over the environment
    monkeypatch.setenv(INT8_FORMAT_ENV, "int4")
    with pytest.raises(InputError, match=f"{INT8_FORMAT_ENV} must be one of .*'int4'"):
        resolve_int8_format(None, vnni)


def test_int8_runs_through_the_runtime_close_to_fp32(tmp_path):
    model = _model("clip_text")
    fp32 = runtime.load(export_onnx(model, tmp_path / "fp32.onnx", attention_mask=True).path)
    int8_report = export_onnx(model, tmp_path / "int8.onnx", attention_mask=True, quantize="int8-dynamic")
    int8 = runtime.load(int8_report.path)
    assert os.path.getsize(int8_report.path) < os.path.getsize(tmp_path / "fp32.onnx")
    ids = torch.randint(3, 90, (4, 12))
    ids[:, -1] = 98
    a, b = fp32(ids), int8(ids)
    assert type(a) is type(b)
    cos = cosine_rows(b.text_embeds, a.text_embeds)
    assert cos.min() > MIN_COSINE, cos
    assert not torch.equal(a.text_embeds, b.text_embeds)  # it did run int8


def outlier_model():
    """A CLIP text tower int8 cannot represent: one activation channel entering fc1 is 10^4 x the others, and fc1
    ignores it (zero weights), so fp32 is unaffected while int8's per-tensor activation scale rounds every other
    channel to zero."""
    model = _model("clip_text")
    with torch.no_grad():
        for layer in model.text_model.encoder.layers:
            layer.layer_norm2.weight[0] = 1e4
            layer.mlp.fc1.weight[:, 0] = 0.0
    return model


def test_runtime_warns_when_an_s8_graph_runs_where_it_saturates(tmp_path):
    """A graph quantized with full-range int8 weights (for a VNNI CPU) and loaded on x86 without VNNI: one
    Int8FormatWarning naming the path, the format and the cause; none where it does not saturate."""
    report = export_onnx(_model("clip_vision"), tmp_path / "m.onnx", quantize="int8-dynamic", int8_format="s8",
                         min_cosine=-1.0)  # fmt: skip
    meta = {p.key: p.value for p in onnx.load(report.path).metadata_props}
    vnni = CpuFeatures("x86_64", frozenset(CASCADE_LAKE.split()), "test")
    avx2 = CpuFeatures("x86_64", frozenset(EPYC_AVX2.split()), "test")
    assert int8_saturation_risk(meta, "path 'm.onnx'", vnni) is None
    assert int8_saturation_risk({**meta, "fastenc.int8_format": "u8"}, "path 'm.onnx'", avx2) is None
    assert int8_saturation_risk({"fastenc.class": "CLIPTextModel"}, "path 'm.onnx'", avx2) is None  # not int8
    message = int8_saturation_risk(meta, "path 'm.onnx'", avx2)
    assert message.startswith("path 'm.onnx': quantized with int8_format 's8'") and "AVX2 without VNNI" in message
    assert "int8_format='auto' picks 'u8'" in message
    here = cpu_features()
    saturates_here = choose_int8_format(here.flags, here.machine)[0].name != "s8"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.load(report.path)
    got = [str(w.message) for w in caught if issubclass(w.category, Int8FormatWarning)]
    assert len(got) == int(saturates_here), got
    assert all(g.startswith(f"path {report.path!r}: quantized with int8_format 's8'") for g in got)


def test_refusal_message_matches_any_cosine():
    for printed in ("0.63755", "-0.12345", "-1.00000", "1e-05", "nan", "0"):
        message = (f"quantize='int8-dynamic' breaks parity for this X: pooled-embedding cosine vs fp32 min {printed} "
                   "< min_cosine 0.99 (mean ...)")  # fmt: skip
        assert re.search(REFUSAL, message), printed


def test_int8_is_refused_where_it_breaks_parity(tmp_path, monkeypatch):
    model = outlier_model()
    with pytest.raises(InputError, match=REFUSAL):
        export_onnx(model, tmp_path / "m.onnx", quantize="int8-dynamic")
    assert os.listdir(tmp_path) == []  # nothing written
    report = export_onnx(model, tmp_path / "m.onnx", quantize="int8-dynamic", min_cosine=-1.0)  # asked for anyway
    assert report.quantization["ok"] and report.quantization["cosine_min"] < MIN_COSINE  # ok: above min_cosine=-1
    monkeypatch.setenv("FASTENC_CACHE", str(tmp_path / "cache"))
    fast = fastenc.optimize(model, backend="onnxruntime", quantize="int8-dynamic", strict=True)
    with pytest.raises(InputError, match="breaks parity"), torch.no_grad():
        fast(torch.randint(3, 90, (2, 8)))


def test_quantize_argument_errors(tmp_path):
    model = _model("clip_text")
    for kwargs, message in (
        (dict(quantize="int4"), "quantize must be None or one of"),
        (dict(quantize="int8-dynamic", dtype=torch.float16), "quantizes an fp32 graph"),
        (dict(quantize="int8-dynamic", optimize=True), "pass optimize=False"),
        (dict(quantize="int8-dynamic", min_cosine=2.0), "min_cosine must be"),
        (dict(quantize="int8-dynamic", int8_format="int4"), "int8_format must be None or one of .*'int4'"),
        (dict(quantize="int8-dynamic", int8_format=8), "int8_format must be None or one of .*8"),
        (dict(int8_format="u8"), "int8_format='u8' applies to quantize='int8-dynamic'"),
    ):
        with pytest.raises(InputError, match=message):
            export_onnx(model, tmp_path / "m.onnx", **kwargs)
    assert os.listdir(tmp_path) == []


def test_optimize_int8(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTENC_CACHE", str(tmp_path / "cache"))
    model = _model("clip_text")
    ids = torch.randint(3, 90, (3, 10))
    ids[:, -1] = 98
    fast32 = fastenc.optimize(model, backend="onnxruntime")
    fast8 = fastenc.optimize(model, backend="onnxruntime", quantize="int8-dynamic")
    with torch.inference_mode(), fastenc.trace() as t:
        ref, a, b = model(ids), fast32(ids), fast8(ids)
    assert t.counts["onnxruntime.forward"] == 2 and not t.fallbacks
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 2  # the quantize option is part of the cache key
    assert (a.text_embeds - ref.text_embeds).abs().max() < 1e-4
    assert cosine_rows(b.text_embeds, ref.text_embeds).min() > MIN_COSINE
    assert fast8._fastenc_ort.encoder.metadata["fastenc.quantize"] == "int8-dynamic"
    auto = resolve_int8_format()[0].name
    assert fast8._fastenc_ort.encoder.metadata["fastenc.int8_format"] == auto


def test_optimize_int8_format_is_part_of_the_cache_key(tmp_path, monkeypatch):
    """A cache shared by machines of different ISAs (or a forced format) keeps one graph per format: a graph
    quantized for VNNI is never served where it saturates."""
    monkeypatch.setenv("FASTENC_CACHE", str(tmp_path / "cache"))
    model = _model("clip_text")
    ids = torch.randint(3, 90, (2, 10))
    ids[:, -1] = 98
    auto = resolve_int8_format()[0].name
    other = next(n for n in ("s8-reduce-range", "u8") if n != auto)
    with torch.inference_mode():
        fastenc.optimize(model, backend="onnxruntime", quantize="int8-dynamic", strict=True)(ids)
        monkeypatch.setenv(INT8_FORMAT_ENV, other)
        forced = fastenc.optimize(model, backend="onnxruntime", quantize="int8-dynamic", strict=True)
        forced(ids)
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 2
    assert forced._fastenc_ort.encoder.metadata["fastenc.int8_format"] == other
