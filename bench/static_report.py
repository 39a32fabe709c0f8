"""Static GPU report: every Triton kernel compiled for sm_90a and sm_80 on a machine without a GPU, with the cubin's
registers, stack (spill) bytes and shared memory.

    python bench/static_report.py                           # the committed report, under the installed triton
    python bench/static_report.py --also .venv-triton36/bin/python         # then the same under triton 3.6
    python bench/static_report.py --matrix ci --json /tmp/ci.json --no-md          # the CI subset

How a row is made (no hand-copied kernel list; a change in kernels/ shows up here):
  1. each case calls a real launcher from `fastenc.kernels.*` on small CPU tensors with the launch intercepted
     (`JITFunction.run` / `Autotuner.run` record their arguments instead of running), so the arguments, constexprs
     and launch options are exactly what the dispatcher passes for that input;
  2. an autotuned launch expands into the configs its pruner keeps, the pruner called as the autotuner calls it,
     with every integer autotune key (e.g. SEQ_BUCKET) swept over 1, 2, 4, ..., 8192: a config is `selectable`
     when the pruner keeps it for some key value (`selectable_when` gives the range); `--all-configs` also
     compiles the configs it never keeps (selectable false);
  3. each (kernel, arguments, config) is specialised by triton's own launch binder (16-byte divisibility, ints
     equal to 1) and compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`;
  4. `cuobjdump --dump-resource-usage` (from the triton wheel) on the cubin gives REG / STACK / LOCAL / SHARED;
     the dynamic shared memory is `compiled.metadata.shared` (what triton's launcher checks against the device).

Which inputs a matrix compiles is data: the tables CI_MATRIX, REPORT_MATRIX and FULL_MATRIX below, one row per
(families, dtypes, sizes, variants) product.

fits: dynamic shared memory <= the arch's per-block opt-in limit (227 KiB sm_90, 163 KiB sm_80) and
registers x threads <= 64 K (at least one CTA per SM). A spill is STACK > 0.

The JSON keeps each triton minor version's rows: a run under 3.9 replaces the 3.9 rows only. It records the sha256
of kernels/*.py at generation time (tests/test_static.py checks it is current) and each version's triton, torch and
python versions. Compiles run in a fork pool (`--jobs`, default 2) with a fresh TRITON_CACHE_DIR that is deleted
afterwards, so nothing is reused across runs or versions.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------------------------------- constants

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
DEFAULT_JSON = Path("bench/results/static-sm90.json")  # relative to the repo root; holds sm_90a and sm_80 rows
ARCHS = {90: {"name": "sm_90a", "smem": 227 * 1024}, 80: {"name": "sm_80", "smem": 163 * 1024}}
REGS_PER_SM = 64 * 1024
KEY_SWEEP = tuple(2**i for i in range(14))  # 1 .. 8192: integer autotune keys (sequence / size buckets)
SCHEMA = 1

# Attention head dims: the issue's head-dim classes, plus the models' odd ones (fp16 vision/plain only: same
# BLOCK_D = 128 masked path as 80 / 96). Models: CLIP / SigLIP base / T5 64, SigLIP so400m 72, bigG vision 104.
HEAD_DIMS = (32, 64, 80, 96, 128, 256)
MODEL_ODD_HEAD_DIMS = (72, 104)
CI_HEAD_DIMS = (64, 80, 128)

# attention flag sets, name -> (causal, key padding, additive bias, T5 relative bias), and where each comes from
ATTN_VARIANTS = {
    "plain": (False, False, False, False),  # vision towers, SigLIP MAP head
    "kpm": (False, True, False, False),  # SigLIP text / NaFlex masks, attn_implementation="fastenc" padding
    "causal": (True, False, False, False),  # CLIP text without attention_mask
    "causal+kpm": (True, True, False, False),  # CLIP text with attention_mask
    "kpm+relbias": (False, True, False, True),  # T5 / UMT5 encoder
    "bias": (False, False, True, False),  # attn_implementation="fastenc": other masks as an additive bias
    "kpm+bias": (False, True, True, False),  # attn_implementation="fastenc": padding + position_bias
}

# dtype labels: fp32 runs IEEE dots unless torch's matmul precision allows TF32 ("fp32-tf32"), see dot_flags
DTYPE_LABELS = ("fp16", "bf16", "fp32", "fp32-tf32")


def _torch_dtype(label):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp32-tf32": torch.float32}[label]


@contextlib.contextmanager
def _matmul_precision(label):
    import torch

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if label == "fp32-tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# ---------------------------------------------------------------------------------------------------- case tables
# What each matrix compiles. A row is a product: each family x dtype x size x variant is one case, built by the
# family's case function (`CASE_FUNCTIONS`), which also names it ("fp16 hd64 causal+kpm"). Sizes are head dims
# (attention), feature widths (cosine, contrastive), or the name of a width list read from the supported model
# shapes (`_size_lists`). In a variant, "{act}" stands for every activation of kernels/activation.py and "{dtype}"
# for the row's dtype. `archs` limits a row to those archs (default: every --arch).

NORM_DTYPES = ("fp16", "bf16", "fp32")
ALL_HEAD_DIMS = HEAD_DIMS + MODEL_ODD_HEAD_DIMS
NORMS = ("layer_norm", "layer_norm_bwd")
RMS_NORMS = ("rms_norm", "rms_norm_bwd")
BIAS_ACTIVATIONS = ("bias_activation", "bias_activation_bwd")
GATED_ACTIVATIONS = ("gated_activation", "gated_activation_bwd")
CONTRASTIVE = ("contrastive_stats", "contrastive_grads")


@dataclass(frozen=True)
class Grid:
    """Cases of one table row: every family x dtype x size x variant."""

    families: tuple
    dtypes: tuple
    sizes: tuple | str  # head dims / widths, or the name of a width list (see _size_lists)
    variants: tuple = ("",)
    archs: tuple | None = None


# tests/test_static.py: attention fp16 with CLIP text's and T5's flags, one norm / activation of each kind
CI_MATRIX = (
    Grid(("attention",), ("fp16",), CI_HEAD_DIMS, ("causal+kpm", "kpm+relbias")),
    Grid(NORMS, ("fp16",), (768,), ("+residual",)),
    Grid(RMS_NORMS, ("fp16",), (4096,), ("w:fp16 +residual",)),
    Grid(BIAS_ACTIVATIONS, ("fp16",), (3072,), ("quick_gelu",)),
    Grid(GATED_ACTIVATIONS, ("fp16",), (2048,), ("gelu_tanh",)),
)

# norms at every supported model width (the same BLOCK_N / warps compile once; rows list the widths) plus the widest
# row the kernel accepts (MAX_FUSED_N forward, MAX_FUSED_BWD_N backward); activations at every FFN width
NORMS_AND_ACTIVATIONS = (
    Grid(NORMS, NORM_DTYPES, "hidden+widest", ("", "+residual")),
    Grid(NORMS, NORM_DTYPES, "narrowest hidden", ("no-bias",)),
    Grid(RMS_NORMS, NORM_DTYPES, "t5_d+widest", ("w:{dtype}", "w:{dtype} +residual")),
    # fp16 / bf16 T5 keeps its residual stream in fp32: fp32 x + residual, half weight
    Grid(RMS_NORMS, ("fp32",), "t5_d+widest", ("w:fp16 +residual",)),
    Grid(BIAS_ACTIVATIONS, NORM_DTYPES, "ffn", ("{act}",)),
    Grid(BIAS_ACTIVATIONS, ("fp16",), "narrowest ffn", ("{act} no-bias",)),
    Grid(GATED_ACTIVATIONS, NORM_DTYPES, "t5_ff", ("{act}",)),
    Grid(("cosine",), DTYPE_LABELS, (768,)),
    Grid(CONTRASTIVE, DTYPE_LABELS, (768,), ("clip", "siglip")),
)

# the committed report: what fits ~4 min per triton version on 2 idle cores
REPORT_MATRIX = (
    Grid(("attention",), ("fp16",), HEAD_DIMS, ("plain", "causal+kpm")),  # vision towers, CLIP text
    Grid(("attention",), ("fp16",), (64, 80, 128), ("kpm+relbias",)),  # T5 (80: covers the CI subset)
    Grid(("attention",), ("fp16",), (64,), ("bias", "kpm+bias")),  # attn_implementation="fastenc"
    Grid(("attention",), ("bf16",), (64,), ("causal+kpm", "kpm+relbias")),
    Grid(("attention",), ("fp32-tf32",), (64,), ("kpm",)),
    Grid(("attention",), ("fp32",), (64,), ("kpm",), archs=(90,)),  # IEEE fp32 (torch's default): 10-70 s a compile
    # the training path: backward (T5 with the table gradient, an additive bias with its gradient) and the forward
    # that writes the row statistics
    Grid(("attention_bwd",), ("fp16",), (64,), ("plain", "causal+kpm", "kpm+relbias", "kpm+bias")),
    Grid(("attention_bwd",), ("fp16",), (80,), ("plain",)),
    Grid(("attention_bwd",), ("fp16",), (128,), ("causal+kpm",)),
    Grid(("attention_bwd",), ("bf16",), (64,), ("causal+kpm",)),
    Grid(("attention_fwd_stats",), ("fp16",), (64,), ("causal+kpm", "kpm+relbias")),
    *NORMS_AND_ACTIVATIONS,
)

# everything: every dtype x head dim (the odd model ones too) x flag set x arch, both weight dtypes of the fp32 T5
# norm, activations without a bias in every dtype
FULL_MATRIX = (
    Grid(("attention", "attention_bwd", "attention_fwd_stats"), DTYPE_LABELS, ALL_HEAD_DIMS, tuple(ATTN_VARIANTS)),
    *NORMS_AND_ACTIVATIONS,
    Grid(RMS_NORMS, ("fp32",), "t5_d+widest", ("w:bf16 +residual",)),
    Grid(BIAS_ACTIVATIONS, ("bf16", "fp32"), "narrowest ffn", ("{act} no-bias",)),
)

MATRICES = {"report": REPORT_MATRIX, "ci": CI_MATRIX, "full": FULL_MATRIX}


# ---------------------------------------------------------------------------------------------------- sources


def kernels_dir() -> Path:
    import fastenc.kernels

    return Path(fastenc.kernels.__file__).parent


def kernel_sources_digest(directory: Path | None = None) -> dict:
    """sha256 of kernels/*.py (names and bytes, sorted), plus each file's own sha256."""
    directory = directory or kernels_dir()
    total = hashlib.sha256()
    files = {}
    for path in sorted(directory.glob("*.py")):
        data = path.read_bytes()
        files[path.name] = hashlib.sha256(data).hexdigest()
        total.update(path.name.encode() + b"\0" + data + b"\0")
    return {"sha256": total.hexdigest(), "files": files}


# ---------------------------------------------------------------------------------------------------- capture


@dataclass
class Case:
    """One dispatcher-level input: a launcher call on CPU tensors. `kernel` names the op family for the report."""

    family: str
    variant: str  # e.g. "fp16 hd64 causal+kpm"
    dtype: str
    launch: object  # () -> None, calls a fastenc.kernels launcher
    shape: str = ""  # the input size it stands for (widths merge when the compile is the same)
    cost: float = 1.0  # relative compile cost, for scheduling
    archs: tuple | None = None  # only these archs (None: every --arch)


@dataclass
class Job:
    family: str
    kernel: str
    variant: str
    dtype: str
    shapes: list
    constexprs: dict
    config: dict
    selectable: bool
    selectable_when: str
    fn: object
    args: tuple
    kwargs: dict
    key: tuple
    cost: float
    archs: tuple | None = None
    arch: int = 0
    extra: dict = field(default_factory=dict)


_CAPTURED: list = []


def _install_capture():
    """Launches record (kernel, args, kwargs) instead of running; no CUDA device is touched."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        _CAPTURED.append((self, args, kwargs))

    def autotuner_run(self, *args, **kwargs):
        _CAPTURED.append((self, args, kwargs))

    JITFunction.run = jit_run
    Autotuner.run = autotuner_run
    torch.cuda.device = lambda device: contextlib.nullcontext()  # launchers enter the tensor's device
    torch.library.wrap_triton = lambda kernel: kernel  # `traceable`: the kernel itself outside tracing


def _capture(launch):
    _CAPTURED.clear()
    launch()
    out = list(_CAPTURED)
    _CAPTURED.clear()
    return out


def _inner_jit(fn):
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _strip_launch(kwargs):
    return {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}


def _config_dict(cfg) -> dict:
    d = dict(cfg.kwargs)
    d["num_warps"] = cfg.num_warps
    d["num_stages"] = cfg.num_stages
    if getattr(cfg, "maxnreg", None):
        d["maxnreg"] = cfg.maxnreg
    return d


def _selectable_range(autotuner, args, kwargs):
    """{config: [key assignments that keep it]} from the pruner, integer autotune keys swept over KEY_SWEEP."""
    nargs = dict(zip(autotuner.arg_names, args, strict=False))
    int_keys = [
        k for k in autotuner.keys if k in nargs and isinstance(nargs[k], int) and not isinstance(nargs[k], bool)
    ]
    kept: dict = {}
    if not autotuner.early_config_prune and not autotuner.perf_model:
        return {c: None for c in autotuner.configs}, int_keys
    for values in itertools.product(KEY_SWEEP, repeat=len(int_keys)):
        autotuner.nargs = {**nargs, **dict(zip(int_keys, values, strict=True))}
        try:
            for c in autotuner.prune_configs(dict(kwargs)):
                kept.setdefault(c, []).append(values)
        finally:
            autotuner.nargs = None
    return kept, int_keys


def _describe_when(values, int_keys) -> str:
    if values is None or len(values) == len(KEY_SWEEP) ** len(int_keys):
        return "always"
    parts = []
    for i, k in enumerate(int_keys):
        vs = sorted({v[i] for v in values})
        parts.append(f"{k} {vs[0]}..{vs[-1]}" if vs != list(KEY_SWEEP) else f"{k} any")
    return ", ".join(parts)


def _spec_key(fn, args, kwargs):
    """What makes two launches the same compile: kernel, argument types / specialisation, constexprs, options."""
    import torch

    parts = []
    for name, a in zip(fn.arg_names, args, strict=False):
        if isinstance(a, torch.Tensor):
            parts.append((name, str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or a is None or isinstance(a, str):
            parts.append((name, a))
        elif isinstance(a, int):
            parts.append((name, "i", a == 1, a % 16 == 0, a.bit_length() > 31))
        else:
            parts.append((name, type(a).__name__))
    return (fn.__name__, tuple(parts), tuple(sorted((k, str(v)) for k, v in kwargs.items())))


def expand_case(case: Case, all_configs: bool) -> list[Job]:
    """The compile jobs of one case: one per config the autotuner may pick (or the launcher's fixed one)."""
    from triton.runtime.autotuner import Autotuner

    launches = _capture(case.launch)
    jobs = []
    for top, args, kwargs in launches:
        kwargs = _strip_launch(kwargs)
        if isinstance(top, Autotuner):
            kept, int_keys = _selectable_range(top, args, kwargs)
            configs = top.configs if all_configs else [c for c in top.configs if c in kept]
            for cfg in configs:

                def launch(top=top, args=args, kwargs=kwargs, cfg=cfg):  # as Autotuner.run calls the chosen config
                    top.fn.run(*args, grid=None, warmup=False, **kwargs, **cfg.all_kwargs())

                ((fn, fargs, fkw),) = _capture(launch)
                fkw = _strip_launch(fkw)
                cdict = _config_dict(cfg)
                jobs.append(_job(case, fn, fargs, fkw, cdict, cfg in kept, _describe_when(kept.get(cfg), int_keys)))
        else:
            fn = _inner_jit(top)
            cdict = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") and k != "BLOCK_D"}
            cdict["num_warps"] = kwargs.get("num_warps", 4)
            cdict["num_stages"] = kwargs.get("num_stages", 3)  # CUDAOptions' default, in 3.6 and 3.9
            jobs.append(_job(case, fn, args, kwargs, cdict, True, "fixed by the launcher"))
    return jobs


def _job(case, fn, args, kwargs, cdict, selectable, when):
    constexprs = {
        p.name: kwargs[p.name] for p in fn.params if p.is_constexpr and p.name in kwargs and p.name not in cdict
    }
    return Job(
        family=case.family, kernel=fn.__name__, variant=case.variant, dtype=case.dtype,
        shapes=[case.shape] if case.shape else [], constexprs=constexprs, config=cdict, selectable=selectable,
        selectable_when=when, fn=fn, args=args, kwargs=kwargs, key=_spec_key(fn, args, kwargs), cost=case.cost,
        archs=case.archs,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- cases


def _tokens(variant: str, allowed: set) -> set:
    """The flags of a table variant; a flag outside `allowed` is a typo in a table."""
    tokens = set(variant.split())
    unknown = tokens - allowed
    if unknown:
        raise ValueError(f"unknown variant flag(s) {sorted(unknown)} in {variant!r} (allowed: {sorted(allowed)})")
    return tokens


def _attention_inputs(dtype, hd, variant, s):
    """(q, keyword arguments) of one attention variant at length s, batch 1, 2 heads: k and v are q's clones. The
    additive bias is (B, 1, Sq, Sk), as attn_implementation builds it (broadcast over heads: the backward's dbias
    then takes atomic adds)."""
    import torch

    causal, kpm, bias, relbias = ATTN_VARIANTS[variant]
    dt = _torch_dtype(dtype)
    b, h = 1, 2
    q = torch.zeros(b, h, s, hd, dtype=dt)
    kw = dict(causal=causal, key_padding_mask=None, bias=None, scale=hd**-0.5)
    if kpm:
        kw["key_padding_mask"] = torch.ones(b, s, dtype=torch.bool)
    if bias:
        kw["bias"] = torch.zeros(b, 1, s, s, dtype=dt)
    if relbias:
        kw["rel_bias_table"] = torch.zeros(32, h, dtype=dt)
        kw["rel_bias_lut"] = torch.zeros(2 * s - 1, dtype=torch.int32)
    return q, kw


def _attention_seq(variant):
    causal, _, _, relbias = ATTN_VARIANTS[variant]
    return 77 if causal else 512 if relbias else 257  # CLIP text, T5, ViT-L/14 vision


def _attention_case(dtype, hd, variant):
    from fastenc.kernels import attention as K

    s = _attention_seq(variant)

    def launch():
        q, kw = _attention_inputs(dtype, hd, variant, s)
        with _matmul_precision(dtype):
            K.attention_forward(q, q.clone(), q.clone(), **kw)

    fp32_cost = 12.0 if dtype == "fp32" else 1.5 if dtype == "fp32-tf32" else 1.0
    cost = fp32_cost * (1.5 if hd >= 128 else 1.0) * (1.5 if "relbias" in variant else 1.0)
    return Case("attention", f"{dtype} hd{hd} {variant}", dtype, launch, f"S={s}", cost)


def _attention_bwd_case(dtype, hd, variant, stats_forward=False):
    """The training path of one attention variant: family "attention_bwd" launches `attention_backward` (delta, dK / dV
    and dQ kernels; T5 with the table gradient, an additive bias with its gradient), "attention_fwd_stats" the
    forward that also writes the row statistics (STORE_STATS)."""
    import torch

    from fastenc.kernels import attention as K

    _, _, bias, relbias = ATTN_VARIANTS[variant]
    s = _attention_seq(variant)

    def launch():
        q, kw = _attention_inputs(dtype, hd, variant, s)
        with _matmul_precision(dtype):
            if stats_forward:
                K.attention_forward(q, q.clone(), q.clone(), return_stats=True, **kw)
            else:
                stats = torch.zeros(q.shape[0], q.shape[1], 2, s, dtype=torch.float32)
                K.attention_backward(q.clone(), q, q.clone(), q.clone(), q.clone(), stats, bias_grad=bias,
                                     table_grad=relbias, **kw)  # fmt: skip

    family = "attention_fwd_stats" if stats_forward else "attention_bwd"
    cost = 2.0 * (12.0 if dtype == "fp32" else 1.0) * (1.5 if hd >= 128 else 1.0)
    return Case(family, f"{dtype} hd{hd} {variant}", dtype, launch, f"S={s}", cost / 2 if stats_forward else cost)


def _attention_stats_case(dtype, hd, variant):
    return _attention_bwd_case(dtype, hd, variant, stats_forward=True)


def _model_widths():
    """(hidden widths, FFN widths, T5 d_model, T5 d_ff) of the supported model shapes (tiny test shapes left out)."""
    from fastenc.benchmark.matrix import SIGLIP_SHAPES, T5_SHAPES
    from fastenc.models.configs import CLIP_SHAPES

    hidden, ffn = set(), set()
    for name, s in CLIP_SHAPES.items():
        if name != "tiny":
            hidden |= {s.text_width, s.vision_width}
            ffn |= {s.text_ffn or 4 * s.text_width, s.vision_ffn or 4 * s.vision_width}
    for name, s in SIGLIP_SHAPES.items():
        if name != "tiny":
            hidden.add(s["width"])
            ffn.add(s["ffn"])
    t5_d = {s["d_model"] for n, s in T5_SHAPES.items() if n != "tiny"}
    t5_ff = {s["d_ff"] for n, s in T5_SHAPES.items() if n != "tiny"}
    return sorted(hidden), sorted(ffn), sorted(t5_d), sorted(t5_ff)


def _size_lists(backward: bool) -> dict:
    """The width lists a table row names: model widths, and with "+widest" the widest row the norm kernel accepts
    (forward or backward)."""
    from fastenc.kernels import norm as N

    hidden, ffn, t5_d, t5_ff = _model_widths()
    widest = N.MAX_FUSED_BWD_N if backward else N.MAX_FUSED_N
    return {
        "hidden+widest": hidden + [widest],
        "narrowest hidden": hidden[:1],
        "t5_d+widest": t5_d + [widest],
        "ffn": ffn,
        "narrowest ffn": ffn[:1],
        "t5_ff": t5_ff,
    }


def _layer_norm_case(dtype, n, variant, backward=False):
    import torch

    from fastenc.kernels import norm as K

    flags = _tokens(variant, {"+residual", "no-bias"})
    residual, has_bias = "+residual" in flags, "no-bias" not in flags

    def launch():
        dt = _torch_dtype(dtype)
        bias = torch.zeros(n, dtype=dt) if has_bias else None
        if backward:
            s = torch.zeros(20, n, dtype=dt)  # 20 rows: 4 programs of 5 (off the GPU), so rows_per_program is not 1
            K.layer_norm_backward(s.clone(), s.clone() if residual else None, s, torch.ones(n, dtype=dt), bias, 1e-5,
                                  residual)  # fmt: skip
        else:
            x = torch.zeros(2, n, dtype=dt)
            K.layer_norm_forward(x, torch.ones(n, dtype=dt), bias, 1e-5, x.clone() if residual else None)

    label = f"{dtype}{' +residual' if residual else ''}{'' if has_bias else ' no-bias'}"
    family = "layer_norm_bwd" if backward else "layer_norm"
    return Case(family, label, dtype, launch, f"N={n}", 0.4 if backward else 0.3)


def _rms_norm_case(dtype, n, variant, backward=False):
    import torch

    from fastenc.kernels import norm as K

    weight = [t for t in variant.split() if t.startswith("w:")]
    weight_dtype = weight[0][2:] if len(weight) == 1 else None
    if weight_dtype not in NORM_DTYPES:
        raise ValueError(f"rms_norm variant {variant!r}: one weight dtype w:<{'|'.join(NORM_DTYPES)}> expected")
    residual = "+residual" in _tokens(variant, {"+residual", weight[0]})

    def launch():
        w = torch.ones(n, dtype=_torch_dtype(weight_dtype))
        if backward:
            s = torch.zeros(20, n, dtype=_torch_dtype(dtype))
            K.rms_norm_backward(s.to(w.dtype if w.dtype != torch.float32 else s.dtype),
                                s.clone() if residual else None, s, w, 1e-6, residual)  # fmt: skip
        else:
            x = torch.zeros(2, n, dtype=_torch_dtype(dtype))
            K.rms_norm_forward(x, w, 1e-6, x.clone() if residual else None)

    label = f"{dtype} w:{weight_dtype}{' +residual' if residual else ''}"
    family = "rms_norm_bwd" if backward else "rms_norm"
    return Case(family, label, dtype, launch, f"N={n}", 0.4 if backward else 0.3)


def _bias_activation_case(dtype, n, variant, backward=False):
    import torch

    from fastenc.kernels import activation as K

    act, *rest = variant.split()
    has_bias = "no-bias" not in _tokens(" ".join(rest), {"no-bias"})

    def launch():
        dt = _torch_dtype(dtype)
        bias = torch.zeros(n, dtype=dt) if has_bias else None
        if backward:
            x = torch.zeros(40, n, dtype=dt)  # with a bias: row-block loops of more than one block per program
            K.bias_activation_backward(x.clone(), x, bias, act)
        else:
            K.bias_activation_forward(torch.zeros(2, n, dtype=dt), bias, act)

    label = f"{dtype} {act}{'' if has_bias else ' no-bias'}"
    family = "bias_activation_bwd" if backward else "bias_activation"
    return Case(family, label, dtype, launch, f"N={n}", 0.3 if backward else 0.2)


def _gated_activation_case(dtype, n, act, backward=False):
    import torch

    from fastenc.kernels import activation as K

    def launch():
        gu = torch.zeros(2, 2 * n, dtype=_torch_dtype(dtype))  # T5's fused wi_0 / wi_1 output, halves as views
        if backward:
            K.gated_activation_backward(gu[:, :n].clone(), gu[:, :n], gu[:, n:], act)
        else:
            K.gated_activation_forward(gu[:, :n], gu[:, n:], act)

    family = "gated_activation_bwd" if backward else "gated_activation"
    return Case(family, f"{dtype} {act}", dtype, launch, f"N={n}", 0.3 if backward else 0.2)


def _cosine_case(dtype, d, variant):
    import torch

    from fastenc.kernels import cosine as K

    _tokens(variant, set())

    def launch():
        a = torch.zeros(64, d, dtype=_torch_dtype(dtype))
        with _matmul_precision(dtype):
            K.cosine_similarity_forward(a, a.clone())

    return Case("cosine", dtype, dtype, launch, f"D={d}", 1.5 if dtype == "fp32" else 1.0)


def _contrastive_case(dtype, d, kind, grads=False):
    import torch

    from fastenc.kernels import contrastive as K

    def launch():
        a = torch.zeros(64, d, dtype=_torch_dtype(dtype))
        with _matmul_precision(dtype):
            if grads:
                st = torch.zeros(64) if kind == "clip" else None
                K.contrastive_row_grads(kind, a, a.clone(), st, st, scale=10.0, coef=1 / 64)
            else:
                K.contrastive_row_stats(kind, a, a.clone(), scale=10.0)

    family = "contrastive_grads" if grads else "contrastive_stats"
    return Case(family, f"{dtype} {kind}", dtype, launch, f"D={d}", 2.0 if dtype == "fp32" else 1.0)


# family -> (dtype, size, variant) -> Case
CASE_FUNCTIONS = {
    "attention": _attention_case,
    "attention_bwd": _attention_bwd_case,
    "attention_fwd_stats": _attention_stats_case,
    "layer_norm": _layer_norm_case,
    "layer_norm_bwd": functools.partial(_layer_norm_case, backward=True),
    "rms_norm": _rms_norm_case,
    "rms_norm_bwd": functools.partial(_rms_norm_case, backward=True),
    "bias_activation": _bias_activation_case,
    "bias_activation_bwd": functools.partial(_bias_activation_case, backward=True),
    "gated_activation": _gated_activation_case,
    "gated_activation_bwd": functools.partial(_gated_activation_case, backward=True),
    "cosine": _cosine_case,
    "contrastive_stats": _contrastive_case,
    "contrastive_grads": functools.partial(_contrastive_case, grads=True),
}


def _variants(template: str, dtype: str) -> list[str]:
    """A table variant with "{dtype}" filled in and "{act}" expanded over every activation."""
    from fastenc.kernels import activation as A

    acts = A.ACTIVATIONS if "{act}" in template else ("",)
    return [template.format(dtype=dtype, act=act) for act in acts]


def build_cases(matrix: str) -> list[Case]:
    """The cases of a matrix (MATRICES): "report" (the committed report), "ci" (tests/test_static.py) or "full"."""
    cases: list[Case] = []
    for grid in MATRICES[matrix]:
        for family in grid.families:
            make = CASE_FUNCTIONS[family]
            if isinstance(grid.sizes, str):
                sizes = _size_lists(backward=family.endswith("_bwd"))[grid.sizes]
            else:
                sizes = grid.sizes
            for dtype, size, template in itertools.product(grid.dtypes, sizes, grid.variants):
                for variant in _variants(template, dtype):
                    case = make(dtype, size, variant)
                    case.archs = grid.archs
                    cases.append(case)
    return cases


def build_jobs(matrix: str, archs, all_configs=False, only: str | None = None) -> list[Job]:
    """Cases -> compile jobs, merged where two inputs give the same compile (their shapes are listed together)."""
    merged: dict = {}
    order = []
    for case in build_cases(matrix):
        if only and not re.search(only, f"{case.family} {case.variant}"):
            continue
        for job in expand_case(case, all_configs):
            if job.key in merged:
                prev = merged[job.key]
                for s in job.shapes:
                    if s not in prev.shapes:
                        prev.shapes.append(s)
                prev.shapes.sort(key=lambda s: (s.split("=")[0], int(s.split("=")[1]) if "=" in s else 0))
                continue
            merged[job.key] = job
            order.append(job)
    jobs = []
    for arch in archs:
        for job in order:
            if job.archs is not None and arch not in job.archs:
                continue
            j = Job(**{**job.__dict__, "arch": arch})
            jobs.append(j)
    return jobs


# ---------------------------------------------------------------------------------------------------- compile


def cuobjdump_path() -> str | None:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if p.exists():
        return str(p)
    return shutil.which("cuobjdump")


def compile_launch(fn, args, kwargs, arch: int):
    """triton.compile of one launch for `arch`, specialised as triton's own launcher would (JITFunction.run)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what JITFunction.run adds, per version
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


_RES_RE = re.compile(r"Function (\S+):\s*\n\s*(.*)")


def resource_usage(cubin: bytes, kernel: str, tool: str) -> dict:
    """REG, STACK, SHARED, LOCAL of `kernel` in the cubin, from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    for name, line in _RES_RE.findall(out.stdout):
        if kernel in name:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            return {k: int(vals.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}
    raise RuntimeError(f"cuobjdump printed no resource line for {kernel}: {out.stdout[-400:]}")


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    text = "\n".join(lines[:12])
    return text if len(text) <= 1500 else text[:1500] + " ..."


_JOBS: list[Job] = []
_TOOL: str | None = None


def _run_job(index: int) -> dict:
    job = _JOBS[index]
    row = {
        "arch": ARCHS[job.arch]["name"],
        "family": job.family,
        "kernel": job.kernel,
        "variant": job.variant,
        "dtype": job.dtype,
        "shapes": job.shapes,
        "constexprs": {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in job.constexprs.items()},
        "config": job.config,
        "selectable": job.selectable,
        "selectable_when": job.selectable_when,
    }
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    try:
        ck = compile_launch(job.fn, job.args, job.kwargs, job.arch)
        res = resource_usage(ck.asm["cubin"], job.kernel, _TOOL)
    except Exception as e:  # noqa: BLE001 - the compiler's error is the row's result
        row.update(status=_error_text(e), registers=None, stack=None, local=None, shared=None, shared_static=None)
        row.update(threads=job.config["num_warps"] * 32, fits=False, fits_reason="did not compile")
    else:
        threads = ck.metadata.num_warps * 32
        shared = int(ck.metadata.shared)
        reasons = []
        if shared > ARCHS[job.arch]["smem"]:
            reasons.append(f"shared {shared} > {ARCHS[job.arch]['smem']}")
        if res["REG"] * threads > REGS_PER_SM:
            reasons.append(f"{res['REG']} regs x {threads} threads > {REGS_PER_SM}")
        row.update(
            status="ok", registers=res["REG"], stack=res["STACK"], local=res["LOCAL"], shared=shared,
            shared_static=res["SHARED"], threads=threads, fits=not reasons, fits_reason="; ".join(reasons),
        )  # fmt: skip
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["compile_cpu_s"] = round(_cpu_seconds() - cpu0, 2)  # this process + ptxas: the time on an idle core
    return row


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_jobs(jobs: list[Job], processes: int, progress=True) -> list[dict]:
    global _JOBS, _TOOL
    import multiprocessing

    _JOBS, _TOOL = jobs, cuobjdump_path()
    if _TOOL is None:
        raise SystemExit("cuobjdump not found (triton/backends/nvidia/bin/ or PATH): cannot read resource usage")
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)  # slow compiles first: the pool ends together
    rows = []
    t0 = time.perf_counter()
    if processes <= 1:
        results = map(_run_job, order)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(processes)
        results = pool.imap_unordered(_run_job, order)
    try:
        for i, row in enumerate(results, 1):
            rows.append(row)
            if progress and (i % 25 == 0 or i == len(order)):
                print(f"  {i}/{len(order)} compiled, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return rows


# ---------------------------------------------------------------------------------------------------- report


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _config_label(config: dict) -> str:
    blocks = "x".join(str(v) for k, v in config.items() if k.startswith("BLOCK_"))
    regs = f" maxnreg{config['maxnreg']}" if config.get("maxnreg") else ""
    return f"{blocks} w{config.get('num_warps')} s{config.get('num_stages')}{regs}".strip()


def _sort_key(row):
    return (row["triton"], row["arch"], row["family"], row["kernel"], row["variant"], _config_label(row["config"]))


def merge_report(path: Path, rows: list[dict], version_info: dict, digest: dict) -> dict:
    """The report at `path` with this triton minor's rows and version record replaced."""
    report = json.loads(path.read_text()) if path.exists() else {}
    minor = version_info["triton_minor"]
    old_rows = [r for r in report.get("rows", []) if r["triton"] != minor]
    versions = dict(report.get("versions", {}))
    versions[minor] = version_info
    return {
        "schema": SCHEMA,
        "about": "fastenc Triton kernels compiled for sm_90a / sm_80 without a GPU: registers, stack (spill) bytes, "
        "shared memory per (kernel, variant, config). Regenerate: python bench/static_report.py",
        "kernel_sources": digest,
        "arch_limits": {v["name"]: {"shared_bytes": v["smem"], "regs_per_sm": REGS_PER_SM} for v in ARCHS.values()},
        "versions": dict(sorted(versions.items())),
        "rows": sorted(old_rows + rows, key=_sort_key),
    }


def spilling(rows, selectable_only=True):
    return [r for r in rows if r["status"] == "ok" and r["stack"] and (r["selectable"] or not selectable_only)]


def render_markdown(report: dict) -> str:
    rows = report["rows"]
    cols = sorted({(r["triton"], r["arch"]) for r in rows}, key=lambda c: (c[0], -int(c[1][3:5])))
    out = ["# Static resource report: fastenc Triton kernels on sm_90a / sm_80", ""]
    out.append(
        'Every kernel compiled ahead of time without a GPU (`triton.compile` for `GPUTarget("cuda", 90|80, 32)`), '
        "registers / stack (spill) bytes / shared memory read from the cubin with the wheel's `cuobjdump "
        "--dump-resource-usage`. Generated by `python bench/static_report.py --also .venv-triton36/bin/python` "
        "(this triton, then triton 3.6; method: the module docstring "
        "of `bench/static_report.py`; rows: `static-sm90.json` next to this file, sm_90a and sm_80 both)."
    )
    out += ["", f"Kernel sources (kernels/*.py) sha256 `{report['kernel_sources']['sha256'][:16]}`.", ""]
    out += [
        "| triton | torch | python | kernel sources | matrix | compiles | wall | compile CPU | generated |",
        "|---" * 9 + "|",
    ]
    for v in report["versions"].values():
        cur = "current" if v["kernel_sources_sha256"] == report["kernel_sources"]["sha256"] else "**stale**"
        out.append(
            f"| {v['triton']} | {v['torch']} | {v['python']} | {cur} | {v['matrix']} | {v['compiles']} "
            f"| {v['wall_s']:.0f} s ({v['jobs']} proc) | {v.get('compile_cpu_s', 0):.0f} s | {v['generated']} |"
        )
    out += [
        "",
        "fits: dynamic shared memory <= 227 KiB (sm_90a) / 163 KiB (sm_80) and registers x threads <= 64 K. "
        "selectable: the autotuner's pruner (or the launcher) can pick this config. A spill is stack > 0.",
        "",
    ]

    out += ["## Totals", "", "| triton | arch | compiles | ok | errors | spilling (selectable) | not fitting |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for t, a in cols:
        sel = [r for r in rows if r["triton"] == t and r["arch"] == a]
        ok = [r for r in sel if r["status"] == "ok"]
        out.append(
            f"| {t} | {a} | {len(sel)} | {len(ok)} | {len(sel) - len(ok)} | {len(spilling(sel))} "
            f"| {sum(1 for r in ok if not r['fits'])} |"
        )

    out += ["", "## Worst stack bytes per kernel and variant", "",
            "Cell: worst stack (spill) bytes over the compiled configs, then spilling / compiled configs "
            "(`E` counts compile errors). Regs: the most registers of any config.", ""]  # fmt: skip
    head = "| op | variant | " + " | ".join(f"{t} {a}" for t, a in cols) + " |"
    out += [head, "|---|---|" + "---|" * len(cols)]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["family"], r["variant"]), {}).setdefault((r["triton"], r["arch"]), []).append(r)
    for (fam, var), by_col in sorted(groups.items()):
        cells = []
        for c in cols:
            rs = by_col.get(c, [])
            if not rs:
                cells.append("-")
                continue
            ok = [r for r in rs if r["status"] == "ok"]
            err = len(rs) - len(ok)
            worst = max((r["stack"] for r in ok), default=0)
            regs = max((r["registers"] for r in ok), default=0)
            sp = sum(1 for r in ok if r["stack"])
            cell = f"{worst} ({sp}/{len(rs)})" + (f" E{err}" if err else "") + f" r{regs}"
            cells.append(f"**{cell}**" if worst or err else cell)
        out.append(f"| {fam} | {var} | " + " | ".join(cells) + " |")

    errs = [r for r in rows if r["status"] != "ok"]
    out += ["", "## Compile errors", ""]
    if errs:
        out += ["| triton | arch | op | variant | config | error |", "|---|---|---|---|---|---|"]
        for r in errs:
            msg = r["status"].splitlines()[0][:200].replace("|", "\\|")
            out.append(f"| {r['triton']} | {r['arch']} | {r['family']} | {r['variant']} | "
                       f"{_config_label(r['config'])} | {msg} |")  # fmt: skip
    else:
        out.append("None.")

    out += ["", "## Spilling or not fitting configs the autotuner may pick", ""]
    bad = [r for r in rows if r["status"] == "ok" and r["selectable"] and (r["stack"] or not r["fits"])]
    if bad:
        out += ["| triton | arch | op | variant | config | regs | stack | shared | fits | when |",
                "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in bad:
            out.append(
                f"| {r['triton']} | {r['arch']} | {r['family']} | {r['variant']} | {_config_label(r['config'])} "
                f"| {r['registers']} | {r['stack']} | {r['shared']} | {'yes' if r['fits'] else r['fits_reason']} "
                f"| {r['selectable_when']} |"
            )
    else:
        out.append("None.")

    out += ["", "## All rows", "", "<details><summary>every compile</summary>", ""]
    out += ["| triton | arch | op | variant | shapes | config | status | regs | stack | shared | fits | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        status = "ok" if r["status"] == "ok" else "error"
        out.append(
            f"| {r['triton']} | {r['arch']} | {r['family']} | {r['variant']} | {' '.join(r['shapes'])} "
            f"| {_config_label(r['config'])} | {status} | {r['registers']} | {r['stack']} | {r['shared']} "
            f"| {'yes' if r['fits'] else 'no'} | {r['compile_s']} |"
        )
    out += ["", "</details>", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- main


def _prepare_process():
    """Before triton is imported: real @triton.jit kernels (not the interpreter), a throw-away compile cache."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
        raise SystemExit("bench/static_report.py must run in a fresh process without TRITON_INTERPRET=1")
    os.environ.pop("TRITON_INTERPRET", None)
    cache = tempfile.mkdtemp(prefix="fastenc-static-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    return cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/static_report.py", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS))
    p.add_argument("--json", type=Path, default=None, help=f"report to update (default {DEFAULT_JSON} in the repo)")
    p.add_argument("--md", type=Path, default=None, help="Markdown report (default: the JSON path with .md)")
    p.add_argument("--no-md", action="store_true")
    p.add_argument("--fresh", action="store_true", help="do not keep other triton versions' rows from --json")
    p.add_argument("--matrix", choices=("report", "ci", "full"), default="report")
    p.add_argument("--all-configs", action="store_true", help="also compile configs the pruner never keeps")
    p.add_argument("--only", default=None, help="regex on 'family variant' (e.g. 'attention fp16 hd64')")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--list", action="store_true", help="print the compile jobs and exit")
    p.add_argument("--md-only", action="store_true", help="re-render the Markdown from --json, compile nothing")
    p.add_argument("--also", action="append", default=[], metavar="PYTHON",
                   help="afterwards run the same command under this interpreter (another triton), e.g. "
                   "--also .venv-triton36/bin/python: one command regenerates both compilers' rows")  # fmt: skip
    a = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    json_path = a.json or (REPO / DEFAULT_JSON)
    md_path = a.md or json_path.with_suffix(".md")
    if a.md_only:
        md_path.write_text(render_markdown(json.loads(json_path.read_text())))
        return 0

    cache = _prepare_process()
    try:
        import torch
        import triton

        torch.set_num_threads(1)
        digest = kernel_sources_digest()  # before the kernels are imported: the rows are of these sources
        _install_capture()
        t0 = time.perf_counter()
        jobs = build_jobs(a.matrix, a.arch, a.all_configs, a.only)
        if a.list:
            for j in jobs:
                print(ARCHS[j.arch]["name"], j.family, j.variant, " ".join(j.shapes), _config_label(j.config),
                      "" if j.selectable else "(not selectable)")  # fmt: skip
            print(f"{len(jobs)} compiles")
            return 0
        print(f"triton {triton.__version__}: {len(jobs)} compiles ({a.matrix} matrix, {a.jobs} processes)",
              file=sys.stderr)  # fmt: skip
        rows = run_jobs(jobs, a.jobs)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    minor = _minor(triton.__version__)
    for r in rows:
        r["triton"] = minor
    info = {
        "triton": triton.__version__,
        "triton_minor": minor,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernel_sources_sha256": digest["sha256"],
        "matrix": a.matrix + (" +all-configs" if a.all_configs else "") + (f" only={a.only}" if a.only else ""),
        "archs": [ARCHS[x]["name"] for x in a.arch],
        "compiles": len(rows),
        "jobs": a.jobs,
        "wall_s": round(wall, 1),
        "compile_cpu_s": round(sum(r["compile_cpu_s"] for r in rows), 1),
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python bench/static_report.py", *_without_also(argv)]),
    }
    if a.fresh and json_path.exists():
        json_path.unlink()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path.with_suffix(".lock"), "w") as lock:  # two versions may finish at once: merge one at a time
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        report = merge_report(json_path, rows, info, digest)
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        if not a.no_md:
            md_path.write_text(render_markdown(report))
    json_path.with_suffix(".lock").unlink(missing_ok=True)
    ok = sum(r["status"] == "ok" for r in rows)
    print(
        f"triton {triton.__version__}: {ok}/{len(rows)} compiled, {len(rows) - ok} errors, "
        f"{len(spilling(rows))} selectable configs spill; {wall:.0f} s -> {json_path}",
        file=sys.stderr,
    )
    for python in a.also:
        cmd = [python, str(SCRIPT), *[x for x in _without_also(argv) if x != "--fresh"]]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
        rc = subprocess.run(cmd, cwd=Path.cwd(), env=env).returncode
        if rc:
            return rc
    return 0


def _without_also(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--also":
            skip = True
        elif not x.startswith("--also="):
            out.append(x)
    return out


if __name__ == "__main__":
    sys.exit(main())
