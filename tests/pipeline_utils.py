"""Tiny diffusers pipelines with random weights, built from configs (no downloads) and written with
`save_pretrained`, so tests and bench load them back through `DiffusionPipeline.from_pretrained`.

`build_pipeline(family, directory)` writes SD 1.x ("sd"), SDXL ("sdxl"), SD3 ("sd3") or FLUX ("flux") and returns the
directory. Sizes: CLIP towers hidden 32 (2 layers, 4 heads, the CLIP-L twin of SDXL/SD3 is the same shape), T5 d_model
32 (2 layers, 4 heads, gated-GELU FFN), denoisers and VAE at the smallest sizes diffusers' own tests use. The CLIP
tokenizer is tests.tokenizer_utils' byte-level BPE; the T5 tokenizer a Unigram over the same word list.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tokenizer_utils import WORDS, build_clip_tokenizer

FAMILIES = ("sd", "sdxl", "sd3", "flux")
CLIP_WIDTH = 32


def _clip_tokenizer(directory: Path):
    return build_clip_tokenizer(directory / "_tok_src")


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = [("\u2581" + w, -float(i % 7) - 1.0) for i, w in enumerate(WORDS)]
    chars = sorted({c for w in WORDS for c in w})
    pieces += [("\u2581", -10.0)] + [(c, -12.0) for c in chars]
    return T5TokenizerFast(vocab=specials + pieces, extra_ids=0)


def _clip(tok, *, projection: bool, seed: int, width: int = CLIP_WIDTH, layers: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width if width == CLIP_WIDTH else 4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act="gelu" if projection else "quick_gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(tok, seed: int, width: int = 32, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=width,
        d_kv=width // 4,
        d_ff=48 if width == 32 else int(2.5 * width),
        num_layers=layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int, flow: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    kw = (
        dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
        if flow
        else {}
    )
    return AutoencoderKL(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        **kw,
    )


def _unet(cross_attention_dim: int, sdxl: bool, pooled: int = CLIP_WIDTH):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(4)
    extra = {}
    if sdxl:  # text_time: pooled text embeds (CLIP_WIDTH) + 6 time ids x 8
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + pooled,
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
        **extra,
    )


def make_pipeline(family: str, directory: Path, *, width: int = CLIP_WIDTH, layers: int = 3):
    """The pipeline object of `family` (random weights); tokenizers are saved under `directory`. width / layers size
    every text encoder (CLIP hidden size and T5 d_model; CLIP layers, T5 layers - 1); the default is the tiny test
    size, the bench also uses a wider one."""
    w = width
    te = dict(width=w, layers=layers)
    t5 = dict(width=w, layers=max(1, layers - 1))
    import diffusers

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _clip_tokenizer(directory)
    if family == "sd":
        sched = diffusers.DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
        )
        return diffusers.StableDiffusionPipeline(
            vae=_vae(4, False),
            text_encoder=_clip(tok, projection=False, seed=1, **te),
            tokenizer=tok,
            unet=_unet(w, False),
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        sched = diffusers.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"
        )
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(4, False),
            text_encoder=_clip(tok, projection=False, seed=1, **te),
            text_encoder_2=_clip(tok, projection=True, seed=2, **te),
            tokenizer=tok,
            tokenizer_2=tok,
            unet=_unet(2 * w, True, pooled=w),
            scheduler=sched,
        )
    t5tok = _t5_tokenizer()
    if family == "sd3":
        torch.manual_seed(5)
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=w,
            pooled_projection_dim=2 * w,
            out_channels=4,
        )
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=_vae(4, True),
            text_encoder=_clip(tok, projection=True, seed=1, **te),
            tokenizer=tok,
            text_encoder_2=_clip(tok, projection=True, seed=2, **te),
            tokenizer_2=tok,
            text_encoder_3=_t5(t5tok, seed=6, **t5),
            tokenizer_3=t5tok,
        )
    torch.manual_seed(5)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=w,
        pooled_projection_dim=w,
        axes_dims_rope=[4, 4, 8],
    )
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_vae(1, True),
        text_encoder=_clip(tok, projection=False, seed=1, **te),
        tokenizer=tok,
        text_encoder_2=_t5(t5tok, seed=6, **t5),
        tokenizer_2=t5tok,
        transformer=transformer,
    )


def build_pipeline(family: str, directory, **size) -> Path:
    """Write a tiny `family` pipeline with `save_pretrained(directory / family)`; returns that folder."""
    directory = Path(directory)
    out = directory / family
    make_pipeline(family, directory / f"_{family}_src", **size).save_pretrained(str(out))
    return out


def load_pipeline(path, dtype: torch.dtype = torch.float32):
    import diffusers

    return diffusers.DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
