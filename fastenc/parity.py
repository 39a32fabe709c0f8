"""Parity of a fastenc-optimized model against the untouched transformers model on the same inputs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .core.errors import InputError
from .core.trace import trace


@dataclass
class FieldError:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float  # max |a - r| / max |r|: relative to the field's scale, robust to near-zero entries
    ok: bool


@dataclass
class ParityReport:
    model: str
    backend: str  # what ran, read from fastenc.trace() (see ran_backend), not the setting asked for
    dtype: str
    device: str
    tolerance_rel: float
    fields: list[FieldError] = field(default_factory=list)
    ops: dict = field(default_factory=dict)  # "backend.op" -> calls
    fallbacks: list = field(default_factory=list)
    requested: str = ""  # the backend optimize was asked for (the CLI's --backend), when known

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.fields)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def table(self) -> str:
        asked = f" (requested {self.requested})" if self.requested and self.requested != self.backend else ""
        head = f"parity of {self.model} ({self.dtype}, {self.device}) vs transformers"
        lines = [f"{head}, backend={self.backend}{asked}:"]
        lines.append(f"  {'output':<44} {'shape':<18} {'max abs err':>12} {'max rel err':>12}  ok")
        for f in self.fields:
            shape = "x".join(map(str, f.shape))
            lines.append(f"  {f.name:<44} {shape:<18} {f.max_abs:>12.3e} {f.max_rel:>12.3e}  {'yes' if f.ok else 'NO'}")
        lines.append("  ops that ran (backend.op: calls):")
        for key, n in sorted(self.ops.items()):
            lines.append(f"    {key:<28} {n}")
        for fb in self.fallbacks:
            lines.append(f"  fallback: {fb['op']} ran on {fb['ran']} instead of {fb['requested']}: {fb['reason']}")
        lines.append(f"  result: {'PASS' if self.ok else 'FAIL'} (relative tolerance {self.tolerance_rel:g})")
        return "\n".join(lines)


def _flatten(prefix: str, out) -> dict[str, torch.Tensor]:
    items = {}
    for key, value in out.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            items[name] = value
        elif isinstance(value, tuple):
            for i, v in enumerate(value):
                if isinstance(v, torch.Tensor):
                    items[f"{name}[{i}]"] = v
        elif hasattr(value, "items"):
            items.update(_flatten(f"{name}.", value))
    return items


# fp32 follows the issue's ~1e-4 relative bar; half precisions are judged by DESIGN.md's 2x-PyTorch rule in the
# tests, here a coarse bar so the CLI can say PASS/FAIL.
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


# ops that run on torch whatever the backend (GEMMs on cuBLAS / MKL, wrapped linears as their module) and export
# steps: they do not say which backend ran the tower
_NOT_A_BACKEND_CHOICE = ("linear", "module", "export")


def ran_backend(counts) -> str:
    """The backend(s) that ran a traced call, from `fastenc.trace()` counts ("backend.op" -> calls): those of the
    tower's ops other than the GEMMs (torch everywhere), joined with "+" when several ran; "none" if nothing ran."""
    ops = [key.split(".", 1) for key in counts if counts[key]]
    chosen = {b for b, op in ops if op not in _NOT_A_BACKEND_CHOICE} or {b for b, op in ops if op != "export"}
    return "+".join(sorted(chosen)) or "none"


def compare(
    reference_model, fast_model, inputs: dict, *, tolerance_rel: float | None = None, requested: str = ""
) -> ParityReport:
    """Run both models on `inputs` (no grad) and report every output tensor's error; the report's backend is what
    `fastenc.trace()` saw run (`ran_backend`), `requested` what optimize was asked for."""
    params = next(reference_model.parameters())
    tol = DEFAULT_TOLERANCE.get(params.dtype, 1e-4) if tolerance_rel is None else tolerance_rel
    with torch.no_grad():
        ref = reference_model(**inputs)
        with trace() as t:
            got = fast_model(**inputs)
    ref_f, got_f = _flatten("", ref), _flatten("", got)
    if set(ref_f) != set(got_f):
        raise InputError(f"output fields differ: transformers {sorted(ref_f)} vs fastenc {sorted(got_f)}")
    report = ParityReport(
        model=type(reference_model).__name__,
        backend=ran_backend(t.counts),
        requested=requested,
        dtype=str(params.dtype).replace("torch.", ""),
        device=str(params.device),
        tolerance_rel=tol,
        ops=dict(t.counts),
        fallbacks=[asdict(f) for f in t.fallbacks],
    )
    for name, r in ref_f.items():
        g = got_f[name]
        if g.shape != r.shape:
            report.fields.append(FieldError(name, tuple(r.shape), math.inf, math.inf, False))
            continue
        diff = (g.float() - r.float()).abs()
        max_abs = diff.max().item() if diff.numel() else 0.0
        scale = r.float().abs().max().item() if r.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else max_abs
        finite = bool(torch.isfinite(g).all()) or not bool(torch.isfinite(r).all())
        report.fields.append(FieldError(name, tuple(r.shape), max_abs, max_rel, finite and max_rel <= tol))
    return report


def clip_inputs(config, batch: int, *, device="cpu", dtype=torch.float32, seq: int | None = None, seed: int = 0):
    """Random but realistic CLIP inputs: BOS, random tokens, EOS, right padding with varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    text = getattr(config, "text_config", None) or (config if hasattr(config, "vocab_size") else None)
    vision = getattr(config, "vision_config", None) or (config if hasattr(config, "image_size") else None)
    if text is not None:
        s = seq or text.max_position_embeddings
        eos = text.eos_token_id
        ids = torch.randint(0, min(text.vocab_size, eos if eos > 2 else text.vocab_size) - 2, (batch, s), generator=g)
        mask = torch.zeros(batch, s, dtype=torch.long)
        for i in range(batch):
            n = max(2, s - (i * 7) % s) if s > 1 else 1  # row 0 full, others shorter
            mask[i, :n] = 1
            ids[i, n - 1] = eos if eos != 2 else text.vocab_size - 1  # EOS (legacy: highest id)
            ids[i, n:] = eos if eos != 2 else 0
        out["input_ids"] = ids.to(device)
        out["attention_mask"] = mask.to(device)
    if vision is not None:
        px = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=g)
        out["pixel_values"] = px.to(device=device, dtype=dtype)
    return out
