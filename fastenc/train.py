"""Contrastive fine-tuning of CLIP / SigLIP with fastenc's fused towers and losses: `fastenc.train.finetune`.

    from fastenc.train import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="/local/clip", data="/data/pairs", steps=1000, batch_size=256,
                                     accum=4, precision="bf16", output_dir="ft"))
    result.losses, result.samples_per_s, result.trace      # per-step loss, throughput, which backend ran each op

The same loop runs as `python examples/finetune_clip.py ...` and `fastenc finetune ...` (flags = FinetuneConfig's
fields, defined with the accepted values in fastenc/train_config.py, which imports no torch), and under
`torchrun --nproc-per-node N` (gloo on CPU, nccl on CUDA).

What one optimizer step computes (every rank, every micro-batch count gives the same math):
    global batch  = `batch_size` pairs, split into world_size shards (rank order), each into `accum` micro-batches
    features      = l2-normalised pooled (projected) embeddings of both towers          # (n, d) per micro-batch
    loss          = fastenc.ops.clip_loss(I, T, exp(logit_scale))                        # CLIPModel
                  | fastenc.ops.siglip_loss(I, T, exp(logit_scale), logit_bias)          # SiglipModel
                    over the WHOLE global batch: with world_size > 1 through fastenc.distributed (each rank its
                    shard, gradients in open_clip's data-parallel convention), then every gradient all-reduced
                    (averaged) once per step, as DDP does;
    accumulation  = open_clip's accum_freq: the features of all micro-batches are computed first without autograd,
                    then each micro-batch runs again with autograd and its features replace its rows of that
                    cached batch before the loss and its backward. The summed gradients are exactly those of one
                    pass over the global batch (the contrastive loss couples every pair, so summing per-micro-batch
                    losses would not be); the price is one extra forward. exp(logit_scale) (and logit_bias) keep
                    their graph in the first micro-batch only, so they get dL/ds once, not `accum` times.
                    Exact when the forward is deterministic (dropout 0: CLIP / SigLIP configs have none);
    then          = grad clipping (global norm), AdamW, learning-rate schedule.

Mixed precision (`precision` bf16 / fp16): with amp="autocast" the forward runs under torch.autocast (fp32 weights,
what transformers models use); with amp="master" the towers are cast to the low dtype, AdamW updates fp32 master
copies (logit_scale / logit_bias stay fp32 throughout) and gradients are accumulated into the masters in fp32.
amp="auto" picks autocast (the fused towers run under it: the bf16 / fp16 GEMM outputs join the fp32 residual
stream in its dtype, as transformers' promotion does); "master" is the choice for memory (towers held in the low
dtype). fp16 uses a GradScaler on CUDA; on CPU fp16 runs without loss scaling.

Fused vs fall-back: `fastenc.optimize(model)` in train() mode runs the fused forward (and the ops' backward) when
dropout is 0; attention dropout > 0 runs the eager attention with dropout, recorded as a fall-back. The first
step runs inside fastenc.trace(): FinetuneResult.trace / .fallbacks say which backend ran each op.

The fine-tuned model is the ORIGINAL transformers object (the optimized model shares its weights), saved with
save_pretrained (fp32) together with the tokenizer / image processor when the model came from a directory.

What a run guarantees (it never saves garbage, never loses its work silently):
- Options are checked before anything is loaded: an InputError names the argument (the CLI flag, `--batch-size`,
  under `fastenc finetune`; the FinetuneConfig field, `batch_size`, in Python) and what was expected.
- `output_dir` must be a writable directory (created if missing) before the first step; the model is saved into a
  temporary folder inside it, read back and compared with the trained weights, then moved into place. A failure
  while saving raises SaveError (the CLI: one error line, exit 2), never a "saved:" line.
- A non-finite loss or gradient norm raises NonFiniteError (the CLI: one error line, exit 1) with
  on_nonfinite="stop" (the default); with "skip-step" the step's optimizer update is skipped (the schedule still
  advances), the skips are counted in the result, and MAX_SKIPPED_IN_A_ROW skipped steps in a row stop the run
  as "stop" does. Weights are checked before every save (model or checkpoint): non-finite weights are never saved.
- An image or caption that cannot be read or decoded is logged on stderr (`fastenc finetune: skipped sample ...`,
  the first MAX_LOGGED of a run), dropped from its batch and counted (FinetuneResult.skipped_samples); a step in
  which every sample failed is an InputError.
- save_every N writes a checkpoint every N steps under output_dir/checkpoints/step-NNNNNNNN (model, fp32 masters,
  AdamW, schedule, GradScaler, the RNG states of torch / CUDA / numpy / random, the step = the data position:
  the sampler is a function of (seed, step)), atomically (a temporary folder, fsync, rename; the newest
  keep_checkpoints are kept). resume ("latest" or a checkpoint folder) checks the checkpoint's format, its digest
  and the settings it was written with (any difference is an InputError listing it), then continues exactly: on
  CPU the final weights equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .core.errors import FastencError, InputError, UnsupportedModelError
from .core.files import file_digest
from .train_config import (
    AMP_MODES,
    BACKENDS,
    CHECKPOINT_DIR,
    DEFAULT_STEPS,
    KINDS,
    LOSS_IMPLS,
    MAX_SKIPPED_IN_A_ROW,
    ON_NONFINITE,
    PRECISIONS,
    SCHEDULES,
    FinetuneConfig,
)

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # keys: PRECISIONS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_LOGGED = 20  # skipped samples printed as they happen (all of them are in FinetuneResult.skipped_samples)
CHECKPOINT_FORMAT = "fastenc-finetune-checkpoint"
CHECKPOINT_VERSION = 1
FAILED = "_failed"  # the key of a dataset item that could not be read: (index, path, message)


class NonFiniteError(FastencError, FloatingPointError):
    """Training produced a non-finite loss, gradient norm or weight; nothing non-finite is saved (CLI: exit 1)."""


class SaveError(FastencError, OSError):
    """Saving the model or a checkpoint failed, or what was written does not read back as written (CLI: exit 2)."""


# Under `fastenc finetune` / examples/finetune_clip.py error messages name the flag (--batch-size), in Python the
# FinetuneConfig field (batch_size): run_cli sets this for the duration of the run.
_CLI_NAMES = contextvars.ContextVar("fastenc_train_cli_names", default=False)
_FLAG_OF = {"fused": "--no-fastenc", "shuffle": "--no-shuffle", "progress": "--no-progress"}


def _arg(name: str) -> str:
    """The name of a FinetuneConfig field as the user wrote it: its CLI flag under the CLI, else the field."""
    if not _CLI_NAMES.get():
        return name
    return _FLAG_OF.get(name, "--" + name.replace("_", "-"))


@dataclass
class FinetuneResult:
    losses: list[float]  # the global-batch loss of every step (before its update)
    step_s: list[float]  # wall time of every step (the first includes warm-up / compilation)
    samples_per_s: float  # global pairs per second over the steps after the first (all steps if only one)
    trace: dict[str, int]  # fastenc.trace() counts of the first step: "triton.attention" -> calls
    fallbacks: list[str]  # fall-backs recorded in the first step ("op: requested -> ran (reason)")
    world_size: int
    amp: str | None  # the mixed-precision mode used (None for fp32)
    output_dir: str | None
    model: torch.nn.Module = field(repr=False)  # the original transformers model, trained weights (fp32)
    skipped_samples: list[dict] = field(default_factory=list)  # unreadable samples {index, path, error} (this rank)
    skipped_steps: int = 0  # steps whose update was skipped (on_nonfinite="skip-step")
    resumed_from: int | None = None  # the checkpoint's step when the run was resumed
    checkpoints: list[str] = field(default_factory=list)  # checkpoint folders written by this run


# ---------------------------------------------------------------------------------------------------- models


def model_kind(model) -> str:
    """The kind of a transformers CLIPModel ("clip") or SiglipModel ("siglip"); UnsupportedModelError otherwise."""
    from transformers import CLIPModel, SiglipModel

    base = getattr(model, "_fastenc_base", type(model))
    if issubclass(base, CLIPModel):
        return "clip"
    if issubclass(base, SiglipModel):
        return "siglip"
    raise UnsupportedModelError(
        f"finetune trains CLIPModel or SiglipModel (both towers + contrastive loss), got {base.__name__}"
    )


def tiny_model(kind: str, seed: int = 0):
    """A tiny random-weight CLIPModel / SiglipModel (2 layers, width 64; images 32x32, patch 8)."""
    from transformers import CLIPModel, SiglipConfig, SiglipModel

    from .models.configs import clip_config

    if kind not in KINDS:
        raise InputError(f"{_arg('tiny')} must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    if kind == "clip":
        return CLIPModel(clip_config("tiny"))
    vocab = 1000
    common = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128)
    text = dict(common, vocab_size=vocab, max_position_embeddings=16, pad_token_id=1, bos_token_id=vocab - 2,
                eos_token_id=vocab - 1, projection_size=64)  # fmt: skip
    vision = dict(common, image_size=32, patch_size=8)
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))


def load_model(cfg: FinetuneConfig):
    """(model, source dir or None): from cfg.model (local directory) or cfg.tiny."""
    if (cfg.model is None) == (cfg.tiny is None):
        raise InputError(
            f"give exactly one of {_arg('model')} (a local checkpoint directory) and {_arg('tiny')} "
            "('clip' or 'siglip')"
        )
    if cfg.tiny is not None:
        return tiny_model(cfg.tiny, cfg.seed), None
    from ._cli_common import load_checkpoint

    model = load_checkpoint(cfg.model, _arg("model"))
    model_kind(model)
    return model, cfg.model


def _pooled(out) -> torch.Tensor:
    """get_*_features returns a tensor in older transformers, a ModelOutput whose pooler_output is it in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def embeddings(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) l2-normalised embeddings, (n, d) each, as CLIPModel / SiglipModel.forward normalise them."""
    img = _pooled(model.get_image_features(pixel_values=batch["pixel_values"]))
    txt = _pooled(model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")))
    return img / img.norm(p=2, dim=-1, keepdim=True), txt / txt.norm(p=2, dim=-1, keepdim=True)


def materialised_loss(kind: str, img, txt, scale, bias=None) -> torch.Tensor:
    """open_clip's ClipLoss / SigLipLoss: the (N, N) logits in the features' dtype, then cross-entropy / logsigmoid."""
    import torch.nn.functional as F

    logits = scale.to(img.dtype) * img @ txt.T  # (N, N)
    n = logits.shape[0]
    if kind == "clip":
        labels = torch.arange(n, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * (logits + bias.to(logits.dtype))).sum() / n


def contrastive_loss(
    kind: str, img, txt, scale, bias=None, *, world_size: int = 1, impl: str = "fastenc", backend=None
):
    """The global-batch loss of (img, txt) (this rank's rows when world_size > 1)."""
    from . import distributed, ops

    if impl == "materialised":
        if world_size > 1:
            raise InputError("loss_impl='materialised' is single-process (the baseline); use 'fastenc' under torchrun")
        return materialised_loss(kind, img, txt, scale, bias)
    lib = distributed if world_size > 1 else ops
    if kind == "clip":
        return lib.clip_loss(img, txt, scale, backend=backend)
    return lib.siglip_loss(img, txt, scale, bias, backend=backend)


# ---------------------------------------------------------------------------------------------------- data


class SyntheticPairs(torch.utils.data.Dataset):
    """n random pairs: pixels ~ N(0, 1) (3, H, W); token ids uniform below the special tokens, the last one EOS.
    Item i is a function of (seed, i) only, so every rank and every run sees the same data."""

    def __init__(self, n: int, *, image_size: int, seq_len: int, vocab_size: int, eos_token_id: int, seed: int = 0):
        if n < 1:
            raise InputError(f"synthetic must be >= 1 pairs, got {n}")
        self.n, self.image_size, self.seq_len, self.seed = n, image_size, seq_len, seed
        self.vocab_size, self.eos = vocab_size, eos_token_id

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        pixels = torch.randn(3, self.image_size, self.image_size, generator=g)
        ids = torch.randint(0, max(1, min(self.vocab_size, self.eos) - 2), (self.seq_len,), generator=g)
        ids[-1] = self.eos
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones(self.seq_len, dtype=torch.long)}


def find_pairs(root: str) -> list[tuple[Path, Path]]:
    """(image, caption) paths under root: every image with a same-name .txt next to it, sorted by path."""
    base = Path(root)
    flag = _arg("data")
    if not base.is_dir():
        raise InputError(f"{flag} {root!r} is not a directory (a folder of images with same-name .txt captions)")
    pairs = []
    try:
        for p in sorted(base.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file():
                pairs.append((p, p.with_suffix(".txt")))
    except OSError as e:
        raise InputError(f"{flag} {root!r} could not be listed: {e}") from None
    if not pairs:
        raise InputError(f"{flag} {root!r} has no image with a same-name .txt caption ({', '.join(IMAGE_SUFFIXES)})")
    return pairs


def _failure(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class ImageTextFolder(torch.utils.data.Dataset):
    """img2dataset layout: `0000/000000001.jpg` + `0000/000000001.txt`. Images go through the model's image
    processor (CLIPImageProcessor / SiglipImageProcessor), captions through its tokenizer padded to seq_len."""

    def __init__(self, root: str, image_processor, tokenizer, seq_len: int, *, with_mask: bool):
        self.pairs = find_pairs(root)
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.seq_len, self.with_mask = seq_len, with_mask

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        """The item of pair i, or {FAILED: (i, path, message)} when its image or caption cannot be read or decoded
        (collate drops it from the batch; finetune logs and counts it)."""
        from PIL import Image

        image_path, text_path = self.pairs[i]
        try:
            with Image.open(image_path) as im:
                im.load()  # decode fully here: a truncated or corrupt file fails now, not inside the processor
                pixels = self.image_processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        except Exception as e:  # noqa: BLE001 - any failure of one sample is logged and skipped, never fatal
            return {FAILED: (i, str(image_path), _failure(e))}
        try:
            caption = text_path.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            return {FAILED: (i, str(text_path), _failure(e))}
        tok = self.tokenizer(
            caption, padding="max_length", truncation=True, max_length=self.seq_len, return_tensors="pt"
        )
        item = {"pixel_values": pixels, "input_ids": tok["input_ids"][0]}
        if self.with_mask and "attention_mask" in tok:
            item["attention_mask"] = tok["attention_mask"][0]
        return item


def load_processors(path: str):
    """(image processor, tokenizer) saved with the checkpoint at `path`; InputError naming what is missing."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(
            f"{_arg('data')} needs the model's tokenizer and image processor saved in {path!r} "
            "(processor.save_pretrained); "
            f"loading them failed: {str(e).splitlines()[0]}"
        ) from None
    return image_processor, tokenizer


def text_length(model, tokenizer=None, requested: int | None = None) -> int:
    max_pos = int(model.config.text_config.max_position_embeddings)
    n = requested
    if n is None:
        n = min(max_pos, int(getattr(tokenizer, "model_max_length", max_pos) or max_pos))
    if not 1 <= n <= max_pos:
        raise InputError(f"{_arg('seq_len')} must be in [1, {max_pos}] (the text tower's positions), got {n}")
    return n


def build_dataset(cfg: FinetuneConfig, model, source: str | None):
    """(dataset, (image processor, tokenizer) or None)."""
    kind = model_kind(model)
    if (cfg.data is None) == (cfg.synthetic <= 0):
        raise InputError(
            f"give exactly one of {_arg('data')} (a folder of image + .txt pairs) and {_arg('synthetic')} N (> 0)"
        )
    if cfg.synthetic > 0:
        tc = model.config.text_config
        eos = tc.eos_token_id if isinstance(tc.eos_token_id, int) else tc.vocab_size - 1
        ds = SyntheticPairs(
            cfg.synthetic,
            image_size=int(model.config.vision_config.image_size),
            seq_len=text_length(model, None, cfg.seq_len),
            vocab_size=int(tc.vocab_size),
            eos_token_id=int(eos),
            seed=cfg.seed,
        )
        return ds, None
    if source is None:
        raise InputError(
            f"{_arg('data')} needs {_arg('model')} (a checkpoint directory with its tokenizer and image processor), "
            f"not {_arg('tiny')}"
        )
    image_processor, tokenizer = load_processors(source)
    ds = ImageTextFolder(
        cfg.data, image_processor, tokenizer, text_length(model, tokenizer, cfg.seq_len), with_mask=kind == "clip"
    )
    return ds, (image_processor, tokenizer)


class StepSampler:
    """Micro-batch index lists of one rank for `steps` optimizer steps: each step takes the next `batch_size`
    indices of a per-epoch permutation (seeded; the same on every rank; the tail of an epoch that does not fill a
    batch is dropped), rank r keeps rows [r * n/W, (r + 1) * n/W) and splits them into `accum` micro-batches.
    A function of (seed, step) only: `start` (a resumed run's step) continues exactly where a run stopped."""

    def __init__(
        self, n: int, steps: int, batch_size: int, accum: int, rank: int, world: int, *, seed: int, shuffle, start=0
    ):
        self.n, self.steps, self.batch, self.accum = n, steps, batch_size, accum
        self.rank, self.world, self.seed, self.shuffle, self.start = rank, world, seed, shuffle, start

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        per_epoch = self.n // self.batch
        shard, micro = self.batch // self.world, self.batch // self.world // self.accum
        order = None
        for step in range(self.start, self.steps):
            epoch, k = divmod(step, per_epoch)
            if k == 0 or order is None:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            rows = order[k * self.batch : (k + 1) * self.batch][self.rank * shard : (self.rank + 1) * shard]
            for j in range(self.accum):
                yield rows[j * micro : (j + 1) * micro].tolist()


def collate(items: list[dict]) -> dict:
    """Stack the items of a micro-batch; items that could not be read are left out, listed under FAILED."""
    good = [it for it in items if FAILED not in it]
    batch = {k: torch.stack([it[k] for it in good]) for k in good[0]} if good else {}
    failed = [it[FAILED] for it in items if FAILED in it]
    if failed:
        batch[FAILED] = failed
    return batch


# ---------------------------------------------------------------------------------------------------- trainer


def _lr_lambda(cfg: FinetuneConfig):
    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, (cfg.steps or DEFAULT_STEPS) - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))

    return f


def resolve_amp(cfg: FinetuneConfig) -> str | None:
    if cfg.precision == "fp32":
        return None
    if cfg.amp == "auto":
        return "autocast"
    return cfg.amp


class ContrastiveTrainer:
    """One optimizer step of contrastive training on `model` (a transformers CLIPModel / SiglipModel; it keeps the
    trained weights). The loop of `finetune` and of bench/bench_training.py."""

    def __init__(self, model, cfg: FinetuneConfig, device: torch.device, *, world_size: int = 1):
        check_config(cfg)
        self.kind = model_kind(model)
        self.cfg, self.device, self.world = cfg, device, world_size
        self.dtype = PRECISION_DTYPES[cfg.precision]
        self.amp = resolve_amp(cfg)
        model.to(device=device, dtype=torch.float32).train()
        self.model = model
        if self.amp == "master":  # towers in the low dtype; logit_scale / logit_bias (model's own) stay fp32
            for child in model.children():
                child.to(self.dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fp32 masters: the parameter itself where it is fp32, else an fp32 copy
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_() for p in self.params]
        self.runner = model
        if cfg.fused:
            from .optimize import optimize

            self.runner = optimize(model, backend=cfg.backend).train()
        decay = [m for m, p in zip(self.masters, self.params, strict=True) if p.ndim >= 2]
        no_decay = [m for m, p in zip(self.masters, self.params, strict=True) if p.ndim < 2]  # biases, norms, scale
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.adam_eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        use_scaler = cfg.precision == "fp16" and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.skipped_steps = 0  # non-finite steps skipped (on_nonfinite="skip-step")
        self.skipped_in_a_row = 0
        self.last_grad_norm: float | None = None

    def _autocast(self):
        if self.amp != "autocast":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _scale_bias(self, keep_graph: bool):
        m = self.model
        scale = m.logit_scale.exp()
        bias = m.logit_bias if self.kind == "siglip" else None
        if keep_graph:
            return scale, bias
        return scale.detach(), None if bias is None else bias.detach()

    def _loss(self, img, txt, keep_graph: bool):
        scale, bias = self._scale_bias(keep_graph)
        return contrastive_loss(
            self.kind, img, txt, scale, bias, world_size=self.world, impl=self.cfg.loss_impl, backend=self.cfg.backend
        )

    def _backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        for p, m in zip(self.params, self.masters, strict=True):  # low-precision grads land in fp32 masters
            if m is not p and p.grad is not None:
                if m.grad is None:
                    m.grad = p.grad.float()
                else:
                    m.grad += p.grad.float()
                p.grad = None

    def forward_backward(self, micro: list[dict]) -> float:
        """Gradients of the global-batch loss over this rank's micro-batches, accumulated in the masters'
        .grad (not reduced across ranks). Returns the loss."""
        micro = [{k: v.to(self.device, non_blocking=True) for k, v in mb.items()} for mb in micro]
        if len(micro) == 1:
            with self._autocast():
                img, txt = embeddings(self.runner, micro[0])
                loss = self._loss(img, txt, True)
            self._backward(loss)
            return float(loss.detach())
        with torch.no_grad(), self._autocast():
            cached = [embeddings(self.runner, mb) for mb in micro]  # 2 x (n_j, d) per micro-batch
        value = None
        for j, mb in enumerate(micro):
            with self._autocast():
                img_j, txt_j = embeddings(self.runner, mb)
                img = torch.cat([c[0] for c in cached[:j]] + [img_j] + [c[0] for c in cached[j + 1 :]])
                txt = torch.cat([c[1] for c in cached[:j]] + [txt_j] + [c[1] for c in cached[j + 1 :]])
                loss = self._loss(img, txt, j == 0)
            self._backward(loss)
            value = float(loss.detach()) if value is None else value
        return value

    def all_reduce_grads(self) -> None:
        """Average the masters' gradients over ranks (one flat all-reduce, as DDP's buckets)."""
        import torch.distributed as dist

        grads = [m.grad for m in self.masters if m.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _nonfinite(self, loss: float, norm: torch.Tensor) -> bool:
        """Whether this step's loss or gradient norm is not finite (agreed over ranks). Under a GradScaler an inf
        gradient is the scaler's business (it skips the step and lowers the scale); a non-finite loss is not."""
        bad = not math.isfinite(loss) or (self.scaler is None and not bool(torch.isfinite(norm)))
        if self.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([float(bad)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        return bad

    def _skip(self, loss: float) -> None:
        """The policy for a non-finite step: raise (stop), or skip its update (skip-step) up to a limit."""
        self.optimizer.zero_grad(set_to_none=True)
        step = self.scheduler.last_epoch + 1
        what = f"step {step}: the loss is {loss} and the gradient norm {self.last_grad_norm} (not finite)"
        hint = f"a smaller {_arg('lr')}, a {_arg('warmup')} or {_arg('max_grad_norm')} usually helps"
        if self.cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"{what}; training stopped ({_arg('on_nonfinite')} stop), nothing saved: {hint}")
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteError(
                f"{what}; {self.skipped_in_a_row} steps in a row were not finite, training stopped "
                f"({_arg('on_nonfinite')} skip-step stops after {MAX_SKIPPED_IN_A_ROW}), nothing saved: {hint}"
            )
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": meant, when step 1 is skipped
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # the schedule stays a function of the step index

    def step(self, micro: list[dict]) -> float:
        """One optimizer step on this rank's micro-batches; returns the global-batch loss. A non-finite loss or
        gradient norm raises NonFiniteError (on_nonfinite="stop") or skips the update ("skip-step")."""
        loss = self.forward_backward(micro)
        if self.world > 1:
            self.all_reduce_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.masters, self.cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([m.grad for m in self.masters if m.grad is not None])
        self.last_grad_norm = float(norm)
        if self._nonfinite(loss, norm):
            self._skip(loss)
            return loss
        self.skipped_in_a_row = 0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                if m is not p:
                    p.copy_(m)  # in place: lands in fastenc's fused q/k/v buffers, shared with the original model
        return loss

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue exactly: weights (and fp32 masters), AdamW, schedule, GradScaler."""
        return {
            "model": self.model.state_dict(),
            "masters": [m.detach() for m in self.masters] if self.amp == "master" else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "skipped_steps": self.skipped_steps,
            "skipped_in_a_row": self.skipped_in_a_row,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` in place (the fused towers share these tensors)."""
        with torch.no_grad():
            own = self.model.state_dict()
            missing = set(own) ^ set(state["model"])
            if missing:
                raise InputError(f"the checkpoint's weights do not match the model: {sorted(missing)[:5]}")
            for k, v in state["model"].items():
                if own[k].shape != v.shape:
                    raise InputError(
                        f"the checkpoint's {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}"
                    )
                own[k].copy_(v)
            if state["masters"] is not None:
                for m, v in zip(self.masters, state["masters"], strict=True):
                    m.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps, self.skipped_in_a_row = state["skipped_steps"], state["skipped_in_a_row"]

    def finish(self) -> torch.nn.Module:
        """The original model in fp32 holding the master weights (what is saved)."""
        if self.amp == "master":
            with torch.no_grad():
                for child in self.model.children():
                    child.float()
                for p, m in zip(self.params, self.masters, strict=True):
                    p.copy_(m)
        return self.model


def _int(v, lo: int, hi: int | None = None, *, none: bool = False) -> bool:
    if v is None:
        return none
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v < hi)


def _real(v, *, positive: bool = False, none: bool = False, below: float | None = None) -> bool:
    if v is None:
        return none
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    return (v > 0 if positive else v >= 0) and (below is None or v < below)


def check_config(cfg: FinetuneConfig) -> None:
    """InputError naming the argument (the flag under the CLI) for values the loop cannot use, before any model
    or data is loaded."""
    betas = cfg.betas
    betas_ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_real(b, below=1.0) for b in betas)
    checks = (
        ("steps", _int(cfg.steps, 1, none=True), "an integer >= 1"),
        ("epochs", _int(cfg.epochs, 1, none=True), "an integer >= 1"),
        ("batch_size", _int(cfg.batch_size, 1), "an integer >= 1"),
        ("accum", _int(cfg.accum, 1), "an integer >= 1"),
        ("synthetic", _int(cfg.synthetic, 0), "an integer >= 0 (pairs)"),
        ("lr", _real(cfg.lr, positive=True), "a finite number > 0"),
        ("weight_decay", _real(cfg.weight_decay), "a finite number >= 0"),
        ("betas", betas_ok, "two numbers in [0, 1)"),
        ("adam_eps", _real(cfg.adam_eps, positive=True), "a finite number > 0"),
        ("warmup", _int(cfg.warmup, 0), "an integer >= 0"),
        ("max_grad_norm", _real(cfg.max_grad_norm, none=True), "a finite number >= 0 (0 or None: no clipping)"),
        ("seq_len", _int(cfg.seq_len, 1, none=True), "an integer >= 1"),
        ("workers", _int(cfg.workers, 0), "an integer >= 0"),
        ("seed", _int(cfg.seed, 0, 2**32), "an integer in [0, 2**32)"),
        ("precision", cfg.precision in PRECISIONS, f"one of {sorted(PRECISIONS)}"),
        ("amp", cfg.amp in AMP_MODES, f"one of {AMP_MODES}"),
        ("schedule", cfg.schedule in SCHEDULES, f"one of {SCHEDULES}"),
        ("loss_impl", cfg.loss_impl in LOSS_IMPLS, f"one of {LOSS_IMPLS}"),
        ("backend", cfg.backend in BACKENDS, f"one of {BACKENDS}"),
        ("tiny", cfg.tiny is None or cfg.tiny in KINDS, f"one of {KINDS}"),
        ("on_nonfinite", cfg.on_nonfinite in ON_NONFINITE, f"one of {ON_NONFINITE}"),
        ("save_every", _int(cfg.save_every, 0), "an integer >= 0 (steps; 0: no checkpoints)"),
        ("keep_checkpoints", _int(cfg.keep_checkpoints, 1), "an integer >= 1"),
    )
    for name, ok, expected in checks:
        if not ok:
            raise InputError(f"{_arg(name)} must be {expected}, got {getattr(cfg, name)!r}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise InputError(f"give {_arg('steps')} or {_arg('epochs')}, not both")
    if cfg.save_every and not cfg.output_dir:
        raise InputError(f"{_arg('save_every')} needs {_arg('output_dir')} (checkpoints are written below it)")
    if cfg.resume is not None and not isinstance(cfg.resume, (str, os.PathLike)):
        raise InputError(f"{_arg('resume')} must be 'latest' or a checkpoint folder, got {cfg.resume!r}")
    if cfg.resume == "latest" and not cfg.output_dir:
        raise InputError(f"{_arg('resume')} latest needs {_arg('output_dir')} (its checkpoints are resumed)")


def check_output_dir(path: str) -> None:
    """InputError unless `path` is (or can be created as) a directory this process can write into: checked with a
    real file (access() says yes to root for anything), before any model is loaded."""
    import tempfile

    flag = _arg("output_dir")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{flag} {str(path)!r} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fastenc-write-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{flag} {str(path)!r} is not a writable directory: {e.strerror or e}") from None


def check_finite_weights(model, what: str) -> None:
    """NonFiniteError naming the first tensor of `model` holding a NaN or an inf (never saved)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name} holds non-finite values; {what} refused (non-finite weights are never saved)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for f in root.iterdir():
        if f.is_file():
            _fsync(f)
    _fsync(root)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return [folder / "model.safetensors"]


def verify_saved(model, folder: Path) -> None:
    """SaveError unless `folder` holds a config.json that parses and safetensors weights that read back equal to
    `model`'s (every tensor, bit for bit; tied aliases may be stored once)."""
    from safetensors import safe_open

    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
        own = model.state_dict()
        seen, ptrs = set(), set()
        for f in _weight_files(folder):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if k not in own or not torch.equal(st.get_tensor(k), own[k].detach().cpu()):
                        raise SaveError(f"{f} does not hold the trained {k}")
                    seen.add(k)
                    ptrs.add(own[k].data_ptr())
        lost = [k for k in own if k not in seen and own[k].data_ptr() not in ptrs]
        if lost:
            raise SaveError(f"the saved weights miss {lost[:3]}")
    except SaveError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever fails to read back means the save is not usable
        raise SaveError(f"the saved model in {folder} does not read back: {_failure(e)}") from None


def save_output(model, processors, output_dir: str, save_processor: bool = True) -> None:
    """save_pretrained into a temporary folder inside output_dir, read it back (verify_saved), then move the files
    into place (replacing an older save's weight files). SaveError on any failure; nothing half-written is left."""
    check_finite_weights(model, f"saving to {_arg('output_dir')} {output_dir!r}")
    out = Path(output_dir)
    tmp = out / f".fastenc-saving-{os.getpid()}"
    try:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            if processors is not None and save_processor:
                for proc in processors:
                    proc.save_pretrained(tmp)
            _fsync_tree(tmp)
            verify_saved(model, tmp)
            new = {f.name for f in tmp.iterdir()}
            for old in out.iterdir():  # an older save's weight shards would be mixed with these
                if old.is_file() and old.name not in new and re.fullmatch(r"model[-.].*safetensors.*", old.name):
                    old.unlink()
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
            _fsync(out)
        except OSError as e:
            raise SaveError(f"saving the model to {_arg('output_dir')} {output_dir!r} failed: {_failure(e)}") from None
        missing = [n for n in new if not (out / n).is_file()]
        if missing:
            raise SaveError(f"saving the model to {_arg('output_dir')} {output_dir!r} failed: {missing} not written")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "random": random.getstate(),
    }


def _set_rng_state(s: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(s["random"])


# how a run is run, not what it computes: free to differ on a resume
_NOT_SETTINGS = ("model", "data", "output_dir", "workers", "progress", "save_processor", "save_every")
_NOT_SETTINGS += ("keep_checkpoints", "resume")


def run_settings(cfg: FinetuneConfig, model, dataset, world: int, device: torch.device) -> dict:
    """Everything a checkpoint's numbers depend on: the options, the architecture (parameter names, shapes,
    dtypes), the data (its size and, for a folder, its file list), world size and device type. A resume must
    match it exactly."""
    s = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_SETTINGS}
    arch = hashlib.sha256()
    for name, t in model.state_dict().items():
        arch.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    s["architecture"] = arch.hexdigest()[:16]
    files = hashlib.sha256()
    for image, _ in getattr(dataset, "pairs", ()):
        files.update(str(image.relative_to(cfg.data)).encode() + b"\0")
    s["data_pairs"] = len(dataset)
    s["data_files"] = files.hexdigest()[:16]
    s["world_size"] = world
    s["device"] = device.type
    return json.loads(json.dumps(s))  # tuples as lists: what meta.json gives back


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(root: Path, trainer: ContrastiveTrainer, step: int, settings: dict, extra: dict, keep: int) -> Path:
    """root/step-NNNNNNNN: state.pt (torch.save of the trainer state, RNG states, the step and `extra`) and
    meta.json (format, step, settings, the sha256 of state.pt), written in a temporary folder, fsynced and renamed
    into place; the newest `keep` are kept. SaveError on a failure (the previous checkpoints stay intact)."""
    from ._version import __version__

    check_finite_weights(trainer.model, f"the checkpoint of step {step}")
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state = {**trainer.state_dict(), "rng": _rng_state(), "step": step, **extra}
        torch.save(state, tmp / "state.pt")
        _fsync(tmp / "state.pt")
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fastenc": __version__, "step": step,
                "state_sha256": file_digest(tmp / "state.pt"), "settings": settings}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # a resume from an older checkpoint passes this step again
            old = root / f".old-step-{step:08d}-{os.getpid()}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        _fsync(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"writing the checkpoint {final} failed: {_failure(e)}") from None
    for _, old in _step_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(cfg: FinetuneConfig) -> Path:
    """The checkpoint folder cfg.resume names ("latest": the newest under output_dir/checkpoints)."""
    flag = _arg("resume")
    if cfg.resume == "latest":
        root = Path(cfg.output_dir) / CHECKPOINT_DIR
        found = _step_dirs(root)
        if not found:
            raise InputError(f"{flag} latest: no checkpoint under {str(root)!r} (written by {_arg('save_every')} N)")
        return found[-1][1]
    path = Path(cfg.resume)
    if not path.is_dir():
        raise InputError(f"{flag} {str(cfg.resume)!r} is not a checkpoint folder")
    return path


def load_checkpoint_state(path: Path, settings: dict) -> dict:
    """The state of checkpoint `path` after checking that it is one (format, version), that state.pt is the file
    meta.json describes (sha256) and that it was written with `settings`; InputError naming the path otherwise."""
    flag = _arg("resume")
    where = f"{flag} {str(path)!r}"
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{where} is not a fastenc finetune checkpoint (meta.json: {_failure(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{where} is not a fastenc finetune checkpoint (meta.json lacks format {CHECKPOINT_FORMAT!r})")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{where} is a version {meta.get('version')} checkpoint; this fastenc reads version "
                         f"{CHECKPOINT_VERSION}")  # fmt: skip
    theirs = meta.get("settings") or {}
    diff = [f"{k} {theirs.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(theirs) | set(settings))
            if theirs.get(k) != settings.get(k)]  # fmt: skip
    if diff:
        raise InputError(f"{where} was written with other settings ({'; '.join(diff)}): resume with the same options")
    state_file = path / "state.pt"
    if not state_file.is_file() or file_digest(state_file) != meta.get("state_sha256"):
        raise InputError(f"{where} is corrupt: state.pt is missing or does not match its sha256 in meta.json")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the state is a corrupt checkpoint
        raise InputError(f"{where} is corrupt: state.pt does not load ({_failure(e)})") from None
    if state.get("step") != meta.get("step"):
        raise InputError(f"{where} is corrupt: state.pt holds step {state.get('step')}, meta.json {meta.get('step')}")
    return state


# ---------------------------------------------------------------------------------------------------- finetune


def _distributed(cfg: FinetuneConfig):
    """(rank, world_size, device, initialised here). Under torchrun (WORLD_SIZE > 1) the process group is
    initialised when nobody did: nccl on CUDA, gloo on CPU."""
    import torch.distributed as dist

    from ._cli_common import parse_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    if world <= 1:
        return 0, 1, parse_device(cfg.device, "device"), False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = parse_device(cfg.device, "device")
    if device.type == "cuda" and cfg.device in (None, "cuda"):
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mine = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        mine = True
    return dist.get_rank(), dist.get_world_size(), device, mine


def _log_skipped(failed, skipped: dict, bar) -> None:
    """One stderr line per sample that could not be read (the first MAX_LOGGED of a run), as `fastenc embed`
    logs its failed samples; each sample is counted once however many epochs meet it."""
    for i, path, msg in failed:
        if i in skipped:
            continue
        skipped[i] = {"index": i, "path": path, "error": msg}
        n = len(skipped)
        if n <= MAX_LOGGED:
            more = " (further skipped samples are counted, not printed)" if n == MAX_LOGGED else ""
            bar.write(f"fastenc finetune: skipped sample {i} {path!r}: {msg}{more}", file=sys.stderr)


def _resolve_steps(cfg: FinetuneConfig, n_pairs: int) -> FinetuneConfig:
    if cfg.epochs is not None:
        return dataclasses.replace(cfg, steps=cfg.epochs * (n_pairs // cfg.batch_size), epochs=None)
    return dataclasses.replace(cfg, steps=cfg.steps if cfg.steps is not None else DEFAULT_STEPS)


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune a CLIPModel / SiglipModel contrastively (see the module docstring); save it to cfg.output_dir."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from .core.trace import trace

    check_config(cfg)
    if cfg.output_dir:
        check_output_dir(cfg.output_dir)
    rank, world, device, mine = _distributed(cfg)
    try:
        if cfg.batch_size % (world * cfg.accum):
            raise InputError(
                f"{_arg('batch_size')} {cfg.batch_size} must be divisible by world size x {_arg('accum')} = "
                f"{world} x {cfg.accum}"
            )
        model, source = load_model(cfg)
        dataset, processors = build_dataset(cfg, model, source)
        if len(dataset) < cfg.batch_size:
            raise InputError(
                f"the data has {len(dataset)} pairs, fewer than one batch ({_arg('batch_size')} {cfg.batch_size})"
            )
        cfg = _resolve_steps(cfg, len(dataset))
        if world > 1:
            model.to(device)  # nccl broadcasts device tensors
            with torch.no_grad():  # the same start on every rank (tiny models are seeded; checkpoints identical)
                for p in model.parameters():
                    dist.broadcast(p.data, 0)
        trainer = ContrastiveTrainer(model, cfg, device, world_size=world)
        settings = run_settings(cfg, model, dataset, world, device)
        start, losses, skipped, resumed_from = 0, [], {}, None
        if cfg.resume is not None:
            path = find_checkpoint(cfg)
            state = load_checkpoint_state(path, settings)
            trainer.load_state_dict(state)
            _set_rng_state(state["rng"])
            start, losses = state["step"], list(state["losses"])
            skipped = {int(d["index"]): d for d in json.loads(state["skipped_samples"])}
            resumed_from = start
            if rank == 0 and cfg.progress:
                print(f"fastenc finetune: resumed from step {start} of {cfg.steps} ({path})", file=sys.stderr)
        sampler = StepSampler(
            len(dataset), cfg.steps, cfg.batch_size, cfg.accum, rank, world, seed=cfg.seed, shuffle=cfg.shuffle,
            start=start,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
        )
        times, counts, fallbacks, written = [], {}, [], []
        root = Path(cfg.output_dir) / CHECKPOINT_DIR if cfg.output_dir else None
        bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and rank == 0), desc="finetune",
                   unit="step")  # fmt: skip
        it = iter(loader)
        for step in range(start, cfg.steps):
            micro = []
            for _ in range(cfg.accum):
                mb = next(it)
                _log_skipped(mb.pop(FAILED, ()), skipped, bar)
                if mb:
                    micro.append(mb)
            if not micro:
                raise InputError(
                    f"{_arg('data')} {cfg.data!r}: every sample of step {step + 1} failed to read (see the skipped "
                    "samples above)"
                )
            t0 = time.perf_counter()
            with trace() if step == start else contextlib.nullcontext() as t:
                loss = trainer.step(micro)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            if step == start:
                counts = dict(t.counts)
                fallbacks = [f"{f.op}: {f.requested} -> {f.ran} ({f.reason})" for f in t.fallbacks]
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{cfg.batch_size / times[-1]:.1f}")
            bar.update(1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and rank == 0:
                extra = {"losses": losses, "skipped_samples": json.dumps(list(skipped.values()))}
                written.append(str(save_checkpoint(root, trainer, step + 1, settings, extra, cfg.keep_checkpoints)))
        bar.close()
        timed = times[1:] or times
        model = trainer.finish()
        if cfg.output_dir and rank == 0:
            save_output(model, processors, cfg.output_dir, cfg.save_processor)
        if world > 1:
            dist.barrier()
        return FinetuneResult(
            losses=losses,
            step_s=times,
            samples_per_s=cfg.batch_size * len(timed) / sum(timed) if timed and sum(timed) > 0 else 0.0,
            trace=counts,
            fallbacks=fallbacks,
            world_size=world,
            amp=trainer.amp,
            output_dir=cfg.output_dir,
            model=model,
            skipped_samples=sorted(skipped.values(), key=lambda d: d["index"]),
            skipped_steps=trainer.skipped_steps,
            resumed_from=resumed_from,
            checkpoints=written,
        )
    finally:
        if mine:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- CLI


def config_from_args(args) -> FinetuneConfig:
    names = set(FinetuneConfig.__dataclass_fields__)
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return FinetuneConfig(**kw)


def run_cli(args) -> int:
    """Run finetune from parsed flags; print a summary (rank 0). Exit status 0; 1 when training stopped on a
    non-finite loss, gradient norm or weight (one `fastenc finetune: error:` line, nothing saved). Bad input
    (InputError, SaveError) propagates to the caller's one-line handler (exit 2); error messages name the flags."""
    from ._cli_common import fail

    token = _CLI_NAMES.set(True)
    try:
        res = finetune(config_from_args(args))
    except NonFiniteError as e:
        fail("finetune", e)
        return 1
    finally:
        _CLI_NAMES.reset(token)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    summary = {k: getattr(res, k) for k in FinetuneResult.__dataclass_fields__ if k != "model"}
    if getattr(args, "json", False):
        print(json.dumps(summary))
    else:
        if res.losses:
            print(
                f"finetune: {len(res.losses)} steps, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}, "
                f"{res.samples_per_s:.1f} samples/s, world size {res.world_size}, amp {res.amp}"
            )
        if res.resumed_from is not None:
            print(f"resumed from step {res.resumed_from}")
        print("ops (first step): " + (", ".join(f"{k} x{v}" for k, v in sorted(res.trace.items())) or "-"))
        for f in res.fallbacks:
            print(f"fall-back: {f}")
        if res.skipped_samples:
            print(f"skipped samples: {len(res.skipped_samples)} (unreadable image or caption; logged on stderr)")
        if res.skipped_steps:
            print(f"skipped steps: {res.skipped_steps} (non-finite loss or gradient norm; --on-nonfinite skip-step)")
        if res.checkpoints:
            print(f"checkpoints: {len(res.checkpoints)}, the last {res.checkpoints[-1]}")
        if res.output_dir:
            print(f"saved: {res.output_dir}")
    return 0
