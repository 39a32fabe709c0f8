"""The pre-LN encoder shared by CLIP and SigLIP towers (same layer layout and parameter names), their input
checks and embeddings, and the mixin every fused model class carries."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..core.errors import InputError, UnsupportedModelError
from ..core.trace import record, tracing
from ..ops.reference import attention_with_probs
from ._base import (
    ExecutionState,
    KeptTensors,
    check_device,
    check_no_extra_kwargs,
    fuse_linears,
    hidden_state_selection,
    layout_key,
    linear,
    plain_linear,
    project,
    project_activation,
    resolve_output_flags,
    same_storage,
    shallow_copy_as,
    structure_generation,
)
from ._config import activation_module_name, compare_field, module_activation, run_activation_module, warn_mismatches

QKV = ("q_proj", "k_proj", "v_proj")


def encoder_layers_forward(
    layers,
    x: torch.Tensor,
    state: ExecutionState,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    hidden_states: list | None,
    attentions: list | None,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run pre-LN encoder layers (CLIP, SigLIP layout). x: (B, S, D). Returns (x, delta): the layer stack's output
    is x + delta, left unsummed so the caller can fuse the add into its final norm. Everything transformers' layers
    compute from their config is read from the layers' modules, as their forward does (see fastenc/models/_config.py):
    the activation module, the norms' eps, the attention's num_heads / scale / dropout.

    hidden_states / attentions: lists to append each layer's output / probabilities to, or None."""
    b, s, d = x.shape
    plan = state.plan(x.device)
    dropout = training and any(float(layer._modules["self_attn"].dropout) > 0 for layer in layers)
    slow = attentions is not None or dropout
    mask = None if slow else plan.mask(key_padding_mask, causal, s, s, x.device)  # converted once per forward
    layer_norm, attention = plan.layer_norm, plan.attention
    autocast = torch.is_autocast_enabled(x.device.type)
    if not slow and not autocast and not tracing() and not torch.compiler.is_compiling():
        cached = layer_weights(state, layers)
        if cached is not None:
            activation, weights = cached
            return _fast_layers(weights, x, plan, mask, activation, hidden_states)
    delta = None
    for layer in layers:
        mods = layer._modules  # dict reads, no nn.Module.__getattr__ in the loop
        attn, ln1, ln2, mlp = mods["self_attn"], mods["layer_norm1"], mods["layer_norm2"], mods["mlp"]
        w1, w2 = ln1._parameters, ln2._parameters
        if delta is None:
            h = layer_norm(x, w1["weight"], w1["bias"], ln1.eps, None)
        else:
            h, x = layer_norm(residual_dtype(delta, x), w1["weight"], w1["bias"], ln1.eps, x)
            if hidden_states is not None:
                hidden_states.append(x)
        nh = attn.num_heads
        fused = fuse_linears(state, attn, QKV)
        if fused is not None:
            qkv = linear(h, *fused).view(b, s, 3, nh, d // nh)  # (B, S, 3, H, Dh)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, Dh), strided views
        else:  # a wrapped (LoRA, quantized) or hooked projection runs as its module
            am = attn._modules
            q, k, v = (project(am[n], h).view(b, s, nh, d // nh).transpose(1, 2) for n in QKV)
        if slow:
            reason = "output_attentions=True needs the probabilities" if attentions is not None else "attention dropout"
            state.fallback("attention", reason)
            record("torch", "attention")
            o, p = attention_with_probs(
                q,
                k,
                v,
                causal=causal,
                key_padding_mask=key_padding_mask,
                scale=attn.scale,
                dropout_p=float(attn.dropout) if training else 0.0,
                training=training,
            )
            if attentions is not None:
                attentions.append(p)
        else:
            o = attention(q, k, v, mask, attn.scale)
        o = o.transpose(1, 2).reshape(b, s, d)  # (B, S, D), free for the kernel's (B, S, H, Dh) output
        a = project(attn._modules["out_proj"], o)
        h, x = layer_norm(residual_dtype(a, x), w2["weight"], w2["bias"], ln2.eps, x)
        fc = mlp._modules
        act_module = fc["activation_fn"]
        activation = module_activation(act_module)
        if activation is None:  # an activation with no fused kernel: the linear, then the module
            f = run_activation_module(state, act_module, project(fc["fc1"], h))
        else:
            f = project_activation(fc["fc1"], h, activation, plan)
        delta = project(fc["fc2"], f)
    return x, delta


def residual_dtype(branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A branch output in the residual stream's dtype. Under torch.autocast the GEMMs return bf16/fp16 while the
    stream stays fp32; transformers' `residual + branch` promotes to fp32, and the fused add + norm needs one dtype."""
    return branch if branch.dtype == x.dtype else branch.to(x.dtype)


def layer_weights(state: ExecutionState, layers) -> tuple[str, list[tuple]] | None:
    """(activation, per layer the tensors `_fast_layers` reads), collected once per model and reused while they are
    current: the structure generation is the same (no module or parameter assigned anywhere), the fused q/k/v
    buffers still are the weights' storage (data pointers, strides and sizes: `layout_key`, so `p.data = p.data.t()`
    is seen), no linear or activation module got a hook, and autograd does not record into the weights. None when a
    layer has a linear that must run as a module (or autograd records), or the layers' activation modules are not
    one fused activation: the general loop runs then."""
    key = ("layers", id(layers))
    kept = state.fused.get(key)
    if kept is not None and kept.current(layers):
        return kept.value
    gen = structure_generation()
    if not len(layers):
        return None
    weights, fused, linears, shared = [], [], [], True
    acts = {module_activation(layer._modules["mlp"]._modules["activation_fn"]) for layer in layers}
    if len(acts) != 1 or None in acts:
        return None
    for layer in layers:
        mods = layer._modules
        attn, ln1, ln2, mlp = mods["self_attn"], mods["layer_norm1"], mods["layer_norm2"], mods["mlp"]
        am, fm = attn._modules, mlp._modules
        lins = (am["q_proj"], am["k_proj"], am["v_proj"], am["out_proj"], fm["fc1"], fm["fc2"])
        if not all(map(plain_linear, lins)):
            return None
        linears.append(fm["activation_fn"])  # its hook dicts join the checked ones
        qkv = fuse_linears(state, attn, QKV)
        if qkv is None or qkv[1] is None or qkv[0].requires_grad:  # a per-call cat (autograd): nothing to keep
            return None
        shared = shared and same_storage(qkv[0], am["q_proj"]._parameters["weight"])
        p1, p2 = ln1._parameters, ln2._parameters
        po, pf1, pf2 = (m._parameters for m in lins[3:])
        weights.append(  # modules for eps / num_heads / scale, read each call (plain attributes, not registered)
            (p1["weight"], p1["bias"], ln1, *qkv, attn, po["weight"], po["bias"],
             p2["weight"], p2["bias"], ln2, pf1["weight"], pf1["bias"], pf2["weight"], pf2["bias"])
        )  # fmt: skip
        fused.extend(m._parameters["weight"] for m in lins[:3])
        fused.extend(m._parameters["bias"] for m in lins[:3])
        linears.extend(lins)
    fused = tuple(fused)
    hooks = tuple(d for m in linears for d in (m._forward_hooks, m._forward_pre_hooks))  # checked empty per call
    cached = (acts.pop(), weights)
    if shared:  # a per-call cat of re-laid-out weights (non-contiguous) is a copy: never kept
        state.fused[key] = KeptTensors(gen, layers, fused, layout_key(fused), hooks, cached)
    return cached


def _fast_layers(weights, x, plan, mask, activation, hidden_states):
    """The loop of `encoder_layers_forward` over prevalidated plain layers: tensors and prebound callables only."""
    b, s, d = x.shape
    layer_norm, linear_act, attention = plan.untraced(x.dtype, activation, inplace=not torch.is_grad_enabled())
    lin = F.linear
    x = x.reshape(b * s, d)  # (B S, D): 2-D GEMMs go straight to addmm
    delta = None
    for w1, b1, ln1, wqkv, bqkv, attn, wo, bo, w2, b2, ln2, wf1, bf1, wf2, bf2 in weights:
        if delta is None:
            h = layer_norm(x, w1, b1, ln1.eps, None)
        else:
            h, x = layer_norm(delta, w1, b1, ln1.eps, x)
            if hidden_states is not None:
                hidden_states.append(x.view(b, s, d))
        nh = attn.num_heads
        qkv = lin(h, wqkv, bqkv)  # (B S, 3D)
        if qkv.is_contiguous():  # the (3, B, H, S, Dh) view in one op instead of view + permute
            q, k, v = qkv.as_strided((3, b, nh, s, d // nh), (d, s * 3 * d, d // nh, 3 * d, 1)).unbind(0)
        else:
            q, k, v = qkv.view(b, s, 3, nh, d // nh).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, Dh)
        o = attention(q, k, v, mask, attn.scale).transpose(1, 2).reshape(b * s, d)  # (B S, D)
        h, x = layer_norm(lin(o, wo, bo), w2, b2, ln2.eps, x)
        delta = lin(linear_act(h, wf1, bf1), wf2, bf2)
    return x.view(b, s, d), delta.view(b, s, d)


def finish_hidden(hidden: list | None, selection: set[int] | None):
    if hidden is None:
        return None
    if selection is not None:
        hidden = [h if i in selection else None for i, h in enumerate(hidden)]
    return tuple(hidden)


def text_embeddings(tower, input_ids, attention_mask, position_ids):
    """Checked token + position embeddings. Returns x (B, S, D), input_ids (B, S) and the key_padding_mask (B, S)
    bool (True = real token) or None."""
    if input_ids is None:
        raise InputError("input_ids is required (a (batch, sequence) integer tensor)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() < 1 or input_ids.shape[-1] == 0:
        raise InputError(
            f"input_ids must have shape (batch, sequence) with sequence >= 1, got {tuple(input_ids.shape)}"
        )
    emb = tower._modules["embeddings"]
    emods = emb._modules
    device = _weight(emods["token_embedding"]).device
    check_device("input_ids", input_ids, device)
    shape = input_ids.shape
    input_ids = input_ids.reshape(-1, shape[-1])  # (B, S)
    b, s = input_ids.shape
    max_pos = _weight(emods["position_embedding"]).shape[0]
    if s > max_pos:
        raise InputError(
            f"input_ids has sequence length {s} > max_position_embeddings={max_pos}; truncate the prompt "
            f"(tokenizer(..., truncation=True, max_length={max_pos})) or chunk it"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise InputError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        check_device("attention_mask", attention_mask, device)
        if attention_mask.shape != shape:
            raise InputError(
                f"attention_mask must have input_ids' shape {tuple(shape)}, got {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.reshape(b, s)
        if attention_mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None  # no padding; checked on the CPU only (on a GPU the check is a host sync)
        else:
            attention_mask = attention_mask != 0  # (B, S) bool, True = real token
    if position_ids is not None:
        check_device("position_ids", position_ids, device)
    x = embed_text(emb, input_ids, position_ids)  # (B, S, D)
    return x, input_ids, attention_mask


def embed_text(emb, input_ids, position_ids):
    """emb(input_ids=..., position_ids=...) for a CLIP / SigLIP (2) text embedding module: token + position
    lookups. transformers' own classes with plain nn.Embedding lookups (no max_norm, no hooks) run as the two
    lookups and the add their forward is, without three module calls; anything else runs as the module."""
    if type(emb) in _TEXT_EMBEDDINGS and not _hooked(emb):
        mods = emb._modules
        tok, pos = mods.get("token_embedding"), mods.get("position_embedding")
        ids = emb._buffers.get("position_ids") if position_ids is None else position_ids
        if _plain_embedding(tok) and _plain_embedding(pos) and ids is not None:
            if position_ids is None:
                ids = ids[:, : input_ids.shape[-1]]
            return F.embedding(input_ids, tok._parameters["weight"]) + F.embedding(ids, pos._parameters["weight"])
    return emb(input_ids=input_ids, position_ids=position_ids)


def _weight(m) -> torch.Tensor:
    """m.weight, without nn.Module.__getattr__ for a registered parameter."""
    w = m._parameters.get("weight")
    return m.weight if w is None else w


def _hooked(m) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _plain_embedding(m) -> bool:
    return type(m) is torch.nn.Embedding and m.max_norm is None and not _hooked(m)


def _text_embedding_classes() -> tuple[type, ...]:
    from transformers.models.clip.modeling_clip import CLIPTextEmbeddings
    from transformers.models.siglip.modeling_siglip import SiglipTextEmbeddings

    classes = [CLIPTextEmbeddings, SiglipTextEmbeddings]
    try:
        from transformers.models.siglip2.modeling_siglip2 import Siglip2TextEmbeddings

        classes.append(Siglip2TextEmbeddings)
    except ImportError:  # transformers without SigLIP 2, or one that reuses SigLIP's class
        pass
    return tuple(classes)


_TEXT_EMBEDDINGS = _text_embedding_classes()


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


def run_encoder(tower, x, state: ExecutionState, *, causal, key_padding_mask, output_attentions, output_hidden_states):
    """tower.encoder.layers over x. Returns (x, delta, hidden list or None, attentions list or None)."""
    hidden = [x] if output_hidden_states is not False else None
    attns = [] if output_attentions else None
    x, delta = encoder_layers_forward(
        tower._modules["encoder"]._modules["layers"],
        x,
        state,
        causal=causal,
        key_padding_mask=key_padding_mask,
        hidden_states=hidden,
        attentions=attns,
        training=tower.training,
    )
    return x, delta, hidden, attns


def text_transformer(
    tower,
    state: ExecutionState,
    input_ids,
    attention_mask,
    position_ids,
    *,
    causal,
    output_attentions,
    output_hidden_states,
):
    """Embeddings, encoder layers and the fused final norm of a CLIP / SigLIP text tower.
    Returns (last_hidden_state (B, S, D), input_ids (B, S), hidden list or None, attentions list or None)."""
    x, input_ids, key_padding_mask = text_embeddings(tower, input_ids, attention_mask, position_ids)  # (B, S, D)
    x, delta, hidden, attns = run_encoder(
        tower,
        x,
        state,
        causal=causal,
        key_padding_mask=key_padding_mask,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
    )
    return final_norm(tower._modules["final_layer_norm"], x, delta, hidden, state), input_ids, hidden, attns


def final_norm(norm, x, delta, hidden, state: ExecutionState):
    """norm(x + delta) with the add fused; the sum (the last layer's output) is appended to hidden as transformers
    reports it, before the norm."""
    p = norm._parameters
    last, x = state.plan(x.device).layer_norm(residual_dtype(delta, x), p["weight"], p["bias"], norm.eps, x)
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
    """Shared by every fused class: `_fastenc` holds the ExecutionState; save_pretrained writes the original class name
    into config.architectures so the checkpoint reloads with plain transformers."""

    _fastenc: ExecutionState
    _fastenc_base: type

    def save_pretrained(self, *args, **kwargs):
        # a throwaway object of the original class over the same weights: this object is never mutated, so other
        # threads running forward keep seeing the fused class
        return shallow_copy_as(self, self._fastenc_base).save_pretrained(*args, **kwargs)

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


def check_encoder_config(model) -> None:
    """Raise UnsupportedModelError for towers the fused encoder does not reproduce, and warn
    (ConfigMismatchWarning) for every forward-relevant config field that no longer says what the modules compute
    (see fastenc/models/_config.py): the fused towers follow the modules, as transformers' forward does."""
    mismatches: list[str] = []
    for name, tower in (("text_model", getattr(model, "text_model", None)),
                        ("vision_model", getattr(model, "vision_model", None)), ("", model)):  # fmt: skip
        if tower is None or not hasattr(tower, "encoder"):
            continue
        for layer in tower.encoder.layers:
            mods = layer._modules
            attn, mlp = mods.get("self_attn"), mods.get("mlp")
            if attn is None or "q_proj" not in attn._modules or mlp is None or "activation_fn" not in mlp._modules:
                raise UnsupportedModelError(f"{type(layer).__name__} is not a CLIP encoder layer fastenc knows")
            d = attn.embed_dim
            if attn.num_heads * attn.head_dim != d:  # transformers' forward views heads of head_dim
                raise UnsupportedModelError(
                    f"{type(attn).__name__} has num_heads={attn.num_heads} x head_dim={attn.head_dim} != "
                    f"embed_dim={d}; fastenc needs heads that tile the width"
                )
        _audit_tower(mismatches, f"{name}." if name else "", tower)
    warn_mismatches(type(model).__name__, mismatches)


def _audit_tower(mismatches: list[str], prefix: str, tower) -> None:
    """Compare every config field the tower's modules were built from with what the modules hold now."""
    config = tower.config
    layers = tower.encoder.layers
    if not len(layers):
        return
    layer = layers[0]
    acts = sorted({type(m._modules["mlp"]._modules["activation_fn"]).__name__ for m in layers})
    named = getattr(config, "hidden_act", None)
    built = activation_module_name(config, "hidden_act")
    if acts != [built]:
        kernel = "fused" if named in ops.HF_ACTIVATIONS else "no fused kernel"
        mismatches.append(
            f"{prefix}config.hidden_act={named!r} (transformers builds {built}; {kernel}) "
            f"but the layers' activation_fn is {', '.join(acts)}"
        )
    attn = layer._modules["self_attn"]
    compare_field(mismatches, config, "num_attention_heads", attn.num_heads, f"{prefix}layers' self_attn.num_heads")
    compare_field(mismatches, config, "attention_dropout", float(attn.dropout), f"{prefix}layers' self_attn.dropout")
    compare_field(mismatches, config, "layer_norm_eps", float(layer._modules["layer_norm1"].eps),
            f"{prefix}layers' layer_norm1.eps")  # fmt: skip
    if "eos_token_id" in tower.__dict__:  # CLIP text: the pooling rule reads the model's own attribute
        what = f"{prefix}eos_token_id (the pooling rule)"
        compare_field(mismatches, config, "eos_token_id", tower.eos_token_id, what)
    if "use_head" in tower.__dict__:  # SigLIP vision
        compare_field(mismatches, config, "vision_use_head", tower.use_head, f"{prefix}use_head")
