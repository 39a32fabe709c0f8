"""Named tower shapes (random weights, no downloads) for the demo, tests and bench."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CLIPShape:
    text_width: int
    text_heads: int
    text_layers: int
    vision_width: int
    vision_heads: int
    vision_layers: int
    image_size: int
    patch_size: int
    projection_dim: int
    text_ffn: int = 0  # 0 = 4 x width
    vision_ffn: int = 0
    hidden_act: str = "quick_gelu"
    max_positions: int = 77
    vocab_size: int = 49408


CLIP_SHAPES = {
    "ViT-B/32": CLIPShape(512, 8, 12, 768, 12, 12, 224, 32, 512),
    "ViT-B/16": CLIPShape(512, 8, 12, 768, 12, 12, 224, 16, 512),
    "ViT-L/14": CLIPShape(768, 12, 12, 1024, 16, 24, 224, 14, 768),
    "ViT-L/14@336": CLIPShape(768, 12, 12, 1024, 16, 24, 336, 14, 768),
    # OpenCLIP ViT-bigG/14 (SDXL's second text tower), GELU
    "ViT-bigG/14": CLIPShape(1280, 20, 32, 1664, 16, 48, 224, 14, 1280, 5120, 8192, "gelu"),
    "tiny": CLIPShape(64, 2, 2, 64, 2, 2, 32, 8, 32, vocab_size=1000),
}


def clip_config(name: str = "ViT-B/32", *, layers: int | None = None, eos_token_id: int | None = None):
    """A transformers CLIPConfig of a named shape. layers: override both towers' depth (a labelled reduction)."""
    from transformers import CLIPConfig

    if name not in CLIP_SHAPES:
        raise KeyError(f"unknown CLIP shape {name!r}; known: {sorted(CLIP_SHAPES)}")
    s = CLIP_SHAPES[name]
    eos = s.vocab_size - 1 if eos_token_id is None else eos_token_id
    text = dict(
        hidden_size=s.text_width,
        num_attention_heads=s.text_heads,
        num_hidden_layers=layers or s.text_layers,
        intermediate_size=s.text_ffn or 4 * s.text_width,
        max_position_embeddings=s.max_positions,
        vocab_size=s.vocab_size,
        hidden_act=s.hidden_act,
        eos_token_id=eos,
        bos_token_id=eos - 1,
        pad_token_id=eos,
    )
    vision = dict(
        hidden_size=s.vision_width,
        num_attention_heads=s.vision_heads,
        num_hidden_layers=layers or s.vision_layers,
        intermediate_size=s.vision_ffn or 4 * s.vision_width,
        image_size=s.image_size,
        patch_size=s.patch_size,
        hidden_act=s.hidden_act,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=s.projection_dim)
