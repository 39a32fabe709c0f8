"""What every fastenc subcommand shares: the one error format (`fastenc <command>: error: ...`, exit status 2),
argument parsing of devices and checkpoints. A leaf of the CLI: `fastenc.cli` and each subcommand's module import
it, it imports none of them. Nothing here imports torch at the top (the parsers and `--help` run without it)."""

from __future__ import annotations

import argparse
import os
import sys

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BAD_INPUT = 2  # exit status of every subcommand on bad input


class CommandParser(argparse.ArgumentParser):
    """argparse with the CLI's one error format: `fastenc <command>: error: <message>` on one line, exit status 2
    (subparsers inherit the class)."""

    def error(self, message):
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(command: str, err: BaseException) -> int:
    """Print `err` as the command's one error line on stderr and return the bad-input exit status."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    print(f"fastenc {command}: error: {message}", file=sys.stderr)
    return BAD_INPUT


def parse_device(value: str | None, flag: str = "--device"):
    """A torch.device from a --device argument (None: cuda if available, else cpu); InputError for a string torch
    does not know, a device type other than cpu / cuda, or a CUDA device this machine does not have."""
    import torch

    from .core.errors import InputError

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{flag} {value!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"{flag} {value!r}: fastenc runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise InputError(f"{flag} {value!r}: {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{flag} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_backend_env() -> None:
    """InputError when $FASTENC_BACKEND names no backend (checked before any model is loaded)."""
    from .core.dispatch import requested_backend

    requested_backend("auto")


def check_checkpoint_dir(path: str, flag: str = "--model") -> None:
    """InputError unless `path` is a folder holding a config.json (cheap: before any progress bar or loading)."""
    from .core.errors import InputError

    if not os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is not a directory (a local save_pretrained checkpoint)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{flag} {path!r} has no config.json (a local save_pretrained checkpoint is expected)")


def load_checkpoint(path: str, flag: str = "--model"):
    """AutoModel.from_pretrained of a local directory; InputError (one line, naming the flag) when it is not one."""
    from transformers import AutoConfig, AutoModel

    from .core.errors import InputError

    check_checkpoint_dir(path, flag)
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        return AutoModel.from_pretrained(path, config=cfg, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{flag} {path!r} could not be loaded as a transformers checkpoint: {first}") from None


def rerun_with_triton_interpreter(argv: list[str]) -> None:
    """Run this command again in a process that starts with TRITON_INTERPRET=1. triton fixes the interpreter mode of
    its own library functions when it is first imported, and this process may already have imported it (through
    transformers or fastenc's kernels); a fresh process is sure not to have."""
    sys.stdout.flush()
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "fastenc.cli", *argv], env)


def split_names(values: list[str] | None) -> list[str] | None:
    """Repeatable, comma-separated argument values (`--models a,b --models c`) as one list; None stays None."""
    if values is None:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def split_ints(values: list[str] | None) -> list[int] | None:
    """`split_names` as integers; InputError for anything else."""
    from .core.errors import InputError

    names = split_names(values)
    if names is None:
        return None
    try:
        return [int(n) for n in names]
    except ValueError:
        raise InputError(f"expected integers, got {values}") from None
