"""Which config fields the fused towers follow, and how.

transformers reads most of a tower's config once, when it builds the modules (`ACT2FN[config.hidden_act]` becomes
`mlp.activation_fn`, `config.layer_norm_eps` the norms' `eps`, `config.num_attention_heads` the attention's
`num_heads` / `head_dim` / `scale`, `config.eos_token_id` the text model's `eos_token_id`, `config.vision_use_head`
SigLIP's `use_head`, T5's `relative_attention_num_buckets` / `_max_distance` / `is_decoder` / `d_kv` / `num_heads`
its attention's attributes, `feed_forward_proj` (`dense_act_fn`, `is_gated_act`) its feed-forward class and `act`,
`dropout_rate` / `attention_dropout` its dropout modules): a config edited after the model was built changes
nothing in transformers' forward. The fused towers read the same modules, so they compute what the transformers
model computes, and `optimize` warns (`ConfigMismatchWarning`, once per model and field) when the config no longer
says what the modules do, naming the field: rebuild the model from the edited config to change it.

The fields transformers reads at call time are read at call time here too: the output options
(`output_attentions`, `output_hidden_states`, `return_dict`) and T5's `config.is_decoder` (its mask: a T5 encoder
whose config says decoder runs transformers' own forward, a recorded fall-back).

An activation module with no fused kernel (`hidden_act="silu"`, `nn.SiLU()` assigned to `mlp.activation_fn`, a
hooked or subclassed activation) runs as its module after the fused linear: `torch.module` in `fastenc.trace()`,
and on a non-torch backend a fall-back record (`FallbackWarning`; `strict=True` raises `BackendUnavailableError`).
"""

from __future__ import annotations

import warnings

import torch

from .. import ops
from ..core.trace import record


class ConfigMismatchWarning(UserWarning):
    """A model's config says something its modules (what transformers' forward computes) do not."""


def _fused_activation_classes() -> dict[type, str]:
    from transformers.activations import ACT2CLS

    out: dict[type, str] = {}
    for name, fused in ops.HF_ACTIVATIONS.items():
        entry = ACT2CLS.get(name)
        if entry is not None:
            out.setdefault(entry[0] if isinstance(entry, tuple) else entry, fused)
    out.setdefault(torch.nn.ReLU, "relu")
    return out


_FUSED_ACTIVATIONS = _fused_activation_classes()  # activation module class -> fastenc's fused activation


def module_activation(m) -> str | None:
    """fastenc's fused activation computing exactly what module `m` computes, or None (run it as its module):
    transformers' activation classes (exact class, no hooks) and torch's nn.GELU / nn.ReLU."""
    if m._forward_hooks or m._forward_pre_hooks:
        return None
    cls = type(m)
    if cls is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
    return _FUSED_ACTIVATIONS.get(cls)


def run_activation_module(state, m, x: torch.Tensor) -> torch.Tensor:
    """m(x) for an activation module with no fused kernel (see `module_activation`), through the fall-back policy."""
    state.fallback("activation", f"{type(m).__name__} has no fused kernel; it runs as its module")
    record("torch", "module")
    return m(x)


def activation_module_name(config, attr: str) -> str | None:
    """The class name transformers builds for config.<attr> (None if ACT2FN does not know the name)."""
    from transformers.activations import ACT2CLS

    entry = ACT2CLS.get(getattr(config, attr, None))
    if entry is None:
        return None
    return (entry[0] if isinstance(entry, tuple) else entry).__name__


def warn_mismatches(where: str, mismatches: list[str]) -> None:
    if mismatches:
        warnings.warn(
            f"fastenc.optimize({where}): the config says what the model's modules do not: {'; '.join(mismatches)}. "
            "transformers' forward computes with the modules (built from the config when the model was "
            "constructed) and so does fastenc; to change these, rebuild the model from the edited config",
            ConfigMismatchWarning,
            stacklevel=4,
        )


def compare_field(mismatches: list[str], config, attr: str, actual, what: str) -> None:
    """Append a mismatch message when config.<attr> (if the config has it) differs from the modules' `actual`."""
    if not hasattr(config, attr):
        return
    want = getattr(config, attr)
    if isinstance(actual, float) and isinstance(want, int | float) and not isinstance(want, bool):
        same = float(want) == actual
    else:
        same = want == actual
    if not same:
        mismatches.append(f"config.{attr}={want!r} but {what} is {actual!r}")


__all__ = [
    "ConfigMismatchWarning",
    "activation_module_name",
    "compare_field",
    "module_activation",
    "run_activation_module",
    "warn_mismatches",
]
