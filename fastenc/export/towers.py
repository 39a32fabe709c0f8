"""What the exporters need to know about each supported tower: the plain transformers module to trace, input and
output names, which axes are dynamic, example inputs of any size, and the ONNX Runtime optimizer's settings.

Supported (exact classes, as in `fastenc.optimize`): CLIPModel, CLIPTextModel(WithProjection),
CLIPVisionModel(WithProjection), SiglipModel, SiglipTextModel, SiglipVisionModel, Siglip2TextModel, T5EncoderModel,
UMT5EncoderModel. Left out: Siglip2VisionModel / Siglip2Model (NaFlex resizes the position embeddings to the
data-dependent `spatial_shapes`, which does not trace to a shape-generic graph).

Inputs are named as transformers names them, and by default they are the inputs of Optimum's ONNX config for the same
tower (optimum/exporters/onnx/model_configs.py; `OPTIMUM_MASK`): CLIP text (CLIPTextOnnxConfig /
CLIPTextWithProjectionOnnxConfig), T5 encoders (T5EncoderOnnxConfig) and SigLIP text take "input_ids" only, which is
how diffusers calls them; the joint CLIPModel takes "input_ids", "attention_mask", "pixel_values" (CLIPOnnxConfig), the
joint SiglipModel "input_ids", "pixel_values". transformers' forward makes the mask optional for every one of these
towers: `attention_mask=True` exports it as an input (needed for T5 on padded batches, or left padding),
`attention_mask=False` leaves it out (a graph without a mask computes what transformers computes when called without
one). Vision towers take "pixel_values" (image size fixed by the position embeddings). Outputs are the ModelOutput
fields holding a tensor, in transformers' order (the same names as Optimum's configs); the nested `text_model_output` /
`vision_model_output` of the joint models and None fields (`loss`, `hidden_states`, `attentions`) are left out.

Dynamic axis names: "batch" and "sequence" for one tower; the joint models have independent "text_batch" and
"image_batch" (their logits are image_batch x text_batch) and "sequence".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..core.errors import InputError, UnsupportedModelError


def _classes() -> dict[type, str]:
    import transformers as tf

    names = {
        "CLIPModel": "clip",
        "CLIPTextModel": "clip_text",
        "CLIPTextModelWithProjection": "clip_text",
        "CLIPVisionModel": "clip_vision",
        "CLIPVisionModelWithProjection": "clip_vision",
        "SiglipModel": "siglip",
        "SiglipTextModel": "siglip_text",
        "SiglipVisionModel": "siglip_vision",
        "Siglip2TextModel": "siglip_text",
        "T5EncoderModel": "t5",
        "UMT5EncoderModel": "t5",
    }
    return {getattr(tf, n): kind for n, kind in names.items() if hasattr(tf, n)}


def supported_classes() -> list[str]:
    return sorted(c.__name__ for c in _classes())


# ORT transformer optimizer model_type per tower kind: the one whose fusion set fires most on that graph (measured on
# random-weight tiny towers; see the README of fastenc.export). "clip" fuses QuickGelu and the vision Attention;
# "bert" fuses Gelu / FastGelu / BiasGelu and Attention; "t5" fuses SimplifiedLayerNormalization and the relative
# position bias.
ORT_MODEL_TYPE = {
    "clip": "clip",
    "clip_text": "clip",
    "clip_vision": "clip",
    "siglip": "bert",
    "siglip_text": "bert",
    "siglip_vision": "bert",
    "t5": "t5",
}


# attention_mask=None: whether the tower's graph takes an "attention_mask" input, as Optimum's ONNX config for it does
# (CLIPTextOnnxConfig / CLIPTextWithProjectionOnnxConfig / SiglipTextOnnxConfig / T5EncoderOnnxConfig: input_ids only;
# CLIPOnnxConfig: input_ids, pixel_values, attention_mask; SiglipOnnxConfig: input_ids, pixel_values). Vision towers
# have no text input.
OPTIMUM_MASK = {"clip": True, "clip_text": False, "t5": False, "siglip": False, "siglip_text": False}


@dataclass
class Tower:
    """One exportable model: `module` is the plain transformers module traced (for a fastenc-optimized model, a
    shallow copy as its transformers class, sharing the weights)."""

    module: torch.nn.Module
    kind: str
    inputs: list[str]
    input_axes: dict[str, dict[int, str]]
    max_sequence: int | None  # text position limit (CLIP, SigLIP); None: relative positions (T5)
    outputs: list[str] = field(default_factory=list)
    output_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    output_shapes: dict[str, tuple] = field(default_factory=dict)  # at the example sizes
    output_class: str = ""  # "module:qualname" of the ModelOutput the module returns (recorded in the ONNX metadata)
    nested: bool = False  # joint models: also export the nested outputs' tensors ("text_model_output.pooler_output")
    nested_classes: dict[str, str] = field(default_factory=dict)  # nested field -> "module:qualname"

    @property
    def class_name(self) -> str:
        return type(self.module).__name__

    @property
    def ort_model_type(self) -> str:
        return ORT_MODEL_TYPE[self.kind]

    @property
    def heads_and_hidden(self) -> tuple[int, int]:
        """(num_heads, hidden_size) for the ORT optimizer. The joint models get their vision tower's: the optimizer
        takes one pair per graph, and ORT's Attention fusion matches only the vision tower (not CLIP's causal text)."""
        cfg = self.module.config
        if self.kind == "t5":
            return cfg.num_heads, cfg.d_model
        if self.kind in ("clip", "siglip"):
            cfg = cfg.vision_config
        return cfg.num_attention_heads, cfg.hidden_size

    def _text_config(self):
        cfg = self.module.config
        return getattr(cfg, "text_config", None) if self.kind in ("clip", "siglip") else cfg

    def _vision_config(self):
        cfg = self.module.config
        return getattr(cfg, "vision_config", None) if self.kind in ("clip", "siglip") else cfg

    def make_inputs(self, batch: int, seq: int = 8, *, image_batch: int | None = None, seed: int = 0) -> dict:
        """Random inputs of the given sizes on the module's device: token ids below the EOS / special ids, one EOS
        per row at a varying position (right padding after it, masked for CLIP and T5), random pixels."""
        p = next(self.module.parameters())
        g = torch.Generator().manual_seed(seed)
        out = {}
        if "input_ids" in self.inputs:
            text = self._text_config()
            vocab = text.vocab_size
            eos, pad = (
                t if isinstance(t, int) and 0 <= t < vocab else None for t in (text.eos_token_id, text.pad_token_id)
            )
            legacy = self.kind.startswith("clip") and eos == 2  # CLIP pools at the highest id
            hi = vocab - 3 if legacy else max(3, min(vocab, eos if eos and eos > 3 else vocab) - 2)
            ids = torch.randint(3, max(4, hi), (batch, seq), generator=g)
            mask = torch.ones(batch, seq, dtype=torch.long)
            for i in range(batch):
                n = seq - (i * 5) % seq if i else seq  # row 0 full length, others shorter
                n = max(1, n)
                ids[i, n - 1] = (vocab - 1) if legacy else (eos if eos is not None else 1)
                if n < seq:
                    ids[i, n:] = pad if pad is not None else 0
                    mask[i, n:] = 0
            out["input_ids"] = ids.to(p.device)
            if "attention_mask" in self.inputs:
                out["attention_mask"] = mask.to(p.device)
        if "pixel_values" in self.inputs:
            vis = self._vision_config()
            nb = image_batch if (image_batch is not None and "input_ids" in self.inputs) else batch
            px = torch.randn(nb, vis.num_channels, vis.image_size, vis.image_size, generator=g)
            out["pixel_values"] = px.to(device=p.device, dtype=p.dtype)
        return out

    def example_sizes(self) -> dict[str, int]:
        """Axis name -> size of the example used to trace; distinct sizes so output axes can be told apart."""
        sizes = {}
        for axes in self.input_axes.values():
            for name in axes.values():
                sizes[name] = {"batch": 2, "text_batch": 2, "image_batch": 3, "sequence": 7}[name]
        return sizes

    def inputs_for_sizes(self, sizes: dict[str, int], seed: int = 0) -> dict:
        batch = sizes.get("batch", sizes.get("text_batch", sizes.get("image_batch", 1)))
        return self.make_inputs(batch, sizes.get("sequence", 8), image_batch=sizes.get("image_batch"), seed=seed)

    def run(self, inputs: dict) -> dict[str, torch.Tensor]:
        """The module's tensor outputs by field name (no grad)."""
        with torch.no_grad():
            out = self.module(**inputs, return_dict=True)
        cls = type(out)
        self.output_class = f"{cls.__module__}:{cls.__qualname__}"
        res = {}
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                res[k] = v
            elif self.nested and hasattr(v, "items"):
                sub = type(v)
                self.nested_classes[k] = f"{sub.__module__}:{sub.__qualname__}"
                res.update({f"{k}.{k2}": v2 for k2, v2 in v.items() if isinstance(v2, torch.Tensor)})
        return res

    def infer_outputs(self) -> None:
        """Fill `outputs` and `output_axes` by running the module at the example sizes and once more per axis with
        that axis grown: an output dimension that follows an input axis is dynamic with the same name."""
        base_sizes = self.example_sizes()
        base = {k: tuple(v.shape) for k, v in self.run(self.inputs_for_sizes(base_sizes)).items()}
        self.outputs = list(base)
        self.output_shapes = base
        self.output_axes = {k: {} for k in base}
        for axis in base_sizes:
            grown = dict(base_sizes, **{axis: base_sizes[axis] + 2})
            shapes = {k: tuple(v.shape) for k, v in self.run(self.inputs_for_sizes(grown)).items()}
            for k, shape in base.items():
                for d, (a, b) in enumerate(zip(shape, shapes[k], strict=True)):
                    if a != b:
                        self.output_axes[k][d] = axis


@contextlib.contextmanager
def eager_attention(module: torch.nn.Module):
    """Trace with transformers' eager attention (explicit MatMul/Softmax, the pattern ORT's Attention fusion knows);
    the configs' previous choice is restored afterwards (they are shared with the caller's model)."""
    configs = [module.config] + [
        getattr(module.config, n) for n in ("text_config", "vision_config") if getattr(module.config, n, None)
    ]
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, b in zip(configs, before, strict=True):
            c._attn_implementation = b


def tower_of(model, attention_mask: bool | None = None) -> Tower:
    """The Tower for a transformers model or a fastenc-optimized one (exported as its transformers class: plain
    ONNX ops, the same weights). Raises UnsupportedModelError for any other class.

    attention_mask: None -> Optimum's choice for the tower (`OPTIMUM_MASK`); True -> "attention_mask" is an input;
    False -> it is not (the graph computes transformers' forward without a mask)."""
    if attention_mask is not None and not isinstance(attention_mask, bool):
        raise InputError(f"attention_mask must be None, True or False, got {attention_mask!r}")
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"model must be a transformers model (torch.nn.Module), got {type(model).__name__}")
    classes = _classes()
    base = getattr(model, "_fastenc_base", type(model))
    kind = classes.get(base)
    if kind is None:
        raise UnsupportedModelError(
            f"fastenc.export does not support {base.__module__}.{base.__name__}; supported: "
            f"{', '.join(supported_classes())}"
        )
    if base is not type(model):
        from ..models._base import shallow_copy_as

        model = shallow_copy_as(model, base)
    if model.training:
        raise InputError("model is in training mode; call model.eval() before exporting (dropout would be traced)")
    dtypes = {p.dtype for p in model.parameters()}
    if not dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        raise UnsupportedModelError(f"model parameters must be fp32/fp16/bf16, got {sorted(map(str, dtypes))}")
    if kind not in OPTIMUM_MASK:  # vision towers
        if attention_mask:
            raise InputError(f"attention_mask=True: {type(model).__name__} has no text input to mask")
        axes = {"pixel_values": {0: "batch"}}
    else:
        mask = OPTIMUM_MASK[kind] if attention_mask is None else attention_mask
        batch = "text_batch" if kind in ("clip", "siglip") else "batch"
        axes = {"input_ids": {0: batch, 1: "sequence"}}
        if mask:
            axes["attention_mask"] = {0: batch, 1: "sequence"}
        if kind in ("clip", "siglip"):
            axes["pixel_values"] = {0: "image_batch"}
    max_seq = None
    if kind != "t5" and "input_ids" in axes:
        cfg = model.config
        max_seq = getattr(getattr(cfg, "text_config", cfg), "max_position_embeddings", None)
    return Tower(module=model, kind=kind, inputs=list(axes), input_axes=axes, max_sequence=max_seq)
