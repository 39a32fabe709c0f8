"""What every fused model shares: the runtime settings, the shallow copy that shares weights with the original,
fused-QKV weight caching, input checks and the output-option plumbing of transformers' forwards."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._dispatch import Fallback, _active_traces, available_backends, check_backend_name, record
from ..errors import BackendUnavailableError, InputError


@dataclass
class Runtime:
    """How a fused model runs its ops: the backend asked for and whether a fall-back raises."""

    backend: str = "auto"
    strict: bool = False
    qkv_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.backend = check_backend_name(self.backend)
        if self.backend != "torch" and "triton" in available_backends():
            from ..ops._library import register_triton_ops

            register_triton_ops()  # up front, so compiling the model before its first eager call traces no import

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
    """What identifies a weight's contents: storage, version, dtype, device. Inference tensors (a model built or
    loaded under torch.inference_mode()) keep no version counter; for them an in-place update is not seen."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device) for t in ts)


def cached_cat(rt: Runtime, slot, ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """torch.cat(ts), cached in `rt` under `slot` while the tensors keep their storage and version (a `.to()`,
    `.half()` or an in-place update rebuilds it). With autograd on, the cat runs every call so gradients reach the
    originals. Under torch.compile the cat is part of the graph: a cache keyed on storage pointers cannot be
    traced, and a compiled graph holding a cached copy would miss in-place weight updates."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in ts)):
        return torch.cat(ts)
    key = _weight_key(*ts)
    hit = rt.qkv_cache.get(slot)
    if hit is None or hit[0] != key:
        hit = (key, torch.cat(ts).detach())
        rt.qkv_cache[slot] = hit
    return hit[1]


def fused_qkv(rt: Runtime, attn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(3D, D) weight and (3D,) bias of q_proj, k_proj, v_proj stacked, so one GEMM computes q, k and v (cached,
    see `cached_cat`)."""
    ws = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    bs = (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
    has_bias = all(b is not None for b in bs)
    return cached_cat(rt, (id(attn), "w"), ws), cached_cat(rt, (id(attn), "b"), bs) if has_bias else None


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
    "cached_cat",
    "check_device",
    "check_no_extra_kwargs",
    "fused_qkv",
    "hidden_state_selection",
    "linear",
    "norm_eps",
    "resolve_output_flags",
    "shallow_copy_as",
]
