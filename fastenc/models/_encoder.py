"""The pre-LN encoder shared by CLIP and SigLIP towers (same layer layout and parameter names), their input
checks and embeddings, and the mixin every fused model class carries."""

from __future__ import annotations

import torch

from .. import ops
from .._dispatch import record
from ..errors import InputError, UnsupportedModelError
from ._base import (
    Runtime,
    attention_with_probs,
    check_device,
    check_no_extra_kwargs,
    fused_qkv,
    hidden_state_selection,
    linear,
    resolve_output_flags,
)


def encoder_layers_forward(
    layers,
    x: torch.Tensor,
    rt: Runtime,
    *,
    activation: str,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    hidden_states: list | None,
    attentions: list | None,
    training: bool = False,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run pre-LN encoder layers (CLIP, SigLIP layout). x: (B, S, D). Returns (x, delta): the layer stack's output
    is x + delta, left unsummed so the caller can fuse the add into its final norm.

    hidden_states / attentions: lists to append each layer's output / probabilities to, or None."""
    b, s, d = x.shape
    delta = None
    for layer in layers:
        attn = layer.self_attn
        ln1, ln2 = layer.layer_norm1, layer.layer_norm2
        if delta is None:
            h = ops.layer_norm(x, ln1.weight, ln1.bias, ln1.eps, **rt.kw)
        else:
            h, x = ops.layer_norm(delta, ln1.weight, ln1.bias, ln1.eps, residual=x, **rt.kw)
            if hidden_states is not None:
                hidden_states.append(x)
        w_qkv, b_qkv = fused_qkv(rt, attn)
        nh = attn.num_heads
        qkv = linear(h, w_qkv, b_qkv).view(b, s, 3, nh, d // nh)  # (B, S, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, Dh), strided views
        if attentions is not None or (training and dropout_p > 0):
            reason = "output_attentions=True needs the probabilities" if attentions is not None else "attention dropout"
            rt.fallback("attention", reason)
            record("torch", "attention")
            o, p = attention_with_probs(
                q,
                k,
                v,
                causal=causal,
                key_padding_mask=key_padding_mask,
                scale=attn.scale,
                dropout_p=dropout_p,
                training=training,
            )
            if attentions is not None:
                attentions.append(p)
        else:
            o = ops.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=attn.scale, **rt.kw)
        o = o.transpose(1, 2).reshape(b, s, d)  # (B, S, D), free for the kernel's (B, S, H, Dh) output
        a = linear(o, attn.out_proj.weight, attn.out_proj.bias)
        h, x = ops.layer_norm(a, ln2.weight, ln2.bias, ln2.eps, residual=x, **rt.kw)
        mlp = layer.mlp
        f = ops.bias_activation(linear(h, mlp.fc1.weight), mlp.fc1.bias, activation, **rt.kw)
        delta = linear(f, mlp.fc2.weight, mlp.fc2.bias)
    return x, delta


def activation_of(config, attr: str = "hidden_act") -> str:
    """fastenc's name for the activation that config.<attr> names; UnsupportedModelError if none is fused."""
    act = getattr(config, attr, None)
    if act not in ops.HF_ACTIVATIONS:
        raise UnsupportedModelError(
            f"config.{attr}={act!r} has no fused kernel; supported: {sorted(ops.HF_ACTIVATIONS)}"
        )
    return ops.HF_ACTIVATIONS[act]


def finish_hidden(hidden: list | None, selection: set[int] | None):
    if hidden is None:
        return None
    if selection is not None:
        hidden = [h if i in selection else None for i, h in enumerate(hidden)]
    return tuple(hidden)


def text_embeddings(tower, input_ids, attention_mask, position_ids):
    """Checked token + position embeddings. Returns x (B, S, D), input_ids (B, S), key mask (B, S) bool or None."""
    if input_ids is None:
        raise InputError("input_ids is required (a (batch, sequence) integer tensor)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() < 1 or input_ids.shape[-1] == 0:
        raise InputError(
            f"input_ids must have shape (batch, sequence) with sequence >= 1, got {tuple(input_ids.shape)}"
        )
    emb = tower.embeddings
    device = emb.token_embedding.weight.device
    check_device("input_ids", input_ids, device)
    shape = input_ids.shape
    input_ids = input_ids.reshape(-1, shape[-1])  # (B, S)
    b, s = input_ids.shape
    max_pos = emb.position_embedding.weight.shape[0]
    if s > max_pos:
        raise InputError(
            f"input_ids has sequence length {s} > max_position_embeddings={max_pos}; truncate the prompt "
            f"(tokenizer(..., truncation=True, max_length={max_pos})) or chunk it"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise InputError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        check_device("attention_mask", attention_mask, device)
        if attention_mask.numel() != input_ids.numel():
            raise InputError(
                f"attention_mask must have input_ids' shape {tuple(shape)}, got {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.reshape(b, s) != 0  # (B, S) bool, True = real token
    if position_ids is not None:
        check_device("position_ids", position_ids, device)
    x = emb(input_ids=input_ids, position_ids=position_ids)  # (B, S, D)
    return x, input_ids, attention_mask


def image_embeddings(tower, pixel_values, interpolate_pos_encoding):
    """Checked patch (+ class) + position embeddings of `tower.embeddings`. Returns x (B, tokens, D)."""
    config = tower.config
    if pixel_values is None:
        raise InputError("pixel_values is required (a (batch, channels, height, width) float tensor)")
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
        raise InputError(
            f"pixel_values must be a float tensor, got {getattr(pixel_values, 'dtype', type(pixel_values))}"
        )
    if pixel_values.dim() != 4 or pixel_values.shape[1] != config.num_channels:
        raise InputError(
            f"pixel_values must have shape (batch, {config.num_channels}, height, width), "
            f"got {tuple(pixel_values.shape)}"
        )
    emb = tower.embeddings
    check_device("pixel_values", pixel_values, emb.patch_embedding.weight.device)
    h, w = pixel_values.shape[-2:]
    if not interpolate_pos_encoding and (h != config.image_size or w != config.image_size):
        raise InputError(
            f"pixel_values is {h}x{w} but the model takes {config.image_size}x{config.image_size}; resize the image "
            "or pass interpolate_pos_encoding=True"
        )
    x = emb(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))  # (B, patches [+ 1], D)
    return x


def run_encoder(tower, x, rt: Runtime, *, causal, key_padding_mask, output_attentions, output_hidden_states):
    """tower.encoder.layers over x. Returns (x, delta, hidden list or None, attentions list or None)."""
    config = tower.config
    hidden = [x] if output_hidden_states is not False else None
    attns = [] if output_attentions else None
    x, delta = encoder_layers_forward(
        tower.encoder.layers,
        x,
        rt,
        activation=activation_of(config),
        causal=causal,
        key_padding_mask=key_padding_mask,
        hidden_states=hidden,
        attentions=attns,
        training=tower.training,
        dropout_p=float(getattr(config, "attention_dropout", 0.0)),
    )
    return x, delta, hidden, attns


def text_transformer(tower, rt: Runtime, input_ids, attention_mask, position_ids, *, causal, oa, oh):
    """Embeddings, encoder layers and the fused final norm of a CLIP / SigLIP text tower.
    Returns (last_hidden_state (B, S, D), input_ids (B, S), hidden list or None, attentions list or None)."""
    x, input_ids, mask = text_embeddings(tower, input_ids, attention_mask, position_ids)  # (B, S, D)
    x, delta, hidden, attns = run_encoder(
        tower, x, rt, causal=causal, key_padding_mask=mask, output_attentions=oa, output_hidden_states=oh
    )
    return final_norm(tower.final_layer_norm, x, delta, hidden, rt), input_ids, hidden, attns


def final_norm(norm, x, delta, hidden, rt: Runtime):
    """norm(x + delta) with the add fused; the sum (the last layer's output) is appended to hidden as transformers
    reports it, before the norm."""
    last, x = ops.layer_norm(delta, norm.weight, norm.bias, norm.eps, residual=x, **rt.kw)
    if hidden is not None:
        hidden.append(x)
    return last


def tower_output(cls, last, pooled, hidden, attns, output_hidden_states, n_layers):
    return cls(
        last_hidden_state=last,
        pooler_output=pooled,
        hidden_states=finish_hidden(hidden, hidden_state_selection(output_hidden_states, n_layers + 1)),
        attentions=tuple(attns) if attns is not None else None,
    )


class FastencModelMixin:
    """Shared by every fused class: `_fastenc` holds the Runtime; save_pretrained writes the original class name
    into config.architectures so the checkpoint reloads with plain transformers."""

    _fastenc: Runtime
    _fastenc_base: type

    def save_pretrained(self, *args, **kwargs):
        fast_cls = self.__class__
        self.__class__ = self._fastenc_base
        try:
            return self._fastenc_base.save_pretrained(self, *args, **kwargs)
        finally:
            self.__class__ = fast_cls

    def _flags(self, kwargs):
        flags = resolve_output_flags(
            self.config,
            kwargs.pop("output_attentions", None),
            kwargs.pop("output_hidden_states", None),
            kwargs.pop("return_dict", None),
        )
        check_no_extra_kwargs(f"{self._fastenc_base.__name__}.forward", kwargs)
        return flags


def model_output(output, return_dict):
    return output if return_dict else output.to_tuple()


def check_config(model) -> None:
    """Raise UnsupportedModelError for tower configs the fused encoder does not reproduce."""
    for tower in (getattr(model, "text_model", None), getattr(model, "vision_model", None), model):
        if tower is None or not hasattr(tower, "encoder"):
            continue
        activation_of(tower.config)
        for layer in tower.encoder.layers:
            if not hasattr(layer, "self_attn") or not hasattr(layer.self_attn, "q_proj"):
                raise UnsupportedModelError(f"{type(layer).__name__} is not a CLIP encoder layer fastenc knows")
