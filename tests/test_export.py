"""fastenc.export: ONNX export of every supported tower (parity with ONNX Runtime at sizes other than the traced
example, EOS pooling, T5 relative buckets, fp16, ORT fusions, external data, atomic writes), TensorRT profiles
(engine build only where tensorrt and a GPU exist), Triton repositories (parsed back), and the `export` CLI."""

import argparse
import copy
import re
from pathlib import Path

import pytest
import torch
import transformers as tf

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import fastenc  # noqa: E402
from fastenc.core.errors import BackendUnavailableError, InputError, UnsupportedModelError  # noqa: E402
from fastenc.export import (  # noqa: E402
    export_onnx,
    onnx_parity,
    read_io,
    resolve_profiles,
    to_onnx,
    to_tensorrt,
    to_triton_repository,
)
from fastenc.export import onnx_export as onnx_export_mod  # noqa: E402
from fastenc.export.cli import add_export_parser  # noqa: E402
from fastenc.export.towers import tower_of  # noqa: E402

VOCAB = 99


def clip_config(eos=VOCAB - 1, layers=1, width=32, heads=2):
    text = dict(hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=2 * width,
                max_position_embeddings=77, vocab_size=VOCAB, eos_token_id=eos, bos_token_id=VOCAB - 2,
                pad_token_id=eos if eos != 2 else 1)  # fmt: skip
    vision = dict(hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=2 * width,
                  image_size=16, patch_size=8)  # fmt: skip
    return tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def siglip_config(layers=1):
    text = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=layers, intermediate_size=64,
                max_position_embeddings=16, vocab_size=VOCAB, projection_size=32, eos_token_id=VOCAB - 1,
                bos_token_id=VOCAB - 2, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=layers, intermediate_size=48, image_size=16,
                  patch_size=8)  # fmt: skip
    return tf.SiglipConfig(text_config=text, vision_config=vision)


def t5_config(cls=tf.T5Config, layers=1, num_buckets=8, max_distance=20):
    # few buckets and a short max_distance: sequences of 40+ reach the log-spaced buckets and the clamp
    return cls(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=layers, num_heads=2,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=num_buckets,
               relative_attention_max_distance=max_distance, pad_token_id=0)  # fmt: skip


def build(cls):
    torch.manual_seed(0)
    name = cls.__name__
    if name.startswith("CLIP"):
        cfg = clip_config()
        if cls is tf.CLIPModel:
            return cls(cfg).eval()
        sub = copy.deepcopy(cfg.vision_config if "Vision" in name else cfg.text_config)
        sub.projection_dim = 16
        return cls(sub).eval()
    if name.startswith("Siglip2"):
        cfg = tf.Siglip2Config(text_config=siglip_config().text_config.to_dict())
        return cls(cfg.text_config).eval()
    if name.startswith("Siglip"):
        cfg = siglip_config()
        if cls is tf.SiglipModel:
            return cls(cfg).eval()
        return cls(cfg.vision_config if "Vision" in name else cfg.text_config).eval()
    return cls(t5_config(tf.UMT5Config if "UMT5" in name else tf.T5Config)).eval()


def tensor_fields(model, inputs) -> list[str]:
    with torch.no_grad():
        out = model(**inputs, return_dict=True)
    return [k for k, v in out.items() if isinstance(v, torch.Tensor)]


# the inputs and outputs of Optimum's ONNX configs for the same towers (optimum/exporters/onnx/model_configs.py:
# CLIPOnnxConfig, CLIPTextOnnxConfig, CLIPTextWithProjectionOnnxConfig, CLIPVisionModelOnnxConfig, SiglipOnnxConfig,
# SiglipTextOnnxConfig, T5EncoderOnnxConfig); the input order is transformers' own
EXPECTED_INPUTS = {
    "CLIPModel": ["input_ids", "attention_mask", "pixel_values"],
    "CLIPTextModel": ["input_ids"],
    "CLIPTextModelWithProjection": ["input_ids"],
    "CLIPVisionModel": ["pixel_values"],
    "CLIPVisionModelWithProjection": ["pixel_values"],
    "SiglipModel": ["input_ids", "pixel_values"],
    "SiglipTextModel": ["input_ids"],
    "SiglipVisionModel": ["pixel_values"],
    "Siglip2TextModel": ["input_ids"],
    "T5EncoderModel": ["input_ids"],
    "UMT5EncoderModel": ["input_ids"],
}
OPTIMUM_OUTPUTS = {
    "CLIPModel": ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"],
    "CLIPTextModel": ["last_hidden_state", "pooler_output"],
    "CLIPTextModelWithProjection": ["text_embeds", "last_hidden_state"],
    "CLIPVisionModel": ["last_hidden_state", "pooler_output"],
    "SiglipTextModel": ["last_hidden_state", "pooler_output"],
    "SiglipVisionModel": ["last_hidden_state", "pooler_output"],
    "T5EncoderModel": ["last_hidden_state"],
}
ALL = [getattr(tf, n) for n in EXPECTED_INPUTS]


def assert_no_leftovers(folder: Path, allowed=()):
    left = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    assert not left, f"files left behind in {folder}: {left}"


# ------------------------------------------------------------------------------------------------ ONNX export


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_tower_exports_with_parity(cls, tmp_path):
    model = build(cls)
    report = export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(report.path)
    onnx.checker.check_model(proto, full_check=True)
    assert {op.domain for op in proto.opset_import} <= {"", "ai.onnx"}, "plain ONNX ops only"
    assert [i.name for i in report.inputs] == EXPECTED_INPUTS[cls.__name__]
    tower = tower_of(model)
    fields = tensor_fields(model, tower.inputs_for_sizes(tower.example_sizes()))
    assert [o.name for o in report.outputs] == fields  # ModelOutput tensor fields, transformers' order
    if cls.__name__ in OPTIMUM_OUTPUTS:
        assert fields == OPTIMUM_OUTPUTS[cls.__name__]
    for spec in report.inputs + report.outputs:
        assert isinstance(spec.dims[0], str) and spec.dims[0].endswith("batch"), (spec.name, spec.dims)
        assert "?" not in spec.dims and not any(isinstance(d, str) and "_dim_" in d for d in spec.dims), spec
    for spec in report.inputs:
        if spec.name in ("input_ids", "attention_mask"):
            assert spec.dims[1] == "sequence" and spec.dtype == "int64"
    # sizes unlike the example (batch 2 / 3, sequence 7): batch 1, 3, 4; sequence 5, 16, 40 (T5: 48)
    parity = onnx_parity(model, report.path)
    assert parity.ok, parity.table()
    assert parity.worst_rel <= 1e-4
    assert len({tuple(r.sizes.items()) for r in parity.rows}) == 3


@pytest.mark.parametrize("eos", [2, VOCAB - 1], ids=["legacy-argmax", "first-eos"])
def test_clip_eos_pooling_at_other_lengths(eos, tmp_path):
    model = build(tf.CLIPTextModel) if eos != 2 else tf.CLIPTextModel(clip_config(eos=2).text_config).eval()
    path = to_onnx(model, tmp_path / "text.onnx", attention_mask=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    seq = 23
    ids = torch.randint(3, VOCAB - 3, (4, seq), generator=g)
    mask = torch.zeros(4, seq, dtype=torch.long)
    for row, n in enumerate((23, 4, 11, 17)):  # EOS at a different position in every row
        ids[row, n - 1] = VOCAB - 1
        ids[row, n:] = VOCAB - 1 if eos != 2 else 1  # first-EOS rule: padding repeats EOS after it
        mask[row, :n] = 1
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
    last, pooled = sess.run(["last_hidden_state", "pooler_output"], {"input_ids": ids.numpy(),
                                                                    "attention_mask": mask.numpy()})  # fmt: skip
    torch.testing.assert_close(torch.from_numpy(pooled), ref.pooler_output, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(last), ref.last_hidden_state, atol=2e-5, rtol=1e-4)
    # pooling really picked the EOS rows (not a fixed position): row 1 pools position 3
    torch.testing.assert_close(torch.from_numpy(pooled[1]), ref.last_hidden_state[1, 3], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(torch.from_numpy(pooled[1]), ref.last_hidden_state[1, -1])


def _padded_ids(batch_lengths, seq, eos=VOCAB - 1, pad=VOCAB - 1, seed=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 3, (len(batch_lengths), seq), generator=g)
    mask = torch.zeros(len(batch_lengths), seq, dtype=torch.long)
    for row, n in enumerate(batch_lengths):
        ids[row, n - 1] = eos
        ids[row, n:] = pad
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("cls", [tf.CLIPTextModel, tf.CLIPTextModelWithProjection, tf.T5EncoderModel],
                         ids=lambda c: c.__name__)  # fmt: skip
def test_text_towers_run_on_input_ids_alone(cls, tmp_path):
    """What diffusers (and Optimum's CLIP text / T5 encoder configs) feed: input_ids, no attention_mask."""
    model = build(cls)
    path = to_onnx(model, tmp_path / "text.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    ids, mask = _padded_ids((19, 4, 11), 19)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {"input_ids": ids.numpy()}), strict=True))
    with torch.no_grad():
        ref = model(input_ids=ids)  # transformers without a mask
        masked = model(input_ids=ids, attention_mask=mask)
    for name in names:
        torch.testing.assert_close(torch.from_numpy(got[name]), ref[name], atol=2e-5, rtol=1e-4)
    if cls is not tf.T5EncoderModel:  # causal attention: right padding changes neither the pooled nor the real tokens
        pooled = "pooler_output" if "pooler_output" in names else "text_embeds"
        torch.testing.assert_close(torch.from_numpy(got[pooled]), masked[pooled], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(got["last_hidden_state"][1, :4]), masked.last_hidden_state[1, :4],
                                   atol=2e-5, rtol=1e-4)  # fmt: skip
    parity = onnx_parity(model, path)
    assert parity.ok and {r.feed for r in parity.rows} == {"input_ids"}, parity.table()


@pytest.mark.parametrize("cls", [tf.CLIPTextModel, tf.T5EncoderModel], ids=lambda c: c.__name__)
def test_attention_mask_on_request(cls, tmp_path):
    model = build(cls)
    report = export_onnx(model, tmp_path / "masked.onnx", attention_mask=True)
    assert [i.name for i in report.inputs] == ["input_ids", "attention_mask"]
    sess = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    ids, mask = _padded_ids((13, 5, 9), 13, pad=0 if cls is tf.T5EncoderModel else VOCAB - 1)
    (last,) = sess.run(["last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()  # positions transformers defines; T5 padding rows differ with and without the mask
    torch.testing.assert_close(torch.from_numpy(last)[keep], ref[keep], atol=2e-5, rtol=1e-4)
    parity = onnx_parity(model, report.path)
    assert parity.ok and {r.feed for r in parity.rows} == {"input_ids+attention_mask"}, parity.table()
    assert "input_ids+attention_mask" in parity.table()


def test_attention_mask_choice_per_tower(tmp_path):
    joint = build(tf.CLIPModel)
    report = export_onnx(joint, tmp_path / "j.onnx", attention_mask=False)
    assert [s.name for s in report.inputs] == ["input_ids", "pixel_values"]
    assert onnx_parity(joint, tmp_path / "j.onnx").ok
    with pytest.raises(InputError, match="no text input"):
        to_onnx(build(tf.CLIPVisionModel), tmp_path / "v.onnx", attention_mask=True)
    with pytest.raises(InputError, match="attention_mask must be"):
        to_onnx(build(tf.CLIPTextModel), tmp_path / "t.onnx", attention_mask="yes")
    assert_no_leftovers(tmp_path, {"j.onnx"})


@pytest.mark.parametrize("cls", [tf.T5EncoderModel, tf.UMT5EncoderModel], ids=lambda c: c.__name__)
def test_t5_relative_bias_past_the_example_length(cls, tmp_path):
    model = build(cls)
    path = to_onnx(model, tmp_path / "t5.onnx")
    # traced at sequence 7; 64 > max_distance 20 uses the log-spaced buckets and the clamp
    parity = onnx_parity(model, path, sizes=[{"batch": 2, "sequence": 64}, {"batch": 1, "sequence": 1}])
    assert parity.ok, parity.table()


def test_fp16_export_within_twice_torch_fp16_error(tmp_path):
    torch.manual_seed(0)
    # T5's default 32 buckets / max_distance 128: at sequence 48 a bucket computed in fp16 lands wrong (shape logic
    # must stay fp32)
    t5 = tf.T5EncoderModel(t5_config(num_buckets=32, max_distance=128)).eval()
    for model in (build(tf.CLIPModel), t5):
        cls = type(model)
        report = export_onnx(model, tmp_path / f"{cls.__name__}.onnx", dtype=torch.float16)
        assert report.dtype == "float16"
        assert {s.dtype for s in report.inputs} <= {"int64", "float16"}
        assert {s.dtype for s in report.outputs} == {"float16"}
        tower, half = tower_of(model), tower_of(copy.deepcopy(model).half())
        sess = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        sizes = {"batch": 3, "text_batch": 3, "image_batch": 2, "sequence": 48}
        inputs = tower.inputs_for_sizes({k: v for k, v in sizes.items() if k in tower.example_sizes()}, seed=5)
        ref = tower.run(inputs)
        base = half.run({k: v.half() if v.is_floating_point() else v for k, v in inputs.items()})
        feed = {k: v.numpy().astype("float16") if v.is_floating_point() else v.numpy() for k, v in inputs.items()}
        for name, got in zip(names, sess.run(names, feed), strict=True):
            err = (torch.from_numpy(got).float() - ref[name]).abs().max().item()
            torch_err = (base[name].float() - ref[name]).abs().max().item()
            assert err <= 2 * torch_err + 1e-3, (
                f"{cls.__name__}.{name}: ORT fp16 {err:.3e} vs torch fp16 {torch_err:.3e}"
            )
        parity = onnx_parity(model, report.path)
        assert parity.ok and parity.tolerance_rel == onnx_export_mod.FP16_TOLERANCE, parity.table()
    fused = export_onnx(t5, tmp_path / "t5_fused_fp16.onnx", dtype=torch.float16, optimize=True)
    assert fused.fusions and onnx_parity(t5, fused.path, tolerance_rel=2e-3).ok


# fusions that must fire on these graphs (measured with onnxruntime 1.32; ORT's CLIP text Attention fusion does not
# match the causal + padding mask, and its T5 attention / relative-bias fusions do not match transformers' graph)
EXPECTED_FUSIONS = {
    "CLIPModel": {"Attention", "QuickGelu", "SkipLayerNormalization"},  # Attention: the vision tower's
    "CLIPVisionModelWithProjection": {"Attention", "QuickGelu", "SkipLayerNormalization"},
    "CLIPTextModelWithProjection": {"QuickGelu", "SkipLayerNormalization"},
    "SiglipTextModel": {"FastGelu", "SkipLayerNormalization"},
    "T5EncoderModel": {"FastGelu", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FUSIONS))
def test_ort_optimizer_fusions_and_parity(name, tmp_path):
    model = build(getattr(tf, name))
    report = export_onnx(model, tmp_path / "opt.onnx", optimize=True)
    assert report.optimized and EXPECTED_FUSIONS[name] <= set(report.fusions), report.fusions
    ops = {n.op_type for n in onnx.load(report.path).graph.node}
    assert EXPECTED_FUSIONS[name] <= ops  # the fused nodes are in the graph written
    assert report.inputs == export_onnx(model, tmp_path / "plain.onnx").inputs
    parity = onnx_parity(model, report.path)
    assert parity.ok, parity.table()


def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    model = build(tf.CLIPTextModelWithProjection)
    report = export_onnx(model, tmp_path / "dyn.onnx", exporter="dynamo")
    assert report.exporter == "dynamo" and [s.dims for s in report.inputs] == [["batch", "sequence"]]
    parity = onnx_parity(model, report.path)
    assert parity.ok, parity.table()


def test_fastenc_optimized_model_exports_transformers_math(tmp_path):
    model = build(tf.CLIPVisionModelWithProjection)
    before = model.config._attn_implementation
    fast = fastenc.optimize(model, backend="torch")
    path = to_onnx(fast, tmp_path / "fast.onnx")
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {""}, "no custom ops"
    assert dict((p.key, p.value) for p in proto.metadata_props)["fastenc.class"] == "CLIPVisionModelWithProjection"
    assert onnx_parity(model, path).ok
    assert model.config._attn_implementation == before  # eager attention only while tracing


def test_external_data_for_large_models(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export_mod, "LARGE_BYTES", 0)  # treat the tiny model as one over 2 GB
    model = build(tf.T5EncoderModel)
    report = export_onnx(model, tmp_path / "big.onnx")
    assert report.external_data and sorted(Path(f).name for f in report.files) == ["big.onnx", "big.onnx.data"]
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert (tmp_path / "big.onnx.data").stat().st_size > weights / 2  # tensors under 1 KiB stay inline
    proto = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    external = [i.name for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert any("shared" in name or "embed" in name for name in external), external
    assert_no_leftovers(tmp_path, {"big.onnx", "big.onnx.data"})
    assert onnx_parity(model, report.path).ok
    # fp16 of a large graph: ORT's converter runs its shape inference on a file, then the fp16 weights go external
    half = export_onnx(model, tmp_path / "half.onnx", dtype=torch.float16)
    assert half.external_data and half.dtype == "float16" and onnx_parity(model, half.path).ok


def test_bad_input_raises_typed_errors_and_writes_nothing(tmp_path):
    model = build(tf.CLIPTextModel)
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)).eval()  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="does not support .*BertModel.*supported: CLIPModel"):
        to_onnx(bert, tmp_path / "x.onnx")
    with pytest.raises(InputError, match="opset 11 is too old"):
        to_onnx(model, tmp_path / "x.onnx", opset=11)
    with pytest.raises(InputError, match="does not exist"):
        to_onnx(model, tmp_path / "missing" / "x.onnx")
    with pytest.raises(InputError, match="is a directory"):
        to_onnx(model, tmp_path)
    with pytest.raises(InputError, match="dtype"):
        to_onnx(model, tmp_path / "x.onnx", dtype=torch.bfloat16)
    with pytest.raises(InputError, match="exporter"):
        to_onnx(model, tmp_path / "x.onnx", exporter="jit")
    with pytest.raises(InputError, match="training mode"):
        to_onnx(copy.deepcopy(model).train(), tmp_path / "x.onnx")
    assert_no_leftovers(tmp_path)


def test_failure_mid_export_leaves_nothing(tmp_path, monkeypatch):
    model = build(tf.CLIPTextModel)
    (tmp_path / "keep.onnx").write_bytes(b"previous")

    def broken(*a, **k):
        raise RuntimeError("checker exploded")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        to_onnx(model, tmp_path / "keep.onnx")
    assert (tmp_path / "keep.onnx").read_bytes() == b"previous"  # an existing file is only replaced on success
    assert_no_leftovers(tmp_path, {"keep.onnx"})


_HOLD_STAGING = """
import os, signal, sys, time
from pathlib import Path
from fastenc.export.onnx_export import staging
with staging(Path(sys.argv[1])) as tmp:
    (tmp / "model.onnx.data").write_bytes(b"x" * 4096)  # what a killed export leaves: hundreds of MB in real life
    print(tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no finally, no atexit
    time.sleep(600)
"""


def _staging_in_subprocess(folder: Path, how: str):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLD_STAGING, str(folder), how], stdout=subprocess.PIPE, text=True)
    path = Path(proc.stdout.readline().strip())
    return proc, path


def test_export_removes_stale_staging_of_killed_exports_but_not_live_ones(tmp_path):
    import os
    import time

    dead, dead_dir = _staging_in_subprocess(tmp_path, "kill")
    assert dead.wait(timeout=900) == -9
    assert dead_dir.name.startswith(".fastenc-export-") and (dead_dir / "model.onnx.data").is_file()  # left behind
    live, live_dir = _staging_in_subprocess(tmp_path, "hold")
    try:
        legacy_old = tmp_path / ".fastenc-export-legacyold"  # an older fastenc's folder, no lock file, a day old
        legacy_new = tmp_path / ".fastenc-export-legacynew"  # the same, but recent: maybe still being written
        for d in (legacy_old, legacy_new):
            d.mkdir()
            (d / "m.onnx").write_bytes(b"x")
        day_ago = time.time() - 86400
        os.utime(legacy_old, (day_ago, day_ago))
        report = export_onnx(build(tf.CLIPVisionModel), tmp_path / "v.onnx")
        assert Path(report.path).is_file()
        assert not dead_dir.exists() and not legacy_old.exists()
        assert (live_dir / "model.onnx.data").is_file(), "a running export's folder must never be removed"
        assert legacy_new.is_dir()
        assert_no_leftovers(tmp_path, {"v.onnx", live_dir.name, legacy_new.name})
    finally:
        live.kill()
        live.wait()
    # the live one is now a killed export's folder too: a Triton repository export into the folder removes it
    to_triton_repository(build(tf.CLIPVisionModel), tmp_path, "vision", optimize=False)
    assert not live_dir.exists()
    assert_no_leftovers(tmp_path, {"v.onnx", "vision", legacy_new.name})


# ------------------------------------------------------------------------------------------------- TensorRT


@pytest.fixture(scope="module")
def clip_text_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("trt") / "clip_text.onnx"
    return to_onnx(build(tf.CLIPTextModelWithProjection), path, attention_mask=True)


def test_tensorrt_default_profiles_from_onnx(clip_text_onnx):
    (prof,) = resolve_profiles(clip_text_onnx)
    # batch defaults (1, 8, 64); sequence capped at CLIP's 77 positions (recorded in the file's metadata)
    assert prof == {"input_ids": ((1, 1), (8, 77), (64, 77)), "attention_mask": ((1, 1), (8, 77), (64, 77))}
    two = resolve_profiles(clip_text_onnx, [{"batch": (1, 1, 1), "sequence": (77, 77, 77)},
                                           {"batch": (2, 16, 32)}])  # fmt: skip
    assert two[0]["input_ids"] == ((1, 77), (1, 77), (1, 77))
    assert two[1]["attention_mask"] == ((2, 1), (16, 77), (32, 77))
    explicit = resolve_profiles(clip_text_onnx, {"input_ids": ((1, 4), (2, 8), (4, 16)), "batch": (1, 2, 4)})
    assert explicit[0]["input_ids"] == ((1, 4), (2, 8), (4, 16))


def test_tensorrt_profile_errors(clip_text_onnx, tmp_path):
    with pytest.raises(InputError, match="min <= opt <= max"):
        resolve_profiles(clip_text_onnx, {"batch": (8, 4, 16)})
    with pytest.raises(InputError, match="neither an input"):
        resolve_profiles(clip_text_onnx, {"pixels": (1, 2, 3)})
    with pytest.raises(InputError, match=r"\(min, opt, max\)"):
        resolve_profiles(clip_text_onnx, {"batch": (1, 2)})
    with pytest.raises(InputError, match="must have 2 dims"):
        resolve_profiles(clip_text_onnx, {"input_ids": ((1,), (2,), (4,))})
    with pytest.raises(InputError, match="is not a file"):
        resolve_profiles(tmp_path / "nope.onnx")


def test_vision_profiles_keep_fixed_dims(tmp_path):
    path = to_onnx(build(tf.CLIPVisionModel), tmp_path / "v.onnx")
    (prof,) = resolve_profiles(path, {"batch": (1, 4, 8)})
    assert prof == {"pixel_values": ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))}
    with pytest.raises(InputError, match="fixed at 16"):
        resolve_profiles(path, {"pixel_values": ((1, 3, 16, 16), (1, 3, 32, 32), (1, 3, 32, 32))})


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device: TensorRT builds engines for a GPU"
    return None


@pytest.mark.skipif(_tensorrt_missing() is None, reason="tensorrt and a GPU are present")
def test_to_tensorrt_without_tensorrt_raises(clip_text_onnx, tmp_path):
    with pytest.raises(BackendUnavailableError, match="tensorrt|CUDA"):
        to_tensorrt(clip_text_onnx, tmp_path / "e.plan")
    assert_no_leftovers(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(_tensorrt_missing() is not None, reason=f"TensorRT engine build: {_tensorrt_missing()}")
def test_tensorrt_engine_matches_transformers(tmp_path):
    import tensorrt as trt

    model = build(tf.CLIPTextModelWithProjection).cuda()
    onnx_path = to_onnx(model, tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    engine_path = to_tensorrt(onnx_path, tmp_path / "m.plan", fp16=False, timing_cache=cache,
                              profiles={"batch": (1, 2, 4), "sequence": (1, 16, 77)})  # fmt: skip
    assert cache.stat().st_size > 0
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    tower = tower_of(model)
    inputs = tower.make_inputs(3, 29, seed=4)
    ref = tower.run(inputs)
    outs = {}
    for name, value in inputs.items():
        context.set_input_shape(name, tuple(value.shape))
        value = value.contiguous()
        inputs[name] = value
        context.set_tensor_address(name, value.data_ptr())
    for name in ref:
        outs[name] = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda", dtype=torch.float32)
        context.set_tensor_address(name, outs[name].data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    for name, r in ref.items():
        torch.testing.assert_close(outs[name], r, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------- Triton

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def parse_pbtxt(text: str) -> dict:
    """A small parser for protobuf text format as config.pbtxt uses it: `key: scalar`, `key: [scalars]`,
    `key { ... }`, `key [ {...}, {...} ]`. Repeated keys collect into lists; every value is a list."""
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"cannot tokenize at {text[pos : pos + 20]!r}")
            break
        pos = m.end()
        if m.group(1):
            continue
        tok = m.group(2) or m.group(3) or m.group(4)
        if tok:
            tokens.append(tok)

    def scalar(tok):
        if tok.startswith('"'):
            return tok[1:-1]
        try:
            return int(tok)
        except ValueError:
            return tok  # enum

    def message(i, end):
        out = {}
        while i < len(tokens) and tokens[i] != end:
            key = tokens[i]
            i += 1
            if tokens[i] == ":":
                i += 1
            if tokens[i] == "{":
                value, i = message(i + 1, "}")
                out.setdefault(key, []).append(value)
            elif tokens[i] == "[":
                i += 1
                items = []
                while tokens[i] != "]":
                    if tokens[i] == "{":
                        value, i = message(i + 1, "}")
                        items.append(value)
                    elif tokens[i] == ",":
                        i += 1
                    else:
                        items.append(scalar(tokens[i]))
                        i += 1
                out.setdefault(key, []).extend(items)
                i += 1
                if key == "dims" and not items:
                    out[key] = []
            else:
                out.setdefault(key, []).append(scalar(tokens[i]))
                i += 1
        return out, i + 1

    parsed, _ = message(0, None)
    return parsed


TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


def check_config_against_onnx(config: dict, onnx_path: Path, name: str):
    inputs, outputs = read_io(onnx_path)
    assert config["name"] == [name]
    mbs = config["max_batch_size"][0]
    for key, specs in (("input", inputs), ("output", outputs)):
        assert [t["name"][0] for t in config[key]] == [s.name for s in specs]
        for t, s in zip(config[key], specs, strict=True):
            assert t["data_type"] == [TYPES[s.dtype]]
            dims = s.dims[1:] if mbs > 0 else s.dims
            assert t.get("dims", []) == [d if isinstance(d, int) else -1 for d in dims], (t, s)
    return mbs


def test_parse_pbtxt_helper():
    text = 'name: "m"  # comment\nmax_batch_size: 8\ninput [ { name: "a" dims: [ -1, 3 ] }, { name: "b" } ]\n' \
           "dynamic_batching { max_queue_delay_microseconds: 5 }\n"  # fmt: skip
    assert parse_pbtxt(text) == {"name": ["m"], "max_batch_size": [8],
                                 "input": [{"name": ["a"], "dims": [-1, 3]}, {"name": ["b"]}],
                                 "dynamic_batching": [{"max_queue_delay_microseconds": [5]}]}  # fmt: skip


def test_triton_repository_single_tower(tmp_path):
    model = build(tf.CLIPTextModelWithProjection)
    entry = to_triton_repository(model, tmp_path / "repo", "clip_text", max_batch_size=16)
    assert entry == tmp_path / "repo" / "clip_text"
    assert sorted(str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file()) == ["1/model.onnx",
                                                                                          "config.pbtxt"]  # fmt: skip
    config = parse_pbtxt((entry / "config.pbtxt").read_text())
    assert config["backend"] == ["onnxruntime"]
    assert check_config_against_onnx(config, entry / "1" / "model.onnx", "clip_text") == 16
    assert config["input"][0]["dims"] == [-1]  # batch left out, sequence dynamic
    assert config["output"][0]["dims"] == [16]  # text_embeds: projection width
    assert config["dynamic_batching"] == [{"max_queue_delay_microseconds": [100]}]
    assert onnx_parity(model, entry / "1" / "model.onnx").ok  # ORT-fused graph by default
    assert_no_leftovers(tmp_path / "repo", {"clip_text"})
    with pytest.raises(InputError, match="exists"):
        to_triton_repository(model, tmp_path / "repo", "clip_text")
    to_triton_repository(model, tmp_path / "repo", "clip_text", overwrite=True, max_batch_size=4)
    assert parse_pbtxt((entry / "config.pbtxt").read_text())["max_batch_size"] == [4]
    assert_no_leftovers(tmp_path / "repo", {"clip_text"})


def test_triton_repository_follows_the_mask_choice(tmp_path):
    model = build(tf.CLIPTextModel)
    plain = to_triton_repository(model, tmp_path, "text", optimize=False)
    masked = to_triton_repository(model, tmp_path, "text_masked", optimize=False, attention_mask=True)
    for entry, inputs in ((plain, ["input_ids"]), (masked, ["input_ids", "attention_mask"])):
        config = parse_pbtxt((entry / "config.pbtxt").read_text())
        assert [t["name"][0] for t in config["input"]] == inputs
        check_config_against_onnx(config, entry / "1" / "model.onnx", entry.name)


def test_triton_repository_joint_model_has_no_batching(tmp_path):
    model = build(tf.SiglipModel)
    entry = to_triton_repository(model, tmp_path, "siglip", optimize=False)
    config = parse_pbtxt((entry / "config.pbtxt").read_text())
    assert check_config_against_onnx(config, entry / "1" / "model.onnx", "siglip") == 0
    assert "dynamic_batching" not in config
    assert config["output"][0]["dims"] == [-1, -1]  # logits_per_image: image_batch x text_batch


def test_triton_repository_bad_input(tmp_path):
    model = build(tf.CLIPVisionModel)
    with pytest.raises(InputError, match="name must be"):
        to_triton_repository(model, tmp_path, "../evil")
    with pytest.raises(InputError, match="backend must be"):
        to_triton_repository(model, tmp_path, "m", backend="openvino")
    with pytest.raises(InputError, match="parent .* does not exist"):
        to_triton_repository(model, tmp_path / "a" / "b", "m")
    if _tensorrt_missing() is not None:
        with pytest.raises(BackendUnavailableError):
            to_triton_repository(model, tmp_path, "m", backend="tensorrt")
    with pytest.raises(UnsupportedModelError):
        to_triton_repository(torch.nn.Linear(2, 2), tmp_path, "m")
    assert_no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------------- CLI


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="fastenc")
    add_export_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["export", *argv, "--no-progress"])
    return args.func(args)


def test_cli_local_checkpoint_tower_and_triton(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    build(tf.CLIPModel).save_pretrained(ckpt)
    out = tmp_path / "text.onnx"
    code = run_cli(["--model", str(ckpt), "--tower", "text", "--out", str(out), "--triton-repo",
                    str(tmp_path / "repo"), "--name", "txt"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    assert "CLIPTextModelWithProjection" in text and "fusions fired" in text
    assert "parity of" in text and "result: PASS" in text and text.count("text_embeds") >= 4
    assert read_io(out)[0][0].name == "input_ids"
    assert (tmp_path / "repo" / "txt" / "config.pbtxt").is_file()


def test_cli_attention_mask_flag(tmp_path, capsys):
    for flag, inputs in (([], ["input_ids"]), (["--attention-mask"], ["input_ids", "attention_mask"])):
        out = tmp_path / f"text{len(flag)}.onnx"
        code = run_cli(["--shape", "tiny", "--layers", "1", "--tower", "text", "--out", str(out), "--no-optimize",
                        *flag])  # fmt: skip
        text = capsys.readouterr().out
        assert code == 0, text
        assert [s.name for s in read_io(out)[0]] == inputs
        assert "+".join(inputs) in text  # the parity table names the feed


def test_cli_random_t5_json(tmp_path, capsys):
    import json

    code = run_cli(["--shape", "t5-tiny", "--layers", "1", "--out", str(tmp_path / "t5.onnx"), "--no-optimize",
                    "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["parity"]["ok"] and report["onnx"]["model"] == "T5EncoderModel"
    assert report["onnx"]["fusions"] == {} and not report["onnx"]["optimized"]


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    bert_dir = tmp_path / "bert"
    tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert_dir)  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    cases = [
        (["--model", str(bert_dir), "--out", str(work / "a.onnx")], "does not support"),
        (["--model", str(tmp_path / "nope"), "--out", str(work / "a.onnx")], "is not a directory"),
        (["--shape", "tiny", "--out", str(work / "a.onnx"), "--opset", "11"], "too old"),
        (["--shape", "tiny", "--out", str(work / "missing" / "a.onnx")], "does not exist"),
        (["--shape", "tiny"], "--out"),
        (["--shape", "t5-tiny", "--tower", "text", "--out", str(work / "a.onnx")], "--tower text needs"),
    ]
    for argv, message in cases:
        assert run_cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert "fastenc export: error:" in err and message in err, (argv, err)
    assert_no_leftovers(work)
