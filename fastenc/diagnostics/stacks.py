"""Conditioning stacks: the text-encoder half of SDXL, SD3 and FLUX pipelines, built from transformers towers
(optionally fastenc-optimized) and returning the tensors a diffusers pipeline takes as `prompt_embeds` /
`pooled_prompt_embeds`.

The arithmetic follows diffusers' own `encode_prompt` of each pipeline (no classifier-free-guidance negatives,
clip_skip=None, one image per prompt):

    SDXL  prompt_embeds        = cat(te1.hidden_states[-2], te2.hidden_states[-2], dim=-1)       (B, 77, D1 + D2)
          pooled_prompt_embeds = te2.text_embeds   (te2 is CLIPTextModelWithProjection)           (B, P2)
    SD3   clip                 = cat(l.hidden_states[-2], g.hidden_states[-2], dim=-1), zero-padded to the T5 width
          prompt_embeds        = cat(clip, t5.last_hidden_state, dim=-2)                         (B, 77 + L, Dt5)
          pooled_prompt_embeds = cat(l.text_embeds, g.text_embeds, dim=-1)                       (B, Pl + Pg)
    FLUX  prompt_embeds        = t5.last_hidden_state                                             (B, L, Dt5)
          pooled_prompt_embeds = clip_l.pooler_output   (clip_l is CLIPTextModel)                (B, Dl)

As in diffusers, prompts are padded to max_length (77 for CLIP, `t5_max_length` for T5), truncated, and the towers
run without an attention mask (the CLIP towers are causal, so padding after the EOS token changes nothing before it).

Inputs: `prompts` is a str or a list of str, tokenized with each tower's tokenizer. `input_ids` (optional) maps a
tower name ("clip_1"/"clip_2" for SDXL, "clip_l"/"clip_g"/"t5" for SD3, "clip_l"/"t5" for FLUX) to a pre-tokenized
LongTensor (B, S); such a tower needs no tokenizer (pass None), and `prompts` may be None when every tower has ids.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..core.errors import InputError, UnsupportedModelError
from .probe import _base_name
from .tokens import check_prompts

CLIP_MAX_LENGTH = 77


def _check_tower(model, arg: str, allowed: tuple[str, ...]) -> None:
    name = _base_name(model)
    if name not in allowed:
        raise UnsupportedModelError(f"{arg} must be one of {', '.join(allowed)}, got {type(model).__name__}")


def _maybe_optimize(model, optimize: bool, backend: str, strict: bool):
    if not optimize:
        return model
    import fastenc

    return fastenc.optimize(model, backend=backend, strict=strict)


def _ids_for(name: str, tokenizer, prompts, input_ids: Mapping | None, max_length: int, device) -> torch.Tensor:
    """input_ids (B, S) for one tower: the caller's pre-tokenized ids, else its tokenizer over prompts."""
    if input_ids is not None and name in input_ids:
        ids = input_ids[name]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise InputError(f"input_ids[{name!r}] must be an integer tensor (B, S), got {got}")
        return ids.to(device=device, dtype=torch.long)
    if tokenizer is None:
        raise InputError(f"tower {name!r}: pass its tokenizer or input_ids[{name!r}]")
    if prompts is None:
        raise InputError(f"tower {name!r}: prompts is None and input_ids has no {name!r} entry")
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return enc["input_ids"].to(device)


def _check_batch(named: dict[str, torch.Tensor]) -> None:
    sizes = {k: v.shape[0] for k, v in named.items()}
    if len(set(sizes.values())) != 1:
        raise InputError(f"every tower needs the same batch size, got {sizes}")


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _clip_penultimate(model, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    out = model(input_ids=ids, output_hidden_states=True, return_dict=True)
    return out.hidden_states[-2], out


def sdxl_conditioning(
    text_encoder_1,
    text_encoder_2,
    tok1,
    tok2,
    prompts,
    *,
    input_ids: Mapping[str, torch.Tensor] | None = None,
    optimize: bool = False,
    backend: str = "auto",
    strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning -> (prompt_embeds (B, 77, D1 + D2), pooled_prompt_embeds (B, P2)).

    text_encoder_1: CLIPTextModel (CLIP ViT-L); text_encoder_2: CLIPTextModelWithProjection (OpenCLIP bigG).
    optimize=True runs both towers through `fastenc.optimize(backend=..., strict=...)` (weights shared)."""
    _check_tower(text_encoder_1, "text_encoder_1", ("CLIPTextModel", "CLIPTextModelWithProjection"))
    _check_tower(text_encoder_2, "text_encoder_2", ("CLIPTextModelWithProjection",))
    prompts = None if prompts is None else check_prompts(prompts)
    te1 = _maybe_optimize(text_encoder_1, optimize, backend, strict)
    te2 = _maybe_optimize(text_encoder_2, optimize, backend, strict)
    ids = {
        "clip_1": _ids_for("clip_1", tok1, prompts, input_ids, CLIP_MAX_LENGTH, _model_device(te1)),
        "clip_2": _ids_for("clip_2", tok2, prompts, input_ids, CLIP_MAX_LENGTH, _model_device(te2)),
    }
    _check_batch(ids)
    with torch.no_grad():
        h1, _ = _clip_penultimate(te1, ids["clip_1"])  # (B, 77, D1)
        h2, out2 = _clip_penultimate(te2, ids["clip_2"])  # (B, 77, D2)
    if h1.shape[1] != h2.shape[1]:
        raise InputError(f"the two towers' sequences differ in length: {h1.shape[1]} vs {h2.shape[1]}")
    prompt_embeds = torch.cat([h1, h2.to(h1.device)], dim=-1)  # (B, 77, D1 + D2)
    return prompt_embeds, out2.text_embeds.to(h1.device)  # (B, P2)


def _t5_sequence(t5, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return t5(input_ids=ids, return_dict=True).last_hidden_state  # (B, L, Dt5)


def sd3_conditioning(
    clip_l,
    clip_g,
    t5,
    tok_l,
    tok_g,
    tok_t5,
    prompts,
    t5_max_length: int = 256,
    *,
    input_ids: Mapping[str, torch.Tensor] | None = None,
    optimize: bool = False,
    backend: str = "auto",
    strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 text conditioning -> (prompt_embeds (B, 77 + L, Dt5), pooled_prompt_embeds (B, Pl + Pg)).

    clip_l, clip_g: CLIPTextModelWithProjection; t5: T5EncoderModel. The CLIP towers' penultimate hidden states are
    concatenated on the feature axis, zero-padded to the T5 width (Dl + Dg <= Dt5 is required) and placed before
    the T5 sequence (L = t5_max_length tokens, or the width of input_ids["t5"])."""
    _check_tower(clip_l, "clip_l", ("CLIPTextModelWithProjection",))
    _check_tower(clip_g, "clip_g", ("CLIPTextModelWithProjection",))
    _check_tower(t5, "t5", ("T5EncoderModel", "UMT5EncoderModel"))
    if not isinstance(t5_max_length, int) or t5_max_length < 1:
        raise InputError(f"t5_max_length must be a positive int, got {t5_max_length!r}")
    prompts = None if prompts is None else check_prompts(prompts)
    clip_l, clip_g, t5 = (_maybe_optimize(m, optimize, backend, strict) for m in (clip_l, clip_g, t5))
    ids = {
        "clip_l": _ids_for("clip_l", tok_l, prompts, input_ids, CLIP_MAX_LENGTH, _model_device(clip_l)),
        "clip_g": _ids_for("clip_g", tok_g, prompts, input_ids, CLIP_MAX_LENGTH, _model_device(clip_g)),
        "t5": _ids_for("t5", tok_t5, prompts, input_ids, t5_max_length, _model_device(t5)),
    }
    _check_batch(ids)
    with torch.no_grad():
        hl, out_l = _clip_penultimate(clip_l, ids["clip_l"])  # (B, 77, Dl)
        hg, out_g = _clip_penultimate(clip_g, ids["clip_g"])  # (B, 77, Dg)
    seq = _t5_sequence(t5, ids["t5"])  # (B, L, Dt5)
    clip = torch.cat([hl, hg.to(hl.device)], dim=-1)  # (B, 77, Dl + Dg)
    if clip.shape[-1] > seq.shape[-1]:
        raise InputError(f"CLIP widths Dl + Dg = {clip.shape[-1]} exceed the T5 width {seq.shape[-1]}")
    clip = F.pad(clip, (0, seq.shape[-1] - clip.shape[-1]))  # (B, 77, Dt5)
    prompt_embeds = torch.cat([clip.to(seq.device, seq.dtype), seq], dim=-2)  # (B, 77 + L, Dt5)
    pooled = torch.cat([out_l.text_embeds, out_g.text_embeds.to(out_l.text_embeds.device)], dim=-1)
    return prompt_embeds, pooled


def flux_conditioning(
    clip_l,
    t5,
    tok_l,
    tok_t5,
    prompts,
    t5_max_length: int = 512,
    *,
    input_ids: Mapping[str, torch.Tensor] | None = None,
    optimize: bool = False,
    backend: str = "auto",
    strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX text conditioning -> (prompt_embeds (B, L, Dt5) = T5 last_hidden_state, pooled_prompt_embeds (B, Dl) =
    clip_l pooler_output). clip_l: CLIPTextModel; t5: T5EncoderModel. (FLUX's `text_ids` are zeros (L, 3) and are
    not returned.)"""
    _check_tower(clip_l, "clip_l", ("CLIPTextModel",))
    _check_tower(t5, "t5", ("T5EncoderModel", "UMT5EncoderModel"))
    if not isinstance(t5_max_length, int) or t5_max_length < 1:
        raise InputError(f"t5_max_length must be a positive int, got {t5_max_length!r}")
    prompts = None if prompts is None else check_prompts(prompts)
    clip_l, t5 = (_maybe_optimize(m, optimize, backend, strict) for m in (clip_l, t5))
    ids = {
        "clip_l": _ids_for("clip_l", tok_l, prompts, input_ids, CLIP_MAX_LENGTH, _model_device(clip_l)),
        "t5": _ids_for("t5", tok_t5, prompts, input_ids, t5_max_length, _model_device(t5)),
    }
    _check_batch(ids)
    with torch.no_grad():
        pooled = clip_l(input_ids=ids["clip_l"], return_dict=True).pooler_output  # (B, Dl)
    return _t5_sequence(t5, ids["t5"]), pooled


__all__ = ["sdxl_conditioning", "sd3_conditioning", "flux_conditioning"]
