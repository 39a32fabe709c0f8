"""Fused T5 encoder towers: T5EncoderModel and UMT5EncoderModel.

Each fused class subclasses the transformers class it replaces and overrides `forward` with one pass over the same
weights (d_model = D, heads = H, d_kv = Dk independent of D / H, inner = H * Dk, d_ff = F):

    x = embed_tokens(input_ids)                        # (B, S, D), or inputs_embeds
    lut = relative_position_buckets(S, S, ...)         # (2S - 1,) int32 bucket ids, transformers' exact formula
    per layer:  h, x = RMSNorm(x + delta)              # residual add of the previous layer fused into the norm
                q, k, v = h @ Wqkv^T                   # one GEMM (no biases), (B, S, 3, H, Dk) -> 3 x (B, H, S, Dk)
                a = attention(q, k, v, scale=1, key_padding_mask, rel_bias=(table, lut)) @ Wo^T
                h, x = RMSNorm(x + a)                  # fused residual + norm
                relu:       delta = act(h @ Wi^T) @ Wo_ff^T
                gated-gelu: g, u = h @ [Wi_0; Wi_1]^T  # one GEMM; delta = gelu_new(g) * u @ Wo_ff^T (fused kernel)
    last = final RMSNorm(x + delta)

The relative-position bias table lives in layer 0 for T5 (shared by every layer) and in every layer for UMT5; the
attention kernel gathers table[lut[j - i + S - 1], h] per tile, so the (S, S) bias is never in memory. Dropout is
the identity in eval mode (transformers' too); a model in training mode with dropout_rate > 0 runs the original
transformers forward (recorded as a fallback of "t5_encoder").

fp16 policy. transformers' eager T5 overflows in fp16: the FFN output (`wo`) and the residual stream of T5 v1.1 /
Flan-T5 exceed 65504, so it clamps inf to finfo.max - 1000 after each sub-layer (which still leaves garbage) and
loads `wo` in fp32 (`_keep_in_fp32_modules = ["wo"]`, which promotes its residual stream to fp32 after the first
FFN). Here, for fp16 models (the dtype of the attention weights):
  * the residual stream x is kept in fp32 (embeddings upcast once; every sub-layer output is added in fp32, and the
    RMSNorm statistics are fp32 as always); the normed activations that feed the GEMMs are fp16;
  * the two GEMMs whose output joins the residual (attention `o` and FFN `wo`) produce fp32 outputs: on CUDA via
    `torch.mm(..., out_dtype=torch.float32)` (fp16 operands, fp32 accumulate and store) where this torch has it,
    otherwise (and on CPU) an fp32 GEMM of the fp16-rounded operands; a `wo` kept in fp32 runs in fp32 as in HF;
  * the d_ff intermediate (act(wi h), gelu(wi_0 h) * wi_1 h) stays fp16, as in transformers;
  * hidden_states are returned in fp16, saturated to +-finfo(fp16).max (transformers' own clamp, without inf).
So where the fp32 model is finite, ours is finite unless the d_ff intermediate itself exceeds 65504 (it does not in
the published checkpoints; transformers would fail there too). bf16 and fp32 models compute in their own dtype, as
transformers does (bf16 has fp32's range).

Not reproduced: a batch row whose attention_mask is all zeros gives 0 from the attention here (transformers gives a
uniform average over the padded keys); such rows carry no tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import T5EncoderModel, UMT5EncoderModel
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from .. import ops
from ..core.errors import InputError, UnsupportedModelError
from ..core.trace import fall_back, record, tracing
from ..ops.reference import attention_with_probs, relative_position_buckets
from ._base import (
    ExecutionState,
    KeptTensors,
    check_device,
    fuse_linears,
    hidden_state_selection,
    layout_key,
    linear,
    norm_eps,
    plain_linear,
    project,
    same_storage,
    structure_generation,
)
from ._config import activation_module_name, compare_field, module_activation, run_activation_module, warn_mismatches
from ._encoder import FastencModelMixin, finish_hidden, model_output, residual_dtype

FP16_MAX = torch.finfo(torch.float16).max

# ------------------------------------------------------------------------------------------------------ weights


_MM_OUT_DTYPE: dict[str, bool] = {}  # device type -> torch.mm(..., out_dtype=) works there


def _linear_fp32_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T with an fp32 result, for the GEMMs that feed the fp32 residual of an fp16 model."""
    record("torch", "linear")
    if w.dtype == torch.float32:  # wo kept in fp32 (_keep_in_fp32_modules): HF casts the input up
        return F.linear(x.float(), w)
    if x.is_cuda and _MM_OUT_DTYPE.get("cuda", True):
        try:
            y = torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32)
            _MM_OUT_DTYPE["cuda"] = True
            return y.view(*x.shape[:-1], w.shape[0])
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE["cuda"] = False
    return F.linear(x.float(), w.float())


# ------------------------------------------------------------------------------------------------------ checks


def check_t5_config(model) -> None:
    """Raise UnsupportedModelError for T5 / UMT5 encoders the fused tower does not reproduce, and warn
    (ConfigMismatchWarning) for every forward-relevant config field that no longer says what the modules compute
    (see fastenc/models/_config.py): the fused tower follows the modules, as transformers' forward does."""
    config = model.config
    if getattr(config, "is_decoder", False):
        raise UnsupportedModelError("fastenc fuses T5 encoders only (config.is_decoder=True)")
    stack = model.encoder
    if not len(stack.block) or not stack.block[0].layer[0].SelfAttention.has_relative_attention_bias:
        raise UnsupportedModelError("the first T5 block has no relative_attention_bias; fastenc needs it")
    first = stack.block[0].layer[0].SelfAttention
    if first.is_decoder:
        raise UnsupportedModelError("fastenc fuses T5 encoders only (the attention modules have is_decoder=True)")
    for block in stack.block:
        attn = block.layer[0].SelfAttention
        if attn.has_relative_attention_bias and any(
            getattr(attn, n) != getattr(first, n)
            for n in ("relative_attention_num_buckets", "relative_attention_max_distance", "is_decoder")
        ):
            raise UnsupportedModelError("T5 blocks with different relative-position bucket settings are not supported")
        if any(getattr(attn, n, None) is None for n in ("q", "k", "v", "o")):
            raise UnsupportedModelError(f"{type(attn).__name__} is not a T5 attention fastenc knows")
        if any(getattr(attn, n).bias is not None for n in ("q", "k", "v", "o")):
            raise UnsupportedModelError("T5 attention projections with biases are not supported")
        ff = block.layer[-1].DenseReluDense
        if not (hasattr(ff, "wi") or (hasattr(ff, "wi_0") and hasattr(ff, "wi_1"))) or not hasattr(ff, "wo"):
            raise UnsupportedModelError(f"{type(ff).__name__} is not a T5 feed-forward fastenc knows")
        if "act" not in ff._modules:
            raise UnsupportedModelError(f"{type(ff).__name__} has no `act` module; fastenc needs T5's layout")
    _audit_t5(model)


def _audit_t5(model) -> None:
    """Compare the config fields T5's modules were built from with what the modules hold now."""
    config, blocks = model.config, model.encoder.block
    attn = blocks[0].layer[0].SelfAttention
    ff = blocks[0].layer[-1]
    dense = ff.DenseReluDense
    mismatches: list[str] = []
    acts = sorted({type(b.layer[-1].DenseReluDense._modules["act"]).__name__ for b in blocks})
    built = activation_module_name(config, "dense_act_fn")
    if acts != [built]:
        mismatches.append(
            f"config.dense_act_fn={getattr(config, 'dense_act_fn', None)!r} (transformers builds {built}) but the "
            f"feed-forward act is {', '.join(acts)}"
        )
    gated = "wi_0" in dense._modules
    compare_field(mismatches, config, "is_gated_act", gated, "the feed-forward's gating (wi_0 / wi_1)")
    proj = getattr(config, "feed_forward_proj", None)
    if isinstance(proj, str) and (proj.split("-")[0] == "gated") != gated:
        mismatches.append(f"config.feed_forward_proj={proj!r} but the feed-forward is {type(dense).__name__}")
    for attr, actual, what in (
        ("relative_attention_num_buckets", attn.relative_attention_num_buckets, "SelfAttention's"),
        ("relative_attention_max_distance", attn.relative_attention_max_distance, "SelfAttention's"),
        ("num_heads", attn.n_heads, "SelfAttention.n_heads"),
        ("d_kv", attn.key_value_proj_dim, "SelfAttention.key_value_proj_dim"),
        ("layer_norm_epsilon", norm_eps(ff._modules["layer_norm"]), "layer_norm.variance_epsilon"),
        ("dropout_rate", float(ff._modules["dropout"].p), "the dropout modules' p"),
    ):
        compare_field(mismatches, config, attr, actual, what if "." in what else f"{what} {attr}")
    warn_mismatches(type(model).__name__, mismatches)


def _embed(stack, input_ids, attention_mask, inputs_embeds):
    """Checked embeddings. Returns x (B, S, D) and the key_padding_mask (B, S) bool (True = real token) or None."""
    device = stack.embed_tokens.weight.device
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("pass exactly one of input_ids ((batch, sequence) integers) or inputs_embeds")
    if input_ids is not None:
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dtype.is_floating_point
            or input_ids.dtype in (torch.bool, torch.complex64)
        ):
            raise InputError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InputError(
                f"input_ids must have shape (batch, sequence) with sequence >= 1, got {tuple(input_ids.shape)}"
            )
        check_device("input_ids", input_ids, device)
        x = stack.embed_tokens(input_ids)  # (B, S, D)
    else:
        d = stack.embed_tokens.weight.shape[1]
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.dtype.is_floating_point:
            raise InputError(f"inputs_embeds must be a float tensor, got {getattr(inputs_embeds, 'dtype', None)}")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0 or inputs_embeds.shape[2] != d:
            raise InputError(
                f"inputs_embeds must have shape (batch, sequence >= 1, d_model={d}), got {tuple(inputs_embeds.shape)}"
            )
        check_device("inputs_embeds", inputs_embeds, device)
        x = inputs_embeds
    b, s = x.shape[:2]
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise InputError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != (b, s):
            raise InputError(
                f"attention_mask must have shape (batch, sequence)={(b, s)}, got {tuple(attention_mask.shape)}"
            )
        check_device("attention_mask", attention_mask, device)
        attention_mask = attention_mask != 0  # (B, S) bool, True = real token
    return x, attention_mask


# ------------------------------------------------------------------------------------------------------ tower


def t5_layer_weights(state: ExecutionState, blocks) -> tuple[str, list[tuple]] | None:
    """(activation, per block what `_t5_fast_layers` reads), collected once per model and reused while current (as
    `_encoder.layer_weights` for CLIP / SigLIP: same structure generation, the fused q/k/v and wi_0/wi_1 buffers are
    still the weights' storage with the same layout (`layout_key`), no linear got a hook, autograd does not record
    into the weights). None where a block needs the general loop: a wrapped or hooked linear, a relative-bias table
    past block 0 (UMT5), autograd, activation modules that are not one fused activation."""
    key = ("t5-blocks", id(blocks))
    kept = state.fused.get(key)
    if kept is not None and kept.current(blocks):
        return kept.value
    gen = structure_generation()
    if not len(blocks):
        return None
    acts = {module_activation(_ff_act(block)) for block in blocks}
    if len(acts) != 1 or None in acts:  # an activation with no fused kernel, or mixed ones: the general loop
        return None
    weights, fused, linears = [], [], []
    for i, block in enumerate(blocks):
        sub = list(block._modules["layer"]._modules.values())
        sa, ff = sub[0], sub[-1]
        attn = sa._modules["SelfAttention"]
        if attn.has_relative_attention_bias != (i == 0):
            return None
        am, fm = attn._modules, ff._modules["DenseReluDense"]._modules
        gated = "wi_0" in fm
        lins = (am["q"], am["k"], am["v"], am["o"], *((fm["wi_0"], fm["wi_1"]) if gated else (fm["wi"],)), fm["wo"])
        if not all(map(plain_linear, lins)):
            return None
        qkv = fuse_linears(state, attn, ("q", "k", "v"))
        wi = fuse_linears(state, ff._modules["DenseReluDense"], ("wi_0", "wi_1")) if gated else (fm["wi"].weight, None)
        if qkv is None or wi is None or not (_is_storage_of(qkv[0], lins[0]) and _is_storage_of(wi[0], lins[4])):
            return None  # a per-call cat (autograd, compile): nothing to keep
        table = am["relative_attention_bias"]._parameters["weight"] if i == 0 else None
        n_gate = fm["wi_0"]._parameters["weight"].shape[0] if gated else 0
        weights.append(  # modules for eps / n_heads / d_kv, read each call (plain attributes, not registered)
            (table, sa._modules["layer_norm"], qkv[0], attn, am["o"]._parameters["weight"],
             ff._modules["layer_norm"], wi[0], n_gate, fm["wo"]._parameters["weight"])
        )  # fmt: skip
        fused.extend(m._parameters["weight"] for m in lins)
        linears.extend((*lins, _ff_act(block)))
    fused = tuple(fused)
    hooks = tuple(d for m in linears for d in (m._forward_hooks, m._forward_pre_hooks))  # checked empty per call
    cached = (acts.pop(), weights)
    state.fused[key] = KeptTensors(gen, blocks, fused, layout_key(fused), hooks, cached)
    return cached


def _ff_act(block):
    """The activation module of a T5 block's feed-forward (built from config.dense_act_fn at construction)."""
    return block._modules["layer"][-1]._modules["DenseReluDense"]._modules["act"]


def _is_storage_of(buffer: torch.Tensor, m) -> bool:
    """The fused buffer is the linear's weight storage (a view laid out by `prefuse`), not a copy."""
    return same_storage(buffer, m._parameters["weight"])


def _t5_fast_layers(weights, x, plan, mask, act: str, cdt: torch.dtype):
    """The general loop of `t5_encoder_forward` over prevalidated plain blocks (fp32 / bf16: no fp16 policy), no
    hidden states or attentions: tensors and prebound callables only. Returns (x, delta), delta left unsummed."""
    b, s, _ = x.shape
    rms_norm, attention = plan.rms_norm, plan.attention
    gated, plain_act = plan.gated_activation, plan.bias_activation
    lin = F.linear
    table = weights[0][0]
    delta = None
    for _, ln1, wqkv, attn, wo, ln2, wi, n_gate, wo_ff in weights:
        if delta is None:
            h = rms_norm(x, ln1._parameters["weight"], norm_eps(ln1), None)
        else:
            h, x = rms_norm(residual_dtype(delta, x), ln1._parameters["weight"], norm_eps(ln1), x)
        nh, dk = attn.n_heads, attn.key_value_proj_dim
        q, k, v = lin(h.to(cdt), wqkv).view(b, s, 3, nh, dk).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, Dk)
        o = attention(q, k, v, mask, _scaling(attn), table).transpose(1, 2).reshape(b, s, nh * dk)
        a = lin(o.to(wo.dtype), wo).to(x.dtype)
        h, x = rms_norm(a, ln2._parameters["weight"], norm_eps(ln2), x)
        h = h.to(cdt)
        if n_gate:
            gu = lin(h, wi)  # (B, S, 2F)
            f = gated(gu[..., :n_gate], gu[..., n_gate:], act)
        else:
            f = plain_act(lin(h, wi), None, act)
        delta = lin(f.to(wo_ff.dtype), wo_ff).to(x.dtype)
    return x, delta


def t5_encoder_forward(
    model, state: ExecutionState, input_ids, attention_mask, inputs_embeds, *, output_attentions, output_hidden_states
) -> BaseModelOutputWithPastAndCrossAttentions:
    """The T5 / UMT5 encoder stack of `model` (model.encoder: embed_tokens, block, final_layer_norm)."""
    stack = model.encoder
    x, key_padding_mask = _embed(stack, input_ids, attention_mask, inputs_embeds)
    b, s, _ = x.shape
    blocks = stack.block
    cdt = blocks[0].layer[0].SelfAttention.q.weight.dtype  # compute dtype of the GEMMs
    wide = cdt == torch.float16  # fp16 policy (module docstring): fp32 residual stream, fp32-out branch GEMMs
    if wide:
        x = x.float()
    out_dtype = cdt if wide else x.dtype

    def branch_linear(h, m):
        if not plain_linear(m):
            record("torch", "module")
            return m(h).to(x.dtype)
        w = m.weight
        return _linear_fp32_out(h, w) if wide else linear(h.to(w.dtype), w).to(x.dtype)

    def visible(t):  # hidden states as returned: the model dtype, saturated (no inf)
        return t.clamp(-FP16_MAX, FP16_MAX).to(out_dtype) if wide else t

    first = blocks[0].layer[0].SelfAttention  # the bucket settings transformers' compute_bias reads (its module's)
    lut = relative_position_buckets(
        s,
        s,
        bidirectional=not first.is_decoder,
        num_buckets=first.relative_attention_num_buckets,
        max_distance=first.relative_attention_max_distance,
        device=x.device,
    )  # (2S - 1,) int32
    hidden = [visible(x)] if output_hidden_states is not False else None
    attns = [] if output_attentions else None
    table = None
    delta = None
    plan = state.plan(x.device)
    rms_norm, attention = plan.rms_norm, plan.attention
    mask = None  # the plan's mask for the current table, converted once per table (T5: once per forward)
    weights = None
    if not (wide or hidden is not None or attns is not None or tracing() or torch.compiler.is_compiling()
            or torch.is_autocast_enabled(x.device.type)):  # fmt: skip
        weights = t5_layer_weights(state, blocks)
    if weights is not None:
        act, weights = weights
        table = weights[0][0]
        mask = plan.mask(key_padding_mask, False, s, s, x.device, rel_bias=(table, lut), dtype=cdt)
        x, delta = _t5_fast_layers(weights, x, plan, mask, act, cdt)
    for block in blocks if weights is None else ():  # the general loop: hooks, wrapped linears, fp16, outputs
        sub = list(block._modules["layer"]._modules.values())
        sa, ff = sub[0], sub[-1]
        attn = sa._modules["SelfAttention"]
        if attn.has_relative_attention_bias:
            table = attn._modules["relative_attention_bias"]._parameters["weight"]  # (num_buckets, H); T5: layer 0
            if attns is None:  # only, UMT5: every layer
                mask = plan.mask(key_padding_mask, False, s, s, x.device, rel_bias=(table, lut), dtype=cdt)
        ln = sa._modules["layer_norm"]
        if delta is None:
            h = rms_norm(x, ln._parameters["weight"], norm_eps(ln), None)
        else:
            h, x = rms_norm(delta, ln._parameters["weight"], norm_eps(ln), x)
            if hidden is not None:
                hidden.append(visible(x))
        h = h.to(cdt)
        nh, dk = attn.n_heads, attn.key_value_proj_dim
        fused = fuse_linears(state, attn, ("q", "k", "v"))  # (3 H Dk, D)
        am = attn._modules
        if fused is not None:
            qkv = linear(h, fused[0]).view(b, s, 3, nh, dk)  # (B, S, 3, H, Dk)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, Dk), strided views
        else:
            q, k, v = (project(am[n], h).view(b, s, nh, dk).transpose(1, 2) for n in ("q", "k", "v"))
        if attns is not None:
            state.fallback("attention", "output_attentions=True needs the probabilities")
            record("torch", "attention")
            o, p = attention_with_probs(q, k, v, key_padding_mask, None, table, lut, scale=_scaling(attn))
            attns.append(p)
        else:
            o = attention(q, k, v, mask, _scaling(attn), table)  # (B, H, S, Dk), a view of (B, S, H, Dk)
        o = o.transpose(1, 2).reshape(b, s, nh * dk)  # free for the kernel's layout
        a = branch_linear(o, am["o"])  # (B, S, D), x.dtype
        ln = ff._modules["layer_norm"]
        h, x = rms_norm(a, ln._parameters["weight"], norm_eps(ln), x)
        h = h.to(cdt)
        mlp = ff._modules["DenseReluDense"]
        mm = mlp._modules
        act_module = mm["act"]
        act = module_activation(act_module)  # the module transformers' forward calls (None: no fused kernel)
        if "wi_0" in mm:
            fused = fuse_linears(state, mlp, ("wi_0", "wi_1"))  # (2F, D)
            if fused is not None:
                n = mm["wi_0"]._parameters["weight"].shape[0]
                gu = linear(h, fused[0])  # (B, S, 2F)
                g, u = gu[..., :n], gu[..., n:]
            else:
                g, u = project(mm["wi_0"], h), project(mm["wi_1"], h)
            if act is None:
                f = run_activation_module(state, act_module, g) * u
            else:
                f = plan.gated_activation(g, u, act)  # (B, S, F)
        elif act is None:
            f = run_activation_module(state, act_module, project(mm["wi"], h))
        else:
            f = plan.bias_activation(project(mm["wi"], h), None, act)
        delta = branch_linear(f, mm["wo"])
    fln = stack.final_layer_norm
    last, x = ops.rms_norm(delta, fln.weight, norm_eps(fln), residual=x, **state.kw)
    if hidden is not None:
        hidden.append(last)  # transformers' last hidden state is the final norm's output
    return BaseModelOutputWithPastAndCrossAttentions(
        last_hidden_state=last,
        hidden_states=finish_hidden(hidden, hidden_state_selection(output_hidden_states, len(blocks) + 1)),
        attentions=tuple(attns) if attns is not None else None,
        cross_attentions=() if output_attentions else None,
    )


# ------------------------------------------------------------------------------------------------------ models


class _FastT5EncoderBase(FastencModelMixin):
    fastenc_check_config = staticmethod(check_t5_config)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if getattr(self.config, "is_decoder", False):  # transformers' T5Stack reads it per call: a causal mask
            _fall_back_to_transformers(self, "config.is_decoder=True (a causal mask) runs the transformers forward")
            return self._fastenc_base.forward(self, input_ids, attention_mask, inputs_embeds, **kwargs)
        if self.training and _dropout_active(self):
            self._fastenc.fallback("t5_encoder", "training-mode dropout runs the transformers forward")
            return self._fastenc_base.forward(self, input_ids, attention_mask, inputs_embeds, **kwargs)
        oa, oh, rd = self._flags(kwargs)
        out = t5_encoder_forward(
            self,
            self._fastenc,
            input_ids,
            attention_mask,
            inputs_embeds,
            output_attentions=oa,
            output_hidden_states=oh,
        )
        return model_output(out, rd)


def _fall_back_to_transformers(model, why: str) -> None:
    """The whole forward runs transformers' own (also on backend="torch": the fused tower does not compute it)."""
    fall_back("t5_encoder", model._fastenc.backend, "transformers", why, strict=model._fastenc.strict)


def _dropout_active(model) -> bool:
    """A dropout that transformers' forward applies in training mode: its dropout modules' p and the attention's
    dropout attribute (both built from config.dropout_rate at construction)."""
    for m in model.encoder.modules():
        p = m.p if isinstance(m, torch.nn.Dropout) else m.__dict__.get("dropout")  # T5Attention.dropout: a float
        if isinstance(p, int | float) and p > 0:
            return True
    return False


def _scaling(attn) -> float:
    """The attention's score scale, 1.0 in T5 (no 1 / sqrt(d_kv)): the module's own attribute where it has one."""
    return float(attn.__dict__.get("scaling", 1.0))


class FastT5EncoderModel(_FastT5EncoderBase, T5EncoderModel):
    pass


class FastUMT5EncoderModel(_FastT5EncoderBase, UMT5EncoderModel):
    pass


# transformers class -> fused class. Exact classes only: a subclass may change forward in ways we cannot see.
FUSED_CLASSES = {T5EncoderModel: FastT5EncoderModel, UMT5EncoderModel: FastUMT5EncoderModel}
