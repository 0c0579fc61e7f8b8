"""Put the rows of several harness runs (``results.json`` written by ``vlprune eval``) into one Markdown table and
one accuracy-against-TFLOPs plot, e.g. a learned projector's run beside the training-free methods' run.

    python -m evals.summary results/mqt-proxy results/tokens-proxy --out results/mqt-vs-training-free
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .run import BLIND_LABEL, budget_label, plot
from .stats import ALPHA, fmt_accuracy, fmt_difference, fmt_versus


def load_rows(folder: Path, suffix: str | None = None) -> tuple[list[dict], dict]:
    """The rows of one run; with ``suffix`` every method name gets it (" (model)"), so that runs on different
    models stay separate series."""
    path = folder / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `vlprune eval --out {folder}` first")
    data = json.loads(path.read_text())
    rows = data["results"]
    for r in rows:
        r["run"] = folder.name
        if suffix:
            r["method"] = r["method"] + suffix
    return rows, data.get("meta", {})


def load_blind(folder: Path) -> dict | None:
    """The blind (question-only) baseline a run recorded (``results.json`` key ``blind``); None for runs without
    one (other benchmarks, or runs written before the harness recorded it)."""
    try:
        data = json.loads((folder / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data.get("blind") if isinstance(data, dict) else None


def _recorded(row: dict, key: str, fmt) -> str:
    """'n/a' for a run written before the harness recorded ``key``; else its cell ('-' where there is no
    reference: the unpruned row, random itself)."""
    if key not in row:
        return "-" if row.get("method", "").startswith("unpruned") else "n/a"
    return fmt(row[key])


def table(rows: list[dict], blinds: dict | None = None) -> str:
    """One row per configuration of every run, each run's blind row first (``blinds``: run name -> the run's
    ``blind`` or None, shown as n/a). Accuracy with its 95% interval; the paired differences to the unpruned model
    and to random at the same budget where the run recorded them."""
    lines = ["| run | method | budget | accuracy [95% CI] | vs unpruned [95% CI] | vs random, same keep | agree | "
             "visual tokens (layer mean) | TFLOPs prefill |",
             "|---|---|---|---:|---:|---|---:|---:|---:|"]
    shown = set()
    for r in rows:
        if blinds is not None and r["run"] not in shown:
            shown.add(r["run"])
            b = blinds.get(r["run"])
            acc = fmt_accuracy(b.get("accuracy"), b.get("accuracy_ci")) if b else "n/a"
            lines.append(f"| {r['run']} | {BLIND_LABEL} | - | {acc} | - | - | - | - | - |")
        acc = fmt_accuracy(r["accuracy"], r["accuracy_ci"]) if r.get("accuracy_ci") else f"{r['accuracy']:.1f} [n/a]"
        lines.append(f"| {r['run']} | {r['method']} | {budget_label(r['keep'])} | {acc} | "
                     f"{_recorded(r, 'vs_unpruned', fmt_difference)} | {_recorded(r, 'vs_random', fmt_versus)} | "
                     f"{r['agreement']:.1f} | "
                     f"{r.get('equivalent_tokens', float('nan')):.1f} | {r.get('tflops_prefill', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.summary", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="harness output folders")
    ap.add_argument("--out", required=True, help="folder for summary.md and accuracy_vs_tflops.png")
    ap.add_argument("--title", default="accuracy against prefill TFLOPs (proxy figures)")
    args = ap.parse_args(argv)
    rows, blinds = [], {}
    try:
        models = [meta_model(Path(f)) for f in args.runs]
        for i, folder in enumerate(args.runs):
            # rows of a run on another model than the first run's are told apart by the model's name
            suffix = None if models[i] == models[0] else f" ({models[i]})"
            got, _ = load_rows(Path(folder), suffix)
            rows.extend(got)
            blinds[Path(folder).name] = load_blind(Path(folder))
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        print(f"python -m evals.summary: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(rows, blinds) + ("\naccuracy in % with its 95% Wilson interval; vs unpruned / vs random: paired "
                                "difference in percentage points with its 95% interval, 'no difference' unless the "
                                f"exact McNemar p < {ALPHA}; n/a: not recorded by that run\n")
    (out / "summary.md").write_text(md)
    first = [r for r in rows if r["method"] == "unpruned"]
    plot_rows = first + [r for r in rows if r["method"] != "unpruned"]
    if first:
        plot(plot_rows, out / "accuracy_vs_tflops.png", args.title)
    print(md)
    return 0


def meta_model(folder: Path) -> str:
    try:
        return json.loads((folder / "results.json").read_text())["meta"]["model"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return folder.name


if __name__ == "__main__":
    sys.exit(main())
