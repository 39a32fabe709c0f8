"""fastenc embed never mixes, never hangs, never drops silently (issue 25, sections 1, 2 and 8): a resume after the
weights or a finished shard's input changed is refused; WebDataset duplicates, field choice and cut tars; only
regular files are read, with a byte limit and PIL's bomb limit; non-UTF-8 captions are logged; a full disk or a bad
--out / CSV / Parquet is one error line; rows that are not finite are failed samples, never stored.

Fixtures (a tiny random CLIP, an image folder) come from tests/test_embed.py; each test copies what it changes."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastenc.cli import main
from fastenc.core.errors import InputError
from fastenc.embed import pipeline, shards
from fastenc.embed.reader import decode_image, list_samples, read_image_bytes
from tests import test_embed as base
from tests.test_embed import CAPTIONS, image_bytes, make_image, read_meta, run_embed, stacked, tree_bytes

pytest.importorskip("PIL")
pytest.importorskip("pyarrow")

clip_dir, folder, private_cache = base.clip_dir, base.folder, base.private_cache  # fixtures (module-scoped)


@pytest.fixture(autouse=True)
def no_hang():
    """A read that blocks (a FIFO, /dev/zero) fails the test instead of hanging the suite."""

    def alarm(signum, frame):
        raise TimeoutError("fastenc embed blocked: a read never returned")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(600)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def cli_common(model, src, out, *extra):
    return ["embed", "--model", str(model), "--input", str(src), "--out", str(out), "--tower", "image", "--batch",
            "2", "--shard-size", "3", "--backend", "torch", "--device", "cpu", "--workers", "0", "--quiet",
            "--store", "fp32", *extra]  # fmt: skip


def one_error_line(err: str, *needles: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("fastenc embed: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def as_killed_after_shard0(out: Path) -> None:
    """What a run killed right after shard 0 leaves (its files, run.json), as FASTENC_EMBED_FAULT would."""
    for name in os.listdir(out):
        if not (name.endswith("-00000.npy") or name in ("meta-00000.parquet", "run.json")):
            os.remove(out / name)


def save_random_clip(model_dir: Path, seed: int) -> None:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir)
    torch.manual_seed(seed)
    other = CLIPModel(model.config).eval()
    other.save_pretrained(model_dir)


# ---------------------------------------------------------------------------------------- resume never mixes


def test_resume_refused_when_weights_change(clip_dir, folder, tmp_path, capsys):
    """New weights saved into the same model folder (same names, same sizes) after shard 0: refused, not mixed."""
    model = tmp_path / "model"
    shutil.copytree(clip_dir, model)
    out = tmp_path / "out"
    assert main(cli_common(model, folder, out)) == 0
    as_killed_after_shard0(out)
    before = tree_bytes(out)
    size = (model / "model.safetensors").stat().st_size
    save_random_clip(model, seed=1)
    assert (model / "model.safetensors").stat().st_size == size  # only the contents differ
    capsys.readouterr()
    assert main(cli_common(model, folder, out)) == 2
    one_error_line(capsys.readouterr().err, "--model", "changed since the run", "another --out")
    assert tree_bytes(out) == before  # nothing written from the new weights


def test_digest_cache_by_file_identity(clip_dir, tmp_path, monkeypatch):
    """The content hash is cached by (path, size, mtime_ns, ctime_ns, inode): an unchanged checkpoint is not re-read,
    a rewrite with the same size and mtime is, and a corrupt cache file is ignored (then rewritten)."""
    monkeypatch.setenv("FASTENC_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(clip_dir, model)
    hashed = []
    real = pipeline.hash_file
    monkeypatch.setattr(pipeline, "hash_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    first = pipeline.checkpoint_digest(str(model))
    assert "model.safetensors" in hashed and "config.json" in hashed
    cache_file = tmp_path / "cache" / "digests" / "files.json"
    assert cache_file.is_file()
    hashed.clear()
    assert pipeline.checkpoint_digest(str(model)) == first and hashed == []  # nothing re-read
    weights = model / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, then the old mtime restored: only ctime (and the contents) tell
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = pipeline.checkpoint_digest(str(model))
    assert changed != first and hashed == ["model.safetensors"]
    for garbage in (b"\x00\xffnot json", b'{"version": 1, "entries": {"x": {"key": "bad", "blake2b": 5}}}'):
        cache_file.write_bytes(garbage)
        hashed.clear()
        assert pipeline.checkpoint_digest(str(model)) == changed and "model.safetensors" in hashed
    assert json.loads(cache_file.read_text())["version"] == 1
    poisoned = json.loads(cache_file.read_text())  # an entry whose identity no longer matches is not used
    for e in poisoned["entries"].values():
        e["key"][1] += 1
        e["blake2b"] = "0" * 64
    cache_file.write_text(json.dumps(poisoned))
    assert pipeline.checkpoint_digest(str(model)) == changed


def test_resume_refused_when_finished_shard_input_changed(clip_dir, folder, tmp_path, capsys):
    """An image replaced in a shard not yet written is embedded from its new bytes; one replaced in a finished shard
    refuses the resume, naming the sample; the output is never a mix of two versions of the input."""
    src = tmp_path / "images"
    shutil.copytree(folder, src)
    out = tmp_path / "out"
    assert main(cli_common(clip_dir, src, out)) == 0
    as_killed_after_shard0(out)
    (src / "sub" / "e.png").write_bytes(image_bytes(make_image(77, (20, 20)), "PNG"))  # index 6: shard 2
    assert main(cli_common(clip_dir, src, out)) == 0
    clean = tmp_path / "clean"
    assert main(cli_common(clip_dir, src, clean)) == 0
    assert tree_bytes(out) == tree_bytes(clean)
    before = tree_bytes(out)
    (src / "b.jpg").write_bytes(image_bytes(make_image(78, (31, 50)), "JPEG"))  # index 1: shard 0, finished
    capsys.readouterr()
    assert main(cli_common(clip_dir, src, out)) == 2
    one_error_line(capsys.readouterr().err, "sample 1 'b.jpg' changed since shard 0", "another --out")
    assert tree_bytes(out) == before


def test_resume_refused_when_tar_members_moved(clip_dir, tmp_path):
    """Tars: the finished shard records member offsets and sizes; a rewritten tar whose member moved is refused."""
    src = tmp_path / "tars"
    rest = [(f"k{j}.jpg", png(j)) for j in (1, 2, 3)]
    write_tar(src / "00000.tar", [("k0.jpg", png(0)), ("k0.txt", b"cap"), *rest])
    out = tmp_path / "out"
    run_embed(clip_dir, str(src), out, tower="image", shard_size=2)
    as_killed_after_shard0(out)
    write_tar(src / "00000.tar", [("k0.jpg", png(9, (50, 40))), ("k0.txt", b"cap"), *rest])  # k1 moves
    with pytest.raises(InputError, match="sample 0 'k0' changed since shard 0.*members"):
        run_embed(clip_dir, str(src), out, tower="image", shard_size=2)


# --------------------------------------------------------------------------------------------------- tars


def png(seed: int, size=(36, 30)) -> bytes:
    return image_bytes(make_image(seed, size), "PNG")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf}


def test_duplicate_key_fails_the_sample_naming_both_members(clip_dir, tmp_path):
    """A key again later (v2 after another key), or one field twice: that sample fails with both members named;
    image v1 is never paired with caption v2."""
    src = tmp_path / "tars"
    write_tar(src / "00000.tar", [("k.jpg", png(1)), ("k.txt", b"v1"), ("m.jpg", png(2)), ("m.txt", b"m"),
                                  ("k.jpg", png(3)), ("k.txt", b"v2"), ("d.jpg", png(4)), ("d.jpg", png(5)),
                                  ("d.txt", b"d")])  # fmt: skip
    write_tar(src / "00001.tar", [("m.txt", b"again"), ("z.jpg", png(6))])
    table = list_samples(str(src))
    assert table.ids == ["k", "m", "d", "z"]
    assert "'00000.tar/k.jpg' and '00000.tar/k.jpg'" in table.errors[0]
    assert "'00000.tar/m.jpg' and '00001.tar/m.txt'" in table.errors[1]
    assert "'00000.tar/d.jpg' and '00000.tar/d.jpg'" in table.errors[2] and 3 not in table.errors
    report = run_embed(clip_dir, str(src), tmp_path / "out", tower="both")
    lines = (tmp_path / "out" / "errors.jsonl").read_text().splitlines()
    errors = {e["id"]: e["error"] for e in map(json.loads, lines)}
    assert set(errors) == {"k", "m", "d", "z"} and "duplicate WebDataset key 'k'" in errors["k"]
    assert errors["z"] == "ValueError: no caption" and report.rows == 0


def test_image_field_preference_list(tmp_path):
    """`k.seg.png` before `k.jpg`: the field is "seg.png", so jpg (first of jpg;jpeg;png;webp) is the image;
    --image-key picks other fields in its order."""
    tar = write_tar(tmp_path / "x.tar", [("k.seg.png", png(1)), ("k.png", png(2)), ("k.jpg", png(3)),
                                         ("k.txt", b"cap"), ("j.seg.png", png(4)), ("j.txt", b"j")])  # fmt: skip
    where = offsets(tar)
    table = list_samples(str(tar))
    assert table.image_refs[0][2] == where["k.jpg"][1] and table.paths[0] == "x.tar/k.jpg"
    assert table.image_refs[1] is None  # j has no image field, only seg.png
    table = list_samples(str(tar), image_key="png;jpg")
    assert table.image_refs[0][2] == where["k.png"][1]
    table = list_samples(str(tar), image_key="seg.png")
    assert table.image_refs[0][2] == where["k.seg.png"][1] and table.image_refs[1][2] == where["j.seg.png"][1]
    with pytest.raises(InputError, match="--image-key"):
        list_samples(str(tar), image_key=" ; ")


@pytest.mark.parametrize("where", ["member", "header"])
def test_cut_tar_keeps_the_samples_before_and_goes_on(clip_dir, tmp_path, where, capsys):
    """A tar cut inside a member's data fails that member's sample; cut inside the next header, the samples before
    are kept; either way the cut is logged (stderr, warnings.jsonl, the report) and the next tar is embedded."""
    src = tmp_path / "tars"
    members = [(f"a{j}.{ext}", png(j) if ext == "jpg" else f"cap {j}".encode()) for j in range(3)
               for ext in ("jpg", "txt")]  # fmt: skip
    tar = write_tar(src / "00000.tar", members)
    write_tar(src / "00001.tar", [("b0.jpg", png(7)), ("b0.txt", b"b")])
    pos = offsets(tar)
    cut = pos["a2.jpg"][1] + 40 if where == "member" else pos["a2.jpg"][0] + 100
    data = tar.read_bytes()[:cut]
    tar.write_bytes(data)
    report = run_embed(clip_dir, str(src), tmp_path / "out", tower="both")
    err = capsys.readouterr().err
    meta = read_meta(tmp_path / "out")
    assert "Traceback" not in err and "warning" in err and "00000.tar is cut" in err
    warned = [json.loads(x) for x in (tmp_path / "out" / "warnings.jsonl").read_text().splitlines()]
    assert [w["kind"] for w in warned] == ["cut"] and report.input_cuts == 1 and report.warnings == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input_cuts"] == 1 and "1 cut tar" in report.summary()
    if where == "member":
        assert meta["id"] == ["a0", "a1", "a2", "b0"]
        assert "cut inside member 'a2.jpg'" in meta["error"][2] and warned[0]["id"] == "a2"
        assert meta["error"][:2] == [None, None] and meta["error"][3] is None and report.rows == 3
    else:
        assert meta["id"] == ["a0", "a1", "b0"] and meta["error"] == [None] * 3 and report.rows == 3
        assert warned[0]["id"] == "a1" and "after member 'a1.txt'" in warned[0]["warning"]


def test_tar_that_is_garbage_or_compressed(clip_dir, tmp_path):
    src = tmp_path / "tars"
    write_tar(src / "00001.tar", [("b0.jpg", png(7))])
    (src / "00000.tar").write_bytes(b"\x01garbage" * 10)
    report = run_embed(clip_dir, str(src), tmp_path / "out", tower="image")
    assert report.rows == 1 and report.input_cuts == 1
    (src / "00000.tar").write_bytes(b"\x1f\x8b\x08" + b"\0" * 100)
    with pytest.raises(InputError, match="gzip-compressed"):
        list_samples(str(src))


# ------------------------------------------------------------------------------------ only regular files


def test_only_regular_files_are_read(clip_dir, folder, tmp_path):
    """A FIFO, a socket and a symlink to /dev/zero named like images (and a FIFO caption) fail their samples with
    the reason, without blocking or reading forever; the other samples are embedded."""
    src = tmp_path / "images"
    src.mkdir()
    (src / "ok.png").write_bytes(png(1))
    os.mkfifo(src / "fifo.png")
    os.symlink("/dev/zero", src / "zero.png")
    (src / "w.png").write_bytes(png(2))
    os.mkfifo(src / "w.txt")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(src)  # AF_UNIX paths are short
    try:
        sock.bind("sock.png")
    finally:
        os.chdir(cwd)
    try:
        report = run_embed(clip_dir, str(src), tmp_path / "out", tower="image", workers=1)
    finally:
        sock.close()
    err = dict(zip(*(read_meta(tmp_path / "out")[k] for k in ("id", "error")), strict=True))
    assert err["ok.png"] is None and report.rows == 1
    assert "FIFO, not a regular file" in err["fifo.png"]
    assert "character device, not a regular file" in err["zero.png"]
    assert "socket, not a regular file" in err["sock.png"]
    assert "caption 'w.txt' is a FIFO" in err["w.png"]


def test_byte_limit_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png(1, (64, 64)))
    n = big.stat().st_size
    assert len(read_image_bytes(("file", str(big)), n)) == n
    with pytest.raises(ValueError, match=f"over --max-image-bytes {n - 1}"):
        read_image_bytes(("file", str(big)), n - 1)
    with pytest.raises(ValueError, match="over --max-image-bytes 10"):
        read_image_bytes(("tar", str(big), 0, n), 10)
    with pytest.raises(ValueError, match="over --max-image-bytes 10"):
        read_image_bytes(("bytes", big.read_bytes()), 10)


def test_max_image_bytes_flag_fails_samples(clip_dir, folder, tmp_path):
    limit = min(p.stat().st_size for p in Path(folder).rglob("*.png")) + 1
    report = run_embed(clip_dir, folder, tmp_path / "out", tower="image", max_image_bytes=limit)
    meta = read_meta(tmp_path / "out")
    over = [i for i, e in zip(meta["id"], meta["error"], strict=True) if e and "--max-image-bytes" in e]
    images = [p for p in Path(folder).rglob("*") if p.suffix in (".png", ".jpg")]
    assert len(over) == sum(1 for p in images if p.stat().st_size > limit)
    assert over and report.rows == 7 - len(over) - 1  # broken.jpg stays broken
    with pytest.raises(InputError, match="--max-image-bytes"):
        run_embed(clip_dir, folder, tmp_path / "o2", max_image_bytes=0)


def test_decompression_bomb_limit_stays_on(clip_dir, tmp_path, monkeypatch):
    """PIL's limit: past MAX_IMAGE_PIXELS (its warning) or twice it (its error), the sample fails, logged."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    src = tmp_path / "images"
    src.mkdir()
    for name, size in (("small.png", (20, 20)), ("warn.png", (40, 30)), ("bomb.png", (50, 50))):
        (src / name).write_bytes(png(3, size))
    with pytest.raises(Image.DecompressionBombWarning):
        decode_image(("file", str(src / "warn.png")))
    report = run_embed(clip_dir, str(src), tmp_path / "out", tower="image")
    err = dict(zip(*(read_meta(tmp_path / "out")[k] for k in ("id", "error")), strict=True))
    assert err["small.png"] is None and report.rows == 1 and report.errors == 2
    assert err["warn.png"].startswith("DecompressionBombWarning") and err["bomb.png"].startswith("DecompressionBomb")


def test_non_utf8_captions_are_logged(clip_dir, tmp_path, capsys):
    src = tmp_path / "images"
    src.mkdir()
    (src / "a.png").write_bytes(png(1))
    (src / "a.txt").write_bytes(b"caf\xe9 au lait")
    (src / "b.png").write_bytes(png(2))
    (src / "b.txt").write_bytes("déjà vu".encode())
    report = run_embed(clip_dir, str(src), tmp_path / "out", tower="both")
    assert "sample 0 'a.png'" in capsys.readouterr().err
    meta = read_meta(tmp_path / "out")
    assert meta["caption"] == ["caf\ufffd au lait", "déjà vu"] and meta["error"] == [None, None]
    warned = [json.loads(x) for x in (tmp_path / "out" / "warnings.jsonl").read_text().splitlines()]
    assert len(warned) == 1 and warned[0]["id"] == "a.png" and "byte 0xe9 at offset 3" in warned[0]["warning"]
    assert report.warnings == 1 and report.rows == 2


# ------------------------------------------------------------------------------------ outputs and tables


def test_full_disk_is_one_line_and_resumable(clip_dir, folder, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing shard 1: one error line naming the file and the bytes; shard 0 intact, no temporaries
    left; the same command then resumes and ends byte-identical to a clean run."""
    out = tmp_path / "out"
    real = shards._save_npy

    def full(path, x):
        if "image-00001" in path:
            with open(path, "wb") as f:
                f.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, x)

    monkeypatch.setattr(shards, "_save_npy", full)
    assert main(cli_common(clip_dir, folder, out)) == 2
    line = one_error_line(capsys.readouterr().err, "image-00001.npy", "No space left on device", "bytes", "resume")
    assert "needs about" in line
    left = sorted(os.listdir(out))
    assert "meta-00000.parquet" in left and "meta-00001.parquet" not in left
    assert not [n for n in left if n.startswith(".tmp-")]
    monkeypatch.setattr(shards, "_save_npy", real)
    assert main(cli_common(clip_dir, folder, out, "--json")) == 0
    assert json.loads(capsys.readouterr().out)["shards_skipped"] == 1
    clean = tmp_path / "clean"
    assert main(cli_common(clip_dir, folder, clean)) == 0
    assert tree_bytes(out) == tree_bytes(clean)


def test_bad_out_and_tables_are_one_line(clip_dir, folder, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(cli_common(clip_dir, folder, tmp_path / "file")) == 2
    one_error_line(capsys.readouterr().err, "--out", "is a file")
    assert main(cli_common(clip_dir, folder, tmp_path / "file" / "sub")) == 2  # a folder under a file
    one_error_line(capsys.readouterr().err, "--out", str(tmp_path / "file" / "sub"))
    bad_csv = tmp_path / "t.csv"
    bad_csv.write_bytes(b"id,caption\n1,caf\xe9\n")
    assert main(cli_common(clip_dir, bad_csv, tmp_path / "o1")) == 2
    one_error_line(capsys.readouterr().err, "--input", "not UTF-8", "0xe9")
    bad_pq = tmp_path / "t.parquet"
    bad_pq.write_bytes(b"PAR1 this is not parquet at all")
    assert main(cli_common(clip_dir, bad_pq, tmp_path / "o2")) == 2
    one_error_line(capsys.readouterr().err, "--input", "not a readable Parquet file")
    os.mkfifo(tmp_path / "pipe.csv")
    assert main(cli_common(clip_dir, tmp_path / "pipe.csv", tmp_path / "o3")) == 2
    one_error_line(capsys.readouterr().err, "--input", "FIFO")


# ---------------------------------------------------------------------------------------- non-finite rows


def test_nonfinite_rows_are_failed_samples(clip_dir, folder, tmp_path, capsys):
    """A token whose embedding is NaN makes the captions holding it NaN: those samples fail at write time (both
    towers, rows stay aligned), are logged and counted; every stored row is finite."""
    from transformers import AutoTokenizer, CLIPModel

    model_dir = tmp_path / "model"
    shutil.copytree(clip_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    others = {t for c in CAPTIONS[1:] for t in tok(c)["input_ids"]}
    poison = next(t for t in tok(CAPTIONS[0])["input_ids"] if t not in others)  # a token of "a red cat" only
    model = CLIPModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight[poison] = float("nan")
    model.save_pretrained(model_dir)
    report = run_embed(str(model_dir), folder, tmp_path / "out", tower="both", batch=3)
    assert "skipped sample 0 'a.png': non-finite text embedding" in capsys.readouterr().err
    meta = read_meta(tmp_path / "out")
    assert meta["error"][0] == "non-finite text embedding (24 NaN, 0 inf); not stored" and meta["row"][0] == -1
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert errors[0]["id"] == "a.png" and report.errors == 3 and report.rows == 4
    img, txt = stacked(tmp_path / "out", "image"), stacked(tmp_path / "out", "text")
    assert img.shape == txt.shape == (4, 24) and np.isfinite(img).all() and np.isfinite(txt).all()


def test_fp16_overflow_is_refused(tmp_path):
    """Finite in fp32 but past fp16's range with --store fp16: refused like NaN."""
    from fastenc.embed.pipeline import ShardAssembler
    from fastenc.embed.reader import SampleTable
    from fastenc.embed.shards import ShardWriter, plan

    table = SampleTable("synthetic", "mem")
    for i in range(3):
        table.add(f"s{i}", f"p{i}", None, None)
    writer = ShardWriter(str(tmp_path / "out"), ("image",), "fp16", "npy")
    writer.start({"model": "none"})
    (shard,) = plan(3, 3, 3)
    asm = ShardAssembler(writer, table, [shard], ("image",), {"image": 2})
    x = np.array([[1.0, 2.0], [1e5, 0.0], [np.inf, 1.0]], dtype=np.float32)
    refused = asm.add(0, np.arange(3), 3, {}, {"image": x})
    assert sorted(refused) == [1, 2] and "past the range of --store fp16" in refused[1] and "1 inf" in refused[2]
    stored = np.load(tmp_path / "out" / "image-00000.npy")
    assert stored.shape == (1, 2) and np.isfinite(stored).all()


def test_corrupt_model_files_are_one_line(clip_dir, folder, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(clip_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    assert main(cli_common(model, folder, tmp_path / "o1")) == 2
    one_error_line(capsys.readouterr().err, "--model", "corrupt or truncated")
    (model / "config.json").write_text("{not json")
    assert main(cli_common(model, folder, tmp_path / "o2")) == 2
    one_error_line(capsys.readouterr().err, "--model", "config.json")
