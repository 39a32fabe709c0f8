"""The one row schema of every benchmark (`fastenc bench`, `fastenc bench --pipeline` and the bench/ scripts).

Every row carries the fields in FIELDS; a script adds its own fields next to them. `make_row` builds a row,
`check_row` validates one, `load_rows` reads a results file (a JSON list or JSON Lines) and `adapt` fills the
fields of a row written before this schema (rows committed under bench/results/ keep their old form on disk).
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

from .timing import percentile, quantiles

SCHEMA = 2
# the "bench" names of rows written before this schema -> the script that writes them now
OLD_SCRIPTS = {"onnx_cpu": "bench_onnx", "overhead": "bench_overhead", "encode_prompt": "fastenc bench --pipeline"}
OLD_SCRIPTS["training"] = "bench_training"
FIELDS = {
    "schema": int,
    "script": str,  # what wrote the row: "bench_norm", "fastenc bench", ...
    "op": str,  # what was timed: an op, a model, a pipeline's encode_prompt
    "competitor": str,  # the implementation timed (a provider of the kernel scripts)
    "mode": str,  # e.g. "forward", "train-step"; "" when the script has one
    "config": dict,  # shape / batch / seq / layers ...
    "dtype": (str, type(None)),
    "device": str,
    "versions": dict,
    "commit": (str, type(None)),
    "samples_ms": list,  # raw per-call samples; [] for a row that did not run (see notes / reason)
    "p20_ms": (float, int, type(None)),
    "p50_ms": (float, int, type(None)),
    "p80_ms": (float, int, type(None)),
    "notes": str,
}


def make_row(
    script: str,
    op: str,
    competitor: str,
    *,
    samples_ms: list[float] | None = None,
    mode: str = "",
    config: dict | None = None,
    dtype: str | None = None,
    device: str = "",
    versions: dict | None = None,
    commit: str | None = None,
    notes: str = "",
    **extra,
) -> dict:
    """A row: the schema's fields (p20 / p50 / p80 from samples_ms) followed by the script's own `extra` fields.

    An extra p50_ms etc. is taken only where there are no samples (a figure that is not a per-call sample)."""
    samples = [float(x) for x in samples_ms or []]
    row = {
        "schema": SCHEMA,
        "script": script,
        "op": op,
        "competitor": competitor,
        "mode": mode,
        "config": dict(config or {}),
        "dtype": dtype,
        "device": str(device),
        "versions": dict(versions or {}),
        "commit": commit,
        "samples_ms": samples,
        **(quantiles(samples) if samples else {"p20_ms": None, "p50_ms": None, "p80_ms": None}),
        "notes": notes,
    }
    for k, v in extra.items():
        if k in FIELDS and samples and k.endswith("_ms"):
            continue
        row[k] = v
    return row


def set_samples(row: dict, samples_ms: list[float]) -> dict:
    """Put samples_ms and their p20 / p50 / p80 into a row built before its timing ran; returns the row."""
    row["samples_ms"] = [float(x) for x in samples_ms]
    row.update(quantiles(row["samples_ms"]))
    return row


def check_row(row: dict) -> None:
    """Raise ValueError naming every schema field that is missing or of the wrong type, or quantiles that do not
    match the samples."""
    bad = [k for k, t in FIELDS.items() if k not in row or not isinstance(row[k], t) or isinstance(row[k], bool)]
    if not bad and row["samples_ms"]:
        s = row["samples_ms"]
        if not all(isinstance(x, numbers.Real) for x in s):
            bad.append("samples_ms")
        elif any(row[f"p{q}_ms"] != percentile(s, q) for q in (20, 50, 80)):
            bad.append("p20_ms/p50_ms/p80_ms (not the samples' percentiles)")
    if bad:
        raise ValueError(f"bench row does not match the schema: {bad}")


def _first(*values):
    """The first value that is not None or empty ("" when there is none)."""
    return next((v for v in values if v not in (None, "", [], {})), "")


def adapt(row: dict) -> dict:
    """A row of either schema as a schema row: an old row keeps every field and gains the missing ones, read from
    its old names (bench / provider / config.competitor / env / flat library versions / label / note)."""
    if row.get("schema") == SCHEMA:
        return row
    script = row.get("script") or OLD_SCRIPTS.get(row.get("bench"), row.get("bench")) or "unknown"
    config = row.get("config") if isinstance(row.get("config"), dict) else {}
    if not config:
        shape = row.get("shape")
        config = (
            dict(shape)
            if isinstance(shape, dict)
            else {k: row[k] for k in ("shape", "batch", "seq", "layers") if k in row}
        )
    env = row.get("env") if isinstance(row.get("env"), dict) else {}
    libs = ("torch", "triton", "cuda", "transformers", "onnxruntime", "onnx", "diffusers", "python", "fastenc")
    versions = row.get("versions") or env.get("versions") or {k: row[k] for k in libs if k in row}
    device = row.get("device")
    if isinstance(device, dict):
        device = device.get("name")
    device = _first(device, row.get("gpu"), row.get("machine"), (env.get("device") or {}).get("name"), "")
    raw = row.get("samples_ms") or row.get("ms_samples") or []  # ms_samples: bench_contrastive's old name
    samples = [x for x in raw if isinstance(x, numbers.Real) and not isinstance(x, bool)]
    ms = row.get("ms") if isinstance(row.get("ms"), dict) else {}  # the kernel scripts' old {"p20", "p50", "p80"}
    q = quantiles(samples) if samples else {f"p{k}_ms": ms.get(f"p{k}") for k in (20, 50, 80)}
    out = {
        **row,
        "schema": SCHEMA,
        "script": str(script),
        "op": str(
            _first(
                row.get("op"),
                row.get("model"),
                row.get("pipeline"),
                row.get("activation"),
                row.get("loss"),
                row.get("case"),
                config.get("model"),
                row.get("bench"),
                "",
            )
        ),
        "competitor": str(_first(row.get("competitor"), config.get("competitor"), row.get("provider"), "")),
        "mode": str(row.get("mode") or ""),
        "config": config,
        "dtype": _first(row.get("dtype"), config.get("dtype")) or None,
        "device": str(device),
        "versions": versions,
        "commit": _first(row.get("commit"), env.get("commit")) or None,
        "samples_ms": samples,
        "notes": str(
            _first(row.get("notes"), row.get("note"), row.get("label"), row.get("reason"), row.get("error"), "")
        ),
    }
    for k in ("p20_ms", "p50_ms", "p80_ms"):  # from the samples where kept, else as recorded
        out[k] = q[k] if samples else _first(row.get(k), q[k], row.get("ms_p50") if k == "p50_ms" else None) or None
    if samples and row.get("p50_ms") not in (None, out["p50_ms"]):
        out["recorded_p50_ms"] = row["p50_ms"]  # an old row's p50 taken by another percentile rule
    return out


def load_rows(path) -> list[dict]:
    """Every row of a results file (a JSON list, or JSON Lines), old or new schema, as schema rows."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        if "rows" in data:
            raise ValueError(f"{path}: a report document, not a list of bench rows")
        data = [data]
    return [adapt(r) for r in data]


def append_jsonl(path, rows: list[dict]) -> None:
    """Append rows to a JSON Lines file (one JSON object per line), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r, allow_nan=True) + "\n")


def read_jsonl(path) -> list[dict]:
    """The rows of a JSON Lines file as written (no schema adapter: see load_rows)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
