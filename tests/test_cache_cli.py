"""`fastenc cache`: lists fastenc's caches with their sizes and clears only what fastenc wrote there (issue 25)."""

import json

import pytest

from fastenc import cli
from tests.test_cli import assert_one_error_line, run

KEY = "0123456789abcdef01234567"  # an ONNX export folder's key (hex)
PROMPT = "ab" * 32  # a PromptCache entry's sha256 key


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """FASTENC_CACHE, FASTENC_CUDA_CACHE and TRITON_CACHE_DIR under tmp_path, each holding entries of known size."""
    root = tmp_path / "fastenc"
    monkeypatch.setenv("FASTENC_CACHE", str(root))
    monkeypatch.setenv("FASTENC_CUDA_CACHE", str(tmp_path / "cuda"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    files = {
        f"fastenc/onnx/CLIPTextModel-{KEY}/model.onnx": 1000,
        f"fastenc/onnx/CLIPTextModel-{KEY}/model.onnx.sha256": 64,
        f"fastenc/onnx/T5EncoderModel-{KEY[::-1]}/model.onnx": 300,
        f"fastenc/prompts/{PROMPT}.safetensors": 50,
        "fastenc/digests/files.json": 20,
        "cuda/torch2.13.0-cuNone-0123456789abcdef/fastenc_cuda.so": 7,
        "triton/AAAA/_attention_fwd_kernel.json": 11,  # a fastenc kernel's Triton cache entry
        "triton/AAAA/__grp___attention_fwd_kernel.json": 5,
        "triton/AAAA/_attention_fwd_kernel.autotune.json": 3,
        "triton/BBBB/some_other_kernel.json": 13,  # another program's: never ours
        "triton/BBBB/some_other_kernel.cubin": 17,
    }
    for rel, n in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * n)
    return tmp_path


def listing(capsys, *extra):
    assert cli.main(["cache", "--json", *extra]) == 0
    return {(c["kind"], c["path"]): c for c in json.loads(capsys.readouterr().out)["caches"]}


def by_kind(rows):
    out = {}
    for (kind, _), c in rows.items():
        out.setdefault(kind, c)
    return out


def test_lists_every_cache_with_its_size(caches, capsys):
    rows = by_kind(listing(capsys))
    assert rows["onnx"]["path"] == str(caches / "fastenc" / "onnx")
    assert (rows["onnx"]["entries"], rows["onnx"]["bytes"]) == (2, 1364)
    assert (rows["prompts"]["entries"], rows["prompts"]["bytes"]) == (1, 50)
    assert (rows["digests"]["entries"], rows["digests"]["bytes"]) == (1, 20)
    assert (rows["cuda"]["entries"], rows["cuda"]["bytes"]) == (1, 7)
    assert (rows["autotune"]["entries"], rows["autotune"]["bytes"], rows["autotune"]["other_bytes"]) == (1, 19, 30)
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"FASTENC_CACHE={caches / 'fastenc'}" in out
    assert "onnx" in out and "2 entries, 1.4 kB" in out and "other programs' kernels" in out


@pytest.mark.parametrize(
    "what,left",
    [
        ("onnx", {"prompts", "digests", "cuda", "autotune"}),
        ("prompts", {"onnx", "digests", "cuda", "autotune"}),
        ("autotune", {"onnx", "prompts", "digests", "cuda"}),
        ("all", set()),
    ],
)
def test_clear_removes_only_the_named_cache(caches, capsys, what, left):
    assert cli.main(["cache", "--clear", "--what", what]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cleared ") and f"of {what}" in out.splitlines()[0]
    rows = by_kind(listing(capsys))
    assert {k for k, c in rows.items() if c["entries"]} == left
    assert (caches / "triton" / "BBBB" / "some_other_kernel.cubin").is_file()  # never another program's kernels
    assert (caches / "fastenc").is_dir()


def test_clear_refuses_a_folder_holding_anything_fastenc_did_not_write(caches, capsys):
    mine = caches / "fastenc" / "onnx" / "my_notes.txt"
    mine.write_text("not a cache entry")
    code, err = run(["cache", "--clear", "--what", "onnx"], capsys)
    assert_one_error_line(code, err, "cache", "refusing to clear the onnx cache")
    assert str(mine) in err and "nothing was removed" in err
    assert mine.is_file() and (caches / "fastenc" / "onnx" / f"CLIPTextModel-{KEY}" / "model.onnx").is_file()
    code, err = run(["cache", "--clear"], capsys)  # "all" refuses too, before removing any other cache
    assert_one_error_line(code, err, "cache", "my_notes.txt")
    assert (caches / "fastenc" / "prompts" / f"{PROMPT}.safetensors").is_file()
    link = caches / "fastenc" / "digests" / ".files.json.1.0a1b2c.tmp"  # atomic_write_bytes' temp name
    mine.unlink()
    link.symlink_to(caches / "cuda")  # a symlink where a temp file would be: refused, not followed
    code, err = run(["cache", "--clear", "--what", "digests"], capsys)
    assert_one_error_line(code, err, "cache", "is a symlink")
    assert (caches / "cuda" / "torch2.13.0-cuNone-0123456789abcdef" / "fastenc_cuda.so").is_file()
    assert cli.main(["cache", "--clear", "--what", "onnx"]) == 0  # the onnx folder is clean again
    assert not any((caches / "fastenc" / "onnx").iterdir())


def test_a_cache_path_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "fastenc").mkdir()
    (tmp_path / "fastenc" / "onnx").write_text("a file of yours")
    monkeypatch.setenv("FASTENC_CACHE", str(tmp_path / "fastenc"))
    code, err = run(["cache", "--clear", "--what", "onnx"], capsys)
    assert_one_error_line(code, err, "cache", "is a file fastenc does not write there")
    assert (tmp_path / "fastenc" / "onnx").read_text() == "a file of yours"


def test_prompt_cache_folder_given_by_the_user(caches, tmp_path, capsys):
    folder = tmp_path / "embeds"
    folder.mkdir()
    (folder / f"{'cd' * 32}.safetensors").write_bytes(b"y" * 40)
    rows = listing(capsys, "--prompt-cache", str(folder))
    assert rows[("prompts", str(folder))]["bytes"] == 40
    assert cli.main(["cache", "--clear", "--what", "prompts", "--prompt-cache", str(folder)]) == 0
    capsys.readouterr()
    assert not any(folder.iterdir()) and folder.is_dir()
    (folder / "image.png").write_bytes(b"z")  # user output next to the entries: refused
    code, err = run(["cache", "--clear", "--what", "prompts", "--prompt-cache", str(folder)], capsys)
    assert_one_error_line(code, err, "cache", "image.png")
    assert (folder / "image.png").is_file()


def test_bad_arguments_are_one_error_line(caches, capsys):
    assert_one_error_line(*run(["cache", "--clear", "--what", "models"], capsys), "cache", "invalid choice")
    assert_one_error_line(*run(["cache", "--what", "onnx"], capsys), "cache", "--what onnx applies with --clear")
