"""What every fused model shares: its execution state, the shallow copy that shares weights with the original,
fused-QKV weight caching, input checks and the output-option plumbing of transformers' forwards."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..core.dispatch import ENV_BACKEND, available_backends, check_backend_name
from ..core.errors import InputError
from ..core.trace import fall_back, record, tracing


@dataclass
class ExecutionState:
    """How one fused model runs its ops (`model._fastenc`): the backend asked for, whether a fall-back raises, and
    what it keeps between calls (fused weights and per-layer tensors, the op plan of its device)."""

    backend: str = "auto"
    strict: bool = False
    fused: dict = field(default_factory=dict, repr=False)  # slot -> KeptTensors, see fuse_linears / layer_weights
    _plan_key: tuple | None = field(default=None, repr=False, compare=False)  # (device, $FASTENC_BACKEND) of _plan
    _plan: object = field(default=None, repr=False, compare=False)  # the OpPlan built for _plan_key

    def __getstate__(self):  # pickle / deepcopy: the settings; caches are rebuilt on first use
        return {"backend": self.backend, "strict": self.strict, "fused": {}, "_plan_key": None, "_plan": None}

    def plan(self, device: torch.device):
        """The ops resolved for `device` (see fastenc.ops._plan): built once, again only when the device or
        $FASTENC_BACKEND changes."""
        key = (device, os.environ.get(ENV_BACKEND))
        if self._plan_key != key:
            from ..ops._plan import OpPlan

            self._plan = OpPlan(self.backend, self.strict, device)
            self._plan_key = key
        return self._plan

    def __post_init__(self):
        self.backend = check_backend_name(self.backend)
        if self.backend != "torch" and "triton" in available_backends():
            from ..ops._library import register_triton_ops

            register_triton_ops()  # up front, so compiling the model before its first eager call traces no import

    @property
    def kw(self) -> dict:
        return {"backend": self.backend, "strict": self.strict}

    def fallback(self, op: str, reason: str) -> None:
        """An op of this model must run on torch for a reason of the call (not of the backend): warn and record
        (or raise when strict), through the package's one fall-back policy."""
        if self.backend != "torch":
            fall_back(op, self.backend, "torch", reason, strict=self.strict)


_generation = [0]


def _bump(*_args):
    _generation[0] += 1


# Any parameter, buffer or submodule (re)assigned anywhere (setattr, register_*, load_state_dict(assign=True))
# bumps one counter: caches of a model's tensor list (CUDA graphs' weight check) re-walk the model only then.
torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump)
torch.nn.modules.module.register_module_module_registration_hook(_bump)


def structure_generation() -> int:
    """A counter that changes whenever a parameter, buffer or submodule is registered on any module."""
    return _generation[0]


def shallow_copy_as(model: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A new module object of class `cls` that shares the original's parameter, buffer and submodule dicts by
    reference (no weight is copied): a parameter, buffer or submodule assigned on either object later (`model.x =
    nn.Parameter(...)`, `load_state_dict(..., assign=True)`, `model.text_projection = nn.Linear(...)`) is seen by
    both. Other attributes (config, training flag, hooks dicts) are copied shallowly at this moment."""
    new = cls.__new__(cls)
    new.__dict__ = dict(model.__dict__)
    return new


def fused_rows(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """torch.cat(ts) (row-wise) without a stale copy: ts become adjacent row blocks of one buffer (each parameter
    keeps its identity, its `.data` is re-pointed once into the buffer), and the buffer itself is returned. Any
    in-place edit of a parameter (`.data.mul_`, `copy_`, fused / foreach optimizers, `load_state_dict`) then lands
    in the buffer; a parameter replaced or moved (`assign=True`, `.to()`, `p.data = ...`) is laid out again on the
    next call. Tensors already adjacent (laid out by this model's `optimize` or another's over the same weights) are
    viewed as one buffer without a copy. Callers keep the result with the parameters' data pointers (see
    `fuse_linears`): the kept buffer holds its storage alive, so no other tensor can take those addresses.

    With autograd recording into any of ts, under torch.compile, or when the tensors cannot be re-pointed
    (inference tensors, mixed dtypes or devices, non-contiguous) the cat runs every call instead."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in ts)):
        return torch.cat(ts)
    t0 = ts[0]
    if any(t.is_inference() or not t.is_contiguous() or t.dtype != t0.dtype or t.device != t0.device for t in ts):
        return torch.cat(ts)
    rows = sum(t.shape[0] for t in ts)
    with torch.inference_mode(False), torch.no_grad():
        if _adjacent(ts):
            return torch.as_strided(t0.detach(), (rows, *t0.shape[1:]), t0.stride())
        buf = torch.cat([t.detach() for t in ts])
        row = 0
        for t in ts:
            n = t.shape[0]
            t.data = buf[row : row + n]  # same Parameter object, its storage is now the buffer's rows
            row += n
    return buf


def _adjacent(ts: tuple[torch.Tensor, ...]) -> bool:
    """ts (contiguous, same dtype) are consecutive row blocks of one storage."""
    storage = ts[0].untyped_storage().data_ptr()
    end = ts[0].data_ptr()
    for t in ts:
        if t.data_ptr() != end or t.untyped_storage().data_ptr() != storage or t.shape[1:] != ts[0].shape[1:]:
            return False
        end += t.numel() * t.element_size()
    return True


_data_ptr, _stride, _numel = torch.Tensor.data_ptr, torch.Tensor.stride, torch.Tensor.numel


def layout_key(tensors) -> tuple:
    """What a cached fused buffer was laid out from, compared on every call: each tensor's data pointer (storage and
    offset), strides and element count. `p.data = p.data.t()` keeps the pointer and the version counter but not the
    strides; `p.data = p.data[:n]` keeps both but not the size (contiguous rows: strides + count fix the shape)."""
    return (*map(_data_ptr, tensors), *map(_stride, tensors), *map(_numel, tensors))


def plain_linear(m) -> bool:
    """True when `m` computes exactly F.linear(x, m.weight, m.bias): an nn.Linear with no hooks. Wrappers (LoRA,
    quantized or parametrized linears) and hooked modules run as modules instead of through fused weights."""
    return type(m) in _PLAIN_LINEARS and not (m._forward_hooks or m._forward_pre_hooks)


_PLAIN_LINEARS = (torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)


class KeptTensors(NamedTuple):
    """An entry of `ExecutionState.fused`: what a fused model collected from its modules once and reuses while it is
    `current` (fused projections, see `fuse_linears`; per-layer tensors, see `_encoder.layer_weights` and
    `t5.t5_layer_weights`)."""

    generation: int  # structure_generation() when collected
    source: object  # the module (or module list) it was read from, compared by identity
    tensors: tuple  # the parameters `value` was laid out from
    layout: tuple  # layout_key(tensors) when collected
    hooks: tuple  # the forward (pre-)hook dicts of the modules involved, all empty when collected
    value: object  # what the caller reuses

    def current(self, source) -> bool:
        """Still valid for `source`: no module or parameter assigned anywhere since (structure generation), the
        tensors keep their layout (`layout_key`), no hook was added and autograd does not record into them."""
        return (
            self.generation == structure_generation()
            and self.source is source
            and layout_key(self.tensors) == self.layout
            and not any(self.hooks)
            and not (torch.is_grad_enabled() and any(map(_requires_grad, self.tensors)))
        )


def _requires_grad(t: torch.Tensor) -> bool:
    return t.requires_grad


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are views of one storage (a fused buffer that is the weights' memory, not a copy)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def fuse_linears(state: ExecutionState, owner: torch.nn.Module, names: tuple[str, ...]):
    """(W, b) of the linears `owner.<names>` stacked row-wise so one GEMM computes all of them (see `fused_rows`;
    b is None unless every one has a bias), or None when one of them is not a plain linear (see `plain_linear`):
    the caller then runs them as modules.

    Hot path: the answer is kept per (owner, names) and reused while the structure generation is the same (no
    module or parameter assigned anywhere since), no weight or bias moved or was laid out anew (`layout_key`), no
    hook was added and autograd does not record into the weights: a few attribute reads per call."""
    slot = (id(owner), names)
    hit = None if torch.compiler.is_compiling() else state.fused.get(slot)  # compiled graphs cat (see fused_rows)
    if (
        hit is not None
        and hit.current(owner)
        and all(plain_linear(owner._modules[n]) for n in names)  # a hook can be added without registering
    ):
        return hit.value
    gen = structure_generation()
    mods = owner._modules
    ms = tuple(mods[n] for n in names)
    if not all(plain_linear(m) for m in ms):
        return None
    ws = tuple(m._parameters["weight"] for m in ms)
    bs = tuple(m._parameters.get("bias") for m in ms)
    has_bias = all(b is not None for b in bs)
    out = (fused_rows(ws), fused_rows(bs) if has_bias else None)
    tensors = ws + bs if has_bias else ws
    if not torch.compiler.is_compiling() and all(  # only a buffer that IS the weights' storage may be reused
        f is None or same_storage(f, t) for f, t in ((out[0], ws[0]), (out[1], bs[0]))
    ):
        state.fused[slot] = KeptTensors(gen, owner, tensors, layout_key(tensors), (), out)
    return out


FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("q", "k", "v"), ("wi_0", "wi_1"))  # CLIP / SigLIP, T5 attn, T5 FF


def prefuse(state: ExecutionState, model: torch.nn.Module) -> None:
    """Lay out every group of FUSED_GROUPS in `model` as one buffer now (see `fused_rows`), so the first forward
    (or a CUDA-graph capture) does not move weights."""
    with torch.no_grad():
        for m in model.modules():
            mods = m._modules
            for names in FUSED_GROUPS:
                if all(n in mods for n in names):
                    fuse_linears(state, m, names)


def project_activation(m, x: torch.Tensor, activation: str, plan) -> torch.Tensor:
    """act(m(x)) through op plan `plan`: its fused linear + bias + activation when `m` is a plain linear."""
    if plain_linear(m):
        p = m._parameters
        return plan.linear_activation(x, p["weight"], p["bias"], activation)
    return plan.bias_activation(project(m, x), None, activation)


def project(m, x: torch.Tensor) -> torch.Tensor:
    """m(x) for a linear layer: F.linear on its weights when it is a plain nn.Linear, else the module's own forward
    (so a LoRA / quantized / hooked linear is honoured)."""
    if plain_linear(m):
        p = m._parameters
        return linear(x, p["weight"], p["bias"])
    record("torch", "module")
    return m(x)


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
    if tracing():
        record("torch", "linear")
    return F.linear(x, weight, bias)


def norm_eps(module) -> float:
    """A norm module's epsilon: `eps` (nn.LayerNorm) or `variance_epsilon` (T5LayerNorm), plain attributes read from
    the instance dict first (a missing attribute costs nn.Module.__getattr__ an exception per call)."""
    d = module.__dict__
    eps = d.get("eps", d.get("variance_epsilon"))
    if eps is None:
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6))
    return float(eps)


__all__ = [
    "ExecutionState",
    "KeptTensors",
    "check_device",
    "check_no_extra_kwargs",
    "fuse_linears",
    "fused_rows",
    "hidden_state_selection",
    "linear",
    "norm_eps",
    "plain_linear",
    "prefuse",
    "project",
    "project_activation",
    "resolve_output_flags",
    "same_storage",
    "shallow_copy_as",
    "structure_generation",
]
