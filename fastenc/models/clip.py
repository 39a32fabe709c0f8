"""Fused CLIP towers: CLIPModel, CLIPTextModel(WithProjection), CLIPVisionModel(WithProjection).

Each fused class subclasses the transformers class it replaces and overrides `forward` (and CLIPModel's
get_text_features / get_image_features) with one pass over the same weights:

    x = embeddings                                    # (B, S, D)
    per layer:  h, x = LN1(x + delta)                 # residual add of the previous layer fused into the norm
                q, k, v = h @ Wqkv^T + bqkv           # one GEMM, (B, S, 3, H, Dh) viewed as 3 x (B, H, S, Dh)
                a = attention(q, k, v, causal, key_padding_mask) @ Wo^T + bo
                h, x = LN2(x + a)                     # fused residual + norm
                delta = act(h @ W1^T + b1) @ W2^T + b2 # bias + activation fused
    text:   last = final_LN(x + delta), pooled = last[eos]      vision: last = x + delta, pooled = post_LN(last[:, 0])
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPOutput, CLIPTextModelOutput, CLIPVisionModelOutput

from ._base import ExecutionState, project
from ._encoder import (
    FastencModelMixin,
    image_embeddings,
    model_output,
    run_encoder,
    text_transformer,
    tower_output,
)

# ------------------------------------------------------------------------------------------------------ towers


def clip_text_tower_forward(
    tower, state: ExecutionState, input_ids, attention_mask, position_ids, *, output_attentions, output_hidden_states
) -> BaseModelOutputWithPooling:
    """The CLIP text transformer of `tower` (a module with embeddings, encoder.layers, final_layer_norm)."""
    last, input_ids, hidden, attns = text_transformer(
        tower,
        state,
        input_ids,
        attention_mask,
        position_ids,
        causal=True,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
    )
    # the model's own eos_token_id (set from the config at construction), as transformers' forward reads it
    eos = tower.__dict__.get("eos_token_id", tower.config.eos_token_id)
    if eos == 2:  # legacy configs (before transformers PR 24773): the EOS token has the highest id
        pos = input_ids.argmax(dim=-1)
    else:  # first position of eos_token_id (pad may equal eos)
        pos = (input_ids == eos).int().argmax(dim=-1)
    b, d = last.shape[0], last.shape[-1]
    pooled = last.gather(1, pos.view(b, 1, 1).expand(b, 1, d)).view(b, d)  # last[rows, pos]: (B, D)
    n_layers = len(tower._modules["encoder"]._modules["layers"])
    return tower_output(BaseModelOutputWithPooling, last, pooled, hidden, attns, output_hidden_states, n_layers)


def clip_vision_tower_forward(
    tower, state: ExecutionState, pixel_values, interpolate_pos_encoding, *, output_attentions, output_hidden_states
) -> BaseModelOutputWithPooling:
    """The CLIP vision transformer of `tower` (embeddings, pre_layrnorm, encoder.layers, post_layernorm)."""
    x = image_embeddings(tower, pixel_values, interpolate_pos_encoding)  # (B, 1 + patches, D)
    layer_norm = state.plan(x.device).layer_norm
    pre = tower.pre_layrnorm
    x = layer_norm(x, pre.weight, pre.bias, pre.eps, None)
    x, delta, hidden, attns = run_encoder(
        tower,
        x,
        state,
        causal=False,
        key_padding_mask=None,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
    )
    last = x + delta
    if hidden is not None:
        hidden.append(last)
    post = tower.post_layernorm
    pooled = layer_norm(last[:, 0, :], post.weight, post.bias, post.eps, None)
    return tower_output(
        BaseModelOutputWithPooling, last, pooled, hidden, attns, output_hidden_states, len(tower.encoder.layers)
    )


# ------------------------------------------------------------------------------------------------------ models


class FastCLIPTextModel(FastencModelMixin, CLIPTextModel):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        out = clip_text_tower_forward(
            self,
            self._fastenc,
            input_ids,
            attention_mask,
            position_ids,
            output_attentions=oa,
            output_hidden_states=oh,
        )
        return model_output(out, rd)


class FastCLIPVisionModel(FastencModelMixin, CLIPVisionModel):
    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        out = clip_vision_tower_forward(
            self, self._fastenc, pixel_values, interpolate_pos_encoding, output_attentions=oa, output_hidden_states=oh
        )
        return model_output(out, rd)


class FastCLIPTextModelWithProjection(FastencModelMixin, CLIPTextModelWithProjection):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        t = clip_text_tower_forward(
            self.text_model,
            self._fastenc,
            input_ids,
            attention_mask,
            position_ids,
            output_attentions=oa,
            output_hidden_states=oh,
        )
        out = CLIPTextModelOutput(
            text_embeds=project(self.text_projection, t.pooler_output),
            last_hidden_state=t.last_hidden_state,
            hidden_states=t.hidden_states,
            attentions=t.attentions,
        )
        return model_output(out, rd)


class FastCLIPVisionModelWithProjection(FastencModelMixin, CLIPVisionModelWithProjection):
    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        v = clip_vision_tower_forward(
            self.vision_model,
            self._fastenc,
            pixel_values,
            interpolate_pos_encoding,
            output_attentions=oa,
            output_hidden_states=oh,
        )
        out = CLIPVisionModelOutput(
            image_embeds=project(self.visual_projection, v.pooler_output),
            last_hidden_state=v.last_hidden_state,
            hidden_states=v.hidden_states,
            attentions=v.attentions,
        )
        return model_output(out, rd)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # the same arithmetic as transformers' _get_vector_norm (pow, sum, sqrt), so logits match bit for bit in fp32
    return x / torch.pow(torch.sum(torch.pow(x, 2), dim=-1, keepdim=True), 0.5)


class FastCLIPModel(FastencModelMixin, CLIPModel):
    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        t = clip_text_tower_forward(
            self.text_model,
            self._fastenc,
            input_ids,
            attention_mask,
            position_ids,
            output_attentions=oa,
            output_hidden_states=oh,
        )
        t.pooler_output = project(self.text_projection, t.pooler_output)
        return model_output(t, rd)

    def get_image_features(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        oa, oh, rd = self._flags(kwargs)
        v = clip_vision_tower_forward(
            self.vision_model,
            self._fastenc,
            pixel_values,
            interpolate_pos_encoding,
            output_attentions=oa,
            output_hidden_states=oh,
        )
        v.pooler_output = project(self.visual_projection, v.pooler_output)
        return model_output(v, rd)

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
        image_embeds = _l2_normalize(vision.pooler_output)
        text_embeds = _l2_normalize(text.pooler_output)
        logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * self.logit_scale.exp()
        logits_per_image = logits_per_text.t()
        loss = None
        if return_loss:
            labels = torch.arange(len(logits_per_text), device=logits_per_text.device)
            ce = torch.nn.functional.cross_entropy
            loss = (ce(logits_per_text, labels) + ce(logits_per_text.t(), labels)) / 2.0
        out = CLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text,
            vision_model_output=vision,
        )
        return model_output(out, rd)


# transformers class -> fused class. Exact classes only: a subclass may change forward in ways we cannot see.
FUSED_CLASSES = {
    CLIPModel: FastCLIPModel,
    CLIPTextModel: FastCLIPTextModel,
    CLIPTextModelWithProjection: FastCLIPTextModelWithProjection,
    CLIPVisionModel: FastCLIPVisionModel,
    CLIPVisionModelWithProjection: FastCLIPVisionModelWithProjection,
}
