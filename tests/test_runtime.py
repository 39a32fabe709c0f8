"""fastenc.runtime: exported ONNX files as drop-in encoders (ORT parity through the module interface, ModelOutput
classes, argument and shape errors, the optimised-model cache), and fastenc.optimize(backend="onnxruntime"): the export
cache, fall-backs in the trace, weight edits after optimize, and what "auto" picks. TensorRT paths skip without
tensorrt and a GPU."""

import os
import warnings

import pytest
import torch
import transformers as tf

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import fastenc  # noqa: E402
from fastenc import runtime  # noqa: E402
from fastenc.core.dispatch import auto_model_backend, requested_backend  # noqa: E402
from fastenc.core.errors import BackendUnavailableError, InputError  # noqa: E402
from fastenc.export import export_onnx, onnx_parity, to_onnx  # noqa: E402
from fastenc.export.onnx_export import FP32_TOLERANCE  # noqa: E402
from fastenc.export.towers import tower_of  # noqa: E402
from fastenc.parity import compare  # noqa: E402
from tests.test_export import clip_config, siglip_config, t5_config  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTENC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTENC_BACKEND", raising=False)


def text_model():
    torch.manual_seed(0)
    return tf.CLIPTextModelWithProjection(clip_config(layers=2).text_config).eval()


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def padded_text(batch=3, seq=9, vocab=99):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab - 3, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        n = seq - 2 * i
        ids[i, n - 1] = vocab - 1
        ids[i, n:] = vocab - 1
        mask[i, n:] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------------ runtime.load


def _models():
    torch.manual_seed(0)
    cfg = clip_config(layers=2)
    return {
        "clip_text": (tf.CLIPTextModelWithProjection(cfg.text_config), True),
        "clip_vision": (tf.CLIPVisionModelWithProjection(cfg.vision_config), None),
        "clip": (tf.CLIPModel(cfg), None),
        "siglip": (tf.SiglipModel(siglip_config()), None),
        "t5": (tf.T5EncoderModel(t5_config(layers=2)), True),
    }


@pytest.mark.parametrize("name", ["clip_text", "clip_vision", "clip", "siglip", "t5"])
def test_load_matches_onnx_parity_through_the_module(tmp_path, name):
    """The drop-in module returns transformers' ModelOutput class, and its error against transformers at onnx_parity's
    sizes is onnx_parity's own figure (same graph, same inputs) and within the fp32 tolerance."""
    model, mask = _models()[name]
    model.eval()
    path = to_onnx(model, tmp_path / f"{name}.onnx", attention_mask=mask)
    report = onnx_parity(model, path)
    assert report.ok, report.table()
    enc = runtime.load(path)
    assert enc.class_name == type(model).__name__
    tower = tower_of(model, attention_mask="attention_mask" in enc.input_names)
    rows = {(tuple(r.sizes.items()), r.output): r for r in report.rows}
    for i, sz in enumerate(sorted({tuple(r.sizes.items()) for r in report.rows}, key=report_order(report))):
        inputs = tower.inputs_for_sizes(dict(sz), seed=i + 1)
        with torch.no_grad():
            ref = model(**inputs)
        got = enc(**inputs)
        assert type(got) is type(ref)
        for out in enc.output_names:
            err = rel_err(got[out], ref[out])
            assert err <= FP32_TOLERANCE, (name, sz, out, err)
            assert err == pytest.approx(rows[(sz, out)].max_rel, rel=1e-3, abs=1e-9), (name, sz, out)


def report_order(report):
    order = []
    for r in report.rows:
        key = tuple(r.sizes.items())
        if key not in order:
            order.append(key)
    return order.index


def test_positional_arguments_return_dict_and_default_mask(tmp_path):
    model = text_model()
    enc = runtime.load(to_onnx(model, tmp_path / "t.onnx", attention_mask=True))
    ids, mask = padded_text()
    with torch.no_grad():
        ref = model(ids, mask)
        ref_nomask = model(ids)
    got = enc(ids, mask)  # CLIPTextModelWithProjection.forward(input_ids, attention_mask, ...)
    assert rel_err(got.text_embeds, ref.text_embeds) < FP32_TOLERANCE
    assert rel_err(enc(input_ids=ids).last_hidden_state, ref_nomask.last_hidden_state) < FP32_TOLERANCE
    tup = enc(ids, mask, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], got.text_embeds)
    assert got.hidden_states is None and got.attentions is None
    assert not got.text_embeds.requires_grad and got.text_embeds.device.type == "cpu"
    again = enc(ids, mask)
    assert again.text_embeds.data_ptr() != got.text_embeds.data_ptr()  # each call owns its outputs
    assert torch.equal(again.text_embeds, got.text_embeds)


def test_maskless_graph_takes_an_all_ones_mask_only(tmp_path):
    model = text_model()
    enc = runtime.load(to_onnx(model, tmp_path / "t.onnx"))  # Optimum's CLIP text inputs: input_ids only
    assert enc.input_names == ["input_ids"]
    ids, mask = padded_text()
    with torch.no_grad():
        ref = model(ids)
    got = enc(ids, torch.ones_like(ids))
    assert rel_err(got.last_hidden_state, ref.last_hidden_state) < FP32_TOLERANCE
    with pytest.raises(InputError, match="attention_mask: .* takes no mask"):
        enc(ids, mask)


def test_bad_calls_raise_input_errors(tmp_path):
    model = text_model()
    enc = runtime.load(to_onnx(model, tmp_path / "t.onnx", attention_mask=True))
    ids, mask = padded_text()
    cases = [
        (dict(attention_mask=mask), "missing input 'input_ids'"),
        (dict(input_ids=ids, output_attentions=True), "output_attentions=True"),
        (dict(input_ids=ids, output_hidden_states=True), "output_hidden_states=True"),
        (dict(input_ids=ids, position_ids=torch.arange(9)[None]), "'position_ids' is not an input"),
        (dict(input_ids=ids[0]), "must have 2 dims"),
        (dict(input_ids=ids, attention_mask=mask[:, :5]), "axis 'sequence' is 5"),
        (dict(input_ids=torch.ones(1, 78, dtype=torch.long)), "longer than the model's 77 positions"),
        (dict(input_ids=ids.float()), "input_ids must be int64"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            enc(**kwargs)
    with pytest.raises(InputError, match="at most"):
        enc(ids, mask, None, None, None, None, None, None, None)
    with pytest.raises(InputError, match="given both"):
        enc(ids, input_ids=ids)


def test_load_argument_errors(tmp_path):
    path = to_onnx(text_model(), tmp_path / "t.onnx")
    with pytest.raises(InputError, match="is not a file"):
        runtime.load(tmp_path / "missing.onnx")
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(InputError, match="expected an .onnx file"):
        runtime.load(tmp_path / "x.bin")
    with pytest.raises(InputError, match="device must be"):
        runtime.load(path, device="tpu")
    with pytest.raises(InputError, match="threads must be"):
        runtime.load(path, threads=0)
    with pytest.raises(InputError, match="graph_optimization_level"):
        runtime.load(path, graph_optimization_level="max")
    with pytest.raises(BackendUnavailableError, match="NoSuchExecutionProvider is not available"):
        runtime.load(path, providers=["NoSuchExecutionProvider"])
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="no CUDA device"):
            runtime.load(path, device="cuda")


def test_session_options_and_optimized_model_cache(tmp_path):
    model = text_model()
    path = to_onnx(model, tmp_path / "t.onnx")
    ids, _ = padded_text()
    first = runtime.load(path, threads=1, optimized_model_cache=True)
    cache = first.optimized_model
    assert cache is not None and cache.is_file() and cache.parent == path.parent
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # written under a temporary name, then renamed
    again = runtime.load(path, threads=1, optimized_model_cache=True)  # loads the optimised file, optimisations off
    assert again.optimized_model == cache
    plain = runtime.load(path, graph_optimization_level="disabled")
    for enc in (again, plain):
        assert rel_err(enc(ids).last_hidden_state, first(ids).last_hidden_state) < 1e-5
    assert first.session.get_session_options().intra_op_num_threads == 1
    quiet = runtime.load(path, session_config={"session.intra_op.allow_spinning": "0"})
    assert quiet.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(InputError, match="session_config entries must be str -> str"):
        runtime.load(path, session_config={"session.intra_op.allow_spinning": 0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (IO binding on the GPU)")
def test_cuda_io_binding_keeps_tensors_on_the_gpu(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA execution provider")
    model = text_model()
    enc = runtime.load(to_onnx(model, tmp_path / "t.onnx", attention_mask=True), device="cuda")
    ids, mask = padded_text()
    got = enc(ids.cuda(), mask.cuda())
    assert got.text_embeds.is_cuda
    with torch.no_grad():
        assert rel_err(got.text_embeds.cpu(), model(ids, mask).text_embeds) < FP32_TOLERANCE


def test_tensorrt_engine_round_trip(tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt is not installed")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    from fastenc.export import to_tensorrt

    model = text_model().cuda()
    onnx_path = to_onnx(model, tmp_path / "t.onnx", attention_mask=True)
    profiles = {"batch": (1, 2, 4), "sequence": (1, 9, 16)}
    plan = to_tensorrt(onnx_path, tmp_path / "t.plan", fp16=False, profiles=profiles)
    enc = runtime.load(plan, device="cuda")
    ids, mask = padded_text()
    got = enc(ids.cuda(), mask.cuda())
    with torch.no_grad():
        ref = model(ids.cuda(), mask.cuda())
    assert type(got) is type(ref) and rel_err(got.text_embeds, ref.text_embeds) < 1e-3
    with pytest.raises(InputError, match="outside every optimisation profile"):
        enc(torch.ones(8, 9, dtype=torch.long, device="cuda"))


# ------------------------------------------------------------------------------------ optimize(backend="onnxruntime")


def test_optimize_onnxruntime_parity_trace_and_cache():
    model = text_model()
    ids, mask = padded_text()
    with torch.no_grad():
        ref = model(ids, mask)
    fast = fastenc.optimize(model, backend="onnxruntime")
    assert isinstance(fast, tf.CLIPTextModelWithProjection)
    with torch.inference_mode(), fastenc.trace() as t:
        got = fast(input_ids=ids, attention_mask=mask)
    assert t.counts == {"onnxruntime.export": 1, "onnxruntime.forward": 1} and not t.fallbacks
    assert type(got) is type(ref) and rel_err(got.text_embeds, ref.text_embeds) < FP32_TOLERANCE
    assert rel_err(got.last_hidden_state, ref.last_hidden_state) < FP32_TOLERANCE  # padded rows too (mask input)
    files = list((runtime.cache_dir() / "onnx").glob("*/model.onnx"))
    assert len(files) == 1
    other = fastenc.optimize(model, backend="onnxruntime")  # same weights: the cached export, no new trace
    with torch.no_grad(), fastenc.trace() as t:
        other(ids, mask)
    assert t.counts == {"onnxruntime.forward": 1} and other._fastenc_ort.exports == 0
    back = fastenc.optimize(fast, backend="torch")  # re-optimizing leaves the ONNX Runtime path behind
    assert "_fastenc_ort" not in back.__dict__
    with torch.no_grad(), fastenc.trace() as t:
        back(ids, mask)
    assert "torch.attention" in t.counts


def test_calls_the_graph_cannot_serve_fall_back_visibly():
    model = text_model()
    fast = fastenc.optimize(model, backend="onnxruntime")
    ids, mask = padded_text()
    with torch.no_grad():
        ref = model(ids, mask, output_hidden_states=True)
    reasons = {
        "autograd is recording": lambda: fast(ids, mask),
        "output_hidden_states is not in the exported graph": lambda: fast(ids, mask, output_hidden_states=True),
        "'position_ids' is not an input": lambda: fast(ids, mask, position_ids=torch.arange(9)[None]),
    }
    for reason, call in reasons.items():
        with fastenc.trace() as t, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.set_grad_enabled(reason.startswith("autograd")):
                out = call()
        assert [f.reason for f in t.fallbacks if reason in f.reason], (reason, t.fallbacks)
        assert t.fallbacks[0].requested == "onnxruntime" and t.fallbacks[0].ran == "torch"
        assert "onnxruntime.forward" not in t.counts and "torch.attention" in t.counts
        assert rel_err(out.text_embeds, ref.text_embeds) < FP32_TOLERANCE
    fast.train()
    with torch.no_grad(), fastenc.trace() as t, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast(ids, mask)
    assert "training mode" in t.fallbacks[0].reason
    fast.eval()
    strict = fastenc.optimize(model, backend="onnxruntime", strict=True)
    with pytest.raises(fastenc.BackendUnavailableError, match="output_hidden_states"):
        with torch.no_grad():
            strict(ids, mask, output_hidden_states=True)


@pytest.mark.parametrize("edit", ["data_mul", "no_grad_copy", "load_state_dict", "assign", "fused_adamw", "refresh"])
def test_weight_edits_after_optimize_are_not_served_stale(edit):
    model = text_model()
    fast = fastenc.optimize(model, backend="onnxruntime")
    ids, mask = padded_text()
    with torch.no_grad():
        fast(ids, mask)  # exported and cached for the original weights
    w = model.text_projection.weight
    if edit == "data_mul":
        w.data.mul_(2)
    elif edit == "no_grad_copy":
        with torch.no_grad():
            w.copy_(torch.randn_like(w))
    elif edit == "load_state_dict":
        sd = {k: v + 0.01 for k, v in model.state_dict().items() if v.is_floating_point()}
        model.load_state_dict(sd, strict=False)
    elif edit == "assign":
        model.text_projection.weight = torch.nn.Parameter(torch.randn_like(w))
    elif edit == "fused_adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        model(ids, mask).text_embeds.sum().backward()
        opt.step()  # no version-counter bump: seen by the sampled values
    elif edit == "refresh":
        w.data[0, 0] += 1.0  # one value of a large weight through .data: only refresh() makes it seen
        runtime.refresh(fast)
    with torch.no_grad():
        ref = model(ids, mask)
        with fastenc.trace() as t:
            got = fast(ids, mask)
    assert t.counts["onnxruntime.forward"] == 1 and t.counts["onnxruntime.export"] == 1
    assert rel_err(got.text_embeds, ref.text_embeds) < FP32_TOLERANCE


def test_auto_picks_onnxruntime_on_a_cpu_machine_outside_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine auto picks the CUDA / Triton kernels")
    model = text_model()
    assert auto_model_backend() is None  # the suite runs under TRITON_INTERPRET=1: auto stays on Triton
    assert not hasattr(fastenc.optimize(model), "_fastenc_ort")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert auto_model_backend() == "onnxruntime"
    fast = fastenc.optimize(model)
    ids, mask = padded_text()
    with torch.no_grad(), fastenc.trace() as t:
        fast(ids, mask)
    assert t.counts["onnxruntime.forward"] == 1
    with torch.no_grad(), fastenc.trace() as t:  # a call ORT cannot serve runs torch, recorded, without raising
        fast(ids, mask, output_attentions=True)
    assert t.fallbacks and t.fallbacks[0].requested == "onnxruntime"
    half = fastenc.optimize(text_model().half())  # auto exports fp32 models only
    assert not hasattr(half, "_fastenc_ort")


def test_backend_variable_selects_onnxruntime_for_models_only(monkeypatch):
    monkeypatch.setenv("FASTENC_BACKEND", "onnxruntime")
    assert auto_model_backend() == "onnxruntime"
    assert requested_backend("auto") == "auto"  # ops of a model ORT cannot serve choose as usual
    fast = fastenc.optimize(text_model())
    assert fast._fastenc_ort.explicit is False
    with pytest.raises(InputError, match="backend must be one of"):
        fastenc.ops.layer_norm(torch.ones(2, 4), torch.ones(4), torch.zeros(4), 1e-5, backend="onnxruntime")


def test_optimize_onnxruntime_argument_errors():
    model = text_model()
    with pytest.raises(InputError, match="quantize='int8-dynamic' applies to backend='onnxruntime'"):
        fastenc.optimize(model, backend="torch", quantize="int8-dynamic")
    with pytest.raises(InputError, match="quantize must be"):
        fastenc.optimize(model, backend="onnxruntime", quantize="int4")
    with pytest.raises(InputError, match="cuda_graphs applies"):
        fastenc.optimize(model, backend="onnxruntime", cuda_graphs=True)
    with pytest.raises(InputError, match="threads must be"):
        fastenc.optimize(model, backend="onnxruntime", threads=0)
    siglip2 = tf.Siglip2VisionModel(
        tf.Siglip2VisionConfig(
            hidden_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            intermediate_size=48,
            num_patches=16,
            patch_size=4,
        )
    )
    with pytest.raises(fastenc.BackendUnavailableError, match="no ONNX export for Siglip2VisionModel"):
        fastenc.optimize(siglip2.eval(), backend="onnxruntime", strict=True)


def test_joint_and_t5_models_through_optimize():
    torch.manual_seed(0)
    clip = tf.CLIPModel(clip_config(layers=1)).eval()
    t5 = tf.T5EncoderModel(t5_config()).eval()
    ids, mask = padded_text(2, 9)
    px = torch.randn(3, 3, 16, 16)
    for model, kwargs, fields in (
        (clip, dict(input_ids=ids, attention_mask=mask, pixel_values=px), ("logits_per_image", "text_embeds")),
        (t5, dict(input_ids=ids, attention_mask=mask), ("last_hidden_state",)),
    ):
        fast = fastenc.optimize(model, backend="onnxruntime")
        with torch.no_grad():
            ref = model(**kwargs)
            with fastenc.trace() as t:
                got = fast(**kwargs)
        assert t.counts["onnxruntime.forward"] == 1 and type(got) is type(ref)
        for f in fields:
            assert rel_err(got[f], ref[f]) < FP32_TOLERANCE, f
        report = compare(model, fast, kwargs)  # every field, the joint model's nested outputs included
        assert report.ok and report.ops.get("onnxruntime.forward") == 1, report.table()
    nested = fastenc.optimize(clip, backend="onnxruntime")
    with torch.no_grad():
        out, ref = nested(input_ids=ids, pixel_values=px), clip(input_ids=ids, pixel_values=px)
    assert type(out.text_model_output) is type(ref.text_model_output)
    assert rel_err(out.vision_model_output.pooler_output, ref.vision_model_output.pooler_output) < FP32_TOLERANCE


def test_export_records_what_the_runtime_needs(tmp_path):
    import onnx

    report = export_onnx(text_model(), tmp_path / "t.onnx")
    meta = {p.key: p.value for p in onnx.load(report.path, load_external_data=False).metadata_props}
    assert meta["fastenc.output_class"].endswith(":CLIPTextModelOutput")
    assert meta["fastenc.outputs"] == "text_embeds,last_hidden_state"
    assert meta["fastenc.inputs"] == "input_ids"


# ------------------------------------------------------------------------------------------------ demo speed line


def test_demo_ends_with_a_measured_speed_line(capsys):
    from fastenc import cli

    argv = ["demo", "--shape", "tiny", "--layers", "1", "--batch", "2", "--backend", "torch", "--device", "cpu"]
    assert cli.main([*argv, "--speed-calls", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "PASS" in "\n".join(out)
    last = out[-1]
    assert last.startswith("speed (CPU, ") and "p50 of 2 interleaved calls" in last, last
    assert "transformers eager" in last and "SDPA" in last and "fastenc [onnxruntime]" in last, last
    assert cli.main([*argv, "--speed-calls", "2", "--json"]) == 0
    import json

    speed = json.loads(capsys.readouterr().out)["speed"]
    assert speed["best"] == "onnxruntime" and speed["calls"] == 2
    assert set(speed["p50_ms"]) == {"transformers eager", "transformers sdpa", "fastenc onnxruntime"}
    assert speed["speedup_vs_sdpa"] == pytest.approx(speed["p50_ms"]["transformers sdpa"] /
                                                     speed["p50_ms"]["fastenc onnxruntime"])  # fmt: skip
    assert cli.main([*argv, "--speed-calls", "0"]) == 0
    assert "speed (" not in capsys.readouterr().out
    assert cli.main([*argv, "--speed-calls", "-1"]) == 2
