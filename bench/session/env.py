"""Phase env: GPU, driver, clocks, versions, GEMM peak; the CUDA extension: a carried prebuilt library (loaded with
torch.ops.load_library) or fastenc's JIT build with MAX_JOBS=16, timed."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time

from .common import ENV_PREBUILT, Phase, Step, cmd, load_prebuilt, smi_snapshot

STEPS = (
    Step("versions", 4, 2),
    Step("cuda-extension", 70, 1),  # JIT build of csrc/ for sm_90a on 16 cores (guess); a prebuilt load is ~1 s
    Step("gemm-peak", 3, 1),
)


def run(s) -> None:
    torch = s.setup_torch(load_cuda_ops=False)  # the cuda-extension step loads (or builds) them, timed

    def versions(s, step):
        from fastenc.benchmark.env import device_info, versions

        info = {
            "device_info": device_info(s.device),
            "versions": versions(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python_executable": sys.executable,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "nvcc": cmd(["nvcc", "--version"]),
            "smi": smi_snapshot(),
            "smi_clocks": cmd(["nvidia-smi", "-q", "-d", "CLOCK"]) if shutil.which("nvidia-smi") else None,
            "smi_performance": cmd(["nvidia-smi", "-q", "-d", "PERFORMANCE"]) if shutil.which("nvidia-smi") else None,
            "env": {
                k: os.environ.get(k)
                for k in (
                    "MAX_JOBS",
                    "TORCH_CUDA_ARCH_LIST",
                    "TRITON_INTERPRET",
                    "FASTENC_CUDA_CACHE",
                    ENV_PREBUILT,
                    "CUDA_HOME",
                )
            },
        }
        if s.device.type == "cuda":
            p = torch.cuda.get_device_properties(s.device)
            info["sm_count"] = p.multi_processor_count
            info["l2_mb"] = getattr(p, "L2_cache_size", 0) / 2**20
        s.row("env", status="ok", device=info["device_info"]["name"], **info)

    def cuda_extension(s, step):
        from fastenc.core import cuda as _cuda

        prebuilt = os.environ.get(ENV_PREBUILT)
        why_not_prebuilt = load_prebuilt(s) if s.device.type == "cuda" else "no CUDA device"
        t0 = time.perf_counter()
        reason = _cuda.unavailable_reason()  # loads the prebuilt ops, or JIT-builds csrc/ (cached for later phases)
        build_s = time.perf_counter() - t0
        fields = dict(
            prebuilt=prebuilt,
            prebuilt_used=prebuilt is not None and why_not_prebuilt is None and reason is None,
            prebuilt_reason=why_not_prebuilt,
            load_s=build_s,
            max_jobs=os.environ.get("MAX_JOBS"),
            arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"),
            cache_dir=str(_cuda.build_cache_dir()),
        )
        if reason is None:
            s.row("cuda_ext", status="ok", how=_cuda.extension(), build_s=build_s, **fields)
            return
        log = _cuda.build_cache_dir() / "build_error.log"
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else None
        status = "skipped" if s.device.type != "cuda" else "error"
        s.row("cuda_ext", status=status, reason=reason, build_log_tail=tail, **fields)

    def gemm_peak(s, step):
        from fastenc.benchmark.timing import matmul_peak

        for dt in ("bf16", "fp16"):
            s.row("gemm_peak", status="ok", **matmul_peak(s.device, dt, 128 if s.dry else None))

    s.run_steps(
        lambda s, step: {"versions": versions, "cuda-extension": cuda_extension, "gemm-peak": gemm_peak}[step.name](
            s, step
        )
    )


def header(rows: list[dict], end: dict | None) -> list[str]:
    """The summary's lines under the device line: versions, nvidia-smi at start and end, GEMM peak, CUDA extension."""
    env = next((r for r in rows if r.get("kind") == "env"), {})
    v = env.get("versions") or {}
    lines = []
    if v:
        lines.append(
            f"- torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, transformers "
            f"{v.get('transformers')}, python {v.get('python')}, cudnn {env.get('cudnn')}, fastenc "
            f"{v.get('fastenc')}, backends {v.get('fastenc_backends')}"
        )
    smi = (env.get("smi") or {}).get("query")
    if smi:
        lines.append("- nvidia-smi at start: " + smi.replace("\n", " / "))
    if end and (end.get("smi_end") or {}).get("query"):
        lines.append("- nvidia-smi at end: " + end["smi_end"]["query"].replace("\n", " / "))
    peaks = [r for r in rows if r.get("kind") == "gemm_peak" and r.get("status") == "ok"]
    if peaks:
        lines.append(
            "- GEMM peak (in-run): "
            + "; ".join(f"{p['dtype']} {p['tflops']:.1f} TFLOP/s ({'x'.join(map(str, p['shape']))})" for p in peaks)
        )
    ext = next((r for r in rows if r.get("kind") == "cuda_ext"), None)
    if ext:
        ok = ext.get("status") == "ok"
        lines.append(
            f"- CUDA extension: {ext.get('status')}: "
            + (f"{ext.get('how')} in {ext.get('build_s', 0):.1f} s" if ok else str(ext.get("reason")))
            + (
                f" (prebuilt not used: {ext.get('prebuilt_reason')})"
                if ext.get("prebuilt") and not ext.get("prebuilt_used")
                else ""
            )
        )
    return lines


PHASE = Phase(
    "env",
    "environment, clocks, GEMM peak; the CUDA extension (prebuilt, else JIT, MAX_JOBS=16)",
    150,
    STEPS,
    run,
)
