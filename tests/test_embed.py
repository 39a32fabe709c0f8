"""fastenc embed: preprocessing parity with the image processors, embeddings equal to the towers called directly,
every input format, corrupt inputs, resume after kill -9 (byte-identical output), the CLI.

Everything is built here: a tiny random-weight CLIP (and SigLIP) saved with save_pretrained next to a locally built
tokenizer and a PIL image processor config, generated PNG / JPEG files, WebDataset tars, Parquet / CSV tables."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastenc.cli import main
from fastenc.core.errors import InputError
from fastenc.embed import EmbedConfig, embed
from fastenc.embed.reader import ImagePreprocessor, list_samples
from tests.tokenizer_utils import build_clip_tokenizer
from tests.utils import FP32, assert_close

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

pa = pytest.importorskip("pyarrow", reason="fastenc embed writes Parquet metadata: pip install 'fastenc[embed]'")
import pyarrow.parquet as pq  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAPTIONS = ["a red cat", "a blue dog on a table", "two birds in the sky", "a tall tree", "an old house at night"]


def _pil_processor(cls_name: str):
    """The PIL-backed image processor class of transformers (5.x: <Name>Pil; older: the slow class itself)."""
    import transformers

    return getattr(transformers, cls_name + "Pil", None) or getattr(transformers, cls_name)


def make_image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode)


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """fastenc's cache (the checkpoint digests of embed) in a temporary folder, for in-process and CLI runs."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("fastenc-cache")
        mp.setenv("FASTENC_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel checkpoint with tokenizer and PIL CLIP image processor (shortest edge 32, crop 32)."""
    from transformers import CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("clip")
    tok = build_clip_tokenizer(root)
    vocab = len(tok)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                         max_position_embeddings=77, vocab_size=vocab, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = root / "model"
    CLIPModel(cfg).eval().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    _pil_processor("CLIPImageProcessor")(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(model_dir)
    return str(model_dir)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Seven images (PNG / JPEG, RGB / RGBA / grayscale, several aspect ratios), captions for most, one corrupt."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    specs = [("a.png", "PNG", "RGB", (40, 30)), ("b.jpg", "JPEG", "RGB", (30, 50)),
             ("c.png", "PNG", "RGBA", (33, 33)), ("sub/d.jpg", "JPEG", "L", (64, 20)),
             ("sub/e.png", "PNG", "RGB", (16, 16)), ("f.jpg", "JPEG", "RGB", (45, 45))]  # fmt: skip
    for k, (name, fmt, mode, size) in enumerate(specs):
        (root / name).write_bytes(image_bytes(make_image(k, size, mode), fmt))
        if k < len(CAPTIONS):
            (root / name).with_suffix(".txt").write_text(CAPTIONS[k] + "\n")
    (root / "broken.jpg").write_bytes(image_bytes(make_image(9), "JPEG")[:60])  # truncated: a corrupt image
    (root / "broken.txt").write_text("a broken image")
    (root / "notes.md").write_text("not an image")
    return str(root)


def features(out):
    """get_*_features' result: a ModelOutput whose pooler_output is projected (transformers 5.2x), or a tensor."""
    return getattr(out, "pooler_output", out)


def reference_embeddings(model_dir, images=None, captions=None):
    """The towers called directly on the processors' own output (fp32, untouched transformers model)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    out = {}
    with torch.no_grad():
        if images is not None:
            proc = _pil_processor("CLIPImageProcessor").from_pretrained(model_dir)
            px = proc(images=images, return_tensors="pt")["pixel_values"]
            out["image"] = features(model.get_image_features(pixel_values=px))
        if captions is not None:
            tok = AutoTokenizer.from_pretrained(model_dir)
            enc = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out["text"] = features(model.get_text_features(**enc))
    return out


def read_meta(out_dir) -> dict:
    tables = [pq.read_table(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir)) if f.startswith("meta-")]
    return pa.concat_tables(tables).to_pydict()


def stacked(out_dir, tower) -> np.ndarray:
    files = sorted(f for f in os.listdir(out_dir) if f.startswith(tower + "-") and f.endswith(".npy"))
    return np.concatenate([np.load(os.path.join(out_dir, f)) for f in files])


def tree_bytes(out_dir) -> dict[str, bytes]:
    return {f: Path(out_dir, f).read_bytes() for f in sorted(os.listdir(out_dir))}


# ------------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("mode,size", [("RGB", (40, 30)), ("RGB", (30, 50)), ("RGBA", (33, 33)), ("L", (64, 20)),
                                       ("RGB", (16, 16)), ("P", (30, 30)), ("CMYK", (31, 29))])  # fmt: skip
def test_clip_preprocessing_equals_processor(mode, size):
    """Every mode through the installed transformers' own RGB conversion (5.17 and 5.2x differ on alpha)."""
    proc = _pil_processor("CLIPImageProcessor")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    mine = ImagePreprocessor.from_settings(proc.to_dict())
    img = make_image(3, size, "RGBA").convert(mode) if mode in ("P", "CMYK") else make_image(3, size, mode)
    expected = proc(images=[img], return_tensors="np")["pixel_values"][0]
    assert_close(torch.from_numpy(mine(img)), torch.from_numpy(expected), atol=1e-6, rtol=0, name="pixel_values")


def test_uint8_batches_normalized_on_device_equal_host_path():
    """Workers ship resized uint8; normalize_torch on the model's device gives the host path's floats bit for bit."""
    proc = _pil_processor("CLIPImageProcessor")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    mine = ImagePreprocessor.from_settings(proc.to_dict())
    raw = np.stack([mine.geometry(make_image(k, (40 + k, 30))) for k in range(3)])
    assert raw.dtype == np.uint8 and raw.shape == (3, 3, 32, 32)
    host = np.stack([mine.normalize(x) for x in raw])
    dev = mine.normalize_torch(torch.from_numpy(raw).to(DEVICE)).cpu().numpy()
    assert np.array_equal(dev, host)


def test_siglip_preprocessing_equals_processor():
    proc = _pil_processor("SiglipImageProcessor")(size={"height": 24, "width": 24})
    mine = ImagePreprocessor.from_settings(proc.to_dict())
    assert mine.crop is None and mine.out_hw == (24, 24)
    for k, (mode, size) in enumerate([("RGB", (40, 30)), ("RGBA", (17, 50))]):
        img = make_image(k, size, mode)
        expected = proc(images=[img], return_tensors="np")["pixel_values"][0]
        assert_close(torch.from_numpy(mine(img)), torch.from_numpy(expected), atol=1e-6, rtol=0, name="pixel_values")


# ------------------------------------------------------------------------------------------------- embeddings


def run_embed(model_dir, src, out, **kw):
    kw = dict(tower="both", batch=4, shard_size=3, store="fp32", backend="torch", device="cpu", workers=0,
              progress=False) | kw  # fmt: skip
    return embed(EmbedConfig(model=model_dir, input=src, out=str(out), **kw))


@pytest.mark.parametrize("workers,backend,tower", [(0, "torch", "both"), (2, "torch", "both"), (0, "triton", "image")])
def test_folder_embeddings_equal_towers(clip_dir, folder, tmp_path, workers, backend, tower, capsys):
    """The towers called directly on the processors' output; on Triton (the interpreter: slow) the image tower only."""
    report = run_embed(clip_dir, folder, tmp_path / "out", workers=workers, backend=backend, tower=tower, batch=3)
    assert "fastenc embed: skipped sample 2 'broken.jpg': " in capsys.readouterr().err
    meta = read_meta(tmp_path / "out")
    ids = meta["id"]
    assert ids == sorted(ids) and len(ids) == 7 and meta["index"] == list(range(7))
    err = dict(zip(ids, meta["error"], strict=True))
    assert "broken.jpg" in ids and err["broken.jpg"] is not None  # truncated JPEG
    if tower == "both":
        assert err["f.jpg"] == "ValueError: no caption"  # --tower both needs a caption
    ok = [i for i, e in zip(ids, meta["error"], strict=True) if e is None]
    assert report.errors == 7 - len(ok) == (2 if tower == "both" else 1) and report.rows == len(ok)
    rows = [r for r in meta["row"] if r >= 0]  # rows restart per shard (shard_size 3)
    assert rows == ([0, 1, 0, 1, 0] if tower == "both" else [0, 1, 0, 1, 2, 0])
    images = [Image.open(os.path.join(folder, i)) for i in ok]
    captions = [Path(folder, i).with_suffix(".txt").read_text().strip() for i in ok] if tower == "both" else None
    ref = reference_embeddings(clip_dir, images, captions)
    for t in ref:
        assert_close(torch.from_numpy(stacked(tmp_path / "out", t)), ref[t], **FP32, name=t)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == len(ok) and manifest["errors"] == 7 - len(ok) and len(manifest["shards"]) == 3
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == (["broken.jpg", "f.jpg"] if tower == "both" else ["broken.jpg"])


def write_tars(root: Path, n_tars=2, per_tar=3) -> list[tuple[Image.Image, str]]:
    """img2dataset layout: NNNNN.tar with <key>.jpg / .txt / .json; one member corrupt."""
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for t in range(n_tars):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tf:
            for j in range(per_tar):
                key = f"{t:05d}{j:04d}"
                img = make_image(100 + 10 * t + j, (36 + j, 30))
                data = image_bytes(img, "PNG")
                if (t, j) == (1, 1):
                    data = b"\x89PNG not really"
                caption = f"{CAPTIONS[j]} number {t}"
                for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode()),
                                      (f"{key}.json", json.dumps({"key": key}).encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
                samples.append((key, img, caption, (t, j) != (1, 1)))
    return samples


def test_webdataset_tars(clip_dir, tmp_path):
    samples = write_tars(tmp_path / "tars")
    report = run_embed(clip_dir, str(tmp_path / "tars"), tmp_path / "out", tower="image", shard_size=4, workers=2)
    meta = read_meta(tmp_path / "out")
    assert meta["id"] == [s[0] for s in samples]
    assert meta["caption"] == [s[2] for s in samples]
    assert meta["path"][0] == "00000.tar/000000000.jpg"
    assert report.errors == 1 and meta["error"][4] is not None and meta["row"][4] == -1
    ref = reference_embeddings(clip_dir, [s[1] for s in samples if s[3]])
    assert_close(torch.from_numpy(stacked(tmp_path / "out", "image")), ref["image"], **FP32, name="image")


def test_tar_keys_with_folders_and_dot_prefix(tmp_path):
    """Keys are the member path up to the basename's first dot ("./" dropped); members of one key group. The field
    is what follows that dot: `k2.seg.jpg` is field "seg.jpg", an image only when --image-key names it."""
    data = image_bytes(make_image(1), "PNG")
    with tarfile.open(tmp_path / "x.tar", "w") as tf:
        for name, payload in (("./k1.png", data), ("./k1.txt", b"one"), ("sub.v2/k2.seg.jpg", data),
                              ("sub.v2/k2.txt", b"two"), ("sub.v2/k2.json", b"{}")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    table = list_samples(str(tmp_path / "x.tar"))
    assert table.ids == ["k1", "sub.v2/k2"] and table.captions == ["one", "two"]
    assert table.image_refs[0][0] == "tar" and table.image_refs[1] is None
    table = list_samples(str(tmp_path / "x.tar"), image_key="png;seg.jpg")
    assert [r[0] for r in table.image_refs] == ["tar", "tar"]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_tables(clip_dir, folder, tmp_path, fmt):
    """Parquet with image bytes (HF datasets structs) / CSV with relative paths; captions and ids from columns."""
    names = ["a.png", "b.jpg", "sub/e.png"]
    caps = ["first caption", "second one", "third"]
    if fmt == "parquet":
        imgs = [{"bytes": Path(folder, n).read_bytes(), "path": n} for n in names]
        pq.write_table(pa.table({"key": ["k0", "k1", "k2"], "image": imgs, "caption": caps}), tmp_path / "t.parquet")
        src = tmp_path / "t.parquet"
    else:
        src = Path(folder) / "t.csv"
        src.write_text(
            "key,image,caption\n" + "".join(f"k{i},{n},{c}\n" for i, (n, c) in enumerate(zip(names, caps, strict=True)))
        )
    out = tmp_path / f"out-{fmt}"
    run_embed(clip_dir, str(src), out, format="parquet")
    if fmt == "csv":
        src.unlink()
    meta = read_meta(out)
    assert meta["id"] == ["k0", "k1", "k2"] and meta["caption"] == caps and meta["error"] == [None] * 3
    ref = reference_embeddings(clip_dir, [Image.open(Path(folder, n)) for n in names], caps)
    for tower in ("image", "text"):
        t = pa.concat_tables([pq.read_table(out / f) for f in sorted(os.listdir(out)) if f.startswith(tower + "-")])
        assert t.column("id").to_pylist() == ["k0", "k1", "k2"]
        got = np.stack(t.column("embedding").to_pylist()).astype(np.float32)
        assert_close(torch.from_numpy(got), ref[tower], **FP32, name=tower)


def test_fp16_store_and_rerun_skips(clip_dir, folder, tmp_path):
    out = tmp_path / "out"
    first = run_embed(clip_dir, folder, out, tower="image", store="fp16")
    assert stacked(out, "image").dtype == np.float16
    before = tree_bytes(out)
    again = run_embed(clip_dir, folder, out, tower="image", store="fp16")
    assert again.shards_skipped == first.shards == 3 and again.samples_run == 0
    assert tree_bytes(out) == before
    for name in ("manifest.json", "errors.jsonl", "meta-00002.parquet"):  # killed while finishing / in the last shard
        (out / name).unlink()
    redo = run_embed(clip_dir, folder, out, tower="image", store="fp16")
    assert redo.shards_skipped == 2 and redo.samples_run == 1
    assert tree_bytes(out) == before
    with pytest.raises(InputError, match="differs in: batch"):
        run_embed(clip_dir, folder, out, tower="image", store="fp16", batch=2)
    assert json.loads((out / "run.json").read_text())["dtype"] == "fp32"  # resolved: fp32 on the CPU
    with pytest.raises(InputError, match="differs in: dtype"):  # e.g. a CPU run resumed as bf16
        run_embed(clip_dir, folder, out, tower="image", store="fp16", dtype="bf16")


def test_bad_input(clip_dir, folder, tmp_path):
    with pytest.raises(InputError, match="--input"):
        run_embed(clip_dir, str(tmp_path / "missing"), tmp_path / "o")
    with pytest.raises(InputError, match="--batch"):
        run_embed(clip_dir, folder, tmp_path / "o", batch=0)
    with pytest.raises(InputError, match="--tower"):
        run_embed(clip_dir, folder, tmp_path / "o", tower="audio")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no samples"):
        run_embed(clip_dir, str(tmp_path / "empty"), tmp_path / "o")
    with pytest.raises(InputError, match="--caption-col"):
        list_samples(str(Path(folder) / "t.csv") if (Path(folder) / "t.csv").exists() else _csv(tmp_path),
                     caption_col="nope")  # fmt: skip


def _csv(tmp_path) -> str:
    p = tmp_path / "x.csv"
    p.write_text("id,caption\n1,a cat\n")
    return str(p)


# ------------------------------------------------------------------------------------- kill -9 and resume (CLI)


def cli(*args, env=None, check=True):
    env = dict(os.environ, **(env or {}))
    r = subprocess.run([sys.executable, "-m", "fastenc.cli", *args], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=900)  # fmt: skip
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_kill9_then_resume_is_byte_identical(clip_dir, folder, tmp_path, capsys):
    """The run is SIGKILLed in shard 1 after its embedding files and before its metadata (the shard's commit
    point); the rerun skips shard 0, redoes shard 1, removes the temporaries, and the folder equals a clean run's."""
    common = ["embed", "--model", clip_dir, "--input", folder, "--tower", "both", "--batch", "2", "--shard-size", "3",
              "--backend", "torch", "--device", "cpu", "--workers", "1", "--quiet"]  # fmt: skip
    killed = tmp_path / "killed"
    r = cli(*common, "--out", str(killed), env={"FASTENC_EMBED_FAULT": "kill-before-meta:2"}, check=False)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    left = sorted(os.listdir(killed))
    assert "manifest.json" not in left and "meta-00000.parquet" in left
    assert "image-00001.npy" in left and "meta-00001.parquet" not in left  # embeddings written, shard not done
    (killed / ".tmp-meta-00001.parquet.12345").write_bytes(b"half a file")  # as a kill mid-write leaves it
    assert main([*common, "--out", str(killed), "--json"]) == 0
    clean = tmp_path / "clean"
    assert main([*common, "--out", str(clean)]) == 0
    assert tree_bytes(killed) == tree_bytes(clean)
    capsys.readouterr()
    assert main([*common, "--out", str(killed), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["shards_skipped"] == 3 and again["samples_run"] == 0


def test_cli_errors_are_one_line(clip_dir, tmp_path, capsys):
    assert main(["embed", "--model", clip_dir, "--input", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastenc embed: error: --input") and "Traceback" not in err
    assert main(["search", "--index", str(tmp_path), "--text", "a cat"]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_siglip_checkpoint(folder, tmp_path):
    """SiglipModel: fixed-size resize without crop, mean/std 0.5, text padded to the model's 16 positions."""
    from transformers import AutoTokenizer, SiglipConfig, SiglipModel

    tok = build_clip_tokenizer(tmp_path)
    vocab = len(tok)
    cfg = SiglipConfig(
        text_config=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
                         max_position_embeddings=16, vocab_size=vocab, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
                           image_size=24, patch_size=8),
    )  # fmt: skip
    torch.manual_seed(0)
    model = SiglipModel(cfg).eval()
    model_dir = tmp_path / "siglip"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    proc = _pil_processor("SiglipImageProcessor")(size={"height": 24, "width": 24})
    proc.save_pretrained(model_dir)
    run_embed(str(model_dir), folder, tmp_path / "out", batch=3)
    meta = read_meta(tmp_path / "out")
    ok = [i for i, e in zip(meta["id"], meta["error"], strict=True) if e is None]
    caps = [c for c, e in zip(meta["caption"], meta["error"], strict=True) if e is None]
    with torch.no_grad():
        px = proc(images=[Image.open(os.path.join(folder, i)) for i in ok], return_tensors="pt")["pixel_values"]
        enc = AutoTokenizer.from_pretrained(model_dir)(caps, padding="max_length", max_length=16, return_tensors="pt")
        ref_img = features(model.get_image_features(pixel_values=px))
        ref_txt = features(model.get_text_features(**enc))
    assert_close(torch.from_numpy(stacked(tmp_path / "out", "image")), ref_img, **FP32, name="image")
    assert_close(torch.from_numpy(stacked(tmp_path / "out", "text")), ref_txt, **FP32, name="text")


def test_warm_up_forward_of_both_towers(clip_dir, folder, tmp_path):
    """The untimed forward that captures CUDA graphs before the clock starts (run on CUDA only by embed)."""
    from fastenc.embed.pipeline import TowerRunner, prepare_run

    cfg = EmbedConfig(model=clip_dir, input=folder, out=str(tmp_path / "o"), tower="both", batch=3, device="cpu")
    source = prepare_run(cfg, False)[0]
    runner = TowerRunner(clip_dir, ("image", "text"), device="cpu", backend="torch", preprocess=source.preprocess)
    runner.warm_up(source, 3)
    assert runner.model_s == 0.0
    batch = {k: torch.from_numpy(v) for k, v in source.prepare(0, 3).items() if isinstance(v, np.ndarray)}
    assert batch["pixel_values"].dtype == torch.float32  # on the CPU the workers normalize
    out = runner.run(batch)
    assert out["image"].shape == (3, 24) and out["text"].shape == (3, 24) and runner.model_s > 0
    source.ship_uint8 = True  # what a CUDA run ships: the same embeddings, bit for bit
    raw = {k: torch.from_numpy(v) for k, v in source.prepare(0, 3).items() if isinstance(v, np.ndarray)}
    assert raw["pixel_values"].dtype == torch.uint8
    assert torch.equal(runner.run(raw)["image"], out["image"])
