"""fastenc.ops.cosine_similarity_matrix and fastenc.ops.topk_cosine.

    cosine_similarity_matrix(a, b, scale=s) == s * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
with zero rows giving 0 (never NaN), fp32 accumulation and the output in the input dtype.

topk_cosine(queries, gallery, k) == torch.topk over the full (Q, G) similarity matrix, computed over gallery chunks
of `chunk_size` rows so memory is O(Q * (k + chunk_size)), never O(Q * G). Similarities are ranked in fp32 (values
are returned in the input dtype). Ties: equal similarities are ordered by ascending gallery index (a stable sort per
chunk, and the running top-k, which holds lower indices, goes first in every merge). On the Triton backend the
similarity tiles come from the fused kernel; the per-chunk top-k and the merge run in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.dispatch import choose_backend
from ..core.errors import InputError
from ._common import FLOAT_DTYPES, check_same_dtype, check_tensor
from ._library import OpSpec, add_ops, fastenc_op
from .reference import cosine_similarity_reference

DEFAULT_CHUNK = 8192  # gallery rows per chunk in topk_cosine


def _check_pair(a_name, a, b_name, b):
    check_tensor(a_name, a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(b_name, b, ndim=2, dtypes=FLOAT_DTYPES, device=a.device)
    check_same_dtype(a_name, a, **{b_name: b})
    if a.shape[1] != b.shape[1]:
        raise InputError(
            f"{b_name} must have the feature dim d={a.shape[1]} of {a_name}, got shape {tuple(b.shape)} "
            f"({a_name} is {tuple(a.shape)})"
        )


def _cosine_kernels():
    """fastenc.kernels.cosine, imported on first use (importing triton follows TRITON_INTERPRET)."""
    from ..kernels import cosine

    return cosine


def _cosine_backend(op, x, backend, strict):
    return choose_backend(op, x.device, backend, strict, lambda: _cosine_kernels().cosine_unsupported_reason(x))


def _scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InputError(f"scale must be a python float, got {type(scale).__name__}")
    return float(scale)


def cosine_similarity_matrix(
    a: torch.Tensor, b: torch.Tensor, *, scale: float = 1.0, backend: str | None = None, strict: bool = False
) -> torch.Tensor:
    """(M, d), (N, d) -> (M, N) = scale * normalize(a) @ normalize(b).T in a.dtype; zero rows give 0.

    Differentiable on every backend; on Triton the forward is the fused kernel and the backward differentiates the
    torch reference (which builds the (M, N) matrix, as the output does anyway)."""
    _check_pair("a", a, "b", b)
    scale = _scale(scale)
    which = _cosine_backend("cosine_similarity_matrix", a, backend, strict)
    if which == "torch":
        return cosine_similarity_reference(a, b, scale)
    return fastenc_op("cosine_similarity_matrix")(a, b, scale, False)


def topk_cosine(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    backend: str | None = None,
    strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities of each query over the gallery: (values (Q, k) in queries.dtype, indices (Q, k)
    int64), sorted by descending similarity, ties by ascending gallery index. 1 <= k <= G. Forward only."""
    _check_pair("queries", queries, "gallery", gallery)
    g = gallery.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= g:
        raise InputError(f"k must be in [1, gallery size {g}], got k={k}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    which = _cosine_backend("topk_cosine", queries, backend, strict)
    if which == "torch":
        qn = F.normalize(queries.float(), dim=-1)

        def sims(chunk):
            return qn @ F.normalize(chunk.float(), dim=-1).T
    else:
        op = fastenc_op("cosine_similarity_matrix")

        def sims(chunk):
            return op(queries, chunk, 1.0, True)

    best_v = best_i = None
    for c0 in range(0, g, chunk_size):
        s = sims(gallery[c0 : c0 + chunk_size])  # (Q, C) fp32
        kk = min(k, s.shape[1])
        v, i = torch.sort(s, dim=1, descending=True, stable=True)  # stable: ties keep ascending index
        v, i = v[:, :kk], i[:, :kk] + c0
        del s
        if best_v is not None:  # the running top-k (lower indices) goes first, so a stable sort keeps the tie rule
            v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
            v, order = torch.sort(v, dim=1, descending=True, stable=True)
            v, i = v[:, :k], torch.gather(i, 1, order[:, :k])
        best_v, best_i = v, i
    return best_v.to(queries.dtype), best_i


# ---------------------------------------------------------------------------------------------------- custom op


def _cosine_launch(a: torch.Tensor, b: torch.Tensor, scale: float, fp32_out: bool) -> torch.Tensor:
    return _cosine_kernels().cosine_similarity_forward(a, b, scale=scale, out_dtype=torch.float32 if fp32_out else None)


def _cosine_fake(a, b, scale, fp32_out):
    return torch.empty(a.shape[0], b.shape[0], dtype=torch.float32 if fp32_out else a.dtype, device=a.device)


def _cosine_reference_op(a, b, scale, fp32_out):
    """cosine_similarity_reference with the op's signature: its vjp is the op's backward."""
    return cosine_similarity_reference(a, b, scale).to(torch.float32 if fp32_out else a.dtype)


add_ops(OpSpec("cosine_similarity_matrix", _cosine_launch, _cosine_fake, reference=_cosine_reference_op))
