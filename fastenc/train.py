"""Contrastive fine-tuning of CLIP / SigLIP with fastenc's fused towers and losses: `fastenc.train.finetune`.

    from fastenc.train import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="/local/clip", data="/data/pairs", steps=1000, batch_size=256,
                                     accum=4, precision="bf16", output_dir="ft"))
    result.losses, result.samples_per_s, result.trace      # per-step loss, throughput, which backend ran each op

The same loop runs as `python examples/finetune_clip.py ...` and `fastenc finetune ...` (flags = the fields below),
and under `torchrun --nproc-per-node N` (gloo on CPU, nccl on CUDA).

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
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError, UnsupportedModelError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_MODES = ("auto", "autocast", "master")
KINDS = ("clip", "siglip")
LOSS_IMPLS = ("fastenc", "materialised")
SCHEDULES = ("cosine", "constant")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class FinetuneConfig:
    """Every knob of `finetune` (the CLI flags have the same names, `_` as `-`)."""

    model: str | None = None  # a local save_pretrained directory (CLIPModel / SiglipModel); never downloaded
    tiny: str | None = None  # "clip" | "siglip": a tiny random-weight model instead of --model
    data: str | None = None  # a folder of images with same-name .txt captions (img2dataset layout)
    synthetic: int = 0  # N random (pixels, tokens) pairs instead of --data
    output_dir: str | None = None  # save_pretrained of the fine-tuned model here (rank 0)
    steps: int = 10  # optimizer steps
    batch_size: int = 32  # pairs per optimizer step over all ranks and micro-batches (the contrastive batch)
    accum: int = 1  # micro-batches per step and rank
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    warmup: int = 0  # linear warm-up steps
    schedule: str = "cosine"  # after warm-up: "cosine" (to 0 at `steps`) or "constant"
    max_grad_norm: float | None = 1.0  # global-norm clipping; None or 0: off
    precision: str = "fp32"  # fp32 | bf16 | fp16
    amp: str = "auto"  # auto | autocast | master (see the module docstring)
    backend: str = "auto"  # fastenc backend: auto | torch | triton | cuda
    fused: bool = True  # False: the plain transformers model (same loop and loss; the baseline)
    loss_impl: str = "fastenc"  # fastenc (tiled, no N x N logits) | materialised (open_clip's N x N logits)
    device: str | None = None  # cpu | cuda[:N]; default cuda if available (under torchrun: cuda:LOCAL_RANK)
    seed: int = 0
    shuffle: bool = True
    seq_len: int | None = None  # text length (default: the tokenizer's / the model's maximum)
    workers: int = 0  # DataLoader worker processes
    progress: bool = True  # tqdm bar on rank 0
    save_processor: bool = True  # also save the tokenizer / image processor found with --model


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
        raise InputError(f"tiny must be one of {KINDS}, got {kind!r}")
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
        raise InputError("give exactly one of model (a local checkpoint directory) and tiny ('clip' or 'siglip')")
    if cfg.tiny is not None:
        return tiny_model(cfg.tiny, cfg.seed), None
    from ._cli_common import load_checkpoint

    model = load_checkpoint(cfg.model, "model")
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
    if not base.is_dir():
        raise InputError(f"data {root!r} is not a directory (a folder of images with same-name .txt captions)")
    pairs = []
    for p in sorted(base.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file():
            pairs.append((p, p.with_suffix(".txt")))
    if not pairs:
        raise InputError(f"data {root!r} has no image with a same-name .txt caption ({', '.join(IMAGE_SUFFIXES)})")
    return pairs


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
        from PIL import Image

        image_path, text_path = self.pairs[i]
        with Image.open(image_path) as im:
            pixels = self.image_processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        caption = text_path.read_text(encoding="utf-8").strip()
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
            f"data needs the model's tokenizer and image processor saved in {path!r} (processor.save_pretrained); "
            f"loading them failed: {str(e).splitlines()[0]}"
        ) from None
    return image_processor, tokenizer


def text_length(model, tokenizer=None, requested: int | None = None) -> int:
    max_pos = int(model.config.text_config.max_position_embeddings)
    n = requested or min(max_pos, int(getattr(tokenizer, "model_max_length", max_pos) or max_pos))
    if not 1 <= n <= max_pos:
        raise InputError(f"seq_len must be in [1, {max_pos}] (the text tower's positions), got {n}")
    return n


def build_dataset(cfg: FinetuneConfig, model, source: str | None):
    """(dataset, (image processor, tokenizer) or None)."""
    kind = model_kind(model)
    if (cfg.data is None) == (cfg.synthetic <= 0):
        raise InputError("give exactly one of data (a folder of image + .txt pairs) and synthetic N (> 0)")
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
        raise InputError("data needs model (a checkpoint directory with its tokenizer and image processor), not tiny")
    image_processor, tokenizer = load_processors(source)
    ds = ImageTextFolder(
        cfg.data, image_processor, tokenizer, text_length(model, tokenizer, cfg.seq_len), with_mask=kind == "clip"
    )
    return ds, (image_processor, tokenizer)


class StepSampler:
    """Micro-batch index lists of one rank for `steps` optimizer steps: each step takes the next `batch_size`
    indices of a per-epoch permutation (seeded; the same on every rank; the tail of an epoch that does not fill a
    batch is dropped), rank r keeps rows [r * n/W, (r + 1) * n/W) and splits them into `accum` micro-batches."""

    def __init__(self, n: int, steps: int, batch_size: int, accum: int, rank: int, world: int, *, seed: int, shuffle):
        self.n, self.steps, self.batch, self.accum = n, steps, batch_size, accum
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle

    def __len__(self) -> int:
        return self.steps * self.accum

    def __iter__(self):
        per_epoch = self.n // self.batch
        shard, micro = self.batch // self.world, self.batch // self.world // self.accum
        order = None
        for step in range(self.steps):
            epoch, k = divmod(step, per_epoch)
            if k == 0:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            rows = order[k * self.batch : (k + 1) * self.batch][self.rank * shard : (self.rank + 1) * shard]
            for j in range(self.accum):
                yield rows[j * micro : (j + 1) * micro].tolist()


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ---------------------------------------------------------------------------------------------------- trainer


def _lr_lambda(cfg: FinetuneConfig):
    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup)
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
        self.dtype = PRECISIONS[cfg.precision]
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

    def step(self, micro: list[dict]) -> float:
        """One optimizer step on this rank's micro-batches; returns the global-batch loss."""
        loss = self.forward_backward(micro)
        if self.world > 1:
            self.all_reduce_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.masters, self.cfg.max_grad_norm)
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

    def finish(self) -> torch.nn.Module:
        """The original model in fp32 holding the master weights (what is saved)."""
        if self.amp == "master":
            with torch.no_grad():
                for child in self.model.children():
                    child.float()
                for p, m in zip(self.params, self.masters, strict=True):
                    p.copy_(m)
        return self.model


def check_config(cfg: FinetuneConfig) -> None:
    """InputError naming the field for values the loop cannot use (before any model is loaded)."""
    checks = (
        ("steps", cfg.steps >= 1, "an integer >= 1"),
        ("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
        ("accum", cfg.accum >= 1, "an integer >= 1"),
        ("lr", cfg.lr > 0, "> 0"),
        ("warmup", cfg.warmup >= 0, ">= 0"),
        ("precision", cfg.precision in PRECISIONS, f"one of {sorted(PRECISIONS)}"),
        ("amp", cfg.amp in AMP_MODES, f"one of {AMP_MODES}"),
        ("schedule", cfg.schedule in SCHEDULES, f"one of {SCHEDULES}"),
        ("loss_impl", cfg.loss_impl in LOSS_IMPLS, f"one of {LOSS_IMPLS}"),
        ("workers", cfg.workers >= 0, ">= 0"),
    )
    for name, ok, expected in checks:
        if not ok:
            raise InputError(f"{name} must be {expected}, got {getattr(cfg, name)!r}")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm < 0:
        raise InputError(f"max_grad_norm must be >= 0 or None, got {cfg.max_grad_norm}")


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


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune a CLIPModel / SiglipModel contrastively (see the module docstring); save it to cfg.output_dir."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from ._trace import trace

    check_config(cfg)
    rank, world, device, mine = _distributed(cfg)
    try:
        if cfg.batch_size % (world * cfg.accum):
            raise InputError(
                f"batch_size {cfg.batch_size} must be divisible by world_size x accum = {world} x {cfg.accum}"
            )
        model, source = load_model(cfg)
        dataset, processors = build_dataset(cfg, model, source)
        if len(dataset) < cfg.batch_size:
            raise InputError(f"the data has {len(dataset)} pairs, fewer than one batch (batch_size {cfg.batch_size})")
        if world > 1:
            model.to(device)  # nccl broadcasts device tensors
            with torch.no_grad():  # the same start on every rank (tiny models are seeded; checkpoints identical)
                for p in model.parameters():
                    dist.broadcast(p.data, 0)
        trainer = ContrastiveTrainer(model, cfg, device, world_size=world)
        sampler = StepSampler(
            len(dataset), cfg.steps, cfg.batch_size, cfg.accum, rank, world, seed=cfg.seed, shuffle=cfg.shuffle
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
        )
        losses, times, counts, fallbacks = [], [], {}, []
        bar = tqdm(total=cfg.steps, disable=not (cfg.progress and rank == 0), desc="finetune", unit="step")
        it = iter(loader)
        for step in range(cfg.steps):
            micro = [next(it) for _ in range(cfg.accum)]
            t0 = time.perf_counter()
            with trace() if step == 0 else contextlib.nullcontext() as t:
                loss = trainer.step(micro)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            if step == 0:
                counts = dict(t.counts)
                fallbacks = [f"{f.op}: {f.requested} -> {f.ran} ({f.reason})" for f in t.fallbacks]
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{cfg.batch_size / times[-1]:.1f}")
            bar.update(1)
        bar.close()
        timed = times[1:] or times
        model = trainer.finish()
        if cfg.output_dir and rank == 0:
            model.save_pretrained(cfg.output_dir)
            if processors is not None and cfg.save_processor:
                for proc in processors:
                    proc.save_pretrained(cfg.output_dir)
        if world > 1:
            dist.barrier()
        return FinetuneResult(
            losses=losses,
            step_s=times,
            samples_per_s=cfg.batch_size * len(timed) / sum(timed),
            trace=counts,
            fallbacks=fallbacks,
            world_size=world,
            amp=trainer.amp,
            output_dir=cfg.output_dir,
            model=model,
        )
    finally:
        if mine:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The FinetuneConfig fields as flags (shared by `fastenc finetune` and examples/finetune_clip.py)."""
    d = FinetuneConfig()
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local CLIPModel / SiglipModel checkpoint directory (never downloaded)")
    src.add_argument("--tiny", nargs="?", const="clip", choices=KINDS, help="tiny random-weight model (default clip)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="folder of images with same-name .txt captions (img2dataset layout)")
    data.add_argument("--synthetic", type=int, metavar="N", help="N random pixel / token pairs")
    p.add_argument("--output-dir", help="save_pretrained the fine-tuned model (and processors) here")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step over all ranks (%(default)s)")
    p.add_argument("--accum", type=int, default=d.accum, help="micro-batches per step and rank (%(default)s)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 turns clipping off")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=d.precision)
    p.add_argument("--amp", choices=AMP_MODES, default=d.amp, help="mixed-precision mode (bf16 / fp16)")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default=d.backend)
    p.add_argument("--no-fastenc", dest="fused", action="store_false", help="plain transformers (the baseline)")
    p.add_argument("--loss-impl", choices=LOSS_IMPLS, default=d.loss_impl)
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda if available)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")


def config_from_args(args) -> FinetuneConfig:
    names = set(FinetuneConfig.__dataclass_fields__)
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return FinetuneConfig(**kw)


def run_cli(args) -> int:
    """Run finetune from parsed flags; print a summary (rank 0). Exit status 0."""
    import json

    res = finetune(config_from_args(args))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    summary = {k: getattr(res, k) for k in FinetuneResult.__dataclass_fields__ if k != "model"}
    if getattr(args, "json", False):
        print(json.dumps(summary))
    else:
        print(
            f"finetune: {len(res.losses)} steps, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}, "
            f"{res.samples_per_s:.1f} samples/s, world size {res.world_size}, amp {res.amp}"
        )
        print("ops (first step): " + (", ".join(f"{k} x{v}" for k, v in sorted(res.trace.items())) or "-"))
        for f in res.fallbacks:
            print(f"fall-back: {f}")
        if res.output_dir:
            print(f"saved: {res.output_dir}")
    return 0


def add_finetune_parser(sub) -> None:
    s = sub.add_parser("finetune", help="contrastive fine-tuning of a CLIP / SigLIP model (fused towers and loss)")
    add_arguments(s)
    s.set_defaults(func=run_cli)
