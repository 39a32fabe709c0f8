"""Typed errors. Each subclasses the builtin a caller would naturally catch (TypeError, ValueError, ...)."""


class FastencError(Exception):
    """Base class of every error fastenc raises on purpose."""


class UnsupportedModelError(FastencError, TypeError):
    """`fastenc.optimize` got a model class it has no fused implementation for."""


class InputError(FastencError, ValueError):
    """A tensor or argument has the wrong shape, dtype, device or value. The message names the argument."""


class BackendUnavailableError(FastencError, RuntimeError):
    """The requested backend cannot run this op here and `strict=True` forbade falling back."""


class DoubleBackwardError(FastencError, NotImplementedError):
    """A second derivative through fastenc's clip_loss / siglip_loss was requested (create_graph=True, then a
    backward through the gradients): the tiled backward is not itself differentiable."""
