"""Fused attention forward, FlashAttention-2 style: the (Sq, Sk) score matrix never leaves the chip.

Math, per batch b, head h, query row i (all arithmetic in fp32, whatever the input dtype):
    s_ij = scale * q_i . k_j + bias_bhij                                  (bias optional, broadcast by stride 0)
         + table[lut[j - i + Sq - 1], h]                                (relative-position bias optional, T5)
    s_ij = -inf  where j > i (causal, top-left aligned) or key_padding_mask[b, j] is False
    o_i  = sum_j softmax_j(s_i) v_j,  and o_i = 0 when every s_ij is -inf (all keys of row i masked)
NaN and inf are not hidden: a NaN or +inf score (NaN / inf in q, k, bias at a key the row attends) makes the row NaN,
and NaN / inf in v reaches every row that attends that key, as in torch SDPA. Masks are applied to the scores by
select, so NaN / inf in q . k or the bias at a masked key does not leak; 0 * NaN from v at a masked key inside a
loaded key tile does (SDPA's math path does the same for every row).

The kernel works in base 2, t = s * log2(e), so exp(s - max) == exp2(t - max'); log2(e) is folded into the q.k
scale. One program owns one BLOCK_M tile of query rows of one (b, h) and streams BLOCK_N tiles of keys (online
softmax): with m the running row max of t, l the running row sum and acc the unnormalised output,
    m_new = max(m, rowmax(t));  alpha = exp2(m - m_new);  p = exp2(t - m_new)
    l = alpha * l + rowsum(p);  acc = alpha * acc + p @ v;  m = m_new
and at the end o = acc / l (o = 0 where l == 0, i.e. every score of the row was -inf; a NaN l stays NaN). m starts
at -FP32_MAX, a finite sentinel, so a tile whose keys are all masked for a row (t = -inf) gives p = exp2(-inf) = 0
and alpha = 1 rather than exp2(-inf - -inf) = NaN.

Relative-position bias (T5, UMT5): `lut` is an O(Sq + Sk) int32 vector of bucket ids, one per relative distance
d = j - i in [-(Sq - 1), Sk - 1], at index d + Sq - 1, built on the host with transformers' exact fp32 log formula (a
kernel-side log could put a distance on the other side of an integer boundary and change its bucket). `table` is the
learned (num_buckets, H) bias. The launcher gathers the two into an (H, Sq + Sk - 1) fp32 vector, the bias of each
distance per head (O(Sq + Sk), bucket ids clamped into range so a bad lut cannot read out of bounds); each tile then
gathers rel[h, j - i + Sq - 1], which stays in cache, and the (Sq, Sk) bias is never written to memory.

Backward (FlashAttention-2 style, `attention_backward`): nothing of size (Sq, Sk) is saved or allocated (except the
gradient of an additive bias that requires grad, in the bias's own shape). With
return_stats=True the forward (STORE_STATS) also writes two fp32 numbers per query row, stats (B, H, 2, Sq):
    stats[.., 0, i] = m_i (final base-2 row max; -FP32_MAX for a dead row)
    stats[.., 1, i] = 1 / l_i (0 for a dead row, NaN for a NaN row)
so the backward recomputes p_ij = exp2(t_ij - m_i) / l_i exactly as the forward normalised it. Not one
log-sum-exp: m + log2(l) loses log2(l) next to a huge |m| (a row that an HF finfo.min / -1e9 additive mask masks
entirely has m ~ -FP32_MAX and the forward's uniform p = 1 / Sk; one lse would give p = 1 there). Then, with s the
natural-log score, do = dL/do and delta_i = sum_d do_id o_id (the forward's rounded o, as FA2):
    dv_j = sum_i p_ij do_i;   dp_ij = do_i . v_j;   ds_ij = p_ij (dp_ij - delta_i)
    dq_i = scale sum_j ds_ij k_j;   dk_j = scale sum_i ds_ij q_i;   dbias_ij = ds_ij (summed where it broadcasts)
    dtable[u, h] = sum over b and the (i, j) with lut[j - i + Sq - 1] = u of ds_bhij
A dead row has o = 0 (a constant) and p = 0, so it contributes nothing to any gradient: the gradient of exactly
the forward's definition. Three kernels: delta (O(Sq D)); dK / dV, one program per BLOCK_N keys streaming the query
blocks that see them (causal: from the diagonal on); dQ, one program per BLOCK_M rows streaming their keys (a second
pass recomputing p, instead of dQ atomics: deterministic). Masks are applied per element in every tile (the backward
has no unmasked fast range). The bias gradient ds is stored to an fp32 buffer of the bias's own shape, by
atomic adds where the bias broadcasts (stride 0); the T5 table gradient is accumulated in-kernel by atomic adds of ds
into an fp32 (B, H, Sq + Sk - 1) per-distance buffer (O(S)), then scattered to the buckets on the host with one
index_add over the lut. Atomics make dbias (broadcast) and dtable run-to-run nondeterministic on a GPU at fp32
rounding level; dq, dk, dv are deterministic. NOTE: the table gradient costs one atomic add per score element (a
tile's diagonals are not pre-summed); that cost is unmeasured on a GPU (no GPU has run fastenc yet).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import dot_flags, interpreting, last_dim_contiguous, traceable

# ---------------------------------------------------------------------------------------------------- constants

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max; -FP32_MAX is the running-max sentinel
_LOG2E = tl.constexpr(LOG2E)  # jit functions may only read constexpr globals
_FP32_MAX = tl.constexpr(FP32_MAX)
MAX_HEAD_DIM = 256  # one (BLOCK_M, BLOCK_D) fp32 accumulator tile per program must fit in registers
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16; head dims below 16 are padded up to it
MAX_GRID_YZ = 65535  # CUDA limit on grid dims 1 and 2, which carry heads and batch
SEQ_BUCKET_MAX = 8192  # autotune key: next power of two of max(Sq, Sk), capped here

# Under the interpreter every program runs in numpy: small tiles keep the tests fast and still exercise multi-tile
# loops, key tails and the causal diagonal at short sequence lengths.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}

# CUDA candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class (BLOCK_D <= 64, 128, 256), from the
# space the Triton fused-attention tutorial searches on H100, autotuned per (BLOCK_D, SEQ_BUCKET, CAUSAL, HAS_KPM,
# HAS_BIAS, HAS_RELBIAS, dtypes). Only configs that compile spill-free on sm_90a under Triton 3.6 and 3.9 are
# candidates (fp16 and bf16, head dims 64 / 80 / 128, every mask / bias variant); measured without a GPU by
# triton.compile(ASTSource, GPUTarget("cuda", 90, 32)) + cuobjdump --dump-resource-usage, with the specialisation a
# launch gets (16-byte aligned q/k/v/out, their strides multiples of 16; bias / key-padding strides not, Sk = 77).
# NOTE: measured stack (spill) bytes, fp16, key-padding mask unless named, Triton 3.6 / 3.9:
#   pruned  hd 64  (128, 64, 4, 3): 0 / 48 (kpm), 0 / 64 (causal), 136 / 200 (fp16 bias); 64 / 96 without the
#                                   launch specialisation (the numbers)
#   pruned  hd 80  (128, 32, 4, 3): 0 / 32 (kpm), 8 / 112 (causal), 24 / 96 (T5), 0 / 112 (fp32 bias)
#   pruned  hd 128 (128, 32, 4, 3): 0 / 40 (kpm), 8 / 72 (causal)
#   changed (32, 32, 4, 2) -> (32, 32, 4, 1) with maxnreg 255 (MAXNREG): under 3.6 ptxas holds these small tiles to
#                                   128 registers and spilled 8 B (hd 80 kpm; hd 64 T5 + bias; also (32, 32, 8, 1) with
#                                   a bias); with an explicit .maxnreg it takes what it needs, 0 B. One stage: a 32-row
#                                   tile is for short sequences (one or two key tiles, nothing to pipeline).
#   kept    hd 64 (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1); hd 80 / 128 (128, 64, 8, 3),
#           (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1): 0 B in every variant except those in SPILLS_WITH below
CUDA_CONFIGS = {
    64: [(128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)],
    128: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)],  # not yet measured (hd > 128)
}
MAXNREG = {(32, 32, 4, 1): 255}  # .maxnreg for a config (else ptxas picks; see the NOTE above)
# Configs dropped for one variant only: (feature, head-dim class) -> configs that spill with it. Measured (stack
# bytes, Triton 3.6 / 3.9): additive fp16 bias, hd 64 (128, 32, 4, 3) 424 / 440, hd 80 (64, 64, 4, 3) 0 / 24,
# (128, 64, 8, 3) 0 / 8; T5 table + bias, hd 80 (64, 64, 4, 3) 0 / 16; T5 table, hd 80 / 128 (128, 64, 8, 3) 72 / 0,
# hd 128 (64, 64, 4, 3) 0 / 56 when Sq = Sk is a multiple of 16 (T5 at 512: the sequence lengths specialise).
SPILLS_WITH = {
    ("HAS_BIAS", 64): {(128, 32, 4, 3)},
    ("HAS_BIAS", 128): {(128, 64, 8, 3), (64, 64, 4, 3)},
    ("HAS_RELBIAS", 128): {(128, 64, 8, 3), (64, 64, 4, 3)},
}

# Backward CUDA candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class, autotuned per (BLOCK_D,
# SEQ_BUCKET, flags, dtypes). dK / dV: a program owns BLOCK_N keys and holds k, v and two (BLOCK_N, BLOCK_D) fp32
# accumulators for the whole loop, so its tiles stay small; dQ holds q, dO and one accumulator. Only configs that
# compile spill-free on sm_90a and sm_80 under Triton 3.9 in every measured variant (fp16 hd 64 plain / causal+kpm /
# T5 with table gradient / kpm + bias with its gradient, hd 80 plain, hd 128 causal+kpm; bf16 hd 64 causal+kpm) are
# candidates, measured like the forward's (a sweep of 11 dK / dV and 9 dQ candidates through
# `python bench/static_report.py --only "attention_bwd ..." --all-configs`, BWD_CUDA_CONFIGS patched).
# NOTE: measured stack (spill) bytes, Triton 3.9, sm_90a / sm_80:
#   dropped dK/dV (64, 64, 4, 2): 136 / 440 (hd 64 kpm+bias); (32, 128, 8, 2): 0 / 128 (hd 64 causal+kpm), 104 / 528
#           (hd 128); (16, 128, 8, 2), (32, 128, 8, 1): up to 1216 / 1272 on sm_80; (64, 64, 8, 2): 56 / 344;
#           (32, 64, 4, 1): 0 / 56; (32, 64, 4, 2): 120 / 8 (hd 80), 112 / 120 (hd 128)
#   dropped dQ (64, 64, 4, 2): 0 / 112 (hd 64 kpm+bias); (64, 64, 8, 2): 0 / 8
#   kept    dK/dV (16, 64, 4, 1), (32, 32, 4, 2): 0 B everywhere; (32, 64, 8, 2): 0 B except with a bias / T5 table
#           on sm_80 (32 / 24 B, BWD_SPILLS_WITH); dQ every listed config: 0 B everywhere
#   checked the kept lists with the report's attention_bwd / attention_fwd_stats cases under Triton 3.9 and 3.6,
#           sm_90a and sm_80: 240 compiles, 0 B stack in every one (`python bench/static_report.py --only
#           "attention_(bwd|fwd_stats)" --json /tmp/b.json --fresh --no-md --also .venv-triton36/bin/python`)
#   hd 256: not measured.
BWD_CUDA_CONFIGS = {
    "dkdv": {
        64: [(32, 64, 8, 2), (16, 64, 4, 1), (32, 32, 4, 2)],
        128: [(32, 64, 8, 2), (16, 64, 4, 1), (32, 32, 4, 2)],
        256: [(16, 64, 4, 1), (16, 32, 4, 1)],
    },
    "dq": {
        64: [(128, 32, 8, 2), (64, 32, 4, 2), (64, 16, 4, 2), (32, 32, 4, 2)],
        128: [(128, 32, 8, 2), (64, 32, 4, 2), (64, 16, 4, 2), (32, 16, 4, 1)],
        256: [(64, 16, 4, 1), (32, 16, 4, 1)],
    },
}
# (kernel, feature, head-dim class) -> configs dropped when the feature is on: measured (hd 64, see the NOTE) or,
# for hd 80 / 128 with a bias or T5 table (not in the measured set), dropped by the same rule as hd 64.
BWD_SPILLS_WITH = {
    ("dkdv", "HAS_BIAS", 64): {(32, 64, 8, 2)},
    ("dkdv", "HAS_RELBIAS", 64): {(32, 64, 8, 2)},
    ("dkdv", "HAS_BIAS", 128): {(32, 64, 8, 2)},
    ("dkdv", "HAS_RELBIAS", 128): {(32, 64, 8, 2)},
}
DELTA_BLOCK_M = 64  # rows per program of the delta = rowsum(dO * O) pass (fixed: one load and a sum per row)


# ---------------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _attn_fwd_inner(
    acc,  # (BLOCK_M, BLOCK_D) fp32, unnormalised output
    l_i,  # (BLOCK_M,) fp32, running sum of exp2(t - m_i)
    m_i,  # (BLOCK_M,) fp32, running max of t (base-2 scores)
    q,  # (BLOCK_M, BLOCK_D) query tile, input dtype (fp32 when DOT_FP32)
    k_base,  # K + b, h offset; key n, dim d at k_base + n * stride_kn + d
    v_base,
    kpm_base,  # key_padding_mask + b offset (uint8, 1 = attend)
    bias_base,  # bias + b, h offset
    rb_base,  # fp32 relative bias per distance + h offset; distance j - i at rb_base + j - i + Sq - 1
    offs_m,  # (BLOCK_M,) query rows of this program
    offs_d,  # (BLOCK_D,)
    lo,
    hi,  # key range [lo, hi) this call covers, lo a multiple of BLOCK_N
    seqlen_q,
    seqlen_k,
    stride_kn,
    stride_vn,
    stride_kpm_n,
    stride_bias_m,
    stride_bias_n,
    qk_scale,  # scale * LOG2E
    BOUNDARY: tl.constexpr,  # this range holds the key tail and/or the causal diagonal: mask per element
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RELBIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM  # (BLOCK_D,)
    m_ok = offs_m < seqlen_q  # (BLOCK_M,)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        n_ok = offs_n < seqlen_k
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        if BOUNDARY:
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        t = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        if HAS_BIAS:
            b_ptrs = bias_base + offs_m[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n
            if BOUNDARY:
                bias = tl.load(b_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            else:
                bias = tl.load(b_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
            # finfo.min-style additive masks overflow to -inf when scaled by LOG2E; clamp those to -FP32_MAX so a
            # row that is all finfo.min stays uniform as in the reference, while a real -inf stays masked. A select,
            # not tl.maximum: maximum drops NaN (fmaxf on CUDA, np.fmax in the interpreter), and NaN must reach t.
            bias2 = bias * _LOG2E
            bias2 = tl.where((bias2 < -_FP32_MAX) & (bias != float("-inf")), -_FP32_MAX, bias2)
            t = t + bias2
        if HAS_RELBIAS:
            rel = offs_n[None, :] - offs_m[:, None] + (seqlen_q - 1)  # (BLOCK_M, BLOCK_N), j - i + Sq - 1
            rb_ok = m_ok[:, None] & n_ok[None, :]
            rb = tl.load(rb_base + rel, mask=rb_ok, other=0.0).to(tl.float32)
            t = t + rb * _LOG2E
        if BOUNDARY:
            keep = n_ok[None, :]  # (1, BLOCK_N)
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])  # (BLOCK_M, BLOCK_N)
            t = tl.where(keep, t, float("-inf"))
        if HAS_KPM:
            if BOUNDARY:
                kp = tl.load(kpm_base + offs_n * stride_kpm_n, mask=n_ok, other=0)
            else:
                kp = tl.load(kpm_base + offs_n * stride_kpm_n)
            t = tl.where(kp[None, :] != 0, t, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(t, 1))  # >= -FP32_MAX, finite
        alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,)
        p = tl.math.exp2(t - m_new[:, None])  # (BLOCK_M, BLOCK_N), 0 where t = -inf
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # p in v's dtype, as FA2
        m_i = m_new
    return acc, l_i, m_i


# ---------------------------------------------------------------------------------------------------- kernel


@triton.jit
def _attention_fwd_kernel(
    Q,  # (B, H, Sq, D), last dim stride 1
    K,  # (B, H, Sk, D), last dim stride 1
    V,  # (B, H, Sk, D), last dim stride 1
    Out,  # (B, H, Sq, D) view of a (B, Sq, H, D) buffer
    KPM,  # (B, Sk) uint8, 1 = attend; unused unless HAS_KPM
    Bias,  # (B, H, Sq, Sk) by strides (0 on broadcast dims); unused unless HAS_BIAS
    RelBias,  # (H, Sq + Sk - 1) fp32 relative-position bias of each distance j - i; unused unless HAS_RELBIAS
    Stats,  # (B, H, 2, Sq) fp32 row statistics for the backward (m, 1 / l); unused unless STORE_STATS
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_kpm_b,
    stride_kpm_n,
    stride_bias_b,
    stride_bias_h,
    stride_bias_m,
    stride_bias_n,
    stride_rb_h,
    stride_st_b,
    stride_st_h,
    seqlen_q,
    seqlen_k,
    qk_scale,  # scale * LOG2E
    SEQ_BUCKET,  # autotune key only: next power of two of max(Sq, Sk), capped
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= max(HEAD_DIM, 16)
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RELBIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast tiles to fp32 before tl.dot (bf16 under the interpreter)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; matters for fp32 operands only
    STORE_STATS: tl.constexpr,  # also write the row statistics the backward needs (training); off for inference
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the causal diagonal starts on a key-tile boundary
    start_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BM, BD)
    if DOT_FP32:
        q = q.to(tl.float32)

    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    kpm_base = KPM + off_b * stride_kpm_b
    bias_base = Bias + off_b * stride_bias_b + off_h * stride_bias_h
    rb_base = RelBias + off_h * stride_rb_h

    m_i = tl.full([BLOCK_M], -_FP32_MAX, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:  # Sq == Sk: keys below this tile's first row need no mask; stop after its last row (skip the rest)
        lo = start_m * BLOCK_M
        hi = tl.minimum((start_m + 1) * BLOCK_M, seqlen_k)
    else:  # full key tiles need no mask; the tail tile does
        lo = (seqlen_k // BLOCK_N) * BLOCK_N
        hi = seqlen_k
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, bias_base, rb_base, offs_m, offs_d, 0, lo,
        seqlen_q, seqlen_k, stride_kn, stride_vn, stride_kpm_n, stride_bias_m, stride_bias_n, qk_scale,
        False, CAUSAL, HAS_KPM, HAS_BIAS, HAS_RELBIAS, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, bias_base, rb_base, offs_m, offs_d, lo, hi,
        seqlen_q, seqlen_k, stride_kn, stride_vn, stride_kpm_n, stride_bias_m, stride_bias_n, qk_scale,
        True, CAUSAL, HAS_KPM, HAS_BIAS, HAS_RELBIAS, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip

    # l_i == 0 exactly when every score of the row is -inf (all keys masked): output 0, whatever 0 * v gave in acc
    # (NaN from a NaN / inf v at a masked key). l_i is NaN when a score is NaN or +inf (NaN / inf in q, k, bias): the
    # row stays NaN, as in SDPA. `l_i > 0` would send NaN to 0 and hide e.g. an fp16 overflow upstream.
    l_zero = l_i == 0.0
    l_safe = tl.where(l_zero, 1.0, l_i)
    out = tl.where(l_zero[:, None], 0.0, acc / l_safe[:, None])  # (BLOCK_M, BLOCK_D)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))
    if STORE_STATS:  # m (base-2 row max; -FP32_MAX for a dead row) and 1 / l (0 for a dead row, NaN for a NaN row)
        st_ptrs = Stats + off_b * stride_st_b + off_h * stride_st_h + offs_m  # (BLOCK_M,), row 0 of (2, Sq)
        tl.store(st_ptrs, m_i, mask=offs_m < seqlen_q)
        tl.store(st_ptrs + seqlen_q, tl.where(l_zero, 0.0, 1.0 / l_safe), mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_probs(
    q,  # (BLOCK_M, BLOCK_D) query tile
    k,  # (BLOCK_N, BLOCK_D) key tile
    row_m,  # (BLOCK_M,) fp32 saved base-2 row max (stats row 0)
    row_inv_l,  # (BLOCK_M,) fp32 saved 1 / row sum (stats row 1); 0 for dead rows and rows past Sq
    offs_m,  # (BLOCK_M,) query rows
    offs_n,  # (BLOCK_N,) key columns
    kpm_base,
    bias_base,
    rb_base,
    seqlen_q,
    seqlen_k,
    stride_kpm_n,
    stride_bias_m,
    stride_bias_n,
    qk_scale,  # scale * LOG2E
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RELBIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 probabilities p = exp2(t - m) / l, t the base-2 scores exactly as the forward forms
    them (same bias clamp, same masks, applied per element: the backward has no unmasked fast range)."""
    m_ok = offs_m < seqlen_q
    n_ok = offs_n < seqlen_k
    t = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
    if HAS_BIAS:
        b_ptrs = bias_base + offs_m[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n
        bias = tl.load(b_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        bias2 = bias * _LOG2E
        bias2 = tl.where((bias2 < -_FP32_MAX) & (bias != float("-inf")), -_FP32_MAX, bias2)  # as the forward
        t = t + bias2
    if HAS_RELBIAS:
        rel = offs_n[None, :] - offs_m[:, None] + (seqlen_q - 1)  # (BLOCK_M, BLOCK_N), j - i + Sq - 1
        rb = tl.load(rb_base + rel, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        t = t + rb * _LOG2E
    keep = n_ok[None, :]  # (1, BLOCK_N)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])  # (BLOCK_M, BLOCK_N)
    if HAS_KPM:
        kp = tl.load(kpm_base + offs_n * stride_kpm_n, mask=n_ok, other=0)
        keep = keep & (kp[None, :] != 0)
    t = tl.where(keep, t, float("-inf"))
    # exp2(-inf - m) = 0 at masked keys (m >= -FP32_MAX is finite); dead rows have 1 / l = 0, so p = 0 there
    return tl.math.exp2(t - row_m[:, None]) * row_inv_l[:, None]


@triton.jit
def _attention_bwd_delta_kernel(
    Out,  # (B, H, Sq, D) forward output, last dim stride 1
    DOut,  # (B, H, Sq, D) its gradient, last dim stride 1
    Delta,  # (B, H, Sq) fp32, contiguous
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    seqlen_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id in fp32 (the softmax backward's row term), O(Sq * D) per (b, h)."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_M, BLOCK_D)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)  # fmt: skip
    do = tl.load(DOut + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)  # fmt: skip
    delta = tl.sum(o * do, 1)  # (BLOCK_M,)
    n_heads = tl.num_programs(1)
    tl.store(Delta + (off_b * n_heads + off_h) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # (B, H, Sq, D), last dim stride 1
    K,  # (B, H, Sk, D)
    V,  # (B, H, Sk, D)
    DOut,  # (B, H, Sq, D)
    Stats,  # (B, H, 2, Sq) fp32 from the forward: m, 1 / l
    Delta,  # (B, H, Sq) fp32 from _attention_bwd_delta_kernel
    DK,  # (B, H, Sk, D) out, contiguous
    DV,  # (B, H, Sk, D) out, contiguous
    KPM,  # (B, Sk) uint8; unused unless HAS_KPM
    Bias,  # (B, H, Sq, Sk) by strides; unused unless HAS_BIAS
    RelBias,  # (H, Sq + Sk - 1) fp32; unused unless HAS_RELBIAS
    DBias,  # fp32, the bias's own shape seen as (B, H, Sq, Sk) by strides (0 on broadcast dims); unless STORE_DBIAS
    DRel,  # (B, H, Sq + Sk - 1) fp32, zeroed, dS summed per distance; unused unless STORE_DREL
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_st_b,
    stride_st_h,
    stride_dkb,
    stride_dkh,
    stride_dkn,  # DK and DV share one layout
    stride_kpm_b,
    stride_kpm_n,
    stride_bias_b,
    stride_bias_h,
    stride_bias_m,
    stride_bias_n,
    stride_rb_h,
    stride_db_b,
    stride_db_h,
    stride_db_m,
    stride_db_n,
    seqlen_q,
    seqlen_k,
    qk_scale,  # scale * LOG2E
    sm_scale,  # scale
    SEQ_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RELBIAS: tl.constexpr,
    STORE_DBIAS: tl.constexpr,
    DBIAS_ATOMIC: tl.constexpr,  # the bias broadcasts over some dim: several (b, h, i, j) add into one element
    STORE_DREL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys owned by this program
):
    """One program owns BLOCK_N keys of one (b, h) and streams the query rows that see them:
        p = exp2(t - m) / l;  dV += p^T dO;  dP = dO V^T;  dS = p (dP - delta);  dK += scale * dS^T Q
    dS (the gradient of the natural-log score s) also goes to DBias (stored, or added where the bias broadcasts)
    and, summed per distance j - i, to DRel (atomic adds: query blocks of other programs share distances)."""
    start_n = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    n_ok = offs_n < seqlen_k
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]  # (BLOCK_N, BLOCK_D)
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # fmt: skip
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # fmt: skip
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DOut + off_b * stride_dob + off_h * stride_doh
    st_base = Stats + off_b * stride_st_b + off_h * stride_st_h
    delta_base = Delta + (off_b * tl.num_programs(1) + off_h) * seqlen_q
    kpm_base = KPM + off_b * stride_kpm_b
    bias_base = Bias + off_b * stride_bias_b + off_h * stride_bias_h
    rb_base = RelBias + off_h * stride_rb_h
    db_base = DBias + off_b * stride_db_b + off_h * stride_db_h
    drel_base = DRel + (off_b * tl.num_programs(1) + off_h) * (seqlen_q + seqlen_k - 1)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # query rows i < start_n * BLOCK_N see none of these keys
        lo = (start_n * BLOCK_N) // BLOCK_M * BLOCK_M
    for start_m in range(lo, seqlen_q, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        m_ok = offs_m < seqlen_q
        qd_mask = m_ok[:, None] & d_ok[None, :]  # (BLOCK_M, BLOCK_D)
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=qd_mask, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        row_m = tl.load(st_base + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        row_inv_l = tl.load(st_base + seqlen_q + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        p = _attn_bwd_probs(
            q, k, row_m, row_inv_l, offs_m, offs_n, kpm_base, bias_base, rb_base, seqlen_q, seqlen_k,
            stride_kpm_n, stride_bias_m, stride_bias_n, qk_scale,
            CAUSAL, HAS_KPM, HAS_BIAS, HAS_RELBIAS, DOT_PRECISION,
        )  # fmt: skip  # (BLOCK_M, BLOCK_N) fp32
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_D)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N) fp32, d loss / d s
        mn_ok = m_ok[:, None] & n_ok[None, :]
        if STORE_DBIAS:
            db_ptrs = db_base + offs_m[:, None] * stride_db_m + offs_n[None, :] * stride_db_n
            if DBIAS_ATOMIC:
                tl.atomic_add(db_ptrs, ds, mask=mn_ok, sem="relaxed")
            else:
                tl.store(db_ptrs, ds, mask=mn_ok)
        if STORE_DREL:
            rel = offs_n[None, :] - offs_m[:, None] + (seqlen_q - 1)  # (BLOCK_M, BLOCK_N)
            tl.atomic_add(drel_base + rel, ds, mask=mn_ok, sem="relaxed")
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_D)

    dk = dk * sm_scale
    dkv_off = off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + dkv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dkv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # (B, H, Sq, D), last dim stride 1
    K,  # (B, H, Sk, D)
    V,  # (B, H, Sk, D)
    DOut,  # (B, H, Sq, D)
    Stats,  # (B, H, 2, Sq) fp32
    Delta,  # (B, H, Sq) fp32
    DQ,  # (B, H, Sq, D) out, contiguous
    KPM,
    Bias,
    RelBias,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_st_b,
    stride_st_h,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_kpm_b,
    stride_kpm_n,
    stride_bias_b,
    stride_bias_h,
    stride_bias_m,
    stride_bias_n,
    stride_rb_h,
    seqlen_q,
    seqlen_k,
    qk_scale,  # scale * LOG2E
    sm_scale,  # scale
    SEQ_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RELBIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # keys per inner step
):
    """One program owns BLOCK_M query rows of one (b, h) and streams the keys they see:
        p = exp2(t - m) / l;  dS = p (dO V^T - delta);  dQ += scale * dS K
    (a separate pass from dK / dV, so dQ needs no atomics and is deterministic)."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    qd_mask = m_ok[:, None] & d_ok[None, :]  # (BLOCK_M, BLOCK_D)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=qd_mask, other=0.0)  # fmt: skip
    do = tl.load(DOut + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=qd_mask, other=0.0)  # fmt: skip
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    st_base = Stats + off_b * stride_st_b + off_h * stride_st_h
    row_m = tl.load(st_base + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    row_inv_l = tl.load(st_base + seqlen_q + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + (off_b * tl.num_programs(1) + off_h) * seqlen_q + offs_m, mask=m_ok, other=0.0)

    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    kpm_base = KPM + off_b * stride_kpm_b
    bias_base = Bias + off_b * stride_bias_b + off_h * stride_bias_h
    rb_base = RelBias + off_h * stride_rb_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = seqlen_k
    if CAUSAL:  # keys past this tile's last row are masked for all of its rows
        hi = tl.minimum((start_m + 1) * BLOCK_M, seqlen_k)
    for start_n in range(0, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        kv_mask = (offs_n[:, None] < seqlen_k) & d_ok[None, :]  # (BLOCK_N, BLOCK_D)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = _attn_bwd_probs(
            q, k, row_m, row_inv_l, offs_m, offs_n, kpm_base, bias_base, rb_base, seqlen_q, seqlen_k,
            stride_kpm_n, stride_bias_m, stride_bias_n, qk_scale,
            CAUSAL, HAS_KPM, HAS_BIAS, HAS_RELBIAS, DOT_PRECISION,
        )  # fmt: skip  # (BLOCK_M, BLOCK_N) fp32
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_D)

    dq = dq * sm_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------------------------------------------- launchers


def _d_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def attention_cuda_configs() -> list[triton.Config]:
    """All CUDA autotune candidates; `_prune_configs` keeps those of the call's head-dim class."""
    seen, out = set(), []
    for rows in CUDA_CONFIGS.values():
        for bm, bn, warps, stages in rows:
            if (bm, bn, warps, stages) not in seen:
                seen.add((bm, bn, warps, stages))
                maxnreg = MAXNREG.get((bm, bn, warps, stages))
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn}
                out.append(triton.Config(cfg, num_warps=warps, num_stages=stages, maxnreg=maxnreg))
    return out


def _prune_configs(configs, named_args, **kwargs):
    """Keep the head-dim class's candidates, less those that spill with this call's bias / T5 table (SPILLS_WITH),
    without query tiles far longer than the sequences."""
    args = {**named_args, **kwargs}
    d_class = _d_class(args["BLOCK_D"])
    wanted = set(CUDA_CONFIGS[d_class])
    for feature in ("HAS_BIAS", "HAS_RELBIAS"):
        if args.get(feature, False):
            wanted -= SPILLS_WITH.get((feature, d_class), set())
    longest = max(32, args["SEQ_BUCKET"])
    kept = [
        c
        for c in configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted
        and c.kwargs["BLOCK_M"] <= longest
    ]
    return kept or configs[:1]


@functools.cache
def _autotuned_attention_kernel():
    """The CUDA entry point: `_attention_fwd_kernel` autotuned. Built lazily, never under the interpreter (where
    autotuning would run every candidate in numpy)."""
    return triton.autotune(
        configs=attention_cuda_configs(),
        # one tuning per variant (the candidates differ); the autotuner adds the tensors' dtypes to the key
        key=["BLOCK_D", "SEQ_BUCKET", "CAUSAL", "HAS_KPM", "HAS_BIAS", "HAS_RELBIAS", "STORE_STATS"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_attention_fwd_kernel)


def attention_unsupported_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    rel_bias_table: torch.Tensor | None = None,
):
    """None if `attention_forward` handles these inputs, else a short reason (the op layer falls back to torch)."""
    b, h, _, d = q.shape
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} is not fp32/fp16/bf16"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}"
    if d == 0:
        return "head dim 0"
    if h > MAX_GRID_YZ or b > MAX_GRID_YZ:
        return f"batch {b} or heads {h} > {MAX_GRID_YZ} (CUDA grid limit)"
    if bias is not None and not bias.dtype.is_floating_point:
        return f"bias dtype {bias.dtype} is not floating point"
    if rel_bias_table is not None and rel_bias_table.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"rel_bias_table dtype {rel_bias_table.dtype} is not fp32/fp16/bf16"
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        return f"device {q.device} needs CUDA or TRITON_INTERPRET=1"
    return None


def _relative_bias_by_distance(table: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """(H, Sq + Sk - 1) fp32: the bias of every relative distance per head, table[lut[d], h] at d + Sq - 1. O(Sq + Sk)
    work on the host side; bucket ids clamped into [0, num_buckets), so a bad lut cannot read out of bounds.

    NOTE: fp32 and one gather per tile, not lut then table in the kernel: the dependent second gather, and any gather
    of 2-byte elements (no cp.async), sits in registers, which spilled 192-472 B on sm_90a under Triton 3.9 (T5, hd
    80/128); from fp32 the gather is pipelined through shared memory (0 B at hd 128, (64, 64, 4, 3))."""
    ids = lut.to(torch.long).clamp(0, table.shape[0] - 1)
    return table.index_select(0, ids).t().to(torch.float32).contiguous()


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    rel_bias_table: torch.Tensor | None = None,
    rel_bias_lut: torch.Tensor | None = None,
    return_stats: bool = False,
):
    """softmax(scale * q @ k^T + bias + rel, masked) @ v. q: (B, H, Sq, D), k, v: (B, H, Sk, D), any strides.

    key_padding_mask: (B, Sk) bool, True = attend. bias: broadcastable to (B, H, Sq, Sk). causal needs Sq == Sk.
    rel_bias_table: (num_buckets, H) and rel_bias_lut: (Sq + Sk - 1,) integer bucket ids, both or neither:
    rel[h, i, j] = rel_bias_table[rel_bias_lut[j - i + Sq - 1], h], gathered per tile, never materialised.
    Returns (B, H, Sq, D) in q.dtype, a view of a (B, Sq, H, D)-contiguous buffer; fully masked rows are 0.
    return_stats: return (out, stats) instead, stats the (B, H, 2, Sq) fp32 row statistics `attention_backward` takes
    (see "Backward" in the module docstring).
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if causal:
        assert sq == sk, f"causal attention needs Sq == Sk, got {sq}, {sk}"
    out = torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Sq, D)
    stats = torch.empty(b, h, 2, sq, dtype=torch.float32, device=q.device) if return_stats else None
    if out.numel() == 0:
        if stats is not None:  # no keys: every row is dead (m = -FP32_MAX, 1 / l = 0)
            stats[:, :, 0] = -FP32_MAX
            stats[:, :, 1] = 0.0
        return (out, stats) if return_stats else out
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)

    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.bool).view(torch.uint8)  # (B, Sk), free for bool
        kpm_strides = (kpm.stride(0), kpm.stride(1))
    else:
        kpm, kpm_strides = q, (0, 0)  # dummy pointer, never read
    if bias is not None:
        bias_v = bias.expand(b, h, sq, sk)  # stride 0 on broadcast dims
        bias_strides = bias_v.stride()
    else:
        bias_v, bias_strides = q, (0, 0, 0, 0)
    has_rel = rel_bias_table is not None
    if has_rel:
        assert rel_bias_lut is not None and rel_bias_lut.numel() == sq + sk - 1, "rel_bias_lut needs Sq + Sk - 1 ids"
        assert rel_bias_table.shape[1] == h, f"rel_bias_table must be (num_buckets, H={h})"
        rb = _relative_bias_by_distance(rel_bias_table, rel_bias_lut)  # (H, Sq + Sk - 1) fp32
        rb_args = (rb.stride(0),)
    else:
        rb, rb_args = q, (0,)  # dummy pointer, never read

    interp = interpreting()
    # bf16 tiles are upcast to fp32 before tl.dot under the interpreter (see dot_flags in kernels/_common.py)
    dot_fp32, dot_precision = dot_flags(q.dtype)
    block_d = max(MIN_BLOCK, triton.next_power_of_2(d))
    seq_bucket = min(SEQ_BUCKET_MAX, triton.next_power_of_2(max(sq, sk)))

    st, st_strides = (stats, (stats.stride(0), stats.stride(1))) if return_stats else (q, (0, 0))
    args = (
        q, k, v, out, kpm, bias_v, rb, st,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *kpm_strides, *bias_strides, *rb_args, *st_strides,
        sq, sk, scale * LOG2E, seq_bucket,
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=d,
        BLOCK_D=block_d,
        CAUSAL=bool(causal),
        HAS_KPM=key_padding_mask is not None,
        HAS_BIAS=bias is not None,
        HAS_RELBIAS=has_rel,
        DOT_FP32=dot_fp32,
        DOT_PRECISION=dot_precision,
        STORE_STATS=bool(return_stats),
    )
    if interp:
        grid = (math.ceil(sq / INTERPRETER_CONFIG["BLOCK_M"]), h, b)
        _attention_fwd_kernel[grid](*args, **meta, **INTERPRETER_CONFIG)
    else:

        def grid(m):
            return (triton.cdiv(sq, m["BLOCK_M"]), h, b)

        with torch.cuda.device(q.device):
            traceable(_autotuned_attention_kernel())[grid](*args, **meta)
    return (out, stats) if return_stats else out


# ---------------------------------------------------------------------------------------------------- backward launch


def _bwd_d_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def _bwd_cuda_configs(table) -> list[triton.Config]:
    seen, out = set(), []
    for rows in table.values():
        for bm, bn, warps, stages in rows:
            if (bm, bn, warps, stages) not in seen:
                seen.add((bm, bn, warps, stages))
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn}
                out.append(triton.Config(cfg, num_warps=warps, num_stages=stages))
    return out


def attention_bwd_cuda_configs(kernel: str) -> list[triton.Config]:
    """All CUDA autotune candidates of one backward kernel ("dkdv" or "dq")."""
    return _bwd_cuda_configs(BWD_CUDA_CONFIGS[kernel])


def _prune_bwd_configs(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d_class = _bwd_d_class(args["BLOCK_D"])
        wanted = set(BWD_CUDA_CONFIGS[kernel][d_class])
        for feature in ("HAS_BIAS", "HAS_RELBIAS"):
            if args.get(feature, False):
                wanted -= BWD_SPILLS_WITH.get((kernel, feature, d_class), set())
        longest = max(32, args["SEQ_BUCKET"])
        own = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"  # the tile a program owns must not dwarf the sequence
        kept = [
            c
            for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted
            and c.kwargs[own] <= longest
        ]
        return kept or configs[:1]

    prune.__name__ = f"_prune_bwd_{kernel}_configs"
    return prune


@functools.cache
def _autotuned_bwd_kernel(kernel: str):
    """The CUDA entry points of the backward, autotuned like the forward (never under the interpreter). The dK / dV
    kernel adds into DBias (broadcast bias) and DRel with atomics: the autotuner zeroes them before every trial."""
    key = ["BLOCK_D", "SEQ_BUCKET", "CAUSAL", "HAS_KPM", "HAS_BIAS", "HAS_RELBIAS"]
    if kernel == "dkdv":
        key += ["STORE_DBIAS", "DBIAS_ATOMIC", "STORE_DREL"]
    fn = _attention_bwd_dkdv_kernel if kernel == "dkdv" else _attention_bwd_dq_kernel
    return triton.autotune(
        configs=attention_bwd_cuda_configs(kernel),
        key=key,
        prune_configs_by={"early_config_prune": _prune_bwd_configs(kernel)},
        reset_to_zero=["DBias", "DRel"] if kernel == "dkdv" else None,
    )(fn)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    rel_bias_table: torch.Tensor | None = None,
    rel_bias_lut: torch.Tensor | None = None,
    bias_grad: bool = False,
    table_grad: bool = False,
):
    """Gradients of `attention_forward` from its output `out`, the row statistics `stats` it returned
    (return_stats=True) and the output gradient `dout` (B, H, Sq, D). Three launches: delta, dK / dV, dQ.

    Returns (dq, dk, dv, dbias, dtable): dq (B, H, Sq, D), dk / dv (B, H, Sk, D) contiguous in the inputs' dtype;
    dbias in bias's own shape and dtype when bias_grad (else None), dtable (num_buckets, H) in the table's dtype when
    table_grad (else None). Memory beyond the gradients: O(B * H * (Sq + Sk)) fp32, plus an fp32 buffer of the
    bias's own shape when bias_grad; never an (Sq, Sk) tensor otherwise.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    dev = q.device
    dq = torch.empty(b, h, sq, d, dtype=q.dtype, device=dev)
    dk = torch.empty(b, h, sk, d, dtype=k.dtype, device=dev)
    dv = torch.empty(b, h, sk, d, dtype=v.dtype, device=dev)
    bias_grad = bias_grad and bias is not None
    table_grad = table_grad and rel_bias_table is not None
    dbias_buf = torch.zeros(bias.shape, dtype=torch.float32, device=dev) if bias_grad else None
    drel = torch.zeros(b, h, sq + sk - 1, dtype=torch.float32, device=dev) if table_grad else None

    def finish():
        dbias = dbias_buf.to(bias.dtype) if bias_grad else None
        dtable = None
        if table_grad:
            ids = rel_bias_lut.to(torch.long).clamp(0, rel_bias_table.shape[0] - 1)  # as the forward's gather
            acc = torch.zeros(rel_bias_table.shape, dtype=torch.float32, device=dev)
            dtable = acc.index_add_(0, ids, drel.sum(0).t()).to(rel_bias_table.dtype)  # (num_buckets, H)
        return dq, dk, dv, dbias, dtable

    if b * h == 0 or sq == 0 or sk == 0 or d == 0:  # nothing attends: every gradient is 0
        for t in (dq, dk, dv):
            t.zero_()
        return finish()

    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    out, dout = last_dim_contiguous(out), last_dim_contiguous(dout)
    stats = stats.contiguous()  # the kernels address row 1 of (2, Sq) at + Sq
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)  # stands for unused pointers (zeroed by the autotuner)
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.bool).view(torch.uint8)  # (B, Sk)
        kpm_strides = (kpm.stride(0), kpm.stride(1))
    else:
        kpm, kpm_strides = dummy, (0, 0)
    if bias is not None:
        bias_v = bias.expand(b, h, sq, sk)
        bias_strides = bias_v.stride()
    else:
        bias_v, bias_strides = dummy, (0, 0, 0, 0)
    if rel_bias_table is not None:
        rb = _relative_bias_by_distance(rel_bias_table, rel_bias_lut)  # (H, Sq + Sk - 1) fp32
        rb_stride = rb.stride(0)
    else:
        rb, rb_stride = dummy, 0
    if bias_grad:
        db_v = dbias_buf.expand(b, h, sq, sk)  # stride 0 where the bias broadcasts
        db_strides = db_v.stride()
        db_atomic = tuple(bias.shape) != (b, h, sq, sk)
    else:
        db_v, db_strides, db_atomic = dummy, (0, 0, 0, 0), False

    delta = torch.empty(b, h, sq, dtype=torch.float32, device=dev)
    dot_fp32, dot_precision = dot_flags(q.dtype)
    block_d = max(MIN_BLOCK, triton.next_power_of_2(d))
    seq_bucket = min(SEQ_BUCKET_MAX, triton.next_power_of_2(max(sq, sk)))
    common = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        stats.stride(0), stats.stride(1),
    )  # fmt: skip
    masks = (*kpm_strides, *bias_strides, rb_stride)
    dkdv_args = (
        q, k, v, dout, stats, delta, dk, dv, kpm, bias_v, rb, db_v, drel if table_grad else dummy,
        *common, dk.stride(0), dk.stride(1), dk.stride(2), *masks, *db_strides,
        sq, sk, scale * LOG2E, scale, seq_bucket,
    )  # fmt: skip
    dq_args = (
        q, k, v, dout, stats, delta, dq, kpm, bias_v, rb,
        *common, dq.stride(0), dq.stride(1), dq.stride(2), *masks,
        sq, sk, scale * LOG2E, scale, seq_bucket,
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=d,
        BLOCK_D=block_d,
        CAUSAL=bool(causal),
        HAS_KPM=key_padding_mask is not None,
        HAS_BIAS=bias is not None,
        HAS_RELBIAS=rel_bias_table is not None,
        DOT_FP32=dot_fp32,
        DOT_PRECISION=dot_precision,
    )
    dkdv_meta = dict(STORE_DBIAS=bias_grad, DBIAS_ATOMIC=db_atomic, STORE_DREL=table_grad)
    delta_args = (out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
                  dout.stride(0), dout.stride(1), dout.stride(2), sq)  # fmt: skip
    delta_grid = (triton.cdiv(sq, DELTA_BLOCK_M), h, b)
    if interpreting():
        cfg = INTERPRETER_CONFIG
        _attention_bwd_delta_kernel[delta_grid](*delta_args, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=DELTA_BLOCK_M)
        _attention_bwd_dkdv_kernel[(triton.cdiv(sk, cfg["BLOCK_N"]), h, b)](*dkdv_args, **meta, **dkdv_meta, **cfg)
        _attention_bwd_dq_kernel[(triton.cdiv(sq, cfg["BLOCK_M"]), h, b)](*dq_args, **meta, **cfg)
        return finish()

    def dkdv_grid(m):
        return (triton.cdiv(sk, m["BLOCK_N"]), h, b)

    def dq_grid(m):
        return (triton.cdiv(sq, m["BLOCK_M"]), h, b)

    with torch.cuda.device(dev):
        traceable(_attention_bwd_delta_kernel)[delta_grid](
            *delta_args, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=DELTA_BLOCK_M, num_warps=4
        )
        traceable(_autotuned_bwd_kernel("dkdv"))[dkdv_grid](*dkdv_args, **meta, **dkdv_meta)
        traceable(_autotuned_bwd_kernel("dq"))[dq_grid](*dq_args, **meta)
    return finish()
