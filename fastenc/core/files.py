"""Support for what fastenc writes and reads back: the cache root, atomic writes, a file's content digest, streamed, and
sizes in words. Leaf module (standard library only), shared by the ONNX export cache, the prompt cache, embed's
checkpoint digests and FAISS records, fine-tuning checkpoints and `fastenc cache`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

TMP_SUFFIX = ".tmp"  # a writer's temporary file: .<name>.<pid>.<hex>.tmp beside its target (`fastenc cache` knows it)
_CHUNK = 1 << 23  # 8 MiB reads: a 20 GB checkpoint is hashed in constant memory
ENV_CACHE = "FASTENC_CACHE"


def cache_dir() -> Path:
    """The root of fastenc's caches (ONNX exports, prompt-cache entries, embed's digests): $FASTENC_CACHE, else
    ~/.cache/fastenc (XDG_CACHE_HOME respected)."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastenc"


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent, its old content or all of `data`: a unique temporary
    file in the same folder, written, fsynced, renamed over `path` (then the folder fsynced, where it can be). On
    any failure the temporary file is removed and the error raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power loss once the folder is synced
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
