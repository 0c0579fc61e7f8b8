"""The evaluation harness's results (``results/*/results.json`` written by ``vlprune eval``) for the loaded model.

The table shows each accuracy with its 95% interval, the paired differences to the unpruned model and to random at
the same budget ("no difference" inside the noise), and the blind (question-only) row; files written before the
harness recorded these show "n/a" in those cells.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BLIND_LABEL = "blind (question only)"
NA = "n/a"


def _interval(ci, signed: bool = False) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or None in ci:
        return NA
    f = "+.1f" if signed else ".1f"
    return f"[{ci[0]:{f}}, {ci[1]:{f}}]"


def accuracy_cell(acc, ci) -> str:
    """'61.5 [54.6, 68.0]'; 'n/a' without an accuracy; '61.5 [n/a]' for a run that recorded no interval."""
    if acc is None:
        return NA
    text = _interval(ci)
    return f"{acc:.1f} {text if text != NA else '[n/a]'}"


def difference_cell(d) -> str:
    """A paired difference ('-12.0 [-17.1, -6.9]', or 'no difference: ...' inside the noise); 'n/a' for None."""
    if not isinstance(d, dict) or d.get("diff") is None:
        return NA
    text = f"{d['diff']:+.1f} {_interval(d.get('ci'), signed=True)}"
    return f"no difference: {text}" if d.get("verdict") == "no difference" else text


def versus_cell(d) -> str:
    """Against random at the same budget: 'better: +8.0 [+2.1, +13.9], p=0.004', 'worse: ...' or 'no difference
    (p=0.41)'; 'n/a' for None."""
    if not isinstance(d, dict) or d.get("verdict") is None:
        return NA
    p = d.get("p")
    ptxt = "" if p is None else f"p={p:.2g}"
    if d["verdict"] == "no difference":
        return f"no difference ({ptxt})" if ptxt else "no difference"
    return f"{d['verdict']}: {d['diff']:+.1f} {_interval(d.get('ci'), signed=True)}" + (f", {ptxt}" if ptxt else "")


def _compared(row: dict, key: str, cell) -> str:
    """'n/a' when the run did not record ``key`` (older files), '-' when it has no reference for this row (random
    itself, a budget random did not run at), else the cell."""
    if key not in row:
        return NA
    return "-" if row[key] is None else cell(row[key])


@dataclass
class HarnessRun:
    name: str  # the results folder's name
    folder: Path
    meta: dict
    rows: list[dict]
    blind: dict | None = None  # results.json's "blind" (proxy benchmark); None for other benchmarks and older runs

    @property
    def png(self) -> Path | None:
        p = self.folder / "accuracy_vs_tflops.png"
        return p if p.exists() else None

    def table(self) -> tuple[list[str], list[list]]:
        """Headers and rows: the blind row first, then one row per configuration."""
        head = ["method", "keep", "accuracy % [95% CI]", "vs unpruned [95% CI]", "vs random, same keep",
                "agreement %", "equiv. tokens", "TFLOPs prefill", "prefill ms", "e2e ms"]
        b = self.blind if isinstance(self.blind, dict) else {}
        out = [[BLIND_LABEL, "-", accuracy_cell(b.get("accuracy", b.get("overall")), b.get("accuracy_ci")), "-", "-",
                "-", "-", "-", "-", "-"]]
        for r in self.rows:
            keep = r.get("keep")
            keep = "all" if keep is None else (f"{keep:g}" if isinstance(keep, float) else str(keep))
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            unpruned = r.get("method") == "unpruned"
            out.append([r.get("method", "?"), keep, accuracy_cell(r.get("accuracy"), r.get("accuracy_ci")),
                        "-" if unpruned else _compared(r, "vs_unpruned", difference_cell),
                        "-" if unpruned else _compared(r, "vs_random", versus_cell),
                        fmt(r.get("agreement"), ".1f"),
                        fmt(r.get("equivalent_tokens"), ".1f"), fmt(r.get("tflops_prefill"), ".4f"),
                        fmt(None if r.get("prefill_s") is None else 1000 * r["prefill_s"], ".1f"),
                        fmt(None if r.get("e2e_s") is None else 1000 * r["e2e_s"], ".1f")])
        return head, out

    def caption(self) -> str:
        m = self.meta
        label = "**proxy figures** (a small LVLM trained here on a procedural benchmark, not a pretrained model): " \
            if m.get("proxy") else ""
        b = self.blind if isinstance(self.blind, dict) else None
        if b:
            blind = (f"{BLIND_LABEL}: each question answered with its commonest answer in {b.get('n_train', '?')} "
                     f"training samples, without the image")
        else:
            blind = (f"{BLIND_LABEL}: n/a (none in this run's results.json: a run on another benchmark than the proxy, "
                     f"or one written before the harness recorded it)")
        return (f"{label}model `{m.get('model')}`, benchmark `{m.get('benchmark')}`, {m.get('n')} samples, seed "
                f"{m.get('seed')}, {m.get('device')}; folder `{self.folder}`; command `{m.get('command', '?')}`.\n\n"
                f"Accuracy in % with its 95% Wilson interval; vs unpruned / vs random: the paired difference on the "
                f"same samples (percentage points, 95% interval), 'no difference' unless the exact McNemar p < 0.05 "
                f"(such methods are not ranked); {blind}; n/a: not recorded by this run.")


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


def default_run_name(spec: str) -> str:
    """The folder of a model's default harness run: ``<model>-default`` (``results/proxy-default`` for the proxy;
    a hub id's ``/`` becomes ``--``)."""
    return f"{spec.replace('/', '--')}-default"


def find_runs(results_dir, spec: str) -> list[HarnessRun]:
    """Every results folder under ``results_dir`` whose run used the model ``spec``: the default run
    (``default_run_name``) first, then the others newest first."""
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
            blind = data.get("blind")
            runs.append(HarnessRun(path.parent.name, path.parent, meta, rows,
                                   blind if isinstance(blind, dict) else None))
    default = default_run_name(spec)
    return sorted(runs, key=lambda r: r.name != default)  # stable: the rest stay newest first
