"""CUDA graphs for fused towers: capture a whole forward per input shape, replay it, pad batches to buckets.

    fast = fastenc.optimize(model, cuda_graphs=True)            # or cuda_graphs=GraphConfig(...)
    with torch.inference_mode():
        out = fast(input_ids=ids, attention_mask=mask)          # 1st call of a shape: warm up + capture; then replay

At batch 1 a CLIP text tower (77 tokens) is bound by kernel-launch overhead; a replayed graph launches the whole
tower at once. How a call is handled:

- Graph key: the method (forward, get_text_features, get_image_features), every tensor argument's padded shape,
  dtype and device, the output options (output_hidden_states, return_dict, interpolate_pos_encoding, return_loss)
  and the inference-mode / autocast state. The sequence length is part of the key as given: tokenizers that pad to
  max_length=77 give one shape, and nothing pads the sequence here (pooling at the last token, as SigLIP's text
  tower does, would change).
- Batch buckets: the batch rounds up to the next of `GraphConfig.batch_buckets` (1, 2, 4, ..., 256). The real rows
  are copied into the first rows of static input buffers; the padding rows hold valid data (the first real row at
  capture, later earlier real rows) and every tower is row-independent (no batch norm, no cross-row op), so they
  cannot change the real rows. Outputs are sliced back to the real batch. CLIPModel / SiglipModel forward pad the
  text and image batches separately and slice logits_per_text (B_text, B_image) in both dimensions;
  return_loss=True (a loss over the whole batch) captures at the exact batch instead.
- Cache: at most `max_graphs` graphs per model; a new key when full evicts the least recently used graph (capture
  is a few forwards, paid once per key). Graphs share one CUDA memory pool per device.
- Weights: every call compares the (storage, version) of each parameter and buffer with those seen at capture (an
  in-place update, `load_state_dict`, `.to()`, `.half()`), and a change drops every graph (they read stale memory
  or a stale fused-QKV cache otherwise). Replacing a Parameter object is not seen: call `clear_graphs(model)`.
- Fall-back to the eager fused forward, recorded as "eager.cuda_graph_fallback" in `fastenc.trace()` with a
  FallbackWarning once per reason (strict=True raises BackendUnavailableError): training mode, autograd (grad
  enabled and a parameter requires grad: call under torch.inference_mode() or torch.no_grad()),
  output_attentions=True, tensors not on CUDA, a batch above the largest bucket, SigLIP 2 vision (spatial_shapes
  is read on the host), a capture that fails after its warm-up passes ran (that key is then never retried).
  Arguments the fused forward rejects go to it unchanged, so the error is the usual one; an error in a warm-up
  pass (the plain eager forward) is raised as it would be without graphs.
- Outputs: outputs="copy" (default) returns fresh tensors; outputs="static" returns views of the graph's static
  output buffers, valid only until the next call of this model (any shape: graphs share memory).
- Traces: a capture records "cuda_graph.capture" plus the ops of the one captured forward (warm-up passes are not
  counted; the capture call then replays the new graph once for its outputs); a later call of the same key records
  only "cuda_graph.replay", because no Python runs inside a replayed graph. Eviction
  and invalidation record "cuda_graph.evict" / "cuda_graph.invalidate".

Calls of one model are serialized by a lock (graphs share static buffers). The capture mechanism is a
`Capturer`; `CudaGraphCapturer` is the real one. Tests inject a double with the same aliasing semantics (static
inputs read by replay, static outputs written in place, garbage outputs until the first replay) to cover this
module on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers.utils import ModelOutput

from .core.errors import InputError
from .core.trace import fall_back, record, suspend_traces
from .models._base import structure_generation

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GRAPHED_METHODS = ("forward", "get_text_features", "get_image_features")
OUTPUT_MODES = ("copy", "static")

# argument name -> batch group; the first name of each group that is given sets the group's batch size
TEXT_ARGS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
IMAGE_ARGS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
_GROUP = {**{n: "text" for n in TEXT_ARGS}, **{n: "image" for n in IMAGE_ARGS}}
_LEAD_DIMS = {"input_ids": 2, "inputs_embeds": 3, "pixel_values": 4}  # dims of a main tensor whose batch can pad
FLAG_ARGS = ("output_attentions", "output_hidden_states", "return_dict", "interpolate_pos_encoding", "return_loss")


# ------------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class GraphConfig:
    """CUDA-graph settings of `fastenc.optimize(model, cuda_graphs=GraphConfig(...))`; `cuda_graphs=True` = defaults.

    batch_buckets: batch sizes graphs are captured at (a call pads up to the next one; above the largest it falls
        back to eager); None captures every exact batch size.
    max_graphs: graphs kept per model; the least recently used is evicted for a new key.
    outputs: "copy" returns fresh tensors; "static" returns views of the static buffers, overwritten by the next
        call of the model.
    warmup: eager passes before capture (Triton compilation / autotuning, fused-QKV caches).
    check_weights: compare parameter storage + version every call and drop stale graphs (25-50 us of Python
        for CLIP-L's 198 tensors); False skips it: then call clear_graphs(model) after changing weights.
    capturer: how graphs are made; None = CudaGraphCapturer().
    """

    batch_buckets: tuple[int, ...] | None = DEFAULT_BATCH_BUCKETS
    max_graphs: int = 16
    outputs: str = "copy"
    warmup: int = 2
    check_weights: bool = True
    capturer: Capturer | None = field(default=None, compare=False)

    def __post_init__(self):
        b = self.batch_buckets
        if b is not None:
            if isinstance(b, int) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in b):
                raise InputError(f"cuda_graphs.batch_buckets must be a sequence of positive ints or None, got {b!r}")
            if not b:
                raise InputError("cuda_graphs.batch_buckets must not be empty (None captures every exact batch)")
            object.__setattr__(self, "batch_buckets", tuple(sorted(set(b))))
        if not isinstance(self.max_graphs, int) or isinstance(self.max_graphs, bool) or self.max_graphs < 1:
            raise InputError(f"cuda_graphs.max_graphs must be an int >= 1, got {self.max_graphs!r}")
        if self.outputs not in OUTPUT_MODES:
            raise InputError(f"cuda_graphs.outputs must be one of {OUTPUT_MODES}, got {self.outputs!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 1:
            raise InputError(f"cuda_graphs.warmup must be an int >= 1, got {self.warmup!r}")
        if not isinstance(self.check_weights, bool):
            raise InputError(f"cuda_graphs.check_weights must be a bool, got {self.check_weights!r}")
        if self.capturer is not None and not (
            hasattr(self.capturer, "capture") and hasattr(self.capturer, "unsupported")
        ):
            raise InputError(f"cuda_graphs.capturer must have capture() and unsupported(), got {self.capturer!r}")

    def bucket(self, batch: int) -> int | None:
        """The batch a call of `batch` rows runs at, or None above the largest bucket."""
        if self.batch_buckets is None:
            return batch
        return next((b for b in self.batch_buckets if b >= batch), None)


def graph_config(cuda_graphs) -> GraphConfig | None:
    """optimize's `cuda_graphs` argument as a GraphConfig (None = off)."""
    if cuda_graphs is False or cuda_graphs is None:
        return None
    if cuda_graphs is True:
        return GraphConfig()
    if isinstance(cuda_graphs, GraphConfig):
        return cuda_graphs
    raise InputError(f"cuda_graphs must be a bool or a fastenc.graphs.GraphConfig, got {type(cuda_graphs).__name__}")


# ------------------------------------------------------------------------------------------------------ capturers


class Graph(Protocol):
    outputs: Any  # the static output tree, rewritten in place by replay()

    def replay(self) -> None: ...


class Capturer(Protocol):
    def unsupported(self, device: torch.device) -> str | None:
        """None if graphs can be captured for tensors on `device`, else why not."""

    def capture(self, fn: Callable[[], Any], warmup: int, device: torch.device) -> Graph:
        """Call fn() `warmup` times, then once more captured; the graph replays that last call. device: the inputs'."""


@dataclass
class _CudaGraph:
    graph: torch.cuda.CUDAGraph
    outputs: Any
    index: int  # the CUDA device it was captured on

    def replay(self) -> None:
        if torch.cuda.current_device() == self.index:
            self.graph.replay()
        else:
            with torch.cuda.device(self.index):
                self.graph.replay()


class CudaGraphCapturer:
    """torch.cuda.CUDAGraph capture: warm-up and capture on one side stream per device (the same stream for every
    capture, as sharing a memory pool requires), one memory pool per device shared by all graphs."""

    def __init__(self):
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._pools: dict[int, Any] = {}

    def unsupported(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"inputs are on {device}; CUDA graphs need CUDA tensors"
        if torch.cuda.is_current_stream_capturing():
            return "called inside another CUDA graph capture"
        return None

    def capture(self, fn: Callable[[], Any], warmup: int, device: torch.device) -> Graph:
        with torch.cuda.device(device):
            index = torch.cuda.current_device()
            if index not in self._streams:
                self._streams[index] = torch.cuda.Stream()
                self._pools[index] = torch.cuda.graph_pool_handle()
            stream = self._streams[index]
            # warm-up on the capture stream: Triton compiles / autotunes, cuBLAS sets up this stream's workspace and
            # the fused-QKV caches fill, all outside the capture
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pools[index], stream=stream):
                out = fn()
            return _CudaGraph(graph, out, index)


# ------------------------------------------------------------------------------------------------------ trees


def _tree_leaves(out, prefix=()):
    """(path, tensor) for every tensor of an output tree (ModelOutput / tuple / tensor / None)."""
    if isinstance(out, torch.Tensor):
        yield prefix, out
    elif isinstance(out, ModelOutput):
        for k, v in out.items():
            yield from _tree_leaves(v, (*prefix, k))
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            yield from _tree_leaves(v, (*prefix, i))


def _tree_map(fn, out, prefix=()):
    if isinstance(out, torch.Tensor):
        return fn(prefix, out)
    if isinstance(out, ModelOutput):
        return type(out)(**{k: _tree_map(fn, v, (*prefix, k)) for k, v in out.items()})
    if isinstance(out, (tuple, list)):
        return type(out)(_tree_map(fn, v, (*prefix, i)) for i, v in enumerate(out))
    return out


def _batch_groups(path: tuple, groups: tuple[str, ...]) -> tuple[str, ...] | None:
    """Which batch group each leading dim of the output at `path` follows; None = no batch dim (e.g. a loss)."""
    if len(groups) == 1:
        return None if path[0] == "loss" else groups
    top = str(path[0])
    if top == "logits_per_text":
        return ("text", "image")
    if top == "logits_per_image":
        return ("image", "text")
    if top.startswith("text"):
        return ("text",)
    if top.startswith(("image", "vision")):
        return ("image",)
    return None


# ------------------------------------------------------------------------------------------------------ runner


@dataclass
class _Entry:
    graph: Graph
    static_inputs: dict[str, torch.Tensor]
    padded: dict[str, bool]  # argument -> its dim 0 is padded to the group's bucket
    slicing: dict[tuple, tuple[str, ...]]  # output path -> batch groups of its leading dims


class _Unsupported(Exception):
    """This call cannot use a graph, for the reason in args[0]."""


@contextlib.contextmanager
def _untraced():
    """Hide the ops of warm-up passes from fastenc.trace() (they repeat the captured pass)."""
    with suspend_traces():
        yield


class GraphRunner:
    """The per-model graph cache behind a model optimized with cuda_graphs (model._fastenc_graphs)."""

    def __init__(self, config: GraphConfig):
        self.config = config
        self.capturer = config.capturer if config.capturer is not None else CudaGraphCapturer()
        self.graphs: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._depth = 0
        self._weights: tuple[int, list[torch.Tensor]] | None = None
        self._fingerprint: tuple | None = None
        self._refused: dict[tuple, str] = {}  # key -> why its captured outputs could not be served

    def __getstate__(self):  # copy.deepcopy(model) keeps the settings, not the graphs
        return {"config": self.config}

    def __setstate__(self, state):
        self.__init__(state["config"])

    def clear(self) -> None:
        """Drop every captured graph (and the weight fingerprint)."""
        with self._lock:
            self.graphs.clear()
            self._refused.clear()
            self._weights = self._fingerprint = None

    # -------------------------------------------------------------------------------------------- call

    def call(self, model, name: str, method, args: tuple, kwargs: dict):
        if torch.compiler.is_compiling():  # torch.compile traces the eager forward (its own graphs, if any)
            return method(model, *args, **kwargs)
        with self._lock:
            if self._depth:  # a graphed method called by another one (CLIPModel.forward -> get_text_features)
                return method(model, *args, **kwargs)
            self._depth += 1
            try:
                return self._call(model, name, method, args, kwargs)
            finally:
                self._depth -= 1

    def _call(self, model, name, method, args, kwargs):
        bound = _bind(method, args, kwargs)
        if bound is None:  # arguments the fused forward rejects: let it raise its usual error
            return method(model, *args, **kwargs)
        try:
            key, plan = self._plan(model, name, method, bound)
        except _Unsupported as e:
            return self._fallback(model, method, args, kwargs, e.args[0])
        if plan is None:
            return method(model, *args, **kwargs)
        self._check_weights(model)
        entry = self.graphs.get(key)
        if entry is None and key in self._refused:
            return self._fallback(model, method, args, kwargs, self._refused[key])
        if entry is None:
            if len(self.graphs) >= self.config.max_graphs:  # evict first: its memory returns to the shared pool
                self.graphs.popitem(last=False)
                record("cuda_graph", "evict")
            try:
                entry = self._capture(model, method, plan)
            except _Unsupported as e:  # capture failed or outputs cannot be sliced: remembered, never retried
                if len(self._refused) >= 256:
                    self._refused.clear()
                self._refused[key] = e.args[0]
                return self._fallback(model, method, args, kwargs, e.args[0])
            self.graphs[key] = entry
            record("cuda_graph", "capture")
            with _untraced():
                entry.graph.replay()  # capture records kernels without running them: the outputs come from a replay
        else:
            self.graphs.move_to_end(key)
            for arg, x in plan["tensors"].items():
                static = entry.static_inputs[arg]
                (static[: x.shape[0]] if entry.padded[arg] else static).copy_(x)
            with _untraced():
                entry.graph.replay()
            record("cuda_graph", "replay")
        return self._outputs(entry, plan)

    def _fallback(self, model, method, args, kwargs, reason: str):
        fall_back("cuda_graph", "cuda_graph", "eager", reason, strict=model._fastenc.strict)
        record("eager", "cuda_graph_fallback")
        return method(model, *args, **kwargs)

    # -------------------------------------------------------------------------------------------- planning

    def _plan(self, model, name, method, bound: dict):
        """(key, plan) for a graphable call; plan None = pass to the eager method (bad arguments);
        raises _Unsupported for calls a graph cannot serve."""
        if "spatial_shapes" in bound or "spatial_shapes" in _param_names(method):
            raise _Unsupported("SigLIP 2 vision reads spatial_shapes on the host (position-embedding resize per image)")
        if model.training:
            raise _Unsupported("the model is in training mode")
        tensors, flags = {}, {}
        for arg, v in bound.items():
            if arg in _GROUP:
                if v is None:
                    continue
                if not isinstance(v, torch.Tensor):
                    return None, None
                tensors[arg] = v
            elif arg in FLAG_ARGS:
                flags[arg] = v
            else:
                return None, None
        if not tensors:
            return None, None
        cfg = model.config
        oa = flags.get("output_attentions")
        if oa is None:
            oa = bool(getattr(cfg, "output_attentions", False))
        if oa:
            raise _Unsupported("output_attentions=True returns attention probabilities (eager path)")
        oh = flags.get("output_hidden_states")
        if oh is None:
            oh = getattr(cfg, "output_hidden_states", False)
        if isinstance(oh, list):
            oh = tuple(oh)
        rd = flags.get("return_dict")
        if rd is None:
            rd = getattr(cfg, "return_dict", True)
        call_flags = {"output_hidden_states": oh}
        for arg in ("interpolate_pos_encoding", "return_loss"):  # given or not, False or None: one key
            if arg in _param_names(method):
                call_flags[arg] = bool(flags.get(arg))
        try:
            hash(tuple(call_flags.values()))
        except TypeError:
            return None, None
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            return None, None  # the eager forward names the misplaced argument
        device = devices.pop()
        why = self.capturer.unsupported(device)
        if why:
            raise _Unsupported(why)
        if torch.is_grad_enabled() and (
            any(t.requires_grad for t in tensors.values()) or any(p.requires_grad for p in self._tensors(model))
        ):
            raise _Unsupported(
                "autograd is on and parameters require grad; call under torch.inference_mode() or torch.no_grad()"
            )

        # batch groups: the main tensor of each group sets its batch; pad only when every tensor of the group has it
        groups: dict[str, int | None] = {}
        for group in ("text", "image"):
            members = [a for a in tensors if _GROUP[a] == group]
            if not members:
                continue
            main = next((a for a in ("input_ids", "inputs_embeds", "pixel_values") if a in members), None)
            t = tensors.get(main) if main else None
            if t is None or t.dim() != _LEAD_DIMS[main] or t.shape[0] == 0:
                groups[group] = None
                continue
            b = t.shape[0]
            groups[group] = b if all(tensors[a].dim() >= 1 and tensors[a].shape[0] == b for a in members) else None
        if call_flags.get("return_loss"):  # a loss over the batch: never pad
            groups = dict.fromkeys(groups)
        buckets = {}
        for group, b in groups.items():
            if b is None:
                continue
            n = self.config.bucket(b)
            if n is None:
                raise _Unsupported(f"batch {b} is above the largest graph batch bucket {self.config.batch_buckets[-1]}")
            buckets[group] = (b, n)
        specs = []
        for arg in sorted(tensors):
            t = tensors[arg]
            shape = tuple(t.shape)
            pad = _GROUP[arg] in buckets
            if pad:
                shape = (buckets[_GROUP[arg]][1], *shape[1:])
            specs.append((arg, shape, t.dtype, pad))
        autocast = torch.is_autocast_enabled(device.type)
        key = (
            name,
            str(device),
            tuple(specs),
            tuple(sorted(call_flags.items())),
            torch.is_inference_mode_enabled(),
            (autocast, torch.get_autocast_dtype(device.type) if autocast else None),
        )
        plan = {
            "tensors": tensors,
            "specs": specs,
            "flags": call_flags,
            "return_dict": rd,
            "buckets": buckets,
            "groups": tuple(groups),
            "device": device,
        }
        return key, plan

    def _tensors(self, model) -> list[torch.Tensor]:
        """The model's parameters and buffers, listed again only after a parameter, buffer or module was assigned
        somewhere (walking the modules costs ~0.2 ms for CLIP-L): a replaced parameter is then checked too."""
        gen = structure_generation()
        if self._weights is None or self._weights[0] != gen:
            self._weights = (gen, [*model.parameters(), *model.buffers()])
        return self._weights[1]

    def _check_weights(self, model) -> None:
        if not self.config.check_weights:
            return
        # weights made under torch.inference_mode() have no version counter (reading it raises): storage only.
        # Strides and shape too: `p.data = p.data.t()` keeps the pointer and the version but a graph replays the old
        # layout.
        fp = tuple(
            (t.data_ptr(), -1 if t.is_inference() else t._version, t.stride(), t.shape) for t in self._tensors(model)
        )
        if self._fingerprint is None:
            self._fingerprint = fp
        elif fp != self._fingerprint:
            if self.graphs:
                record("cuda_graph", "invalidate")
            self.graphs.clear()
            self._fingerprint = fp

    # -------------------------------------------------------------------------------------------- capture

    def _capture(self, model, method, plan) -> _Entry:
        static, padded = {}, {}
        for arg, shape, dtype, pad in plan["specs"]:
            x = plan["tensors"][arg]
            buf = torch.empty(shape, dtype=dtype, device=plan["device"])
            if pad:
                buf[: x.shape[0]].copy_(x)
                buf[x.shape[0] :].copy_(x[:1].expand(shape[0] - x.shape[0], *shape[1:]))  # valid rows as padding
            else:
                buf.copy_(x)
            static[arg], padded[arg] = buf, pad
        kwargs = {**static, **plan["flags"], "return_dict": True}
        calls, warmup_failed = [0], [False]
        warmup = self.config.warmup

        def run():
            calls[0] += 1
            if calls[0] > warmup:
                return method(model, **kwargs)
            try:
                with _untraced():
                    return method(model, **kwargs)
            except BaseException:
                warmup_failed[0] = True
                raise

        try:
            graph = self.capturer.capture(run, warmup, plan["device"])
        except Exception as e:
            if warmup_failed[0]:  # the eager forward failed (bad input): the caller's error, as without graphs
                raise
            raise _Unsupported(f"capture failed: {type(e).__name__}: {e}") from e
        slicing = {}
        for path, leaf in _tree_leaves(graph.outputs):
            groups = _batch_groups(path, plan["groups"])
            if groups is None:
                if any(g in plan["buckets"] for g in plan["groups"]):
                    raise _Unsupported(f"output {'.'.join(map(str, path))} has no batch dimension to slice")
                continue
            for dim, g in enumerate(groups):
                if g in plan["buckets"] and (leaf.dim() <= dim or leaf.shape[dim] != plan["buckets"][g][1]):
                    raise _Unsupported(f"output {'.'.join(map(str, path))} has shape {tuple(leaf.shape)}, no batch dim")
            slicing[path] = groups
        return _Entry(graph, static, padded, slicing)

    def _outputs(self, entry: _Entry, plan):
        copy = self.config.outputs == "copy"
        buckets = plan["buckets"]

        def finish(path, leaf):
            groups = entry.slicing.get(path, ())
            index = tuple(slice(0, buckets[g][0]) if g in buckets else slice(None) for g in groups)
            if any(s.stop is not None and s.stop != leaf.shape[i] for i, s in enumerate(index)):
                leaf = leaf[index]
            return leaf.clone() if copy else leaf

        out = _tree_map(finish, entry.graph.outputs)
        return out if plan["return_dict"] else out.to_tuple()


# ------------------------------------------------------------------------------------------------------ binding


@functools.cache
def _param_names(method) -> tuple[str, ...]:
    """The named parameters of a fused method, after self, without **kwargs."""
    ps = list(inspect.signature(method).parameters.values())[1:]
    return tuple(p.name for p in ps if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _bind(method, args: tuple, kwargs: dict) -> dict | None:
    """Arguments by name, or None when they do not bind (the eager method raises the error)."""
    names = _param_names(method)
    if len(args) > len(names):
        return None
    bound = dict(zip(names, args, strict=False))
    for k, v in kwargs.items():
        if k in bound:
            return None
        bound[k] = v
    return bound


# ------------------------------------------------------------------------------------------------------ classes

_GRAPHED: dict[type, type] = {}


def _graphed_method(name: str, fn):
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        return self._fastenc_graphs.call(self, name, fn, args, kwargs)

    return method


def graphed_class(fused: type, base: type) -> type:
    """A subclass of the fused class `fused` (itself a subclass of the transformers class `base`) whose forward and
    get_*_features run through the model's GraphRunner."""
    cls = _GRAPHED.get(fused)
    if cls is None:
        name = f"{fused.__name__}Graphed"
        ns = {"__module__": __name__, "__qualname__": name}
        for m in GRAPHED_METHODS:
            fn = getattr(fused, m, None)
            if fn is not None and fn is not getattr(base, m, None):
                ns[m] = _graphed_method(m, fn)
        cls = type(name, (fused,), ns)
        _GRAPHED[fused] = cls
    return cls


def clear_graphs(model) -> None:
    """Drop the captured graphs of a model optimized with cuda_graphs (after replacing a Parameter object)."""
    runner = getattr(model, "_fastenc_graphs", None)
    if runner is None:
        raise InputError(
            "clear_graphs: model was not optimized with cuda_graphs (fastenc.optimize(..., cuda_graphs=True))"
        )
    runner.clear()


__all__ = [
    "DEFAULT_BATCH_BUCKETS",
    "Capturer",
    "CudaGraphCapturer",
    "Graph",
    "GraphConfig",
    "GraphRunner",
    "clear_graphs",
    "graph_config",
    "graphed_class",
]
