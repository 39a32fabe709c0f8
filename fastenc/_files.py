"""Support for what fastenc reads back from disk: a file's content digest, streamed, and sizes in words. Leaf module
(standard library only), shared by the ONNX export cache, embed's checkpoint digests, fine-tuning checkpoints and
`fastenc cache`."""

from __future__ import annotations

import hashlib
import os

_CHUNK = 1 << 23  # 8 MiB reads: a 20 GB checkpoint is hashed in constant memory


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's contents, read in chunks. `algorithm`: "sha256" (what sha256sum prints), "blake2b"
    (blake2b-256) or any other name hashlib.new takes."""
    h = hashlib.blake2b(digest_size=32) if algorithm == "blake2b" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def human_bytes(n: float) -> str:
    """812 B, 1.4 kB, 604.8 MB, 12.0 GB (decimal units, as `ls -h --si` and `du --si`)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # pragma: no cover
