"""What importing fastenc loads, read from sys.modules in fresh interpreters (never a wall time):

- `import fastenc` loads neither transformers' model code (`transformers.models.*`, `transformers.modeling_utils`)
  nor torch.distributed, yet every public name and subpackage is there on first use;
- `python -m fastenc.cli --help` and every `fastenc <command> --help` load neither torch nor transformers;
- attn_implementation="fastenc" is registered when transformers' modeling code is imported, before or after
  `import fastenc`, and the import hook that does it is gone afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

COMMANDS = ("demo", "parity", "tokens", "probe", "bench", "export", "embed", "search", "finetune", "encode", "cache")
MARK = "@@modules@@"  # the line a child prints its findings on, after anything else it wrote


def _child(code: str) -> dict:
    """Run `code` in a fresh interpreter; it ends with `report(value)`; return that value."""
    prelude = f"import json, sys\ndef report(value):\n    print({MARK!r} + json.dumps(value))\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len(MARK) :])


def _loaded(prefixes: tuple[str, ...]) -> str:
    """Child code: the loaded modules named by one of `prefixes` (the module itself or one below it)."""
    return f"sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in {prefixes!r}))"


def test_import_fastenc_loads_no_model_code_and_no_torch_distributed():
    heavy = ("transformers.models", "transformers.modeling_utils", "torch.distributed")
    got = _child(f"import fastenc\nreport({_loaded(heavy)})")
    assert got == [], f"import fastenc loaded {got[:10]} ({len(got)} modules)"


def test_every_public_name_after_a_bare_import():
    got = _child(
        "import fastenc\n"
        "names = {n: type(getattr(fastenc, n)).__name__ for n in fastenc.__all__}\n"
        "missing = [n for n in fastenc.__all__ if n not in dir(fastenc)]\n"
        "ns = {}\n"
        "exec('from fastenc import ' + ', '.join(fastenc.__all__), ns)\n"
        "same = all(ns[n] is getattr(fastenc, n) for n in fastenc.__all__)\n"
        "report({'names': names, 'missing': missing, 'same': same, 'optimize': callable(fastenc.optimize)})"
    )
    assert got["missing"] == [] and got["same"] and got["optimize"], got
    modules = {"diagnostics", "distributed", "export", "integrations", "models", "ops", "pipelines"}
    assert {n for n, kind in got["names"].items() if kind == "module"} == modules, got["names"]
    assert got["names"]["optimize"] == got["names"]["trace"] == "function"
    assert got["names"]["InputError"] == got["names"]["FallbackWarning"] == "type"


@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_help_loads_no_torch(command):
    """`python -m fastenc.cli [command] --help`: the parsers come from modules that import no torch."""
    argv = ["fastenc", *([command] if command else []), "--help"]
    got = _child(
        "import runpy\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    runpy.run_module('fastenc.cli', run_name='__main__')\n"
        "    code = None\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        f"report({{'code': code, 'heavy': {_loaded(('torch', 'transformers', 'triton'))}}})"
    )
    assert got["code"] == 0, got
    assert got["heavy"] == [], f"fastenc {command} --help loaded {got['heavy'][:10]} ({len(got['heavy'])} modules)"


_REGISTERED = (
    "from transformers import AttentionInterface\n"
    "from transformers.masking_utils import AttentionMaskInterface\n"
    "import fastenc.integrations as fi\n"
    "hooks = [type(f).__name__ for f in sys.meta_path if type(f).__module__ == 'fastenc.integrations.import_hook']\n"
    "mu = sys.modules['transformers.modeling_utils']\n"
    "report({'registered': AttentionInterface()['fastenc'] is fi.fastenc_attention_forward,\n"
    "        'mask': 'fastenc' in AttentionMaskInterface(), 'hooks': hooks,\n"
    "        'own_loader': type(mu.__loader__).__module__ != 'fastenc.integrations.import_hook'\n"
    "                      and type(mu.__spec__.loader).__module__ != 'fastenc.integrations.import_hook',\n"
    "        'settings': fi.transformers_attention_settings()})"
)


@pytest.mark.parametrize("order", ["fastenc-first", "transformers-first"])
def test_attention_is_registered_whichever_is_imported_first(order):
    first = "import fastenc\nimport transformers.modeling_utils\n"
    if order == "transformers-first":
        first = "import transformers.modeling_utils\nimport fastenc\n"
    got = _child(first + _REGISTERED)
    assert got == {
        "registered": True,
        "mask": True,
        "hooks": [],
        "own_loader": True,
        "settings": {"backend": "auto", "strict": False},
    }


def test_registration_through_a_model_class_keeps_explicit_settings():
    """A model built after a bare `import fastenc` takes attn_implementation="fastenc"; settings given before
    transformers' modeling code was imported are the ones registered."""
    got = _child(
        "import fastenc\n"
        "fastenc.register_transformers_attention(backend='torch', strict=True)\n"
        "from transformers import BertConfig, BertModel\n"
        "cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,\n"
        "                 vocab_size=100)\n"
        "model = BertModel(cfg, add_pooling_layer=False)\n"
        "model.set_attn_implementation('fastenc')\n"
        "report({'impl': model.config._attn_implementation,\n"
        "        'settings': fastenc.integrations.transformers_attention_settings()})"
    )
    assert got == {"impl": "fastenc", "settings": {"backend": "torch", "strict": True}}
