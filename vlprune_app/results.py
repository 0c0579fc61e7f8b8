"""The evaluation harness's results (``results/*/results.json`` written by ``vlprune eval``) for the loaded model."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class HarnessRun:
    name: str  # the results folder's name
    folder: Path
    meta: dict
    rows: list[dict]

    @property
    def png(self) -> Path | None:
        p = self.folder / "accuracy_vs_tflops.png"
        return p if p.exists() else None

    def table(self) -> tuple[list[str], list[list]]:
        head = ["method", "keep", "accuracy %", "agreement %", "equiv. tokens", "TFLOPs prefill", "prefill ms",
                "e2e ms"]
        out = []
        for r in self.rows:
            keep = r.get("keep")
            keep = "all" if keep is None else (f"{keep:g}" if isinstance(keep, float) else str(keep))
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            out.append([r.get("method", "?"), keep, fmt(r.get("accuracy"), ".1f"), fmt(r.get("agreement"), ".1f"),
                        fmt(r.get("equivalent_tokens"), ".1f"), fmt(r.get("tflops_prefill"), ".4f"),
                        fmt(None if r.get("prefill_s") is None else 1000 * r["prefill_s"], ".1f"),
                        fmt(None if r.get("e2e_s") is None else 1000 * r["e2e_s"], ".1f")])
        return head, out

    def caption(self) -> str:
        m = self.meta
        label = "**proxy figures** (a small LVLM trained here on a procedural benchmark, not a pretrained model): " \
            if m.get("proxy") else ""
        return (f"{label}model `{m.get('model')}`, benchmark `{m.get('benchmark')}`, {m.get('n')} samples, seed "
                f"{m.get('seed')}, {m.get('device')}; folder `{self.folder}`; command `{m.get('command', '?')}`")


def _same_model(recorded, spec: str) -> bool:
    if recorded is None:
        return False
    if str(recorded) == spec:
        return True
    a, b = Path(str(recorded)), Path(spec)
    try:
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    except OSError:
        return False


def find_runs(results_dir, spec: str) -> list[HarnessRun]:
    """Every results folder under ``results_dir`` whose run used the model ``spec``, newest first."""
    root = Path(results_dir)
    runs = []
    for path in sorted(root.glob("*/results.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        meta = data.get("meta", {}) if isinstance(data, dict) else {}
        rows = data.get("results", []) if isinstance(data, dict) else []
        if _same_model(meta.get("model"), spec) and isinstance(rows, list):
            runs.append(HarnessRun(path.parent.name, path.parent, meta, rows))
    return runs
