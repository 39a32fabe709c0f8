"""The benchmark matrix: named models (random weights from configs, never downloaded), their inputs, the FLOPs
formula, and the cases (model x dtype x batch x seq) a run covers.

FLOPs per forward (`forward_flops`) count matmul work only, 2 FLOPs per multiply-add:
  * every linear layer: 2 * tokens * in_features * out_features (= 2 * tokens * matmul parameters);
  * attention: 4 * B * H * S_q * S_k * D (QK^T and PV), halved for causal attention (CLIP text), whose upper
    triangle is masked;
  * the vision patch embedding (a strided conv): 2 * B * patches * (3 * p * p) * width;
  * heads: CLIP projections and SigLIP's text head on the pooled token, SigLIP's MAP head (one probe query
    attending over every patch, then its MLP);
  * norms, activations, softmax, embedding lookups and T5's relative-position bias are not counted.
Every competitor of a case is charged the same FLOPs, so MFU compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_BATCHES = (1, 8, 32, 128, 256)
DEFAULT_T5_SEQS = (77, 128, 256, 512)
DEFAULT_DTYPES = ("fp16", "bf16", "fp32")
QUICK_BATCHES = (1, 2)
QUICK_DTYPES = ("fp32",)
QUICK_T5_SEQS = (16,)

# T5-v1.1 encoder shapes (google/t5-v1_1-*; Flan-T5 the same): gated-gelu FFN, 32 buckets, max distance 128.
T5_SHAPES = {
    "t5-v1_1-base": dict(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12),
    "t5-v1_1-large": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24),
    "t5-v1_1-xl": dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24),
    "t5-v1_1-xxl": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24),
    "tiny": dict(d_model=64, d_kv=32, num_heads=2, d_ff=128, num_layers=2),
}

# SigLIP shapes (google/siglip-base-patch16-224, google/siglip-so400m-patch14-384); text padded to 64 tokens.
SIGLIP_SHAPES = {
    "base-patch16-224": dict(width=768, heads=12, layers=12, ffn=3072, image=224, patch=16),
    "so400m-patch14-384": dict(width=1152, heads=16, layers=27, ffn=4304, image=384, patch=14),
    "tiny": dict(width=64, heads=2, layers=2, ffn=128, image=32, patch=8),
}
SIGLIP_TEXT_LEN = 64


@dataclass(frozen=True)
class ModelSpec:
    """One tower to benchmark. family: clip | siglip | t5; tower: text | vision | encoder; shape: a key of
    CLIP_SHAPES / SIGLIP_SHAPES / T5_SHAPES; layers: a reduced depth (None = the full stack), labelled in rows."""

    name: str
    family: str
    tower: str
    shape: str
    layers: int | None = None
    quick: bool = False
    aliases: tuple[str, ...] = field(default=())

    @property
    def full_layers(self) -> int:
        if self.family == "t5":
            return T5_SHAPES[self.shape]["num_layers"]
        if self.family == "siglip":
            return SIGLIP_SHAPES[self.shape]["layers"]
        from ..models.configs import CLIP_SHAPES

        s = CLIP_SHAPES[self.shape]
        return s.text_layers if self.tower == "text" else s.vision_layers

    @property
    def num_layers(self) -> int:
        return self.layers or self.full_layers

    @property
    def label(self) -> str:
        """e.g. "t5-v1_1-xxl (2/24 layers)": the reduction is part of the name wherever a figure is shown."""
        return self.name if self.layers is None else f"{self.name} ({self.layers}/{self.full_layers} layers)"

    def config(self):
        """The transformers config of the tower (random weights are drawn from it)."""
        if self.family == "clip":
            from ..models.configs import clip_config

            cfg = clip_config(self.shape, layers=self.layers)
            sub = cfg.text_config if self.tower == "text" else cfg.vision_config
            sub.projection_dim = cfg.projection_dim  # a tower built alone reads its own (default 512) field
            return sub
        if self.family == "siglip":
            from transformers import SiglipTextConfig, SiglipVisionConfig

            s = SIGLIP_SHAPES[self.shape]
            common = dict(
                hidden_size=s["width"],
                num_attention_heads=s["heads"],
                num_hidden_layers=self.num_layers,
                intermediate_size=s["ffn"],
                hidden_act="gelu_pytorch_tanh",
            )
            if self.tower == "text":
                vocab = 1000 if self.shape == "tiny" else 32000
                ids = dict(pad_token_id=1, bos_token_id=vocab - 2, eos_token_id=vocab - 1, vocab_size=vocab)
                n = SIGLIP_TEXT_LEN
                return SiglipTextConfig(**common, **ids, max_position_embeddings=n, projection_size=s["width"])
            return SiglipVisionConfig(**common, image_size=s["image"], patch_size=s["patch"], vision_use_head=True)
        from transformers import T5Config

        vocab = 1000 if self.shape == "tiny" else 32128
        return T5Config(
            vocab_size=vocab,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            **{**T5_SHAPES[self.shape], "num_layers": self.num_layers},
        )

    def model_class(self):
        import transformers as tf

        return {
            ("clip", "text"): tf.CLIPTextModelWithProjection,
            ("clip", "vision"): tf.CLIPVisionModelWithProjection,
            ("siglip", "text"): tf.SiglipTextModel,
            ("siglip", "vision"): tf.SiglipVisionModel,
            ("t5", "encoder"): tf.T5EncoderModel,
        }[(self.family, self.tower)]

    def build(self, attn_implementation: str, device, dtype):
        """A fresh eval-mode transformers model with seed-0 random weights (the same weights on every call)."""
        import torch

        torch.manual_seed(0)
        with torch.device(device):
            model = self.model_class()._from_config(self.config(), attn_implementation=attn_implementation)
        return model.to(dtype=dtype).eval()

    def seqs(self, requested: tuple[int, ...] | None) -> tuple[int, ...]:
        """Sequence lengths this model runs: CLIP text 77 (padded, the SD case), SigLIP text 64, vision the tokens
        of the model's resolution, T5 the requested lengths."""
        cfg = self.config()
        if self.tower == "vision":
            patches = (cfg.image_size // cfg.patch_size) ** 2
            return (patches + (1 if self.family == "clip" else 0),)
        if self.family == "clip":
            return (cfg.max_position_embeddings,)
        if self.family == "siglip":
            return (SIGLIP_TEXT_LEN,)
        return tuple(requested or (QUICK_T5_SEQS if self.quick else DEFAULT_T5_SEQS))

    def inputs(self, batch: int, seq: int, device, dtype, seed: int = 0) -> dict:
        """Model inputs: CLIP text padded to 77 with varied lengths (fastenc.parity.clip_inputs), SigLIP text 64
        tokens without a mask (its processor pads to max_length), T5 `seq` tokens, images at the model's size."""
        import torch

        from ..parity import clip_inputs

        cfg = self.config()
        if self.family == "clip":
            out = clip_inputs(cfg, batch, device=device, dtype=dtype, seed=seed)
            return {k: v for k, v in out.items() if (k == "pixel_values") == (self.tower == "vision")}
        g = torch.Generator().manual_seed(seed)
        if self.tower == "vision":
            px = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)
            return {"pixel_values": px.to(device=device, dtype=dtype)}
        ids = torch.randint(1, cfg.vocab_size, (batch, seq), generator=g).to(device)
        if self.family == "siglip":
            return {"input_ids": ids}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _spec(name, family, tower, shape, layers=None, quick=False):
    return ModelSpec(name, family, tower, shape, layers, quick)


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec("clip-vit-b-32-text", "clip", "text", "ViT-B/32"),
        _spec("clip-vit-b-32-vision", "clip", "vision", "ViT-B/32"),
        _spec("clip-vit-l-14-text", "clip", "text", "ViT-L/14"),
        _spec("clip-vit-l-14-vision", "clip", "vision", "ViT-L/14"),
        _spec("clip-vit-l-14-336-vision", "clip", "vision", "ViT-L/14@336"),
        _spec("siglip-base-16-224-text", "siglip", "text", "base-patch16-224"),
        _spec("siglip-base-16-224-vision", "siglip", "vision", "base-patch16-224"),
        _spec("siglip-so400m-14-384-vision", "siglip", "vision", "so400m-patch14-384"),
        _spec("t5-v1_1-base", "t5", "encoder", "t5-v1_1-base"),
        _spec("t5-v1_1-xl", "t5", "encoder", "t5-v1_1-xl", layers=4),
        _spec("t5-v1_1-xxl", "t5", "encoder", "t5-v1_1-xxl", layers=2),
        # quick (CPU) mode: one-layer tiny towers that prove the harness, not the speed
        _spec("tiny-clip-text", "clip", "text", "tiny", layers=1, quick=True),
        _spec("tiny-clip-vision", "clip", "vision", "tiny", layers=1, quick=True),
        _spec("tiny-siglip-vision", "siglip", "vision", "tiny", layers=1, quick=True),
        _spec("tiny-t5", "t5", "encoder", "tiny", layers=1, quick=True),
    )
}
FULL_MODELS = tuple(n for n, s in MODELS.items() if not s.quick)
QUICK_MODELS = ("tiny-clip-text", "tiny-clip-vision", "tiny-t5")


@dataclass(frozen=True)
class Case:
    """One (batch, seq) point of a model at a dtype: every competitor runs it in the same process."""

    model: str
    dtype: str
    batch: int
    seq: int

    @property
    def key(self) -> tuple:
        return (self.model, self.dtype, self.batch, self.seq)


def cases(model: str, dtype: str, batches, seqs) -> list[Case]:
    spec = MODELS[model]
    return [Case(model, dtype, b, s) for b in batches for s in spec.seqs(seqs)]


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attention(batch: int, heads: int, sq: int, sk: int, head_dim: int, causal: bool = False) -> float:
    f = 4 * batch * heads * sq * sk * head_dim
    return f / 2 if causal else f


def forward_flops(spec: ModelSpec, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward of `spec` at (batch, seq); the formula is in this module's docstring."""
    cfg = spec.config()
    tok = batch * seq
    if spec.family == "t5":
        d, inner, h, f = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.num_heads, cfg.d_ff
        gated = cfg.is_gated_act
        per_layer = (
            _linear(tok, d, 3 * inner)
            + _linear(tok, inner, d)
            + _attention(batch, h, seq, seq, cfg.d_kv)
            + _linear(tok, d, f) * (2 if gated else 1)
            + _linear(tok, f, d)
        )
        return float(cfg.num_layers * per_layer)
    d, h, f = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
    causal = spec.family == "clip" and spec.tower == "text"
    per_layer = (
        (_linear(tok, d, 3 * d) + _linear(tok, d, d) + _attention(batch, h, seq, seq, d // h, causal))
        + _linear(tok, d, f)
        + _linear(tok, f, d)
    )
    total = cfg.num_hidden_layers * per_layer
    if spec.tower == "vision":
        patches = (cfg.image_size // cfg.patch_size) ** 2
        total += _linear(batch * patches, cfg.num_channels * cfg.patch_size**2, d)
    if spec.family == "clip":
        total += _linear(batch, d, cfg.projection_dim)
    elif spec.tower == "text":  # SigLIP text head: Linear(width, projection_size) on the pooled token
        total += _linear(batch, d, cfg.projection_size)
    elif getattr(cfg, "vision_use_head", True):  # SigLIP MAP head: one probe query over all patches, then an MLP
        total += _linear(batch, d, d) + _linear(batch * seq, d, 2 * d) + _attention(batch, h, 1, seq, d // h)
        total += _linear(batch, d, d) + _linear(batch, d, f) + _linear(batch, f, d)
    return float(total)
