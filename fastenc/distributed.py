"""fastenc.distributed.clip_loss / siglip_loss: the contrastive losses of a batch sharded over torch.distributed ranks.

Each rank passes its local shard (image_features, text_features: (n_r, d), the same rows of the global batch, in
rank order; shards may differ in size). Conventions:
- every rank returns the same value: the loss of the concatenated global batch (exactly fastenc.ops.clip_loss /
  siglip_loss on torch.cat over ranks);
- each rank calls backward on its returned loss; the gradient it gets w.r.t. its local features is the matching
  slice of the single-process gradient of the global loss, and every rank gets the full gradient w.r.t.
  logit_scale / logit_bias (all-reduced). Under DDP, which averages parameter grads over ranks, model parameters
  therefore receive 1/world of the global-loss gradient (as open_clip with gather_with_grad); scale the loss by the
  world size if you want the plain sum.

How: features are all-gathered once without autograd (O(N_global * d) per rank); the O(N) CLIP logsumexp
statistics are computed for the local rows (image rows vs all texts, text rows vs all images) and all-gathered;
the backward computes the local gradients directly from the gathered features and statistics, recomputing logit
tiles, so no gradient needs to travel and memory per rank is O(N_global * d + N_local-tile * N_global). Collectives:
forward 2 feature all-gathers (+2 O(N) stat all-gathers for CLIP) and one scalar all-reduce; backward one 2-element
all-reduce when logit_scale / logit_bias are tensors. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import InputError
from .ops.contrastive import ContrastiveLossFunction, _as_arg, _backend, check_loss_inputs


class GroupComm:
    """The collectives ContrastiveLossFunction needs, over a process group; shards may have different sizes."""

    def __init__(self, group, n_local: int, device: torch.device):
        if not dist.is_available() or not dist.is_initialized():
            raise InputError("group: torch.distributed is not initialised (call dist.init_process_group first)")
        self.group = group
        self.world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.int64, device=device), group=group)
        self.sizes = [int(s.item()) for s in sizes]
        self.offset = sum(self.sizes[:rank])

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


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    group=None,
    *,
    backend: str | None = None,
    strict: bool = False,
) -> torch.Tensor:
    """fastenc.ops.clip_loss of the global batch (all ranks' shards concatenated in rank order); same on every
    rank. See the module docstring for the gradient convention."""
    check_loss_inputs(image_features, text_features, logit_scale)
    comm = GroupComm(group, image_features.shape[0], image_features.device)
    which = _backend("clip_loss", image_features, backend, strict)
    return ContrastiveLossFunction.apply("clip", which, comm, image_features, text_features, _as_arg(logit_scale), None)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    group=None,
    *,
    backend: str | None = None,
    strict: bool = False,
) -> torch.Tensor:
    """fastenc.ops.siglip_loss of the global batch (all ranks' shards concatenated in rank order); same on every
    rank. See the module docstring for the gradient convention."""
    check_loss_inputs(image_features, text_features, logit_scale, logit_bias, has_bias=True)
    comm = GroupComm(group, image_features.shape[0], image_features.device)
    which = _backend("siglip_loss", image_features, backend, strict)
    return ContrastiveLossFunction.apply(
        "siglip", which, comm, image_features, text_features, _as_arg(logit_scale), _as_arg(logit_bias)
    )
