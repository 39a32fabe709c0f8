"""Binding probe: does this CLIP / SigLIP encoder tell "a red cube next to a blue sphere" from "a blue cube next to
a red sphere"? Scores an image against a prompt and its variants, and (text-only mode) compares prompt embeddings.

Python:
    caption_variants("a red cube next to a blue sphere")        -> Variants (a list; .reason when empty)
    binding_probe(model, tokenizer_or_processor, image, prompt)  -> ProbeReport   (.table(), .to_dict(), .to_json())
    text_similarity(model, tokenizer, prompts)                   -> SimilarityReport
    probe_file(path, model, tokenizer, image=None)               -> BatchReport  (one pair per line, tqdm bar)
CLI (wired by fastenc.cli): fastenc probe --model DIR [--image IMG] --prompt "..." [--variant ...]* [--pairs FILE]
    [--text-only] [--json] [--threshold T]

Margins are in logits: logit = logit_scale * cos(image, caption) (+ logit_bias for SigLIP), the numbers the model's
own softmax / sigmoid turn into probabilities. A margin m of the true caption over a variant means the model prefers
the true caption by a factor e^m in a two-way softmax; margin < threshold (default 1.0, odds under e:1, i.e. a
two-way probability under 0.73) is flagged "distinction not represented by this encoder".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import FastencError, InputError, UnsupportedModelError
from .tokens import check_prompts

if TYPE_CHECKING:  # torch is imported where it is used: `fastenc probe --help` loads no torch
    import torch

DEFAULT_THRESHOLD = 1.0
FLAG = "distinction not represented by this encoder"

# ------------------------------------------------------------------------------------------- caption variants

COLOURS = ("red blue green yellow black white orange purple pink brown gray grey golden silver").split()
# swap partner used when a prompt has only one colour (attribute change rather than attribute swap)
_OTHER_COLOUR = {"red": "blue", "blue": "red", "green": "purple", "purple": "green", "yellow": "black",
                 "black": "white", "white": "black", "orange": "blue", "pink": "green", "brown": "white",
                 "gray": "red", "grey": "red", "golden": "silver", "silver": "golden"}  # fmt: skip
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
           "eight": 8, "nine": 9, "ten": 10}  # fmt: skip
_NUMBER_WORDS = {v: k for k, v in NUMBERS.items() if k not in ("a", "an")}
# relation -> its inverse (None: symmetric, or no inverse word); longest phrases first so the regex prefers them
RELATIONS = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "in front of": "behind",
    "on top of": "under",
    "next to": None,
    "left of": "right of",
    "right of": "left of",
    "behind": "in front of",
    "under": "on",
    "below": "above",
    "above": "below",
    "on": "under",
    "riding": None,
    "chasing": None,
    "holding": None,
    "inside": None,
    "beside": None,
}
SYMMETRIC = {"next to", "beside"}

_DET = r"(?P<{p}det>a|an|the|one|two|three|four|five|six|seven|eight|nine|ten)"
_COL = r"(?:(?P<{p}col>" + "|".join(COLOURS) + r")\s+)?"
_NP = _DET + r"\s+" + _COL + r"(?P<{p}noun>[a-z]+)"
_REL = "|".join(re.escape(r) for r in sorted(RELATIONS, key=len, reverse=True))
_PATTERN = re.compile(
    r"^\s*" + _NP.format(p="s") + r"(?:\s+(?P<rel>" + _REL + r")\s+" + _NP.format(p="o") + r")?\s*\.?\s*$",
    re.IGNORECASE,
)


@dataclass
class Variant:
    text: str
    kind: str  # "attribute-swap" | "attribute-change" | "count-change" | "relation-swap" | "role-swap" | "user"
    detail: str = ""


class Variants(list):
    """A list of Variant; `reason` says why it is empty (prompt not recognised) or is None."""

    reason: str | None = None


@dataclass
class _NPart:
    det: str
    col: str | None
    noun: str

    def render(self) -> str:
        words = [w for w in (self.col, self.noun) if w]
        det = self.det
        if det.lower() in ("a", "an"):
            det = "an" if words[0][0].lower() in "aeiou" else "a"
        return " ".join([det, *words])


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in tuple("aeiou"):
        return noun[:-1] + "ies"
    return noun + "s"


def _singular(noun: str) -> str:
    if noun.endswith("ies"):
        return noun[:-3] + "y"
    if noun.endswith(("ses", "xes", "zes", "ches", "shes")):
        return noun[:-2]
    if noun.endswith("s") and not noun.endswith("ss"):
        return noun[:-1]
    return noun


def _count_changed(np_: _NPart) -> _NPart | None:
    n = NUMBERS.get(np_.det.lower())
    if n is None:  # "the": no count to change
        return None
    if n == 1:
        return _NPart("two", np_.col, _plural(np_.noun))
    if n == 2:
        return _NPart("one", np_.col, _singular(np_.noun))
    return _NPart(_NUMBER_WORDS[n - 1], np_.col, np_.noun)


def caption_variants(prompt: str) -> Variants:
    """Auto-generate hard negatives for a simple prompt. Recognised (case-insensitive, optional final period):

        NP [RELATION NP]      NP = DET [COLOUR] NOUN
        DET      a | an | the | one .. ten
        COLOUR   red blue green yellow black white orange purple pink brown gray grey golden silver
        NOUN     one word (plurals made by simple English rules: cat -> cats, box -> boxes, fly -> flies)
        RELATION next to | beside | on | on top of | under | below | above | behind | in front of |
                 (to the) left of | (to the) right of | riding | chasing | holding | inside

    Variants produced:
        attribute-swap    both NPs coloured differently: the colours trade places ("a blue X next to a red Y")
        attribute-change  one colour only: it becomes another colour ("a red X" -> "a blue X")
        count-change      each NP with a number/article: one <-> two, n -> n - 1 ("two X on a Y" -> "one X ...")
        relation-swap     a relation with an inverse is replaced by it ("on" -> "under", "left of" -> "right of")
        role-swap         asymmetric relations: subject and object trade places ("an astronaut riding a horse")
    Symmetric relations (next to, beside) get no role swap: it would mean the same thing. An unrecognised prompt
    returns an empty Variants whose `.reason` says why; pass variants yourself then."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt is empty")
    m = _PATTERN.match(prompt)
    out = Variants()
    if m is None:
        out.reason = (
            "prompt not recognised: the generator understands 'DET [COLOUR] NOUN [RELATION DET [COLOUR] NOUN]' "
            "(e.g. 'a red cube next to a blue sphere', 'two cats on a table', 'a horse riding an astronaut'); "
            "pass variants explicitly"
        )
        return out
    g = {k: (v.lower() if v else v) for k, v in m.groupdict().items()}
    subj = _NPart(g["sdet"], g["scol"], g["snoun"])
    obj = _NPart(g["odet"], g["ocol"], g["onoun"]) if g["rel"] else None
    rel = g["rel"]

    def sentence(s: _NPart, r: str | None, o: _NPart | None) -> str:
        return s.render() if r is None else f"{s.render()} {r} {o.render()}"

    seen = {sentence(subj, rel, obj)}

    def add(text, kind, detail):
        if text not in seen:
            seen.add(text)
            out.append(Variant(text, kind, detail))

    # attributes
    if obj is not None and subj.col and obj.col and subj.col != obj.col:
        s2, o2 = _NPart(subj.det, obj.col, subj.noun), _NPart(obj.det, subj.col, obj.noun)
        add(sentence(s2, rel, o2), "attribute-swap", f"{subj.col} <-> {obj.col}")
    else:
        for who, np_ in (("subject", subj), ("object", obj)):
            if np_ is not None and np_.col:
                new = _NPart(np_.det, _OTHER_COLOUR[np_.col], np_.noun)
                s2, o2 = (new, obj) if who == "subject" else (subj, new)
                add(sentence(s2, rel, o2), "attribute-change", f"{who} {np_.col} -> {new.col}")
    # counts
    for who, np_ in (("subject", subj), ("object", obj)):
        new = _count_changed(np_) if np_ is not None else None
        if new is not None:
            s2, o2 = (new, obj) if who == "subject" else (subj, new)
            add(sentence(s2, rel, o2), "count-change", f"{who} {np_.det} -> {new.det}")
    # relations
    if rel is not None:
        inverse = RELATIONS[rel]
        if inverse:
            add(sentence(subj, inverse, obj), "relation-swap", f"{rel} -> {inverse}")
        if rel not in SYMMETRIC:
            add(sentence(obj, rel, subj), "role-swap", f"{subj.noun} <-> {obj.noun}")
    return out


# ------------------------------------------------------------------------------------------ model plumbing

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
_CONTRASTIVE = ("CLIPModel", "SiglipModel")
_TEXT = _CONTRASTIVE + ("CLIPTextModel", "CLIPTextModelWithProjection", "SiglipTextModel")


def _base_name(model) -> str:
    return getattr(model, "_fastenc_base", type(model)).__name__


def _family(model) -> str:
    return "siglip" if _base_name(model).startswith("Siglip") else "clip"


def _split_processor(processor_or_tokenizer):
    """(tokenizer, image_processor or None) from a processor (has .tokenizer) or a plain tokenizer."""
    if processor_or_tokenizer is None:
        raise InputError("processor_or_tokenizer is None: pass a tokenizer or a processor")
    tok = getattr(processor_or_tokenizer, "tokenizer", None)
    if tok is not None:
        return tok, getattr(processor_or_tokenizer, "image_processor", None)
    if not callable(processor_or_tokenizer):
        raise InputError(f"processor_or_tokenizer must be a tokenizer or processor, got {type(processor_or_tokenizer)}")
    return processor_or_tokenizer, None


def _text_config(model):
    return getattr(model.config, "text_config", model.config)


def _tokenize(tokenizer, model, prompts: list[str]) -> torch.Tensor:
    """input_ids (N, S) padded to the model's maximum length, as diffusion front-ends and SigLIP's training do; the
    towers then run without an attention mask (CLIP is causal, SigLIP pools the last position)."""
    s = _text_config(model).max_position_embeddings
    enc = tokenizer(prompts, padding="max_length", max_length=s, truncation=True, return_tensors="pt")
    return enc["input_ids"].to(next(model.parameters()).device)


def _text_outputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (N, P), per-token (N, S, D)) for every supported text-bearing class."""
    import torch

    name = _base_name(model)
    with torch.no_grad():
        if name in _CONTRASTIVE:
            out = model.get_text_features(input_ids=ids, return_dict=True)
            return out.pooler_output, out.last_hidden_state
        out = model(input_ids=ids, return_dict=True)
    pooled = out.text_embeds if name == "CLIPTextModelWithProjection" else out.pooler_output
    return pooled, out.last_hidden_state


# ------------------------------------------------------------------------------------------------- images


def _vision_config(model):
    return model.config.vision_config


def _preprocess_tensor(img: torch.Tensor, model) -> torch.Tensor:
    """A raw image (3, H, W) in [0, 1] -> pixel_values (1, 3, S, S). CLIP: resize the short side to S (bicubic,
    antialiased), centre-crop S x S, normalise with CLIP's mean/std. SigLIP: resize to S x S, mean = std = 0.5.
    (What the transformers image processors do, without needing one or PIL.)"""
    import torch
    import torch.nn.functional as F

    size = _vision_config(model).image_size
    x = img.float().unsqueeze(0)
    if _family(model) == "clip":
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        mean, std = SIGLIP_MEAN, SIGLIP_STD
    x = x.clamp(0, 1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def _raw_to_chw(a: torch.Tensor, arg: str) -> torch.Tensor:
    """uint8 (H, W, 3) or (3, H, W) -> float (3, H, W) in [0, 1]."""
    if a.dim() == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (3, 4):
        a = a[..., :3].permute(2, 0, 1)
    if a.dim() != 3 or a.shape[0] != 3:
        raise InputError(f"{arg}: a raw image must be (H, W, 3) or (3, H, W), got {tuple(a.shape)}")
    return a.float() / 255.0


def _pil_to_chw(img) -> torch.Tensor:
    import numpy as np
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def _is_pil(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(obj, Image.Image)


def load_pixel_values(image, model, image_processor=None) -> tuple[torch.Tensor, str]:
    """(pixel_values (1, 3, S, S), a description) from:
      - a float tensor (1, 3, S, S) or (3, S, S): taken as pixel_values, already preprocessed;
      - a uint8 tensor / numpy array (H, W, 3) or (3, H, W): a raw image, preprocessed as below;
      - a PIL image, or a path to an image file (needs Pillow, which fastenc does not require);
      - a path to a `.pt` (torch.save of a tensor) or `.npy` file: read, then as the tensors above.
    A PIL/raw image goes through `image_processor` when one is given (a processor loaded with the model), else
    through `_preprocess_tensor` (resize/crop/normalise in torch with the model family's mean/std)."""
    import numpy as np
    import torch

    size = _vision_config(model).image_size
    desc = type(image).__name__
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        desc = str(path)
        if not path.is_file():
            raise InputError(f"image: file {str(path)!r} does not exist")
        if path.suffix.lower() == ".pt":
            try:
                image = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise InputError(f"image: cannot read {str(path)!r} as a torch tensor: {e}") from e
        elif path.suffix.lower() == ".npy":
            try:
                image = np.load(path, allow_pickle=False)
            except Exception as e:
                raise InputError(f"image: cannot read {str(path)!r} as a .npy array: {e}") from e
        else:
            try:
                from PIL import Image, UnidentifiedImageError
            except ImportError as e:
                raise InputError(
                    f"image: reading {path.suffix or 'image'} files needs Pillow (pip install pillow); "
                    "or pass a .pt/.npy tensor file or a pixel_values tensor"
                ) from e
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (UnidentifiedImageError, OSError) as e:
                raise InputError(f"image: cannot read {str(path)!r} as an image: {e}") from e
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image.copy())
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            chw = _raw_to_chw(image, "image")
        elif image.is_floating_point():
            pv = image.unsqueeze(0) if image.dim() == 3 else image
            if pv.dim() != 4 or pv.shape[0] != 1 or tuple(pv.shape[1:]) != (3, size, size):
                raise InputError(
                    f"image: a float tensor is taken as pixel_values and must be (1, 3, {size}, {size}) or "
                    f"(3, {size}, {size}), got {tuple(image.shape)} (pass raw images as uint8)"
                )
            return pv, f"pixel_values {tuple(pv.shape)}" if desc == "Tensor" else desc
        else:
            raise InputError(f"image: tensor dtype {image.dtype} is neither uint8 (raw) nor float (pixel_values)")
    elif _is_pil(image):
        if image_processor is not None:
            pv = image_processor(images=image, return_tensors="pt")["pixel_values"]
            return pv, desc
        chw = _pil_to_chw(image)
    else:
        raise InputError(f"image must be a path, a PIL image or a tensor, got {type(image).__name__}")
    return _preprocess_tensor(chw, model), f"{desc} (resized/normalised in torch)"


# ------------------------------------------------------------------------------------------------- reports


@dataclass
class CaptionScore:
    caption: str
    kind: str  # "true" or a Variant kind
    cosine: float
    logit: float
    prob: float  # softmax over all captions for this image
    sigmoid: float | None = None  # SigLIP: independent match probability
    margin: float | None = None  # logit(true) - logit(this); None for the true caption
    cosine_margin: float | None = None
    flagged: bool = False
    detail: str = ""


@dataclass
class ProbeReport:
    model: str
    image: str
    prompt: str
    threshold: float
    captions: list[CaptionScore] = field(default_factory=list)
    note: str = ""

    @property
    def flagged(self) -> list[CaptionScore]:
        return [c for c in self.captions if c.flagged]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flagged"] = [c.caption for c in self.flagged]
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        sig = any(c.sigmoid is not None for c in self.captions)
        w = max(len(c.caption) for c in self.captions)
        head = f"{'caption':<{w}}  {'kind':<16} {'cosine':>8} {'logit':>8} {'softmax':>8}"
        head += f" {'sigmoid':>8}" if sig else ""
        head += f" {'margin':>8}  verdict"
        lines = [f"binding probe: {self.model}  image: {self.image}  threshold: {self.threshold:g} logits", head]
        for c in self.captions:
            row = f"{c.caption:<{w}}  {c.kind:<16} {c.cosine:>8.4f} {c.logit:>8.3f} {c.prob:>8.4f}"
            row += f" {c.sigmoid:>8.4f}" if sig else ""
            row += f" {'' if c.margin is None else format(c.margin, '.3f'):>8}  "
            row += FLAG if c.flagged else ("" if c.margin is None else "ok")
            lines.append(row)
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


@dataclass
class PairSimilarity:
    a: str
    b: str
    pooled: float  # cosine of the pooled (projected where the model has a projection) embeddings
    token_mean: float  # mean token-wise cosine over the positions either prompt occupies (BOS..EOS)
    token_all: float  # mean token-wise cosine over the whole padded sequence, as cross-attention sees it


@dataclass
class SimilarityReport:
    model: str
    prompts: list[str]
    pooled: list[list[float]]  # (N, N)
    token_mean: list[list[float]]  # (N, N)
    pairs: list[PairSimilarity] = field(default_factory=list)  # prompt 0 against each other prompt

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        w = max(len(p.b) for p in self.pairs) if self.pairs else 10
        lines = [
            f"text similarity: {self.model}",
            f"reference: {self.prompts[0]}",
            f"{'other prompt':<{w}}  {'pooled':>8} {'tokens':>8} {'seq':>8}",
        ]
        for p in self.pairs:
            lines.append(f"{p.b:<{w}}  {p.pooled:>8.4f} {p.token_mean:>8.4f} {p.token_all:>8.4f}")
        lines.append("pooled: cosine of pooled embeddings; tokens: mean token-wise cosine over occupied positions; "
                     "seq: over the whole padded sequence")  # fmt: skip
        return "\n".join(lines)


@dataclass
class BatchReport:
    reports: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"reports": [r.to_dict() for r in self.reports]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        return "\n\n".join(r.table() for r in self.reports)


def _model_label(model) -> str:
    label = _base_name(model)
    rt = getattr(model, "_fastenc", None)
    return f"{label} (fastenc, backend={rt.backend})" if rt is not None else f"{label} (transformers)"


# ------------------------------------------------------------------------------------------------- probes


def binding_probe(
    model,
    processor_or_tokenizer,
    image,
    prompt: str,
    variants: Sequence[str] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> ProbeReport:
    """Score `image` against `prompt` and its variants with a CLIPModel or SiglipModel (plain or fastenc-optimized).

    variants: captions to compare against; None generates them with `caption_variants` (InputError with the reason
    when the prompt is not recognised). image: see `load_pixel_values`. Each variant gets margin = logit(prompt) -
    logit(variant) and is flagged "distinction not represented by this encoder" when margin < threshold."""
    import torch

    name = _base_name(model)
    if name not in _CONTRASTIVE:
        raise UnsupportedModelError(f"binding_probe needs a CLIPModel or SiglipModel, got {type(model).__name__}")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise InputError(f"threshold must be a finite number, got {threshold!r}")
    prompt = check_prompts([prompt], "prompt")[0]
    if variants is None:
        gen = caption_variants(prompt)
        if not gen:
            raise InputError(f"prompt {prompt!r}: {gen.reason}")
        kinds = [(v.text, v.kind, v.detail) for v in gen]
    else:
        kinds = [(v, "user", "") for v in check_prompts(list(variants), "variants")]
    tok, image_processor = _split_processor(processor_or_tokenizer)
    captions = [prompt] + [k[0] for k in kinds]
    p = next(model.parameters())
    pv, desc = load_pixel_values(image, model, image_processor)
    pv = pv.to(device=p.device, dtype=p.dtype)
    ids = _tokenize(tok, model, captions)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pv, return_dict=True)
    cos = (out.text_embeds.float() @ out.image_embeds.float().t())[:, 0]  # (N,)
    logits = out.logits_per_image[0].float()  # (N,)
    probs = logits.softmax(-1)
    sig = torch.sigmoid(logits) if name == "SiglipModel" else None
    rows = []
    for i, cap in enumerate(captions):
        kind, detail = ("true", "") if i == 0 else kinds[i - 1][1:]
        margin = None if i == 0 else float(logits[0] - logits[i])
        rows.append(
            CaptionScore(
                caption=cap,
                kind=kind,
                cosine=float(cos[i]),
                logit=float(logits[i]),
                prob=float(probs[i]),
                sigmoid=None if sig is None else float(sig[i]),
                margin=margin,
                cosine_margin=None if i == 0 else float(cos[0] - cos[i]),
                flagged=margin is not None and margin < threshold,
                detail=detail,
            )
        )
    return ProbeReport(_model_label(model), desc, prompt, float(threshold), rows)


def text_similarity(model, tokenizer, prompts: Sequence[str]) -> SimilarityReport:
    """Cosine similarity between prompt embeddings, pooled and per token.

    Each prompt is padded to the model's maximum length (77 for CLIP). pooled: the model's pooled text embedding
    (projected for CLIPModel / *WithProjection / SiglipModel). token_mean[i][j]: mean over the positions occupied by
    either prompt (BOS..EOS of the longer one) of the cosine between the two prompts' hidden states at the same
    position; pairs[k].token_all: the same mean over all padded positions (what a diffusion model's cross-attention
    receives). Word-order swaps such as "a horse riding an astronaut" / "an astronaut riding a horse" typically
    show pooled cosine near 1."""
    import torch
    import torch.nn.functional as F

    if _base_name(model) not in _TEXT:
        raise UnsupportedModelError(f"text_similarity supports {', '.join(_TEXT)}, got {type(model).__name__}")
    prompts = check_prompts(prompts, "prompts")
    if len(prompts) < 2:
        raise InputError("prompts needs at least two prompts to compare")
    tok, _ = _split_processor(tokenizer)
    ids = _tokenize(tok, model, prompts)  # (N, S)
    pooled, seq = _text_outputs(model, ids)
    pooled = F.normalize(pooled.float(), dim=-1)
    seq = F.normalize(seq.float(), dim=-1)  # (N, S, D)
    pooled_sim = pooled @ pooled.t()  # (N, N)
    tokwise = torch.einsum("isd,jsd->ijs", seq, seq)  # (N, N, S)
    lengths = _occupied_lengths(tok, ids)  # (N,)
    n = len(prompts)
    token_mean = torch.empty(n, n)
    for i in range(n):
        for j in range(n):
            m = int(max(lengths[i], lengths[j]))
            token_mean[i, j] = tokwise[i, j, :m].mean()
    pairs = [
        PairSimilarity(prompts[0], prompts[j], float(pooled_sim[0, j]), float(token_mean[0, j]),
                       float(tokwise[0, j].mean()))
        for j in range(1, n)
    ]  # fmt: skip
    return SimilarityReport(_model_label(model), prompts, pooled_sim.tolist(), token_mean.tolist(), pairs)


def _occupied_lengths(tok, ids: torch.Tensor) -> list[int]:
    """Tokens up to and including the first EOS (BOS..EOS), per row."""
    eos = getattr(tok, "eos_token_id", None)
    out = []
    for row in ids.tolist():
        out.append(row.index(eos) + 1 if eos is not None and eos in row else len(row))
    return out


def read_pairs(path) -> list[tuple[str, str]]:
    """Prompt pairs from a text file: one pair a line, separated by a tab or '|'; blank lines and '#' comments
    are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pairs: file {str(path)!r} does not exist")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split("\t") if "\t" in s else s.split("|")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise InputError(f"pairs: {path}:{n}: expected two prompts separated by a tab or '|', got {line!r}")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise InputError(f"pairs: {path} holds no prompt pairs")
    return pairs


def probe_file(
    path,
    model,
    processor_or_tokenizer,
    *,
    image=None,
    threshold: float = DEFAULT_THRESHOLD,
    progress: bool = True,
) -> BatchReport:
    """Batch mode over a file of prompt pairs (see `read_pairs`), with a tqdm progress bar on stderr. With an
    image: binding_probe(prompt=first, variants=[second]) per pair; without: text_similarity([first, second])."""
    from tqdm.auto import tqdm

    pairs = read_pairs(path)
    report = BatchReport()
    for a, b in tqdm(pairs, desc="fastenc probe", unit="pair", disable=not progress, file=sys.stderr):
        if image is not None:
            report.reports.append(binding_probe(model, processor_or_tokenizer, image, a, [b], threshold))
        else:
            report.reports.append(text_similarity(model, processor_or_tokenizer, [a, b]))
    return report


# ------------------------------------------------------------------------------------------------------ CLI


def add_probe_parser(subparsers) -> argparse.ArgumentParser:
    """Add `probe` to an argparse subparsers object; the handler is `run_probe(args) -> int`."""
    s = subparsers.add_parser(
        "probe",
        help="binding probe: image vs prompt and variants (CLIP/SigLIP), or text-only prompt similarity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--model", required=True, help="local checkpoint directory (model + tokenizer); never downloaded")
    s.add_argument("--image", help="image file (.png/.jpg need Pillow), .pt/.npy tensor file")
    s.add_argument("--prompt", help="the true caption")
    s.add_argument("--variant", action="append", default=None, help="a variant caption (repeatable); default: auto")
    s.add_argument("--pairs", help="file of prompt pairs, one per line, tab- or '|'-separated (batch mode)")
    s.add_argument("--text-only", action="store_true", help="compare prompt embeddings, no image")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="flag margins below this (logits)")
    s.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    s.add_argument("--strict", action="store_true", help="raise instead of falling back")
    s.add_argument("--no-optimize", action="store_true", help="run the plain transformers model")
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar in --pairs mode")
    s.set_defaults(func=run_probe)
    return s


def _load_local(path: str):
    from transformers import AutoTokenizer

    from .._cli_common import load_checkpoint

    model = load_checkpoint(path, "--model")  # InputError for a missing folder or one without a loadable model
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise InputError(f"--model {path!r}: no tokenizer could be loaded from it: {e}") from e
    image_processor = None
    try:
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception:
        image_processor = None  # none saved, or Pillow/torchvision missing: preprocess in torch
    return model, tok, image_processor


class _Processor:
    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor


def run_probe(args) -> int:
    """Handler of `fastenc probe`. Prints a table (or JSON with --json); returns 0, or 2 on bad input."""
    try:
        return _run_probe(args)
    except FastencError as e:
        from .._cli_common import fail

        return fail("probe", e)


def _run_probe(args) -> int:
    if args.pairs is None and not args.prompt:
        raise InputError("--prompt is required (or --pairs FILE)")
    if args.pairs is None and args.prompt is not None and not args.prompt.strip():
        raise InputError("--prompt is empty")
    if not args.text_only and args.image is None:
        raise InputError("--image is required unless --text-only")
    if args.image is not None and not os.path.isfile(args.image):
        raise InputError(f"--image {args.image!r} does not exist")
    from .._cli_common import check_backend_env, parse_device

    device = parse_device(args.device)
    if not args.no_optimize:
        check_backend_env()
    model, tok, image_processor = _load_local(args.model)
    model = model.to(device).eval()
    if not args.no_optimize:
        import fastenc

        model = fastenc.optimize(model, backend=args.backend, strict=args.strict)
    proc = _Processor(tok, image_processor)
    image = None if args.text_only else args.image
    if args.pairs is not None:
        report = probe_file(
            args.pairs, model, proc, image=image, threshold=args.threshold, progress=not args.no_progress
        )
    elif args.text_only:
        others = args.variant
        if not others:
            gen = caption_variants(args.prompt)
            if not gen:
                raise InputError(f"--prompt {args.prompt!r}: {gen.reason}")
            others = [v.text for v in gen]
        report = text_similarity(model, proc, [args.prompt, *others])
    else:
        report = binding_probe(model, proc, image, args.prompt, args.variant, args.threshold)
    print(report.to_json(indent=2) if args.json else report.table())
    return 0


__all__ = [
    "BatchReport",
    "CaptionScore",
    "ProbeReport",
    "SimilarityReport",
    "Variant",
    "Variants",
    "add_probe_parser",
    "binding_probe",
    "caption_variants",
    "load_pixel_values",
    "probe_file",
    "read_pairs",
    "run_probe",
    "text_similarity",
]
