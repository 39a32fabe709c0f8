"""Markdown tables and PNG plots from benchmark rows: `markdown` / `plots` for `fastenc bench`'s matrix, and
`rows_table` / `rows_plot` for the rows of every script in the one schema (fastenc.benchmark.rows; old rows through its
adapter): `python -m fastenc.benchmark.report bench/results/*.json* [--plot out.png]`."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .competitors import BASELINES
from .rows import load_rows


def _f(x, spec: str = ".3f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _case(r: dict) -> tuple:
    c = r["config"]
    return (c["label"], c["dtype"], c["batch"], c["seq"])


def latest(rows: list[dict]) -> list[dict]:
    """The last row of each (model, dtype, batch, seq, competitor) in file order, e.g. over several runs."""
    keep: dict[tuple, dict] = {}
    for r in rows:
        c = r["config"]
        keep[(c["model"], c["dtype"], c["batch"], c["seq"], c["competitor"])] = r
    return list(keep.values())


def best_fastenc(group: list[dict]) -> dict | None:
    ok = [r for r in group if r["status"] == "ok" and r["config"]["competitor"].startswith("fastenc-")]
    return min(ok, key=lambda r: r["p50_ms"]) if ok else None


def _by_case(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(_case(r), []).append(r)
    return out


def markdown(rows: list[dict]) -> str:
    """Three parts: the headline (best fastenc competitor per case and its speedup over each baseline of the same
    run), every ok row, and the skip / error reasons."""
    if not rows:
        return "(no rows)\n"
    r0 = rows[0]
    v = r0["versions"]
    lines = [
        f"Device: {r0['device']}; torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, "
        f"onnxruntime {v['onnxruntime']}, fastenc {v['fastenc']}; commit {r0['commit']}; {r0['time']}"
        + ("; quick mode (tiny shapes: proves the harness, not the speed)" if r0.get("quick") else ""),
        "",
    ]
    peaks = {}
    for r in rows:
        p = r.get("peak")
        if p:
            peaks[p["dtype"]] = p
    lines.append(
        "Measured matmul peak (MFU denominator): "
        + "; ".join(f"{d} {p['tflops']:.1f} TFLOP/s ({'x'.join(map(str, p['shape']))})" for d, p in peaks.items())
    )
    lines.append("")
    cases = _by_case(rows)
    present = [b for b in BASELINES if any(r["config"]["competitor"] == b for r in rows)]
    head = ["model", "dtype", "batch", "seq", "fastenc (best)", "p50 ms", "MFU"] + [f"x vs {b}" for b in present]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, dtype, batch, seq), group in cases.items():
        best = best_fastenc(group)
        if best is None:
            continue
        sp = best.get("speedup_vs", {})
        cells = [label, dtype, str(batch), str(seq), best["config"]["competitor"], _f(best["p50_ms"])]
        cells += [_f(best["mfu"], ".1%")] + [_f(sp.get(b), ".2f") for b in present]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    head = ["model", "dtype", "batch", "seq", "competitor", "p50 ms", "p90 ms", "p99 ms", "items/s", "stream items/s"]
    head += ["peak MiB", "TFLOP/s", "MFU", "setup s", "first call s", "provider"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, dtype, batch, seq), group in cases.items():
        for r in group:
            if r["status"] != "ok":
                continue
            cells = [label, dtype, str(batch), str(seq), r["config"]["competitor"]]
            cells += [_f(r["p50_ms"]), _f(r["p90_ms"]), _f(r["p99_ms"]), _f(r["items_per_s"], ".1f")]
            cells += [_f(r["throughput_items_per_s"], ".1f"), _f(r["peak_mem_mb"], ".0f"), _f(r["tflops"], ".2f")]
            cells += [_f(r["mfu"], ".1%"), _f(r["setup_s"], ".2f"), _f(r["first_call_s"], ".2f"), r["provider"]]
            lines.append("| " + " | ".join(cells) + " |")
    reasons: dict[tuple, list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            c = r["config"]
            reasons.setdefault((c["competitor"], r["status"], r["reason"]), []).append(
                f"{c['label']} {c['dtype']} b={c['batch']} s={c['seq']}"
            )
    if reasons:
        lines += ["", "Not measured:", ""]
        for (competitor, status, reason), where in reasons.items():
            shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
            lines.append(f"- {competitor} {status}: {reason} ({shown})")
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def plots(rows: list[dict], outdir: Path) -> list[Path]:
    """Per (model, dtype, seq): p50 latency vs batch, one line per competitor (log-log), and grouped bars of the
    best fastenc competitor's speedup over each baseline per batch. Returns the PNG paths written."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("fastenc bench: plots need matplotlib (pip install matplotlib, or pass --no-plots)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    panels: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            c = r["config"]
            panels.setdefault((c["label"], c["dtype"], c["seq"]), []).append(r)
    paths = []
    for (label, dtype, seq), group in panels.items():
        stem = _slug(f"{label}-{dtype}-s{seq}")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for competitor in dict.fromkeys(r["config"]["competitor"] for r in group):
            pts = sorted((r["config"]["batch"], r["p50_ms"]) for r in group if r["config"]["competitor"] == competitor)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=competitor)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(f"{label} {dtype} seq {seq}\n{group[0]['device']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = outdir / f"latency-{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

        by_batch = _by_case(group)
        bars = []
        for (_, _, batch, _), g in sorted(by_batch.items(), key=lambda kv: kv[0][2]):
            best = best_fastenc(g)
            if best is not None:
                sp = best.get("speedup_vs", {})
                bars.append((batch, {b: sp[b] for b in BASELINES if b in sp}))
        baselines = [b for b in BASELINES if any(b in s for _, s in bars)]
        if not bars or not baselines:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        width = 0.8 / len(baselines)
        for i, b in enumerate(baselines):
            xs = [j + i * width for j in range(len(bars))]
            ax.bar(xs, [s.get(b, 0.0) for _, s in bars], width, label=f"vs {b}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(baselines) - 1) / 2 for j in range(len(bars))])
        ax.set_xticklabels([str(b) for b, _ in bars])
        ax.set_xlabel("batch")
        ax.set_ylabel("speedup of the best fastenc competitor (x)")
        ax.set_title(f"{label} {dtype} seq {seq}\n{group[0]['device']}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = outdir / f"speedup-{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(rows: list[dict], out: Path, *, with_plots: bool = True) -> dict:
    """Markdown next to the JSONL file (same stem, .md) and PNGs in <stem>-plots/; returns the paths."""
    out = Path(out)
    md_path = out.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    md_path.write_text(text)
    pngs = plots(rows, out.parent / f"{out.stem}-plots") if with_plots else []
    return {"markdown": md_path, "plots": pngs, "text": text}


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items() if k not in ("competitor", "label") and v is not None)


def rows_table(rows: list[dict]) -> str:
    """One Markdown line per schema row (any script): who ran what, where, and its p20 / p50 / p80."""
    head = ["script", "op", "competitor", "mode", "config", "dtype", "device", "p20 ms", "p50 ms", "p80 ms", "n"]
    lines = ["| " + " | ".join(head + ["notes"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        cells = [r["script"], r["op"], r["competitor"], r["mode"], _config_text(r["config"]), str(r["dtype"] or "")]
        cells += [r["device"], _f(r["p20_ms"]), _f(r["p50_ms"]), _f(r["p80_ms"]), str(len(r["samples_ms"]))]
        cells.append(str(r["notes"]).replace("\n", " ")[:120])
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def rows_plot(rows: list[dict], path: Path) -> Path | None:
    """p50 (with the p20-p80 range) of every timed schema row as horizontal bars, one panel per script; None
    (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed: dict[str, list[dict]] = {}
    for r in rows:
        if r["p50_ms"] is not None:
            timed.setdefault(r["script"], []).append(r)
    if not timed:
        return None
    height = sum(max(1.0, 0.25 * len(g)) + 0.8 for g in timed.values())
    fig, axes = plt.subplots(len(timed), 1, figsize=(9, height), squeeze=False)
    for ax, (script, group) in zip(axes[:, 0], timed.items(), strict=True):
        names = [f"{r['op']} {r['competitor']} {_config_text(r['config'])}"[:70] for r in group]
        p50 = [r["p50_ms"] for r in group]
        lo = [r["p50_ms"] - (r["p20_ms"] if r["p20_ms"] is not None else r["p50_ms"]) for r in group]
        hi = [(r["p80_ms"] if r["p80_ms"] is not None else r["p50_ms"]) - r["p50_ms"] for r in group]
        ax.barh(range(len(group)), p50, xerr=[lo, hi])
        ax.set_yticks(range(len(group)))
        ax.set_yticklabels(names, fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("p50 ms (bars: p20-p80)")
        ax.set_title(script, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_cli(argv=None) -> int:
    """Print the table of every row in the given results files; --plot writes the bars too (with matplotlib)."""
    p = argparse.ArgumentParser(prog="python -m fastenc.benchmark.report", description=report_cli.__doc__)
    p.add_argument("files", nargs="+", type=Path, help="results files: JSON lists or JSON Lines, either schema")
    p.add_argument("--plot", type=Path, help="PNG to write (needs matplotlib; skipped with a note without it)")
    args = p.parse_args(argv)
    rows = [r for f in args.files for r in load_rows(f)]
    print(rows_table(rows), end="")
    if args.plot is not None:
        written = rows_plot(rows, args.plot)
        print(f"# plot: {written}" if written else "# plot: matplotlib is not installed (table only)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(report_cli())
