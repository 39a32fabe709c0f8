"""fastenc.runtime: exported engines as drop-in encoders, and the ONNX Runtime backend of `fastenc.optimize`.

    enc = fastenc.runtime.load("clip_text.onnx")                       # ONNX Runtime, CPU
    enc = fastenc.runtime.load("clip_text.plan", device="cuda")        # a TensorRT engine from fastenc.export
    out = enc(input_ids=ids)        # the ModelOutput class of the exported model (CLIPTextModelOutput, ...)
    fast = fastenc.optimize(model, backend="onnxruntime")             # export once (cached), run through the above
    fastenc.runtime.refresh(fast)                                      # re-read the weights, retry a failed export

Two modules: `engines.py` (`load`, `OrtEncoder`, `TensorRTEncoder`: what a file carries, argument checks, IO binding,
TensorRT profiles) and `ort_backend.py` (optimize's backend: the export cache keyed by the weights' fingerprint, its
sha256 digest and metadata checks, the folder lock, the per-call weight-change check, `refresh`). The names below are
the public ones; the cache's root and the fingerprint are the package's own (fastenc/core/files.py,
fastenc/core/fingerprint.py), named here because they key this cache.
"""

from ..core.files import ENV_CACHE, cache_dir
from ..core.fingerprint import weights_fingerprint
from .engines import SESSION_CONFIG, Encoder, OrtEncoder, TensorRTEncoder, load, sidecar_path
from .ort_backend import CacheWarning, check_digest, refresh, write_digest

__all__ = [
    "ENV_CACHE",
    "SESSION_CONFIG",
    "CacheWarning",
    "Encoder",
    "OrtEncoder",
    "TensorRTEncoder",
    "cache_dir",
    "check_digest",
    "load",
    "refresh",
    "sidecar_path",
    "weights_fingerprint",
    "write_digest",
]
