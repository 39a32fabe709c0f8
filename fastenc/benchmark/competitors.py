"""One builder per competitor: each returns a Runner (a callable over the model inputs plus its setup time) or
raises Skip with the reason it cannot run here. All of them run the same ModelSpec with the same seed-0 weights.

eager / sdpa               transformers with attn_implementation="eager" / "sdpa"
compile                    torch.compile(sdpa model, dynamic=False); dynamo is reset before each case, so each
compile-max-autotune       case's first call carries its own compile (reported as first_call_s, not latency)
fastenc-torch|triton|cuda  fastenc.optimize(sdpa model, backend=..., strict=True): an op that would fall back to
                           another backend is an error row, not a silently different measurement
fastenc-*+graphs           the same with cuda_graphs=True (CUDA only; capture lands in first_call_s)
onnxruntime                fastenc.export.to_onnx of the sdpa model, run by onnxruntime (CUDA EP when this
                           onnxruntime has it and the run is on CUDA, else the CPU EP; the row's provider says which)
tensorrt                   fastenc.export.to_tensorrt of that ONNX file, run through the TensorRT runtime (CUDA only)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

COMPETITORS = (
    "eager",
    "sdpa",
    "compile",
    "compile-max-autotune",
    "fastenc-torch",
    "fastenc-triton",
    "fastenc-cuda",
    "fastenc-triton+graphs",
    "fastenc-cuda+graphs",
    "onnxruntime",
    "tensorrt",
)
GPU_DEFAULT = tuple(c for c in COMPETITORS if c != "fastenc-torch")
QUICK_DEFAULT = ("eager", "sdpa", "fastenc-torch", "fastenc-triton", "onnxruntime")
BASELINES = ("eager", "sdpa", "compile", "compile-max-autotune", "onnxruntime", "tensorrt")
# the Triton CPU interpreter takes seconds per call even on the tiny towers: quick mode runs it at batch 1 only
INTERPRETER_MAX_BATCH = 1


class Skip(Exception):
    """This competitor cannot run here; str(e) is the reason recorded in its rows."""


@dataclass
class Runner:
    name: str
    provider: str  # what actually ran, e.g. "transformers sdpa", "fastenc backend=triton", "onnxruntime CPU EP"
    call: Callable  # feed -> output
    setup_s: float  # build / optimize / export / session creation, once per model and dtype
    prepare: Callable = lambda inputs: inputs  # torch inputs -> this runtime's feed, once per case
    new_case: Callable = lambda: None  # before each case's first call (compile: reset dynamo)
    close: Callable = lambda: None
    host_timer: bool = False  # time with perf_counter + synchronize (runs outside torch's stream)
    mem_tracked: bool = True  # allocates through torch's CUDA allocator
    on_cpu: bool = False  # executes on the host CPU (cost-guarded against the CPU matmul peak)
    max_batch: int | None = None
    max_batch_reason: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Context:
    device: object  # torch.device
    dtype: object  # torch dtype
    dtype_name: str
    workdir: Path  # where exported files go


def first_output(out):
    """The tensor a row's output check compares: last_hidden_state where there is one, else the first tensor."""
    import numpy as np
    import torch

    if isinstance(out, dict) and "last_hidden_state" in out:
        out = out["last_hidden_state"]
    elif hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        out = out.last_hidden_state
    elif isinstance(out, dict):
        out = next(iter(out.values()))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    return out


def _torch_runner(name, provider, model, t0, **kw) -> Runner:
    return Runner(name, provider, lambda feed: model(**feed), time.perf_counter() - t0, **kw)


def _hf(name, spec, ctx, impl):
    t0 = time.perf_counter()
    model = spec.build(impl, ctx.device, ctx.dtype)
    return _torch_runner(name, f"transformers {impl}", model, t0, on_cpu=ctx.device.type == "cpu")


def _compile(name, spec, ctx, mode):
    import torch

    t0 = time.perf_counter()
    model = spec.build("sdpa", ctx.device, ctx.dtype)
    compiled = torch.compile(model, mode=mode, dynamic=False)
    label = f"torch.compile(mode={mode or 'default'}, dynamic=False) of transformers sdpa"
    return _torch_runner(name, label, compiled, t0, new_case=torch._dynamo.reset, on_cpu=ctx.device.type == "cpu")


def _fastenc(name, spec, ctx, backend, graphs):
    import fastenc
    from fastenc.core.dispatch import triton_interpret

    if ctx.device.type == "cpu" and backend == "cuda":
        raise Skip("fastenc backend 'cuda' needs a CUDA device")
    if ctx.device.type == "cpu" and backend == "triton" and not triton_interpret():
        raise Skip("fastenc backend 'triton' on a CPU needs TRITON_INTERPRET=1 set before Python starts")
    available = fastenc.available_backends()
    if backend not in available:
        raise Skip(f"fastenc backend {backend!r} is not available here (available: {', '.join(available)})")
    if graphs and ctx.device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    t0 = time.perf_counter()
    base = spec.build("sdpa", ctx.device, ctx.dtype)
    kwargs = {"cuda_graphs": True} if graphs else {}
    try:
        model = fastenc.optimize(base, backend=backend, strict=True, **kwargs)
    except TypeError as e:
        if graphs and "cuda_graphs" in str(e):
            raise Skip(f"this fastenc.optimize takes no cuda_graphs yet ({e})") from None
        raise
    provider = f"fastenc backend={backend}" + (" + CUDA graphs" if graphs else "")
    interpreted = backend == "triton" and ctx.device.type == "cpu"
    return _torch_runner(
        name,
        provider + (" (Triton CPU interpreter)" if interpreted else ""),
        model,
        t0,
        on_cpu=ctx.device.type == "cpu",
        max_batch=INTERPRETER_MAX_BATCH if interpreted else None,
        max_batch_reason="the Triton CPU interpreter takes seconds per call; it runs at batch 1 only"
        if interpreted
        else "",
    )


def _export_onnx(spec, ctx):
    """(onnx path, export seconds) of the sdpa model through fastenc.export.to_onnx; Skip where it is missing."""
    from fastenc import InputError

    try:
        from fastenc import export
    except ImportError as e:
        raise Skip(f"fastenc.export is not available in this fastenc ({e})") from None
    if not hasattr(export, "to_onnx"):
        raise Skip("fastenc.export has no to_onnx")
    t0 = time.perf_counter()
    model = spec.build("sdpa", ctx.device, ctx.dtype)
    path = ctx.workdir / f"{spec.name}-{ctx.dtype_name}.onnx"
    try:
        path = Path(export.to_onnx(model, path, dtype=ctx.dtype))
    except InputError as e:  # e.g. a dtype the exporter does not write (bf16)
        raise Skip(f"fastenc.export.to_onnx refuses this model: {e}") from None
    del model
    return path, time.perf_counter() - t0


_ORT_ELEMENT = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32"}
_ORT_ELEMENT.update({"tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"})


def _onnxruntime(name, spec, ctx):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise Skip(f"onnxruntime is not installed ({e})") from None
    import numpy as np
    import torch

    path, export_s = _export_onnx(spec, ctx)
    cuda_ep = ctx.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_ep else ["CPUExecutionProvider"]
    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not cuda_ep:  # the CPU EP gets the threads torch has, so CPU rows compare like with like
        opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    session_s = time.perf_counter() - t0
    ran = sess.get_providers()[0]
    wanted = {i.name: _ORT_ELEMENT.get(i.type, "float32") for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]

    def complete(inputs: dict) -> dict:
        feed = dict(inputs)
        if "attention_mask" in wanted and "attention_mask" not in feed:  # SigLIP text: no mask means all ones
            feed["attention_mask"] = torch.ones_like(feed["input_ids"])
        missing = sorted(set(wanted) - set(feed))
        if missing:
            raise RuntimeError(f"the exported model wants inputs {missing} that the benchmark does not make")
        return {k: feed[k] for k in wanted}

    if ran == "CUDAExecutionProvider":

        def prepare(inputs):
            feed = complete(inputs)
            binding = sess.io_binding()
            keep = []
            for k, t in feed.items():
                t = t.to(getattr(torch, wanted[k])).contiguous()
                keep.append(t)
                binding.bind_input(k, "cuda", t.device.index or 0, np.dtype(wanted[k]), list(t.shape), t.data_ptr())
            for o in outputs:
                binding.bind_output(o, "cuda")
            return binding, keep

        def call(prepared):
            sess.run_with_iobinding(prepared[0])
            return None

        mem_tracked, on_cpu = False, False
    else:

        def prepare(inputs):
            feed = complete(inputs)
            return {k: v.detach().cpu().to(getattr(torch, wanted[k])).numpy() for k, v in feed.items()}

        def call(feed):
            return dict(zip(outputs, sess.run(outputs, feed), strict=True))

        mem_tracked, on_cpu = ctx.device.type == "cpu", True
    return Runner(
        name,
        f"onnxruntime {ran}",
        call,
        export_s + session_s,
        prepare=prepare,
        host_timer=True,
        mem_tracked=mem_tracked,
        on_cpu=on_cpu,
        extra={"export_s": export_s, "session_s": session_s, "ort_threads": opts.intra_op_num_threads},
    )


def _tensorrt(name, spec, ctx):
    if ctx.device.type != "cuda":
        raise Skip("TensorRT needs a CUDA device")
    try:
        import tensorrt as trt
    except ImportError as e:
        raise Skip(f"tensorrt is not installed ({e})") from None
    try:
        from fastenc.export import to_tensorrt
    except ImportError as e:
        raise Skip(f"fastenc.export.to_tensorrt is not available ({e})") from None
    import torch

    onnx_path, export_s = _export_onnx(spec, ctx)
    t0 = time.perf_counter()
    engine_path = Path(to_tensorrt(onnx_path, onnx_path.with_suffix(".engine"), fp16=ctx.dtype == torch.float16))
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    torch_dtype.update({trt.int64: torch.int64, trt.bfloat16: torch.bfloat16})
    build_s = time.perf_counter() - t0

    def prepare(feed):
        if "attention_mask" in inputs and "attention_mask" not in feed:
            feed = {**feed, "attention_mask": torch.ones_like(feed["input_ids"])}
        bound = {n: feed[n].to(torch_dtype[engine.get_tensor_dtype(n)]).contiguous() for n in inputs}
        for n, t in bound.items():
            context.set_input_shape(n, tuple(t.shape))
            context.set_tensor_address(n, t.data_ptr())
        for n in names:
            if n not in bound:
                shape, dt = tuple(context.get_tensor_shape(n)), torch_dtype[engine.get_tensor_dtype(n)]
                bound[n] = torch.empty(shape, dtype=dt, device=ctx.device)
                context.set_tensor_address(n, bound[n].data_ptr())
        return bound

    def call(bound):
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return {n: t for n, t in bound.items() if n not in inputs}

    return Runner(
        name,
        f"tensorrt {trt.__version__}",
        call,
        export_s + build_s,
        prepare=prepare,
        mem_tracked=False,  # the engine's activations and workspace are TensorRT's own cudaMalloc, not torch's
        extra={"export_s": export_s, "engine_build_s": build_s},
    )


def build(name: str, spec, ctx: Context) -> Runner:
    """The Runner of competitor `name` for `spec` at ctx's device and dtype; raises Skip with the reason."""
    if name == "eager":
        return _hf(name, spec, ctx, "eager")
    if name == "sdpa":
        return _hf(name, spec, ctx, "sdpa")
    if name == "compile":
        return _compile(name, spec, ctx, None)
    if name == "compile-max-autotune":
        return _compile(name, spec, ctx, "max-autotune")
    if name.startswith("fastenc-"):
        backend, _, graphs = name.removeprefix("fastenc-").partition("+")
        return _fastenc(name, spec, ctx, backend, graphs == "graphs")
    if name == "onnxruntime":
        return _onnxruntime(name, spec, ctx)
    if name == "tensorrt":
        return _tensorrt(name, spec, ctx)
    raise ValueError(f"unknown competitor {name!r}; known: {', '.join(COMPETITORS)}")
