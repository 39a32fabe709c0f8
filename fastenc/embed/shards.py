"""Output layout of `fastenc embed`: deterministic shards, atomic files, resume, the manifest.

A shard is a fixed contiguous range of sample indices [shard * shard_size, (shard + 1) * shard_size) of the stable
input order, cut into model batches of `batch` rows from the shard's start (the last one shorter). So the batch a
sample runs in - hence its bits on any backend - does not depend on what ran before: a resumed run, a clean run and
the Ray run compute every shard identically.

Files in the output folder (`<tower>` is image or text):
  run.json                    the run's settings (written first; a rerun with other settings is refused)
  <tower>-NNNNN.npy           (rows, dim) float16 / float32 embeddings of the shard's successful samples, in order
  <tower>-NNNNN.parquet       (--format parquet instead of .npy) columns index, id, embedding (fixed-size list)
  meta-NNNNN.parquet          one row per sample of the shard: index, id, path, caption, shard, row (-1 when the
                              sample failed), error (null when it did not), source (the sample's input members as
                              listed: size and mtime of files, offset and size of tar members). Written last: it
                              marks the shard done; a resume checks its ids, captions and sources against the input
  errors.jsonl                every failed sample {index, id, path, error}, in index order (at the end)
  warnings.jsonl              input problems that failed no sample {index, id, path, kind, warning} (at the end)
  manifest.json               settings, per-shard rows / errors / files, totals (at the end)
Every file is written to a hidden temporary name in the same folder, fsynced and renamed, so a killed run leaves
whole files or hidden temporaries (removed by the next run), never a half-written shard under a final name. The
end files are rebuilt from the shards on disk, so a resumed run's output is byte-identical to a clean run's. A write
that fails (a full disk, a read-only folder) is an InputError naming the file and the bytes it needed; the shards
finished before it are intact and a rerun resumes after them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError

FORMAT = "fastenc-embeddings/1"
RUN_FILE = "run.json"
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
WARNINGS = "warnings.jsonl"
TMP_PREFIX = ".tmp-"
ENV_FAULT = "FASTENC_EMBED_FAULT"  # test hook: "kill-after-shards:N" | "kill-before-meta:N" (SIGKILL this process)


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int
    batch: int

    def batches(self) -> list[tuple[int, int]]:
        return [(a, min(a + self.batch, self.stop)) for a in range(self.start, self.stop, self.batch)]


def plan(n: int, shard_size: int, batch: int) -> list[Shard]:
    return [Shard(s, a, min(a + shard_size, n), batch) for s, a in enumerate(range(0, n, shard_size))]


def shard_name(kind: str, shard: int, ext: str) -> str:
    return f"{kind}-{shard:05d}.{ext}"


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            "fastenc embed writes Parquet metadata and needs pyarrow: pip install 'fastenc[embed]'"
        ) from None
    return pa, pq


def atomic_write(path: str, write) -> None:
    """write(tmp_path) then fsync + rename to `path` (same folder, so the rename is atomic)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{name}.{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:  # a full disk must not stay full of our temporaries
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_error(path: str, e: OSError, nbytes: int | None = None) -> InputError:
    """The one-line error for a failed write of `path`: the OS's reason, the bytes the file needed when known and,
    for a full disk, the bytes free."""
    why = e.strerror or str(e) or type(e).__name__
    need = f"; it needs about {nbytes} bytes" if nbytes is not None else ""
    free = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f", {shutil.disk_usage(os.path.dirname(path) or '.').free} bytes free"
        except OSError:
            pass
    return InputError(
        f"--out: cannot write {path!r}: {why}{need}{free}; the finished shards are intact: rerun the same command "
        "to resume once there is room"
    )


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _record(table, i: int) -> str:
    records = getattr(table, "records", None)
    return records[i] if records and i < len(records) else ""


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


class _Fault:
    """FASTENC_EMBED_FAULT: SIGKILL this process after N shards, or in the N-th shard before its meta file."""

    def __init__(self):
        spec = os.environ.get(ENV_FAULT, "")
        self.kind, _, n = spec.partition(":")
        self.n = int(n) if n.isdigit() else 0
        self.written = 0

    def check(self, point: str) -> None:
        if self.kind == "kill-before-meta" and point == "before-meta" and self.written + 1 == self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "kill-after-shards" and point == "after-shard" and self.written == self.n:
            os.kill(os.getpid(), signal.SIGKILL)


class ShardWriter:
    """Writes shards atomically, knows which are done, rebuilds the end files from disk."""

    def __init__(self, out: str, towers: tuple[str, ...], store: str, fmt: str):
        self.out, self.towers, self.store, self.fmt = out, towers, store, fmt
        self.fault = _Fault()

    def start(self, run: dict) -> None:
        """Create the folder, check or write run.json, remove temporaries of killed runs."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise InputError(f"--out {self.out!r} is a file; expected a folder (created if missing)")
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise InputError(f"--out {self.out!r} cannot be created: {e.strerror or e}") from e
        path = os.path.join(self.out, RUN_FILE)
        want = _json_bytes(run)
        if os.path.exists(path):
            with open(path, "rb") as f:
                have = f.read()
            if have != want:
                try:
                    old = json.loads(have)
                except ValueError:
                    old = {}
                old = old if isinstance(old, dict) else {}
                diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
                if "model_digest" in diff and old.get("model") == run.get("model"):
                    raise InputError(
                        f"--model {run['model']!r}: its files (weights, config or tokenizer) changed since the run "
                        f"in --out {self.out!r} started (digest {old.get('model_digest')} -> {run['model_digest']}); "
                        "resuming would mix two models: restore them or use another --out folder"
                    )
                raise InputError(
                    f"--out {self.out!r} holds a run with other settings (differs in: {', '.join(diff)}); "
                    "use another --out folder or the same settings to resume"
                )
        else:
            self._atomic(path, lambda tmp: _write_file(tmp, want), len(want))
        for name in os.listdir(self.out):
            if name.startswith(TMP_PREFIX):
                os.remove(os.path.join(self.out, name))

    def _atomic(self, path: str, write, nbytes: int | None = None) -> None:
        try:
            atomic_write(path, write)
        except OSError as e:
            raise write_error(path, e, nbytes) from e

    def verify(self, done: list[Shard], table) -> None:
        """InputError naming the first sample of a finished shard whose input changed since the shard was written
        (another id at its index, another caption, or other members: sizes, mtimes, tar offsets). The shards still
        to run are computed from today's listing; this proves the finished ones were computed from the same one."""
        if not done:
            return
        _, pq = _pa()
        import pyarrow as pa

        for s in done:
            path = os.path.join(self.out, self.files(s.index)["meta"])
            try:
                meta = pq.read_table(path).to_pydict()
            except (pa.ArrowException, OSError) as e:
                raise InputError(
                    f"--out: {path!r} is unreadable ({str(e).strip().splitlines()[0] if str(e).strip() else e!r}); "
                    f"delete it to redo shard {s.index}"
                ) from None
            if "source" not in meta:
                raise InputError(
                    f"--out {self.out!r}: shard {s.index} was written by an older fastenc that recorded no input "
                    "members, so the input cannot be proven unchanged; use another --out folder"
                )
            for k, i in enumerate(meta["index"]):
                was = (meta["id"][k], meta["caption"][k], meta["source"][k])
                now = (table.ids[i], table.captions[i], table.records[i]) if i < len(table) else (None, None, None)
                if was == now:
                    continue
                j = next(j for j in range(3) if was[j] != now[j])
                what = ("id", "caption", "members")[j]
                raise InputError(
                    f"--input {table.source!r}: sample {i} {was[0]!r} changed since shard {s.index} was written to "
                    f"--out {self.out!r} ({what}: was {was[j]!r}, now {now[j]!r}); resuming would mix two versions "
                    "of the input: restore it, or use another --out folder"
                )

    def files(self, shard: int) -> dict[str, str]:
        ext = "parquet" if self.fmt == "parquet" else "npy"
        names = {t: shard_name(t, shard, ext) for t in self.towers}
        names["meta"] = shard_name("meta", shard, "parquet")
        return names

    def done(self, shard: Shard) -> bool:
        return all(os.path.isfile(os.path.join(self.out, f)) for f in self.files(shard.index).values())

    def write(self, shard: Shard, table, ok: np.ndarray, errors: dict[int, str], emb: dict[str, np.ndarray]) -> None:
        """ok: the successful sample indices in order; emb[tower]: (len(ok), dim) float32; errors: index -> msg."""
        pa, pq = _pa()
        dtype = np.float16 if self.store == "fp16" else np.float32
        files = self.files(shard.index)
        for t in self.towers:
            x = np.ascontiguousarray(emb[t].astype(dtype))
            path = os.path.join(self.out, files[t])
            if self.fmt == "parquet":
                flat = pa.array(x.reshape(-1), type=pa.float16() if dtype == np.float16 else pa.float32())
                tbl = pa.table(
                    {
                        "index": pa.array(ok, type=pa.int64()),
                        "id": pa.array([table.ids[i] for i in ok], type=pa.string()),
                        "embedding": pa.FixedSizeListArray.from_arrays(flat, x.shape[1]),
                    }
                )
                self._atomic(path, lambda tmp, tbl=tbl: pq.write_table(tbl, tmp), x.nbytes + tbl.nbytes)
            else:
                self._atomic(path, lambda tmp, x=x: _save_npy(tmp, x), x.nbytes + 128)
        self.fault.check("before-meta")
        row_of = {int(i): r for r, i in enumerate(ok)}
        idx = list(range(shard.start, shard.stop))
        meta = pa.table(
            {
                "index": pa.array(idx, type=pa.int64()),
                "id": pa.array([table.ids[i] for i in idx], type=pa.string()),
                "path": pa.array([table.paths[i] for i in idx], type=pa.string()),
                "caption": pa.array([table.captions[i] for i in idx], type=pa.string()),
                "shard": pa.array([shard.index] * len(idx), type=pa.int32()),
                "row": pa.array([row_of.get(i, -1) for i in idx], type=pa.int32()),
                "error": pa.array([errors.get(i) for i in idx], type=pa.string()),
                "source": pa.array([_record(table, i) for i in idx], type=pa.string()),
            }
        )
        self._atomic(os.path.join(self.out, files["meta"]), lambda tmp: pq.write_table(meta, tmp), meta.nbytes)
        self.fault.written += 1
        self.fault.check("after-shard")

    def finish(self, run: dict, shards: list[Shard], table=None) -> dict:
        """errors.jsonl and manifest.json from the shards on disk, warnings.jsonl from the listing of `table`
        (identical for clean and resumed runs)."""
        _, pq = _pa()
        entries, err_lines, total_rows, dims = [], [], 0, {}
        for s in shards:
            files = self.files(s.index)
            meta = pq.read_table(os.path.join(self.out, files["meta"])).to_pydict()
            rows = sum(1 for r in meta["row"] if r >= 0)
            errs = [i for i, e in enumerate(meta["error"]) if e is not None]
            for i in errs:
                line = {
                    "index": meta["index"][i],
                    "id": meta["id"][i],
                    "path": meta["path"][i],
                    "error": meta["error"][i],
                }
                err_lines.append(json.dumps(line, sort_keys=True))
            for t in self.towers:
                dims[t] = embedding_dim(os.path.join(self.out, files[t]))
            entries.append(
                {"shard": s.index, "start": s.start, "stop": s.stop, "rows": rows, "errors": len(errs), "files": files}
            )
            total_rows += rows
        data = "".join(x + "\n" for x in err_lines).encode()
        self._atomic(os.path.join(self.out, ERRORS), lambda tmp: _write_file(tmp, data), len(data))
        warned = list(table.warnings) if table is not None else []
        if table is not None:
            data = "".join(json.dumps(w, sort_keys=True) + "\n" for w in warned).encode()
            self._atomic(os.path.join(self.out, WARNINGS), lambda tmp: _write_file(tmp, data), len(data))
        manifest = {
            "format": FORMAT,
            "run": run,
            "towers": list(self.towers),
            "dims": dims,
            "samples": shards[-1].stop if shards else 0,
            "rows": total_rows,
            "errors": len(err_lines),
            "warnings": len(warned),
            "input_cuts": sum(1 for w in warned if w.get("kind") == "cut"),
            "shards": entries,
        }
        data = _json_bytes(manifest)
        self._atomic(os.path.join(self.out, MANIFEST), lambda tmp: _write_file(tmp, data), len(data))
        return manifest


def _save_npy(path: str, x: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, x, allow_pickle=False)


def embedding_dim(path: str) -> int:
    if path.endswith(".npy"):
        return int(np.load(path, mmap_mode="r").shape[1])
    _, pq = _pa()
    return int(pq.read_schema(path).field("embedding").type.list_size)


def load_embeddings(path: str) -> np.ndarray:
    """(rows, dim) array of one shard file (.npy memory-mapped, .parquet read)."""
    if path.endswith(".npy"):
        return np.load(path, mmap_mode="r")
    _, pq = _pa()
    col = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
