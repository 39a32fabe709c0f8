"""What every fused model shares: the runtime settings, the shallow copy that shares weights with the original,
fused-QKV weight caching, input checks and the output-option plumbing of transformers' forwards."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._dispatch import Fallback, _active_traces, check_backend_name, record
from ..errors import BackendUnavailableError, InputError


@dataclass
class Runtime:
    """How a fused model runs its ops: the backend asked for and whether a fall-back raises."""

    backend: str = "auto"
    strict: bool = False
    qkv_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.backend = check_backend_name(self.backend)

    @property
    def kw(self) -> dict:
        return {"backend": self.backend, "strict": self.strict}

    def fallback(self, op: str, reason: str) -> None:
        """An op of this model must run on torch for a reason of the call (not of the backend)."""
        if self.strict and self.backend != "torch":
            raise BackendUnavailableError(f"{op}: {reason}; strict=True forbids falling back to torch")
        for t in _active_traces():
            t.fallbacks.append(Fallback(op, self.backend, "torch", reason))


def shallow_copy_as(model: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A new module object of class `cls` whose parameters, buffers and submodules are the original's (no weight
    is copied). Swapping submodules on the copy leaves the original untouched."""
    new = cls.__new__(cls)
    new.__dict__ = dict(model.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        new.__dict__[key] = type(model.__dict__[key])(model.__dict__[key])
    return new


def _weight_key(*ts: torch.Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in ts)


def fused_qkv(rt: Runtime, attn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(3D, D) weight and (3D,) bias of q_proj, k_proj, v_proj stacked, so one GEMM computes q, k and v.

    Cached per attention module while the three weights keep their storage and version (a `.to()`, `.half()` or an
    in-place update rebuilds it). With autograd on, the cat runs every call so gradients reach the originals."""
    ws = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    bs = (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
    has_bias = all(b is not None for b in bs)
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
        return torch.cat(ws), torch.cat(bs) if has_bias else None
    key = _weight_key(*ws, *(bs if has_bias else ()))
    hit = rt.qkv_cache.get(id(attn))
    if hit is None or hit[0] != key:
        hit = (key, torch.cat(ws).detach(), torch.cat(bs).detach() if has_bias else None)
        rt.qkv_cache[id(attn)] = hit
    return hit[1], hit[2]


def attention_with_probs(q, k, v, *, causal, key_padding_mask, scale, dropout_p=0.0, training=False):
    """Eager attention that also returns the probabilities (output_attentions=True) and applies dropout (training).
    Softmax in fp32, probabilities cast to q.dtype as transformers' eager path does."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, H, Sq, Sk)
    keep = None
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].bool()
        keep = pad if keep is None else keep & pad
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(q.dtype)
    pd = F.dropout(p, p=dropout_p, training=training) if dropout_p > 0 else p
    return torch.matmul(pd, v), p


def resolve_output_flags(config, output_attentions, output_hidden_states, return_dict):
    """transformers' defaults: a None option takes the config's value."""
    if output_attentions is None:
        output_attentions = bool(getattr(config, "output_attentions", False))
    if output_hidden_states is None:
        output_hidden_states = getattr(config, "output_hidden_states", False)
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return output_attentions, output_hidden_states, return_dict


def hidden_state_selection(output_hidden_states, n: int) -> set[int] | None:
    """None = all n hidden states; a set = only these indices (transformers >= 5.18 takes an int or a list)."""
    if isinstance(output_hidden_states, bool):
        return None
    picks = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    bad = [i for i in picks if not isinstance(i, int) or not -n <= i < n]
    if bad:
        raise InputError(f"output_hidden_states indices must be ints in [-{n}, {n}), got {bad}")
    return {i % n for i in picks}


def check_no_extra_kwargs(fn: str, kwargs: dict) -> None:
    if kwargs:
        raise InputError(
            f"{fn}() got arguments fastenc does not implement: {sorted(kwargs)}; "
            "call the original transformers model for them"
        )


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise InputError(f"{name} is on {t.device} but the model's weights are on {device}; move it with .to()")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """GEMMs stay on cuBLAS (torch); counted in traces as torch.linear so every op of the tower is visible."""
    record("torch", "linear")
    return F.linear(x, weight, bias)


def norm_eps(module) -> float:
    return float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6)))


__all__ = [
    "Runtime",
    "attention_with_probs",
    "check_device",
    "check_no_extra_kwargs",
    "fused_qkv",
    "hidden_state_selection",
    "linear",
    "norm_eps",
    "resolve_output_flags",
    "shallow_copy_as",
]
