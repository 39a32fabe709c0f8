"""export_onnx(quantize="int8-dynamic"): ORT dynamic quantization of the linear layers, the accuracy report on the fixed
probe set (pooled-embedding cosine and top-1 zero-shot agreement against fp32), the refusal when int8 breaks parity
(nothing written), and optimize(backend="onnxruntime", quantize=...)."""

import os

import pytest
import torch
import transformers as tf

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

import fastenc  # noqa: E402
from fastenc import runtime  # noqa: E402
from fastenc.errors import InputError  # noqa: E402
from fastenc.export import export_onnx  # noqa: E402
from fastenc.export.quantize import MIN_COSINE  # noqa: E402
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


@pytest.mark.parametrize("kind", ["clip_text", "clip_vision", "clip", "siglip", "t5"])
def test_int8_export_report_and_graph(tmp_path, kind):
    model = _model(kind)
    report = export_onnx(model, tmp_path / "m.onnx", quantize="int8-dynamic")
    q = report.quantization
    assert report.quantize == "int8-dynamic" and q["ok"] and q["mode"] == "int8-dynamic"
    assert MIN_COSINE <= q["cosine_min"] <= q["cosine_mean"] <= 1.0 + 1e-9
    assert 0.0 <= q["top1_agreement"] <= 1.0 and "16 queries x 8 classes" in q["probe"]
    proto = onnx.load(report.path)
    ops = [n.op_type for n in proto.graph.node]
    weights = {i.name for i in proto.graph.initializer}
    # every linear layer's MatMul became int8; only activation x activation MatMuls (attention) stay fp32
    assert ops.count("MatMulInteger") == q["quantized_matmuls"] > 0
    assert not [n for n in proto.graph.node if n.op_type == "MatMul" and any(x in weights for x in n.input)]
    assert any(i.data_type == onnx.TensorProto.INT8 for i in proto.graph.initializer)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fastenc.quantize"] == "int8-dynamic"
    assert "int8-dynamic: " in report.summary()


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


def test_int8_is_refused_where_it_breaks_parity(tmp_path, monkeypatch):
    model = outlier_model()
    with pytest.raises(InputError, match=r"breaks parity .* cosine vs fp32 min 0\.\d+ < min_cosine 0.99"):
        export_onnx(model, tmp_path / "m.onnx", quantize="int8-dynamic")
    assert os.listdir(tmp_path) == []  # nothing written
    report = export_onnx(model, tmp_path / "m.onnx", quantize="int8-dynamic", min_cosine=-1.0)  # asked for anyway
    assert report.quantization["cosine_min"] < 0.5
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
