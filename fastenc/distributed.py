"""fastenc.distributed.clip_loss / siglip_loss: the contrastive losses of a batch sharded over torch.distributed ranks.

Each rank passes its local shard (image_features, text_features: (n_r, d), the same rows of the global batch, in
rank order; shards may differ in size, none may be empty). Conventions:
- every rank returns the same value: the loss L of the concatenated global batch (exactly fastenc.ops.clip_loss /
  siglip_loss on torch.cat over ranks);
- gradients follow the data-parallel convention of open_clip's ClipLoss(gather_with_grad=True) and SigLipLoss:
  with grad_reduce="mean" (the default; DDP and FSDP average parameter gradients over ranks) each rank's gradient
  w.r.t. its local features is world_size x its slice of dL/d(features), and every rank gets the full dL/dlogit_scale
  and dL/dlogit_bias. After DDP averages, every parameter (towers, logit_scale, logit_bias) therefore holds exactly
  the gradient of L, the same as single-process training on the concatenated batch: towers and scale/bias keep their
  relative size (SGD, global-norm clipping), and the loss value and every averaged gradient match open_clip's.
  With grad_reduce="sum" (a wrapper that sums gradients over ranks) the features get their plain slice of dL/d(...)
  and logit_scale / logit_bias get dL/d(...) / world_size, so after summing every parameter again holds dL/d(...).
- open_clip's SigLipLoss returns a per-rank value (the local rows' loss, over the local batch size) whose mean over
  ranks is L when shards are equal; fastenc returns L itself on every rank, with the same averaged gradients.

Sizes are agreed first: one all_gather of (rows, dim, dtype, local inputs valid) per call. If any rank's inputs are
bad (an empty shard, a feature dim or dtype that differs across ranks, a local input error) every rank raises the
same InputError before any further collective, so no rank is left waiting in one.

How: features are all-gathered once without autograd (O(N_global * d) per rank); the O(N) CLIP statistics are
computed for the local rows (image rows vs all texts, text rows vs all images) and all-gathered; the backward
computes the local gradients directly from the gathered features and statistics, recomputing logit tiles, so no
gradient needs to travel and memory per rank is O(N_global * d + N_local-tile * N_global). Collectives: the size
agreement, forward 2 feature all-gathers (+2 O(N) stat all-gathers for CLIP) and one scalar all-reduce; backward one
2-element all-reduce when logit_scale / logit_bias are tensors. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .core.errors import InputError
from .ops._common import FLOAT_DTYPES
from .ops.contrastive import ContrastiveLossFunction, _as_arg, _loss_backend, check_loss_inputs

GRAD_REDUCE = ("mean", "sum")


def _collective_device(group, x) -> torch.device:
    """Where the size-agreement tensor lives: the features' device, else what the group's backend needs."""
    if isinstance(x, torch.Tensor):
        return x.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class GroupComm:
    """The collectives ContrastiveLossFunction needs, over a process group; shards may have different sizes.

    Construction is itself a collective (every rank of the group must call it): it agrees on the shard sizes and
    raises the same InputError on every rank if any rank's inputs are unusable."""

    def __init__(self, group, image_features, local_error: InputError | None, grad_reduce: str = "mean"):
        if not dist.is_available() or not dist.is_initialized():
            raise InputError("group: torch.distributed is not initialised (call dist.init_process_group first)")
        if grad_reduce not in GRAD_REDUCE:  # same argument on every rank, so every rank raises here
            raise InputError(f"grad_reduce must be one of {GRAD_REDUCE}, got {grad_reduce!r}")
        self.group = group
        self.world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        device = _collective_device(group, image_features)
        ok = local_error is None
        n, d = (image_features.shape[0], image_features.shape[1]) if ok else (0, 0)
        code = FLOAT_DTYPES.index(image_features.dtype) if ok else -1
        info = [torch.zeros(4, dtype=torch.int64, device=device) for _ in range(self.world)]
        dist.all_gather(info, torch.tensor([n, d, code, int(ok)], dtype=torch.int64, device=device), group=group)
        rows = [[int(v) for v in t.tolist()] for t in info]
        self._agree(rows, rank, local_error)
        self.sizes = [r[0] for r in rows]
        self.offset = sum(self.sizes[:rank])
        self.feature_grad_scale = float(self.world) if grad_reduce == "mean" else 1.0
        self.scalar_grad_scale = 1.0 if grad_reduce == "mean" else 1.0 / self.world

    def _agree(self, rows, rank, local_error) -> None:
        """Raise the same InputError on every rank unless every shard is usable (rows: [n, d, dtype, ok] per rank)."""
        bad = [r for r, row in enumerate(rows) if not row[3]]
        if bad:
            msgs = [None] * self.world
            dist.all_gather_object(msgs, None if local_error is None else str(local_error), group=self.group)
            detail = "; ".join(f"rank {r}: {msgs[r]}" for r in bad)
            raise InputError(f"invalid inputs on rank(s) {bad} of {self.world} (every rank raises this): {detail}")
        sizes = [row[0] for row in rows]
        empty = [r for r, n in enumerate(sizes) if n == 0]
        if empty:
            raise InputError(
                f"image_features: every rank needs at least one row, rank(s) {empty} have an empty shard "
                f"(rows per rank: {sizes}; every rank raises this)"
            )
        dims = [row[1] for row in rows]
        if len(set(dims)) > 1:
            raise InputError(f"image_features: the feature dim differs across ranks (dim per rank: {dims})")
        dtypes = [FLOAT_DTYPES[row[2]] for row in rows]
        if len(set(dtypes)) > 1:
            raise InputError(f"image_features: the dtype differs across ranks (dtype per rank: {dtypes})")

    def total(self, n_local: int) -> int:
        return sum(self.sizes)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along dim 0 (no autograd), padding to the largest shard for the collective."""
        x = x.detach().contiguous()
        width = max(self.sizes)
        if x.shape[0] < width:
            x = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, self.sizes, strict=True)])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x


def _local_check(*args, has_bias: bool = False) -> InputError | None:
    try:
        check_loss_inputs(*args, has_bias=has_bias, allow_empty=True)
    except InputError as e:
        return e
    return None


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    group=None,
    *,
    grad_reduce: str = "mean",
    backend: str | None = None,
    strict: bool = False,
) -> torch.Tensor:
    """fastenc.ops.clip_loss of the global batch (all ranks' shards concatenated in rank order); same on every
    rank. grad_reduce: how the data-parallel wrapper combines parameter gradients over ranks, "mean" (DDP, FSDP;
    default: open_clip's ClipLoss(gather_with_grad=True) gradients) or "sum". See the module docstring."""
    error = _local_check(image_features, text_features, logit_scale)
    comm = GroupComm(group, image_features, error, grad_reduce)
    which = _loss_backend("clip_loss", image_features, backend, strict)
    return ContrastiveLossFunction.apply("clip", which, comm, image_features, text_features, _as_arg(logit_scale), None)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    group=None,
    *,
    grad_reduce: str = "mean",
    backend: str | None = None,
    strict: bool = False,
) -> torch.Tensor:
    """fastenc.ops.siglip_loss of the global batch (all ranks' shards concatenated in rank order); same on every
    rank. grad_reduce: "mean" (DDP, FSDP; default: open_clip's SigLipLoss gradients after averaging) or "sum". See
    the module docstring."""
    error = _local_check(image_features, text_features, logit_scale, logit_bias, has_bias=True)
    comm = GroupComm(group, image_features, error, grad_reduce)
    which = _loss_backend("siglip_loss", image_features, backend, strict)
    return ContrastiveLossFunction.apply(
        "siglip", which, comm, image_features, text_features, _as_arg(logit_scale), _as_arg(logit_bias)
    )
