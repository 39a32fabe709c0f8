"""fastenc.train never saves garbage or nothing (issue 25, section 5): non-finite steps stop (or are skipped and
counted), non-finite weights are never saved, --output-dir is checked before training and every save is read back,
unreadable samples are logged and skipped, checkpoints are atomic and a SIGKILLed run resumes bit for bit, and
out-of-range options are refused naming the flag (CLI) or the argument (Python)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastenc
import fastenc.cli
from fastenc import train
from fastenc.train import FinetuneConfig, NonFiniteError, SaveError, finetune, tiny_model

REPO = Path(__file__).resolve().parents[1]
FAST = dict(tiny="clip", synthetic=8, batch_size=8, seq_len=8, backend="torch", progress=False)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def _cli(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = fastenc.cli.main(["finetune", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("fastenc finetune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------- non-finite


def test_nonfinite_loss_stops_with_exit_1_and_saves_nothing(tmp_path, capsys):
    """--lr 1e30: the first update makes the weights huge, the second step's loss is NaN: one error line naming
    the step and the policy, exit 1, no model in --output-dir (before: NaN weights saved, exit 0)."""
    out = tmp_path / "ft"
    argv = ["--tiny", "--synthetic", "8", "--batch-size", "8", "--seq-len", "8", "--steps", "3", "--lr", "1e30",
            "--backend", "torch", "--no-progress", "--output-dir", str(out)]  # fmt: skip
    rc, stdout, err = _cli(argv, capsys)
    line = _error_line(err)
    assert rc == 1 and "step 2" in line and "not finite" in line and "--on-nonfinite stop" in line, err
    assert "saved:" not in stdout and not (out / "model.safetensors").exists()


def test_nonfinite_lr_is_refused_naming_the_flag(capsys):
    for value in ("inf", "nan", "0", "-1e-3"):
        rc, _, err = _cli(["--tiny", "--synthetic", "8", f"--lr={value}"], capsys)
        assert rc == 2 and "--lr must be a finite number > 0" in _error_line(err), err


def test_skip_step_skips_the_update_and_counts_it():
    """on_nonfinite="skip-step": a micro-batch with NaN pixels leaves weights and AdamW state untouched and is
    counted; the next finite step updates as usual."""
    model = tiny_model("clip")
    cfg = FinetuneConfig(**FAST, on_nonfinite="skip-step", lr=1e-3)
    trainer = train.ContrastiveTrainer(model, cfg, torch.device("cpu"))
    ds = train.SyntheticPairs(4, image_size=32, seq_len=8, vocab_size=1000, eos_token_id=999, seed=0)
    good = train.collate([ds[i] for i in range(4)])
    bad = {**good, "pixel_values": good["pixel_values"].clone()}
    bad["pixel_values"][0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = trainer.step([bad])
    assert not torch.isfinite(torch.tensor(loss)) and trainer.skipped_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not trainer.optimizer.state and trainer.scheduler.last_epoch == 1  # no AdamW step; the schedule moved
    trainer.step([good])
    assert trainer.skipped_steps == 1 and trainer.skipped_in_a_row == 0 and trainer.optimizer.state
    assert not torch.equal(model.logit_scale, before["logit_scale"])
    trainer.cfg = FinetuneConfig(**FAST, on_nonfinite="stop", lr=1e-3)
    with pytest.raises(NonFiniteError, match="step 3: the loss is nan"):
        trainer.step([bad])


def test_skip_step_stops_after_too_many_in_a_row(tmp_path):
    with pytest.raises(NonFiniteError, match=f"{train.MAX_SKIPPED_IN_A_ROW} steps in a row"):
        finetune(FinetuneConfig(**FAST, steps=train.MAX_SKIPPED_IN_A_ROW + 2, lr=1e30, on_nonfinite="skip-step",
                                output_dir=str(tmp_path)))  # fmt: skip
    assert not (tmp_path / "model.safetensors").exists()


def test_nonfinite_weights_are_never_saved(tmp_path):
    model = tiny_model("clip")
    with torch.no_grad():
        model.text_projection.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="text_projection.weight"):
        train.save_output(model, None, str(tmp_path))
    assert not list(tmp_path.iterdir())
    trainer = train.ContrastiveTrainer(model, FinetuneConfig(**FAST), torch.device("cpu"))
    with pytest.raises(NonFiniteError, match="text_projection.weight"):
        train.save_checkpoint(tmp_path / "ck", trainer, 1, {}, {"losses": [], "skipped_samples": "[]"}, 1)
    assert not (tmp_path / "ck" / "step-00000001").exists()


# ---------------------------------------------------------------------------------------------------- output dir


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_output_dir_that_cannot_hold_the_model_is_refused_before_training(tmp_path, capsys, monkeypatch, where):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    out = target if where == "file" else target / "sub" / "ft"
    rc, stdout, err = _cli(["--tiny", "--synthetic", "8", "--output-dir", str(out)], capsys)
    assert rc == 2 and f"--output-dir {str(out)!r}" in _error_line(err) and "saved:" not in stdout

    def no_training(*a, **k):
        raise AssertionError("the model was loaded before --output-dir was checked")

    monkeypatch.setattr(train, "load_model", no_training)
    with pytest.raises(fastenc.InputError, match="output_dir"):
        finetune(FinetuneConfig(**FAST, output_dir=str(out)))


def test_unwritable_output_dir_is_refused(tmp_path, monkeypatch):
    """As root every folder is writable; a probe file that cannot be created stands for a read-only mount."""
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(fastenc.InputError, match="output_dir .* is not a writable directory: Permission denied"):
        finetune(FinetuneConfig(**FAST, output_dir=str(tmp_path)))


def test_a_failed_save_is_an_error_never_saved(tmp_path, capsys, monkeypatch):
    """ENOSPC inside save_pretrained, or weights that do not read back: one error line, exit 2, no "saved:", and
    no half-written file left in --output-dir."""
    from transformers import CLIPModel

    out = tmp_path / "ft"
    argv = ["--tiny", "--synthetic", "8", "--batch-size", "8", "--seq-len", "8", "--steps", "1", "--backend",
            "torch", "--no-progress", "--output-dir", str(out)]  # fmt: skip

    def disk_full(self, folder, **k):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CLIPModel, "save_pretrained", disk_full)
    rc, stdout, err = _cli(argv, capsys)
    line = _error_line(err)
    assert rc == 2 and "No space left on device" in line and f"--output-dir {str(out)!r}" in line, err
    assert "saved:" not in stdout and sorted(p.name for p in out.iterdir()) == []

    monkeypatch.undo()
    original = CLIPModel.save_pretrained

    def truncated(self, folder, **k):
        original(self, folder, **k)
        f = Path(folder) / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])

    monkeypatch.setattr(CLIPModel, "save_pretrained", truncated)
    with pytest.raises(SaveError, match="does not read back"):
        finetune(FinetuneConfig(**FAST, steps=1, output_dir=str(out)))
    assert not (out / "model.safetensors").exists() and not list(out.glob(".fastenc-saving-*"))


# ---------------------------------------------------------------------------------------------------- bad data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPModel

    from fastenc.models.configs import clip_config
    from tests.tokenizer_utils import build_clip_tokenizer

    root = tmp_path_factory.mktemp("ftmodel")
    tok = build_clip_tokenizer(root / "tok", model_max_length=16)
    torch.manual_seed(0)
    src = root / "model"
    CLIPModel(clip_config("tiny", eos_token_id=tok.eos_token_id)).save_pretrained(src)
    tok.save_pretrained(src)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(src)
    return src


def _image_folder(root: Path, n: int) -> Path:
    from PIL import Image

    data = root / "data" / "00000"
    data.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{i:09d}.png")
        (data / f"{i:09d}.txt").write_text(f"caption number {i}")
    return data


def test_unreadable_image_or_caption_is_logged_and_skipped(tmp_path, model_dir, capsys):
    """A truncated PNG, garbage named .jpg and a caption that is not UTF-8: each logged once on stderr as embed
    logs its failures, left out of its batch, counted in the summary; the run finishes and saves."""
    data = _image_folder(tmp_path, 6)
    png = data / "000000001.png"
    png.write_bytes(png.read_bytes()[:60])
    (data / "000000003.jpg").write_bytes(b"this is no image")
    (data / "000000003.txt").write_text("garbage image")
    (data / "000000004.txt").write_bytes(b"caption \xff\xfe latin-1 bytes")
    out = tmp_path / "ft"
    argv = ["--model", str(model_dir), "--data", str(tmp_path / "data"), "--batch-size", "7", "--steps", "2",
            "--backend", "torch", "--no-progress", "--output-dir", str(out)]  # fmt: skip
    rc, stdout, err = _cli(argv, capsys)
    assert rc == 0, err[-3000:]
    logged = [ln for ln in err.splitlines() if ln.startswith("fastenc finetune: skipped sample")]
    assert len(logged) == 3, err  # each once, though both steps meet them
    assert any("000000001.png" in ln for ln in logged) and any("000000003.jpg" in ln for ln in logged)
    assert any("000000004.txt" in ln and "UnicodeDecodeError" in ln for ln in logged)
    assert "skipped samples: 3" in stdout and f"saved: {out}" in stdout
    res = finetune(FinetuneConfig(model=str(model_dir), data=str(tmp_path / "data"), batch_size=7, steps=1,
                                  backend="torch", progress=False))  # fmt: skip
    names = [Path(d["path"]).name for d in res.skipped_samples]
    assert sorted(names) == ["000000001.png", "000000003.jpg", "000000004.txt"], res.skipped_samples
    assert all(map(torch.isfinite, torch.tensor(res.losses)))


def test_a_step_whose_samples_all_fail_is_one_error_line(tmp_path, model_dir, capsys):
    data = _image_folder(tmp_path, 2)
    for f in data.glob("*.png"):
        f.write_bytes(b"broken")
    argv = ["--model", str(model_dir), "--data", str(tmp_path / "data"), "--batch-size", "2", "--steps", "1",
            "--backend", "torch", "--no-progress"]  # fmt: skip
    rc, _, err = _cli(argv, capsys)
    assert rc == 2 and "every sample of step 1 failed" in _error_line(err) and "--data" in _error_line(err)


# ---------------------------------------------------------------------------------------------------- resume

RESUME_ARGS = ["--tiny", "--synthetic", "16", "--batch-size", "8", "--accum", "2", "--steps", "6", "--seq-len", "8",
               "--warmup", "2", "--lr", "1e-3", "--backend", "torch", "--no-progress"]  # fmt: skip


def _reference(tmp_path) -> tuple[dict, dict]:
    """The same run uninterrupted, in a process started as the killed one was (same environment, so the same thread
    count and GEMM summation order as the resumed run: bit-for-bit comparable). -> (summary, saved tensors)."""
    out = tmp_path / "reference"
    cmd = [sys.executable, "-m", "fastenc.cli", "finetune", *RESUME_ARGS, "--output-dir", str(out), "--json"]
    r = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), load_file(out / "model.safetensors")


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The CLI with --save-every 2 is killed with SIGKILL as soon as its first checkpoint is on disk (the kill may
    land in the middle of writing the next one); --resume continues from the newest complete checkpoint and the
    final weights equal an uninterrupted run's, bit for bit (CPU), as do the per-step losses."""
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "fastenc.cli", "finetune", *RESUME_ARGS, "--output-dir", str(out)]
    proc = subprocess.Popen([*cmd, "--save-every", "2"], env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    ckpts = out / "checkpoints"
    try:
        deadline = time.monotonic() + 900
        while not (ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir())):
            assert proc.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "model.safetensors").exists()
    done = sorted(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert done and done[-1] < 6, done
    r = subprocess.run([*cmd, "--save-every", "2", "--resume", "--json"], env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == done[-1] and len(summary["losses"]) == 6
    assert not list(ckpts.glob(".tmp-*")), list(ckpts.iterdir())  # a half-written checkpoint never stays
    ref, ref_tensors = _reference(tmp_path)
    assert summary["losses"] == ref["losses"]  # exactly
    saved = load_file(out / "model.safetensors")
    assert sorted(saved) == sorted(ref_tensors)
    for k, v in ref_tensors.items():
        assert torch.equal(saved[k], v), k


def test_resume_refuses_a_foreign_corrupt_or_differently_configured_checkpoint(tmp_path, capsys):
    out = tmp_path / "ft"
    base = ["--tiny", "--synthetic", "8", "--batch-size", "8", "--seq-len", "8", "--steps", "2", "--backend",
            "torch", "--no-progress", "--output-dir", str(out)]  # fmt: skip
    rc, _, err = _cli([*base, "--resume"], capsys)
    assert rc == 2 and "--resume latest: no checkpoint under" in _error_line(err)
    rc, _, err = _cli([*base, "--save-every", "1"], capsys)
    assert rc == 0, err
    ck = out / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]  # --keep-checkpoints 1

    rc, _, err = _cli([*base, "--lr", "2e-5", "--resume"], capsys)  # other settings
    line = _error_line(err)
    assert rc == 2 and "written with other settings" in line and "lr 1e-05 -> 2e-05" in line, line
    rc, _, err = _cli([*base, "--resume"], capsys)  # same settings: a resume at the last step just saves
    assert rc == 0, err
    rc, _, err = _cli([*base, "--resume", str(tmp_path)], capsys)  # a foreign folder
    assert rc == 2 and "is not a fastenc finetune checkpoint" in _error_line(err)
    meta = json.loads((ck / "meta.json").read_text())
    (ck / "meta.json").write_text(json.dumps({**meta, "format": "someone-else"}))
    rc, _, err = _cli([*base, "--resume"], capsys)
    assert rc == 2 and "is not a fastenc finetune checkpoint" in _error_line(err)
    (ck / "meta.json").write_text(json.dumps(meta))
    state = bytearray((ck / "state.pt").read_bytes())
    state[len(state) // 2] ^= 0xFF
    (ck / "state.pt").write_bytes(bytes(state))
    rc, _, err = _cli([*base, "--resume"], capsys)
    assert rc == 2 and "is corrupt" in _error_line(err) and str(ck) in _error_line(err)


# ---------------------------------------------------------------------------------------------------- options

BAD_FLAGS = [
    (["--seq-len", "0"], "--seq-len must be an integer >= 1"),
    (["--weight-decay=-5"], "--weight-decay must be a finite number >= 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--accum", "0"], "--accum must be an integer >= 1"),
    (["--warmup=-1"], "--warmup must be an integer >= 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number >= 0"),
    (["--workers=-2"], "--workers must be an integer >= 0"),
    (["--seed=-1"], "--seed must be an integer in [0, 2**32)"),
    (["--save-every=-1"], "--save-every must be an integer >= 0"),
    (["--save-every", "2"], "--save-every needs --output-dir"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be an integer >= 1"),
    (["--batch-size", "6", "--accum", "4"], "--batch-size 6 must be divisible by world size x --accum"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_out_of_range_options_are_refused_naming_the_flag(argv, message, capsys):
    rc, stdout, err = _cli(["--tiny", "--synthetic", "8", *argv], capsys)
    assert rc == 2 and message in _error_line(err) and not stdout, err


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(seq_len=0), "seq_len must be an integer >= 1, got 0"),
        (dict(weight_decay=-5), "weight_decay must be a finite number >= 0, got -5"),
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
        (dict(epochs=0), "epochs must be an integer >= 1"),
        (dict(steps=3, epochs=1), "give steps or epochs, not both"),
        (dict(betas=(0.9, 1.5)), "betas must be two numbers in [0, 1)"),
        (dict(batch_size="8"), "batch_size must be an integer >= 1, got '8'"),
        (dict(on_nonfinite="ignore"), "on_nonfinite must be one of"),
    ],
)
def test_out_of_range_arguments_in_python_name_the_argument(kw, message):
    with pytest.raises(fastenc.InputError) as e:
        finetune(FinetuneConfig(**{**FAST, **kw}))
    assert message in str(e.value) and "--" not in str(e.value).split(" must ")[0], str(e.value)


def test_epochs_set_the_number_of_steps():
    res = finetune(FinetuneConfig(**{**FAST, "synthetic": 16}, epochs=2))  # 16 pairs / batch 8 = 2 steps an epoch
    assert len(res.losses) == 4
