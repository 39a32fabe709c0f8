"""Fused SigLIP and SigLIP 2 towers: Siglip(2)Model, Siglip(2)TextModel, Siglip(2)VisionModel.

Same pre-LN encoder as CLIP (fastenc/models/_encoder.py) with SigLIP's differences:
    text:   no causal mask (key padding only), last = final_LN(x + delta), pooled = head(last[:, -1])
    vision: no class token, no pre-norm, last = post_LN(x + delta), pooled = MAP head(last):
            o = attention(q = probe @ Wq^T + bq, k/v = last @ Wkv^T + bkv)      # one query per image, (B, H, 1, Dh)
            o = o @ Wo^T + bo;  pooled = o + mlp(LN(o))
    model:  logits_per_text = s.exp() * t_hat @ i_hat^T + b, sigmoid loss.
SigLIP 2 (NaFlex) feeds pre-patchified pixels (B, max_patches, C*p*p) with spatial_shapes (B, 2) and a patch mask
(B, max_patches); the mask becomes the key padding mask of every encoder layer and of the pooling head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (
    Siglip2Model,
    Siglip2TextModel,
    Siglip2VisionModel,
    SiglipModel,
    SiglipTextModel,
    SiglipVisionModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.siglip.modeling_siglip import SiglipOutput
from transformers.models.siglip2.modeling_siglip2 import Siglip2Output

from .. import ops
from ..core.errors import InputError
from ._base import ExecutionState, check_device, linear, project, project_activation
from ._config import module_activation, run_activation_module
from ._encoder import (
    FastencModelMixin,
    final_norm,
    image_embeddings,
    model_output,
    run_encoder,
    text_transformer,
    tower_output,
)


def siglip_text_tower_forward(
    tower, state: ExecutionState, input_ids, attention_mask, position_ids, *, output_attentions, output_hidden_states
) -> BaseModelOutputWithPooling:
    """SiglipTextModel's transformer: bidirectional, last-token pooling through `head`."""
    last, _, hidden, attns = text_transformer(
        tower,
        state,
        input_ids,
        attention_mask,
        position_ids,
        causal=False,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
    )
    pooled = project(tower.head, last[:, -1, :])  # the last token, which may be padding
    return tower_output(
        BaseModelOutputWithPooling, last, pooled, hidden, attns, output_hidden_states, len(tower.encoder.layers)
    )


def attention_pooling_head(head, last: torch.Tensor, state: ExecutionState, key_padding_mask=None):
    """Siglip(2)MultiheadAttentionPoolingHead: a learned probe attends over the patches. last: (B, N, D) -> (B, D)."""
    b, n, d = last.shape
    mha = head.attention
    nh = mha.num_heads
    w, bias = mha.in_proj_weight, mha.in_proj_bias  # (3D, D), (3D,)
    q = linear(head.probe, w[:d], bias[:d])  # (1, 1, D): the same query for every image
    q = q.view(1, 1, nh, d // nh).transpose(1, 2).expand(b, nh, 1, d // nh)  # (B, H, 1, Dh), batch stride 0
    kv = linear(last, w[d:], bias[d:]).view(b, n, 2, nh, d // nh)  # (B, N, 2, H, Dh)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, N, Dh)
    o = ops.attention(q, k, v, key_padding_mask=key_padding_mask, scale=(d // nh) ** -0.5, **state.kw)  # (B, H, 1, Dh)
    o = project(mha.out_proj, o.transpose(1, 2).reshape(b, 1, d))  # (B, 1, D)
    ln = head.layernorm
    h = ops.layer_norm(o, ln.weight, ln.bias, ln.eps, **state.kw)
    mlp = head.mlp._modules
    act_module = mlp["activation_fn"]
    activation = module_activation(act_module)  # the head's own module, as transformers' forward computes
    if activation is None:
        f = run_activation_module(state, act_module, project(mlp["fc1"], h))
    else:
        f = project_activation(mlp["fc1"], h, activation, state.plan(last.device))
    return (o + project(head.mlp.fc2, f))[:, 0]


def siglip_vision_tower_forward(
    tower, state: ExecutionState, x, key_padding_mask=None, *, output_attentions, output_hidden_states
) -> BaseModelOutputWithPooling:
    """Siglip(2)VisionModel's transformer over embeddings x (B, patches, D): no class token; pooled by the
    attention-pooling head when the config has one. key_padding_mask: (B, patches) bool, SigLIP 2's patch mask."""
    x, delta, hidden, attns = run_encoder(
        tower,
        x,
        state,
        causal=False,
        key_padding_mask=key_padding_mask,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
    )
    last = final_norm(tower.post_layernorm, x, delta, hidden, state)
    pooled = None
    if getattr(tower, "use_head", True) and hasattr(tower, "head"):
        pooled = attention_pooling_head(tower.head, last, state, key_padding_mask)
    return tower_output(
        BaseModelOutputWithPooling, last, pooled, hidden, attns, output_hidden_states, len(tower.encoder.layers)
    )


def naflex_embeddings(tower, pixel_values, pixel_attention_mask, spatial_shapes):
    """Checked SigLIP 2 inputs -> (embeddings (B, N, D), key_padding_mask (B, N) bool: the patch mask)."""
    config = tower.config
    patch_dim = config.num_channels * config.patch_size**2
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 3 or pixel_values.shape[-1] != patch_dim:
        raise InputError(
            f"pixel_values must be patchified, shape (batch, max_num_patches, {patch_dim}), "
            f"got {tuple(getattr(pixel_values, 'shape', ()))}"
        )
    if not pixel_values.dtype.is_floating_point:
        raise InputError(f"pixel_values must be a float tensor, got {pixel_values.dtype}")
    b, n, _ = pixel_values.shape
    device = tower.embeddings.patch_embedding.weight.device
    check_device("pixel_values", pixel_values, device)
    if not isinstance(spatial_shapes, torch.Tensor) or tuple(spatial_shapes.shape) != (b, 2):
        raise InputError(f"spatial_shapes must be a ({b}, 2) tensor of patch-grid (height, width)")
    if pixel_attention_mask is None or tuple(pixel_attention_mask.shape) != (b, n):
        got = None if pixel_attention_mask is None else tuple(pixel_attention_mask.shape)
        raise InputError(f"pixel_attention_mask must have shape ({b}, {n}) (1 = real patch), got {got}")
    check_device("pixel_attention_mask", pixel_attention_mask, device)
    return tower.embeddings(pixel_values, spatial_shapes), pixel_attention_mask != 0


def _siglip_vision(tower, state, pixel_values, interpolate_pos_encoding, oa, oh):
    x = image_embeddings(tower, pixel_values, interpolate_pos_encoding)  # (B, patches, D)
    return siglip_vision_tower_forward(tower, state, x, output_attentions=oa, output_hidden_states=oh)


def _siglip2_vision(tower, state, pixel_values, pixel_attention_mask, spatial_shapes, oa, oh):
    x, key_padding_mask = naflex_embeddings(tower, pixel_values, pixel_attention_mask, spatial_shapes)
    return siglip_vision_tower_forward(tower, state, x, key_padding_mask, output_attentions=oa, output_hidden_states=oh)


def _sigmoid_logits(model, vision, text, return_loss, output_cls):
    """Siglip(2)Model's head: normalised embeddings, scaled + biased logits, sigmoid loss."""
    image_embeds = vision.pooler_output / vision.pooler_output.norm(p=2, dim=-1, keepdim=True)
    text_embeds = text.pooler_output / text.pooler_output.norm(p=2, dim=-1, keepdim=True)
    logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * model.logit_scale.exp() + model.logit_bias
    logits_per_image = logits_per_text.t()
    loss = None
    if return_loss:
        labels = 2 * torch.eye(logits_per_text.size(0), device=logits_per_text.device) - 1
        loss = -torch.sum(F.logsigmoid(labels * logits_per_text), dim=-1).mean()
    return output_cls(
        loss=loss,
        logits_per_image=logits_per_image,
        logits_per_text=logits_per_text,
        text_embeds=text_embeds,
        image_embeds=image_embeds,
        text_model_output=text,
        vision_model_output=vision,
    )


class _TextForward:
    """forward of Siglip(2)TextModel (same signature in both)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        out = siglip_text_tower_forward(
            self, self._fastenc, input_ids, attention_mask, position_ids, output_attentions=oa, output_hidden_states=oh
        )
        return model_output(out, rd)


class FastSiglipVisionModel(FastencModelMixin, SiglipVisionModel):
    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        return model_output(_siglip_vision(self, self._fastenc, pixel_values, interpolate_pos_encoding, oa, oh), rd)


class _TextFeatures:
    """get_text_features of Siglip(2)Model (same signature in both)."""

    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        out = siglip_text_tower_forward(
            self.text_model,
            self._fastenc,
            input_ids,
            attention_mask,
            position_ids,
            output_attentions=oa,
            output_hidden_states=oh,
        )
        return model_output(out, rd)


class FastSiglipTextModel(_TextForward, FastencModelMixin, SiglipTextModel):
    pass


class FastSiglipModel(_TextFeatures, FastencModelMixin, SiglipModel):
    def get_image_features(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        out = _siglip_vision(self.vision_model, self._fastenc, pixel_values, interpolate_pos_encoding, oa, oh)
        return model_output(out, rd)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        return_loss=None,
        interpolate_pos_encoding=False,
        **kwargs,
    ):
        oa, oh, rd = self._flags(kwargs)
        flags = {"output_attentions": oa, "output_hidden_states": oh, "return_dict": True}
        vision = self.get_image_features(pixel_values, interpolate_pos_encoding, **flags)
        text = self.get_text_features(input_ids, attention_mask, position_ids, **flags)
        return model_output(_sigmoid_logits(self, vision, text, return_loss, SiglipOutput), rd)


class FastSiglip2TextModel(_TextForward, FastencModelMixin, Siglip2TextModel):
    pass


class FastSiglip2VisionModel(FastencModelMixin, Siglip2VisionModel):
    def forward(self, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        out = _siglip2_vision(self, self._fastenc, pixel_values, pixel_attention_mask, spatial_shapes, oa, oh)
        return model_output(out, rd)


class FastSiglip2Model(_TextFeatures, FastencModelMixin, Siglip2Model):
    def get_image_features(self, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        out = _siglip2_vision(
            self.vision_model, self._fastenc, pixel_values, pixel_attention_mask, spatial_shapes, oa, oh
        )
        return model_output(out, rd)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        pixel_attention_mask=None,
        spatial_shapes=None,
        attention_mask=None,
        position_ids=None,
        return_loss=None,
        **kwargs,
    ):
        oa, oh, rd = self._flags(kwargs)
        flags = {"output_attentions": oa, "output_hidden_states": oh, "return_dict": True}
        vision = self.get_image_features(pixel_values, pixel_attention_mask, spatial_shapes, **flags)
        text = self.get_text_features(input_ids, attention_mask, position_ids, **flags)
        return model_output(_sigmoid_logits(self, vision, text, return_loss, Siglip2Output), rd)


FUSED_CLASSES = {
    SiglipModel: FastSiglipModel,
    SiglipTextModel: FastSiglipTextModel,
    SiglipVisionModel: FastSiglipVisionModel,
    Siglip2Model: FastSiglip2Model,
    Siglip2TextModel: FastSiglip2TextModel,
    Siglip2VisionModel: FastSiglip2VisionModel,
}
