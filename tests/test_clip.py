"""fastenc.optimize on CLIP towers: parity against the untouched transformers model, torch and Triton backends."""

import os

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

import fastenc
from fastenc.parity import clip_inputs
from tests.utils import FP32, assert_close, assert_error_within, compare_outputs, run_both

VOCAB = 99


def make_config(
    width=64,
    heads=2,
    layers=2,
    *,
    vision_width=None,
    vision_heads=None,
    image=24,
    patch=8,
    act="quick_gelu",
    eos=VOCAB - 1,
    max_pos=77,
):
    text = dict(
        hidden_size=width,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=2 * width,
        max_position_embeddings=max_pos,
        vocab_size=VOCAB,
        hidden_act=act,
        eos_token_id=eos,
        bos_token_id=VOCAB - 2,
        pad_token_id=eos,
    )
    vision = dict(
        hidden_size=vision_width or width,
        num_attention_heads=vision_heads or heads,
        num_hidden_layers=layers,
        intermediate_size=2 * (vision_width or width),
        image_size=image,
        patch_size=patch,
        hidden_act=act,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def build(cls, config):
    torch.manual_seed(0)
    if cls in (CLIPModel,):
        return cls(config).eval()
    sub = config.vision_config if "Vision" in cls.__name__ else config.text_config
    return cls(sub).eval()


def inputs_for(model, batch, seq=None):
    return clip_inputs(model.config, batch, seq=seq)


ALL_CLASSES = [CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel, CLIPVisionModelWithProjection]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_class_matches_transformers(cls, backend):
    model = build(cls, make_config())
    fast = fastenc.optimize(model, backend=backend, strict=True)
    assert isinstance(fast, cls) and fast is not model
    ref, got, t = run_both(model, fast, inputs_for(model, 3, seq=13))
    compare_outputs(ref, got)
    towers = (2 if cls is CLIPModel else 1) * 2  # layers per tower x towers
    assert t.counts[f"{backend}.attention"] == towers, t.counts
    assert t.counts[f"{backend}.bias_activation"] == towers
    assert not t.fallbacks


@pytest.mark.parametrize("width,heads", [(64, 2), (160, 2), (208, 2)], ids=["hd32", "hd80", "hd104"])
@pytest.mark.parametrize("seq,batch", [(1, 1), (13, 3), (77, 3)])
def test_text_tower_head_dims_and_lengths_triton(width, heads, seq, batch):
    model = build(CLIPTextModelWithProjection, make_config(width, heads))
    fast = fastenc.optimize(model, backend="triton", strict=True)
    ref, got, t = run_both(model, fast, inputs_for(model, batch, seq=seq))
    compare_outputs(ref, got)
    assert t.counts["triton.attention"] == 2


def test_vision_tower_head_dim_80_triton():
    model = build(CLIPVisionModelWithProjection, make_config(vision_width=160, vision_heads=2, image=30, patch=6))
    fast = fastenc.optimize(model, backend="triton", strict=True)
    ref, got, t = run_both(model, fast, inputs_for(model, 2))  # 1 + 25 patches = 26 tokens
    compare_outputs(ref, got)
    assert t.counts["triton.attention"] == 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padding_rows_that_mask_almost_everything(backend):
    model = build(CLIPTextModel, make_config())
    fast = fastenc.optimize(model, backend=backend, strict=True)
    ids = torch.randint(0, VOCAB - 3, (3, 77))
    mask = torch.zeros(3, 77, dtype=torch.long)
    mask[0, :1] = 1  # one real token: every query sees only key 0
    mask[1, :2] = 1
    mask[2, :] = 1
    ids[0, 0] = ids[1, 1] = ids[2, 76] = VOCAB - 1  # EOS at the last real position
    ref, got, _ = run_both(model, fast, {"input_ids": ids, "attention_mask": mask})
    compare_outputs(ref, got)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_legacy_eos_token_id_2_pools_argmax(backend):
    model = build(CLIPTextModel, make_config(eos=2))
    fast = fastenc.optimize(model, backend=backend, strict=True)
    ids = torch.randint(3, VOCAB - 5, (2, 9))
    ids[0, 4] = VOCAB - 1  # highest id marks the EOS in legacy checkpoints
    ids[1, 8] = VOCAB - 1
    ref, got, _ = run_both(model, fast, {"input_ids": ids})
    compare_outputs(ref, got)
    assert torch.equal(got.pooler_output, got.last_hidden_state[[0, 1], [4, 8]])


def test_first_eos_rule_when_pad_equals_eos():
    model = build(CLIPTextModel, make_config())
    fast = fastenc.optimize(model, backend="torch")
    ids = torch.full((2, 10), VOCAB - 1)  # padding with the EOS id: the FIRST EOS is the pooled token
    ids[0, :3] = torch.tensor([5, 6, 7])
    ids[1, :6] = torch.arange(10, 16)
    ref, got, _ = run_both(model, fast, {"input_ids": ids})
    compare_outputs(ref, got)
    assert torch.equal(got.pooler_output, got.last_hidden_state[[0, 1], [3, 6]])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hidden_states_and_tuple_output(backend):
    model = build(CLIPModel, make_config())
    fast = fastenc.optimize(model, backend=backend, strict=True)
    inputs = inputs_for(model, 2, seq=11)
    ref, got, _ = run_both(model, fast, inputs, output_hidden_states=True)
    assert len(got.text_model_output.hidden_states) == 3
    compare_outputs(ref, got)
    with torch.no_grad():
        ref_t = model(**inputs, return_dict=False)
        got_t = fast(**inputs, return_dict=False)
    assert isinstance(got_t, tuple) and len(got_t) == len(ref_t)
    for a, b in zip(got_t[:4], ref_t[:4], strict=True):
        assert_close(a, b, **FP32)


def test_output_attentions_runs_torch_and_says_so():
    model = build(CLIPTextModel, make_config())
    model.config._attn_implementation = "eager"
    fast = fastenc.optimize(model, backend="triton")
    inputs = inputs_for(model, 2, seq=9)
    ref, got, t = run_both(model, fast, inputs, output_attentions=True)
    compare_outputs(ref, got)
    assert t.counts["torch.attention"] == 2 and t.counts["triton.attention"] == 0
    assert {f.reason for f in t.fallbacks} == {"output_attentions=True needs the probabilities"}
    strict = fastenc.optimize(model, backend="triton", strict=True)
    with pytest.raises(fastenc.BackendUnavailableError, match="output_attentions"):
        strict(**inputs, output_attentions=True)


def test_gelu_config_and_interpolated_positions():
    model = build(CLIPVisionModel, make_config(act="gelu"))
    fast = fastenc.optimize(model, backend="triton", strict=True)
    px = torch.randn(2, 3, 32, 32)  # 24x24 model, 4x4 patch grid interpolated
    ref, got, _ = run_both(model, fast, {"pixel_values": px, "interpolate_pos_encoding": True})
    compare_outputs(ref, got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_within_twice_pytorch_error(dtype, backend):
    model32 = build(CLIPModel, make_config())
    inputs = inputs_for(model32, 2, seq=13)
    half = build(CLIPModel, make_config()).to(dtype)
    fast = fastenc.optimize(half, backend=backend, strict=True)
    with torch.no_grad():
        ref32 = model32(**inputs)
        ref_half = half(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)})
        got = fast(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)})
    for key in ("text_embeds", "image_embeds", "logits_per_image"):
        assert got[key].dtype == ref_half[key].dtype
        assert_error_within(got[key], ref_half[key], ref32[key], factor=2.0, atol=1e-3, name=key)
    for tower in ("text_model_output", "vision_model_output"):
        assert_error_within(
            got[tower].last_hidden_state,
            ref_half[tower].last_hidden_state,
            ref32[tower].last_hidden_state,
            factor=2.0,
            atol=1e-2,
            name=tower,
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match_transformers(backend):
    model = build(CLIPModel, make_config())
    fast = fastenc.optimize(model, backend=backend, strict=True)
    inputs = inputs_for(model, 3, seq=8)
    ref_loss = model(**inputs, return_loss=True).loss
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()), allow_unused=True)
    with fastenc.trace() as t:
        loss = fast(**inputs, return_loss=True).loss
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert t.counts[f"{backend}.attention"] == 4
    assert_close(loss, ref_loss, **FP32, name="loss")
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        if r is None:
            assert g is None or not g.any(), name
            continue
        assert_close(g, r, atol=1e-5, rtol=1e-3, name=f"grad {name}")


def test_original_model_is_untouched_and_weights_are_shared():
    model = build(CLIPModel, make_config())
    fast = fastenc.optimize(model)
    assert type(model) is CLIPModel
    assert fast.text_model.embeddings.token_embedding.weight is model.text_model.embeddings.token_embedding.weight
    assert fast.state_dict().keys() == model.state_dict().keys()
    again = fastenc.optimize(fast, backend="torch")  # re-optimizing changes settings only
    assert type(again) is type(fast) and again._fastenc.backend == "torch"


def test_save_pretrained_and_from_pretrained_roundtrip(tmp_path):
    model = build(CLIPModel, make_config())
    model.save_pretrained(tmp_path / "orig")
    loaded = CLIPModel.from_pretrained(tmp_path / "orig").eval()
    fast = fastenc.optimize(loaded, backend="triton", strict=True)
    ref, got, _ = run_both(model, fast, inputs_for(model, 2, seq=7))
    compare_outputs(ref, got)
    fast.save_pretrained(tmp_path / "fast")  # reloads with plain transformers
    reloaded = CLIPModel.from_pretrained(tmp_path / "fast").eval()
    assert reloaded.config.architectures == ["CLIPModel"]
    ref2, got2, _ = run_both(reloaded, fast, inputs_for(model, 2, seq=7))
    compare_outputs(ref2, got2)


def test_env_var_forces_backend(monkeypatch):
    model = build(CLIPTextModel, make_config())
    fast = fastenc.optimize(model)  # backend="auto"
    inputs = inputs_for(model, 1, seq=5)
    monkeypatch.setenv("FASTENC_BACKEND", "triton")
    _, _, t = run_both(model, fast, inputs)
    assert t.counts["triton.attention"] == 2
    monkeypatch.setenv("FASTENC_BACKEND", "torch")
    _, _, t = run_both(model, fast, inputs)
    assert t.counts["torch.attention"] == 2 and t.counts["triton.attention"] == 0
    monkeypatch.setenv("FASTENC_BACKEND", "tpu")
    with pytest.raises(fastenc.InputError, match="FASTENC_BACKEND"):
        fast(**inputs)


def test_cuda_backend_falls_back_visibly_or_raises_when_strict():
    model = build(CLIPTextModel, make_config())
    inputs = inputs_for(model, 1, seq=5)
    with pytest.raises(fastenc.BackendUnavailableError, match="cuda"):
        fastenc.optimize(model, backend="cuda", strict=True)(**inputs)
    fast = fastenc.optimize(model, backend="cuda")
    with pytest.warns(fastenc.FallbackWarning):
        _, got, t = run_both(model, fast, inputs)
    assert t.fallbacks and all(f.requested == "cuda" for f in t.fallbacks)
    assert t.counts["cuda.attention"] == 0 and t.counts["triton.attention"] + t.counts["torch.attention"] == 2


# ------------------------------------------------------------------------------------------------ bad input


def test_unsupported_model_class():
    with pytest.raises(fastenc.UnsupportedModelError, match="CLIPForImageClassification"):
        fastenc.optimize(CLIPForImageClassification(make_config()))
    with pytest.raises(fastenc.UnsupportedModelError, match="supported: CLIPModel"):
        fastenc.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):  # UnsupportedModelError is a TypeError
        fastenc.optimize(torch.nn.Linear(2, 2))


def test_activation_without_a_kernel_and_bad_backend_name():
    model = build(CLIPTextModel, make_config(act="silu"))  # runs as its module (tests/test_config_fields.py)
    ref, got, t = run_both(model, fastenc.optimize(model, backend="torch"), inputs_for(model, 2, seq=6))
    compare_outputs(ref, got)
    assert t.counts["torch.module"] == 2
    with pytest.raises(fastenc.InputError, match="backend"):
        fastenc.optimize(build(CLIPTextModel, make_config()), backend="gpu")


def test_bad_inputs_raise_named_errors():
    model = build(CLIPModel, make_config())
    fast = fastenc.optimize(model)
    good = inputs_for(model, 2, seq=6)
    with pytest.raises(fastenc.InputError, match="input_ids must be an integer tensor"):
        fast(**{**good, "input_ids": good["input_ids"].float()})
    with pytest.raises(fastenc.InputError, match="max_position_embeddings=77"):
        fast.get_text_features(input_ids=torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError):  # InputError is a ValueError, like transformers' own error
        fast.get_text_features(input_ids=torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(fastenc.InputError, match="attention_mask must have input_ids' shape"):
        fast(**{**good, "attention_mask": good["attention_mask"][:, :3]})
    with pytest.raises(fastenc.InputError, match="pixel_values must have shape"):
        fast(**{**good, "pixel_values": good["pixel_values"][:, :1]})
    with pytest.raises(fastenc.InputError, match="interpolate_pos_encoding"):
        fast(**{**good, "pixel_values": torch.randn(2, 3, 40, 40)})
    with pytest.raises(fastenc.InputError, match="weights are on cpu"):
        fast(**{**good, "input_ids": good["input_ids"].to("meta")})
    with pytest.raises(fastenc.InputError, match="input_ids is required"):
        fast.get_text_features(input_ids=None)
    with pytest.raises(fastenc.InputError, match="head_mask"):
        fast(**good, head_mask=torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_on_gpu_real_clip_l14_sizes():
    from fastenc.models.configs import clip_config

    model = CLIPModel(clip_config("ViT-L/14")).cuda().eval()
    fast = fastenc.optimize(model, backend="triton", strict=True)
    inputs = clip_inputs(model.config, 8, device="cuda")
    ref, got, _ = run_both(model, fast, inputs)
    compare_outputs(ref, got, dict(atol=1e-4, rtol=1e-3))


def test_demo_cli_runs(capsys):
    from fastenc.cli import main

    env = os.environ.get("FASTENC_BACKEND")
    assert env is None
    assert main(["demo", "--shape", "tiny", "--batch", "2", "--backend", "triton", "--strict"]) == 0
    out = capsys.readouterr().out
    assert "triton.attention" in out and "PASS" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter re-exec only happens without CUDA")
def test_demo_cli_triton_without_interpret_env():
    """`fastenc demo --backend triton` on a CPU machine with TRITON_INTERPRET unset: the CLI must start the
    interpreter before triton is imported (it re-executes itself with the variable set)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTENC_BACKEND")}
    cmd = [sys.executable, "-m", "fastenc.cli", "demo", "--shape", "tiny", "--layers", "1", "--batch", "2"]
    proc = subprocess.run([*cmd, "--backend", "triton", "--strict"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "triton.attention" in proc.stdout and "PASS" in proc.stdout


def test_model_built_under_inference_mode():
    """Weights created under torch.inference_mode() have no version counter; the fused-QKV cache still works."""
    with torch.inference_mode():
        model = build(CLIPModel, make_config(layers=1))
        fast = fastenc.optimize(model, backend="torch")
        inputs = inputs_for(model, 2)
        for _ in range(2):  # the second call hits the cache
            compare_outputs(model(**inputs), fast(**inputs))
