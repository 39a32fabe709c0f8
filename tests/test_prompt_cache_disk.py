"""fastenc.PromptCache's disk side serves only what it wrote (issue 25, section 3): every entry file carries its key
and a digest of its tensors, checked on read (a flipped byte, a cut file, garbage or another entry's file is a miss,
removed and recomputed, one warning per file); a folder that cannot be written leaves the encode uncached with one
warning; writes are atomic (a SIGKILL mid-write leaves nothing under the entry's name); the folder is bounded by
max_disk_bytes, least recently used first.

Most tests attach the cache to one tiny fused CLIP text tower (random weights from a config); one runs SD 1.x's own
encode_prompt (tests/pipeline_utils.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

import fastenc
from fastenc.pipelines import DEFAULT_MAX_DISK_BYTES, PromptCacheWarning, _BadEntry, _decode_entry

ENCODER_CODE = """
import torch, fastenc
from transformers import CLIPTextConfig, CLIPTextModel
torch.manual_seed(0)
cfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=16)
enc = fastenc.optimize(CLIPTextModel(cfg).eval(), backend="torch")
"""


def _encoder():
    """The tiny fused CLIP text tower (the same weights in every process: ENCODER_CODE)."""
    scope = {}
    exec(ENCODER_CODE, scope)
    return scope["enc"]


def _ids(seed: int, n: int = 1) -> torch.Tensor:
    return torch.randint(3, 99, (n, 8), generator=torch.Generator().manual_seed(seed))


def _run(enc, ids):
    with torch.no_grad():
        out = enc(ids, output_hidden_states=True)
    return [out.last_hidden_state, out.pooler_output, *out.hidden_states]


def _assert_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), i


def _entries(folder):
    return sorted(folder.glob("*.safetensors"))


def _cache_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, PromptCacheWarning)]


@pytest.fixture(scope="module")
def enc():
    return _encoder()


@pytest.fixture(scope="module")
def refs(enc):
    """seed -> the uncached outputs of prompt _ids(seed)."""
    fastenc.pipelines._unwrap_cache(enc)  # an earlier test may have attached a cache
    return {s: _run(enc, _ids(s)) for s in range(8)}


def _key_file(enc, folder, seed):
    """The entry file a cache in `folder` writes for prompt `seed` (written by a scratch cache there)."""
    c = fastenc.PromptCache(path=folder)
    c.attach(enc)
    _run(enc, _ids(seed))
    (f,) = [f for f in _entries(folder)]
    return f


def _data_offset(f, name: str) -> int:
    """Offset in file f of tensor `name`'s first byte."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8 : 8 + n])[name]["data_offsets"][0]


# ------------------------------------------------------------------------------------------------ integrity


def test_flipped_byte_in_prompt_embeds_is_a_miss_never_served(tmp_path):
    """SD 1.x encode_prompt through a disk cache whose entry got one byte flipped (a float's exponent byte: ~1e38):
    the next process recomputes the entry (one warning), returns the encoder's own prompt_embeds and rewrites it."""
    from tests.pipeline_utils import make_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = make_pipeline("sd", tmp_path / "src")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe.encode_prompt("a red cat", "cpu", 1, False)[0]
    folder = tmp_path / "embeds"
    fastenc.optimize(pipe, backend="torch", prompt_cache=fastenc.PromptCache(path=folder))
    with torch.no_grad():
        first = pipe.encode_prompt("a red cat", "cpu", 1, False)[0]
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)
    (f,) = _entries(folder)
    raw = bytearray(f.read_bytes())
    raw[_data_offset(f, "last_hidden_state") + 3] = 0x7F  # the high byte of the first float32: exponent 0xFE
    f.write_bytes(bytes(raw))

    cache = fastenc.PromptCache(path=folder)  # a new process: memory empty
    fastenc.optimize(pipe, backend="torch", prompt_cache=cache)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = pipe.encode_prompt("a red cat", "cpu", 1, False)[0]
    assert torch.equal(got, first) and got.abs().max() < 1e3
    msgs = _cache_warnings(record)
    assert len(msgs) == 1 and f.name in msgs[0] and "digest" in msgs[0], msgs
    assert cache.misses == 1 and cache.disk_hits == 0 and cache.disk_rejected == 1
    again = fastenc.PromptCache(path=folder)  # the rewritten entry is served, and checks
    fastenc.optimize(pipe, backend="torch", prompt_cache=again)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptCacheWarning)
        with torch.no_grad():
            assert torch.equal(pipe.encode_prompt("a red cat", "cpu", 1, False)[0], first)
    assert again.disk_hits == 1 and again.misses == 0


def test_every_flipped_byte_is_refused_or_harmless(enc, tmp_path):
    """Every byte of an entry file changed in turn (its lowest bit, then all bits; header, metadata, digest, every
    tensor byte): the read refuses the file or returns exactly the tensors written, never other values."""
    f = _key_file(enc, tmp_path, 0)
    key = f.name.removesuffix(".safetensors")
    raw = f.read_bytes()
    _, fields, _ = _decode_entry(raw, key, torch.device("cpu"))  # the file itself reads back
    for i in range(len(raw)):
        for flip in (0x01, 0xFF):
            bad = bytearray(raw)
            bad[i] ^= flip
            try:
                _, got, _ = _decode_entry(bytes(bad), key, torch.device("cpu"))
            except _BadEntry:
                continue
            assert sorted(got) == sorted(fields) and all(torch.equal(got[k], fields[k]) for k in fields), (i, flip)


def test_truncated_garbage_and_empty_entries_are_misses_with_one_warning_each(enc, refs, tmp_path):
    folder = tmp_path / "embeds"
    files = [_key_file(enc, tmp_path / f"scratch{s}", s).name for s in (0, 1, 2)]
    folder.mkdir()
    good = (tmp_path / "scratch0" / files[0]).read_bytes()
    (folder / files[0]).write_bytes(good[: len(good) // 2])  # cut in its tensor data
    (folder / files[1]).write_bytes(os.urandom(4096))  # garbage
    (folder / files[2]).write_bytes(b"")  # empty
    cache = fastenc.PromptCache(path=folder)
    cache.attach(enc)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for s in (0, 1, 2):
            _assert_equal(_run(enc, _ids(s)), refs[s])
    msgs = _cache_warnings(record)
    assert len(msgs) == 3 and all(name in m for name, m in zip(files, msgs, strict=True)), msgs
    assert cache.misses == 3 and cache.disk_rejected == 3
    fresh = fastenc.PromptCache(path=folder)  # rewritten: every entry now checks and is served from disk
    fresh.attach(enc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptCacheWarning)
        for s in (0, 1, 2):
            _assert_equal(_run(enc, _ids(s)), refs[s])
    assert fresh.disk_hits == 3 and fresh.misses == 0


def test_another_entrys_file_under_a_key_is_a_miss(enc, refs, tmp_path):
    """Entry A's (valid) file copied to the name of prompt B's key: B is recomputed, never served A's embeddings."""
    folder = tmp_path / "embeds"
    a = _key_file(enc, folder, 0)
    b = _key_file(enc, tmp_path / "scratch", 1).name
    (folder / b).write_bytes(a.read_bytes())
    cache = fastenc.PromptCache(path=folder)
    cache.attach(enc)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _assert_equal(_run(enc, _ids(1)), refs[1])
    msgs = _cache_warnings(record)
    assert len(msgs) == 1 and b in msgs[0] and "key" in msgs[0], msgs
    assert cache.misses == 1 and cache.disk_hits == 0


def test_unremovable_bad_entries_in_a_read_only_folder_do_not_flood(enc, refs, tmp_path, monkeypatch):
    """Two corrupt entries in a folder where nothing can be removed or written (EROFS), one memory slot, the two
    prompts alternately four times: every call is right, and there are 3 warnings (one per file, one for writes)."""
    folder = tmp_path / "embeds"
    names = [_key_file(enc, tmp_path / f"scratch{s}", s).name for s in (0, 1)]
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"\x08" + b"\x00" * 7 + b"{}garbage")
    real_open, real_unlink = os.open, os.unlink

    def ro_open(path, flags, *a, **kw):
        if str(path).startswith(str(folder)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **kw)

    def ro_unlink(path, *a, **kw):
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "unlink", ro_unlink)
    cache = fastenc.PromptCache(path=folder, max_entries=1)
    cache.attach(enc)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for s in (0, 1) * 4:
            _assert_equal(_run(enc, _ids(s)), refs[s])
    msgs = _cache_warnings(record)
    assert len(msgs) == 3, msgs
    assert sum(names[0] in m for m in msgs) == sum(names[1] in m for m in msgs) == 1
    assert sum("cannot write" in m and "Read-only file system" in m for m in msgs) == 1
    assert cache.misses == 8 and cache.disk_write_errors == 8


# ------------------------------------------------------------------------------------------------ unwritable folder


def test_cache_folder_under_a_regular_file_encodes_uncached_with_one_warning(enc, refs, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" / "embeds"
    cache = fastenc.PromptCache(path=folder)
    cache.attach(enc)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for s in (0, 1, 2, 0):
            _assert_equal(_run(enc, _ids(s)), refs[s])
    msgs = _cache_warnings(record)
    assert len(msgs) == 1 and str(folder) in msgs[0] and "cannot write" in msgs[0], msgs
    assert cache.hits == 1 and cache.misses == 3 and cache.disk_write_errors == 3


def test_full_disk_mid_write_leaves_no_partial_file_and_recovers(enc, refs, tmp_path, monkeypatch):
    """ENOSPC after half an entry was written: the encode returns the encoder's output, one warning, nothing under
    the entry's name and no temporary file left; once space is back the next entry is written (no warning)."""
    folder = tmp_path / "embeds"
    cache = fastenc.PromptCache(path=folder)
    cache.attach(enc)
    real_write = os.write

    def full_write(fd, data):
        n = len(data) // 2
        if n:
            return real_write(fd, data[:n])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", full_write)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for s in (0, 1):
                _assert_equal(_run(enc, _ids(s)), refs[s])
    msgs = _cache_warnings(record)
    assert len(msgs) == 1 and "No space left on device" in msgs[0], msgs
    assert sorted(p.name for p in folder.iterdir()) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptCacheWarning)
        _assert_equal(_run(enc, _ids(2)), refs[2])
    assert len(_entries(folder)) == 1


def test_sigkill_mid_write_never_leaves_a_file_under_the_entry_name(refs, tmp_path):
    """A process killed (SIGKILL) after writing an entry's bytes, before the rename: no file under the entry's name
    (a later process misses, without a warning, and writes it); its temporary file is removed once stale."""
    folder = tmp_path / "embeds"
    code = ENCODER_CODE + (
        "import os, signal\n"
        f"cache = fastenc.PromptCache(path={str(folder)!r}); cache.attach(enc)\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        "with torch.no_grad():\n"
        "    enc(torch.randint(3, 99, (1, 8), generator=torch.Generator().manual_seed(0)), output_hidden_states=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == -9, proc.stderr
    assert _entries(folder) == []
    (tmp,) = list(folder.iterdir())  # the killed writer's temporary file
    old = time.time() - 7200
    os.utime(tmp, (old, old))
    enc = _encoder()
    cache = fastenc.PromptCache(path=folder)
    cache.attach(enc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptCacheWarning)
        _assert_equal(_run(enc, _ids(0)), refs[0])
    assert cache.misses == 1 and cache.disk_rejected == 0
    assert [p.name for p in folder.iterdir()] == [_entries(folder)[0].name]  # written; the stale temp removed


# ------------------------------------------------------------------------------------------------ disk bound


def test_disk_side_is_bounded_least_recently_used_first(enc, refs, tmp_path):
    folder = tmp_path / "embeds"
    size = _key_file(enc, tmp_path / "scratch", 0).stat().st_size
    bound = int(2.5 * size)  # room for two entries
    c1 = fastenc.PromptCache(path=folder, max_disk_bytes=bound)
    c1.attach(enc)
    for s in (0, 1):
        _run(enc, _ids(s))
    a, b = (_key_file(enc, tmp_path / f"k{s}", s).name for s in (0, 1))
    now = time.time()
    # A written first, B after; atime > mtime, so a plain read (relatime) does not move A's atime: only the cache does
    os.utime(folder / a, (now - 250, now - 300))
    os.utime(folder / b, (now - 150, now - 200))
    c2 = fastenc.PromptCache(path=folder, max_disk_bytes=bound)  # a new process reads A: A is now the recent one
    c2.attach(enc)
    _assert_equal(_run(enc, _ids(0)), refs[0])
    assert c2.disk_hits == 1
    # the cache sets the clock itself (both times: a noatime mount never moves atime on a read)
    assert min((folder / a).stat().st_atime, (folder / a).stat().st_mtime) > now - 60
    os.utime(folder / a, (now - 250, now - 300))
    _assert_equal(_run(enc, _ids(0)), refs[0])  # a memory hit is an access too
    assert c2.hits == 2 and (folder / a).stat().st_mtime > now - 60
    _assert_equal(_run(enc, _ids(2)), refs[2])  # a third entry: the least recently used (B) goes
    names = {p.name for p in _entries(folder)}
    assert a in names and b not in names and len(names) == 2
    assert c2.disk_evicted == 1 and c2.stats["disk_bytes"] <= bound
    for s in range(3, 8):  # many more: the folder stays within its bound
        _assert_equal(_run(enc, _ids(s)), refs[s])
        assert sum(p.stat().st_size for p in _entries(folder)) <= bound
    tiny = fastenc.PromptCache(path=tmp_path / "tiny", max_disk_bytes=size // 2)  # an entry larger than the bound
    tiny.attach(enc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptCacheWarning)
        _assert_equal(_run(enc, _ids(0)), refs[0])
    assert _entries(tmp_path / "tiny") == [] and len(tiny) == 1


def test_disk_bound_arguments():
    assert fastenc.PromptCache().max_disk_bytes == DEFAULT_MAX_DISK_BYTES == 10 * 2**30
    assert fastenc.PromptCache(max_disk_bytes=None).max_disk_bytes is None
    for bad in (0, -1, 1.5, True, "1G"):
        with pytest.raises(fastenc.InputError, match="max_disk_bytes"):
            fastenc.PromptCache(max_disk_bytes=bad)
