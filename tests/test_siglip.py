"""fastenc.optimize on SigLIP towers: parity against the untouched transformers model, torch and Triton backends."""

import pytest
import torch
from transformers import SiglipConfig, SiglipForImageClassification, SiglipModel, SiglipTextModel, SiglipVisionModel

import fastenc
from tests.utils import FP32, assert_close, assert_error_within, compare_outputs, run_both

VOCAB = 99


def make_config(*, vision_width=144, vision_heads=2, text_width=64, text_heads=2, layers=2, use_head=True):
    # vision head dim 72 = So400M's (1152 / 16): not a power of two
    text = dict(
        hidden_size=text_width,
        num_attention_heads=text_heads,
        num_hidden_layers=layers,
        intermediate_size=2 * text_width,
        max_position_embeddings=16,
        vocab_size=VOCAB,
        projection_size=vision_width,
    )
    vision = dict(
        hidden_size=vision_width,
        num_attention_heads=vision_heads,
        num_hidden_layers=layers,
        intermediate_size=96,
        image_size=24,
        patch_size=8,
        vision_use_head=use_head,
    )
    return SiglipConfig(text_config=text, vision_config=vision)


def build(cls, config):
    torch.manual_seed(0)
    if cls is SiglipModel:
        return cls(config).eval()
    return cls(config.vision_config if cls is SiglipVisionModel else config.text_config).eval()


def inputs_for(cls, batch=3, seq=16):
    g = torch.Generator().manual_seed(1)
    out = {}
    if cls in (SiglipModel, SiglipTextModel):
        out["input_ids"] = torch.randint(0, VOCAB, (batch, seq), generator=g)
    if cls in (SiglipModel, SiglipVisionModel):
        out["pixel_values"] = torch.randn(batch, 3, 24, 24, generator=g)
    return out


CLASSES = [SiglipModel, SiglipTextModel, SiglipVisionModel]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_class_matches_transformers(cls, backend):
    model = build(cls, make_config())
    fast = fastenc.optimize(model, backend=backend, strict=True)
    assert isinstance(fast, cls)
    ref, got, t = run_both(model, fast, inputs_for(cls), output_hidden_states=True)
    compare_outputs(ref, got)
    # 2 layers per tower, + the attention-pooling head's attention for the vision tower
    expected = {SiglipModel: 5, SiglipTextModel: 2, SiglipVisionModel: 3}[cls]
    assert t.counts[f"{backend}.attention"] == expected, t.counts
    assert not t.fallbacks


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sigmoid_loss_and_logit_bias(backend):
    model = build(SiglipModel, make_config())
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)
        model.logit_scale.fill_(2.0)
    fast = fastenc.optimize(model, backend=backend, strict=True)
    ref, got, _ = run_both(model, fast, inputs_for(SiglipModel), return_loss=True)
    compare_outputs(ref, got)
    assert_close(got.loss, ref.loss, **FP32, name="loss")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_text_padding_mask_is_bidirectional(backend):
    model = build(SiglipTextModel, make_config())
    fast = fastenc.optimize(model, backend=backend, strict=True)
    inputs = inputs_for(SiglipTextModel, batch=3, seq=12)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 1:] = 0  # one real token
    mask[2, 7:] = 0
    ref, got, _ = run_both(model, fast, {**inputs, "attention_mask": mask})
    compare_outputs(ref, got)


def test_vision_without_head_and_tuple_output():
    model = build(SiglipVisionModel, make_config(use_head=False))
    fast = fastenc.optimize(model, backend="triton", strict=True)
    ref, got, t = run_both(model, fast, inputs_for(SiglipVisionModel))
    assert got.pooler_output is None and ref.pooler_output is None
    compare_outputs(ref, got)
    assert t.counts["triton.attention"] == 2
    with torch.no_grad():
        tup = fast(**inputs_for(SiglipVisionModel), return_dict=False)
    assert isinstance(tup, tuple)
    assert_close(tup[0], ref.last_hidden_state, **FP32)


def test_output_attentions_falls_back_visibly():
    model = build(SiglipModel, make_config())
    model.config.text_config._attn_implementation = "eager"
    model.config.vision_config._attn_implementation = "eager"
    model.text_model.config._attn_implementation = "eager"
    model.vision_model.config._attn_implementation = "eager"
    fast = fastenc.optimize(model, backend="triton")
    ref, got, t = run_both(model, fast, inputs_for(SiglipModel), output_attentions=True)
    compare_outputs(ref, got)
    assert t.counts["torch.attention"] == 4 and t.counts["triton.attention"] == 1  # the pooling head stays fused
    assert t.fallbacks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_pytorch_error(dtype):
    ref32 = build(SiglipModel, make_config())
    half = build(SiglipModel, make_config()).to(dtype)
    fast = fastenc.optimize(half, backend="triton", strict=True)
    inputs = inputs_for(SiglipModel)
    half_inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}
    with torch.no_grad():
        r32, rh, got = ref32(**inputs), half(**half_inputs), fast(**half_inputs)
    for key in ("text_embeds", "image_embeds", "logits_per_image"):
        assert_error_within(got[key], rh[key], r32[key], factor=2.0, atol=2e-3, name=key)


def test_gradients_match_transformers():
    model = build(SiglipModel, make_config())
    fast = fastenc.optimize(model, backend="triton", strict=True)
    inputs = inputs_for(SiglipModel)
    ref = torch.autograd.grad(model(**inputs, return_loss=True).loss, list(model.parameters()), allow_unused=True)
    got = torch.autograd.grad(fast(**inputs, return_loss=True).loss, list(model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), got, ref, strict=True):
        if r is not None:
            assert_close(g, r, atol=1e-5, rtol=1e-3, name=f"grad {name}")


def test_interpolated_positions_and_roundtrip(tmp_path):
    model = build(SiglipVisionModel, make_config())
    model.save_pretrained(tmp_path)
    fast = fastenc.optimize(SiglipVisionModel.from_pretrained(tmp_path).eval(), backend="triton", strict=True)
    px = torch.randn(2, 3, 32, 32)
    ref, got, _ = run_both(model, fast, {"pixel_values": px, "interpolate_pos_encoding": True})
    compare_outputs(ref, got)


def test_bad_input_and_unsupported_class():
    fast = fastenc.optimize(build(SiglipModel, make_config()))
    good = inputs_for(SiglipModel)
    with pytest.raises(fastenc.InputError, match="max_position_embeddings=16"):
        fast(**{**good, "input_ids": torch.zeros(3, 17, dtype=torch.long)})
    with pytest.raises(fastenc.InputError, match="pixel_values is 32x32"):
        fast(**{**good, "pixel_values": torch.randn(3, 3, 32, 32)})
    with pytest.raises(fastenc.UnsupportedModelError, match="SiglipForImageClassification"):
        fastenc.optimize(SiglipForImageClassification(make_config()))


# ------------------------------------------------------------------------------------------------ SigLIP 2 (NaFlex)


def make_siglip2(layers=2):
    from transformers import Siglip2Config

    text = dict(
        hidden_size=64,
        num_attention_heads=2,
        num_hidden_layers=layers,
        intermediate_size=128,
        max_position_embeddings=16,
        vocab_size=VOCAB,
        projection_size=144,
    )
    vision = dict(
        hidden_size=144,
        num_attention_heads=2,
        num_hidden_layers=layers,
        intermediate_size=96,
        patch_size=4,
        num_patches=16,
    )
    return Siglip2Config(text_config=text, vision_config=vision)


def naflex_inputs(batch=3, max_patches=16):
    g = torch.Generator().manual_seed(2)
    shapes = torch.tensor([[4, 4], [3, 4], [2, 3]])[:batch]  # patch grids (h, w); 16, 12 and 6 real patches
    mask = torch.zeros(batch, max_patches, dtype=torch.long)
    for i, (h, w) in enumerate(shapes.tolist()):
        mask[i, : h * w] = 1
    return {
        "pixel_values": torch.randn(batch, max_patches, 3 * 4 * 4, generator=g),
        "pixel_attention_mask": mask,
        "spatial_shapes": shapes,
        "input_ids": torch.randint(0, VOCAB, (batch, 16), generator=g),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["Siglip2Model", "Siglip2TextModel", "Siglip2VisionModel"])
def test_siglip2_matches_transformers(name, backend):
    import transformers

    cls = getattr(transformers, name)
    config = make_siglip2()
    torch.manual_seed(0)
    sub = {"Siglip2Model": config, "Siglip2TextModel": config.text_config, "Siglip2VisionModel": config.vision_config}
    model = cls(sub[name]).eval()
    inputs = naflex_inputs()
    if name == "Siglip2TextModel":
        inputs = {"input_ids": inputs["input_ids"]}
    elif name == "Siglip2VisionModel":
        inputs.pop("input_ids")
    fast = fastenc.optimize(model, backend=backend, strict=True)
    assert isinstance(fast, cls)
    ref, got, t = run_both(model, fast, inputs, output_hidden_states=True)
    compare_outputs(ref, got)
    assert t.counts[f"{backend}.attention"] == {"Siglip2Model": 5, "Siglip2TextModel": 2, "Siglip2VisionModel": 3}[name]


def test_siglip2_bad_naflex_inputs():
    from transformers import Siglip2VisionModel

    torch.manual_seed(0)
    fast = fastenc.optimize(Siglip2VisionModel(make_siglip2().vision_config).eval())
    good = naflex_inputs()
    good.pop("input_ids")
    with pytest.raises(fastenc.InputError, match="pixel_attention_mask must have shape"):
        fast(**{**good, "pixel_attention_mask": None})
    with pytest.raises(fastenc.InputError, match="spatial_shapes"):
        fast(**{**good, "spatial_shapes": good["spatial_shapes"][:1]})
    with pytest.raises(fastenc.InputError, match="patchified"):
        fast(**{**good, "pixel_values": torch.randn(3, 3, 16, 16)})
