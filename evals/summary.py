"""Put the rows of several harness runs (``results.json`` written by ``vlprune eval``) into one Markdown table and
one accuracy-against-TFLOPs plot, e.g. a learned projector's run beside the training-free methods' run.

    python -m evals.summary results/mqt-proxy results/tokens-proxy --out results/mqt-vs-training-free
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .run import budget_label, plot


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


def table(rows: list[dict]) -> str:
    lines = ["| run | method | budget | accuracy | agree | visual tokens (layer mean) | TFLOPs prefill |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {budget_label(r['keep'])} | {r['accuracy']:.1f} | "
                     f"{r['agreement']:.1f} | {r.get('equivalent_tokens', float('nan')):.1f} | "
                     f"{r.get('tflops_prefill', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.summary", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="harness output folders")
    ap.add_argument("--out", required=True, help="folder for summary.md and accuracy_vs_tflops.png")
    ap.add_argument("--title", default="accuracy against prefill TFLOPs (proxy figures)")
    args = ap.parse_args(argv)
    rows = []
    try:
        models = [meta_model(Path(f)) for f in args.runs]
        for i, folder in enumerate(args.runs):
            # rows of a run on another model than the first run's are told apart by the model's name
            suffix = None if models[i] == models[0] else f" ({models[i]})"
            got, _ = load_rows(Path(folder), suffix)
            rows.extend(got)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        print(f"python -m evals.summary: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(rows)
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
