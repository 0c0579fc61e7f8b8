"""Benchmarks for the evaluation harness: the proxy benchmark, POPE-format JSONL and a generic JSONL.

Every benchmark yields ``Item`` s (index, image loader, question, answer, family, category) and scores a
prediction; ``load_benchmark(spec, ...)`` picks one.

- ``proxy`` / ``proxy-next``: the procedural benchmark of ``evals.proxy`` (LLaVA-1.5 or AnyRes scenes); the test
  split, samples ``seed * 10^6 + i``; exact match of the first answer word.
- POPE JSONL (one object per line: ``question_id``, ``image``, ``text``, ``label`` yes/no, optional ``category``)
  with ``--images`` naming the image folder; scored as POPE does (an answer with "no" or "not" among its words is
  "no", anything else "yes"), with accuracy, precision, recall, F1 and yes-ratio.
- generic JSONL (``image``, ``question``, ``answer``, optional ``category``): normalised exact match.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["Item", "Benchmark", "load_benchmark", "pope_metrics", "pope_label", "normalize"]


@dataclasses.dataclass
class Item:
    index: int
    image: Callable[[], object]          # returns a PIL image
    question: str
    answer: str
    family: str
    category: str


@dataclasses.dataclass
class Benchmark:
    name: str
    kind: str                            # "proxy" | "pope" | "jsonl"
    items: list[Item]

    def score(self, prediction: str, item: Item) -> bool:
        if self.kind == "pope":
            return pope_label(prediction) == item.answer
        if self.kind == "proxy":                         # one-word answers: the first word counts
            return normalize(prediction).split()[:1] == [item.answer]
        return normalize(prediction) == normalize(item.answer)

    def same(self, a: str, b: str) -> bool:
        """Whether two predictions say the same (POPE: the same yes/no reading)."""
        if self.kind == "pope":
            return pope_label(a) == pope_label(b)
        return normalize(a) == normalize(b)

    def extra_metrics(self, records: Sequence[dict]) -> dict:
        """POPE's metrics (overall and per category) for a POPE benchmark; {} otherwise."""
        if self.kind != "pope":
            return {}
        out = {"all": pope_metrics([r["prediction"] for r in records], [r["answer"] for r in records])}
        for cat in sorted({r["category"] for r in records}):
            rs = [r for r in records if r["category"] == cat]
            out[cat] = pope_metrics([r["prediction"] for r in rs], [r["answer"] for r in rs])
        return out


def normalize(text: str) -> str:
    """Lower case, first line, punctuation stripped, whitespace collapsed."""
    text = (text or "").strip().split("\n")[0].lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def pope_label(prediction: str) -> str:
    """POPE's reading of a free-form answer: its first sentence; "no" if it holds the word "no" or "not"."""
    first = (prediction or "").strip().split(".")[0].replace(",", " ").lower()
    words = first.split()
    return "no" if ("no" in words or "not" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE's metrics with "yes" as the positive class, in percent (yes_ratio too)."""
    pred = [pope_label(p) for p in predictions]
    tp = sum(p == "yes" and l == "yes" for p, l in zip(pred, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(pred, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(pred, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(pred, labels))
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "accuracy": 100.0 * (tp + tn) / n if n else 0.0, "precision": 100.0 * precision,
            "recall": 100.0 * recall, "f1": 100.0 * f1, "yes_ratio": 100.0 * (tp + fp) / n if n else 0.0,
            "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def _proxy(geometry: str, n: int, seed: int) -> Benchmark:
    from .proxy.scenes import make_sample, render, split_seed

    items = []
    for i in range(n):
        s = make_sample(split_seed("test", seed * 1_000_000 + i), geometry=geometry)
        items.append(Item(i, (lambda sc=s.scene: render(sc)), s.question, s.answer, s.family, s.category))
    return Benchmark("proxy" if geometry == "llava" else "proxy-next", "proxy", items)


def _read_jsonl(path: Path, required: Sequence[str]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}): {line.strip()[:80]!r}; every line must "
                                 f"be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}; this format needs {list(required)} "
                                 f"(found {sorted(row)})")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples (the file is empty)")
    return rows


def _image_loader(folder: Path, name: str, where: str):
    p = Path(name) if Path(name).is_absolute() else folder / name
    if not p.is_file():
        raise FileNotFoundError(f"{where}: image {name!r} not found at {p}; pass the folder that holds it with "
                                f"--images")

    def load():
        from PIL import Image

        with Image.open(p) as im:
            return im.convert("RGB")
    return load


def _subset(rows: list, n: int | None, seed: int) -> list[tuple[int, dict]]:
    idx = list(range(len(rows)))
    if n is not None and n < len(rows):
        random.Random(seed).shuffle(idx)
        idx = sorted(idx[:n])
    return [(i, rows[i]) for i in idx]


def load_benchmark(spec: str = "proxy", n: int | None = 200, seed: int = 0, images: str | None = None,
                   fmt: str = "auto") -> Benchmark:
    """``spec``: "proxy", "proxy-next" or a JSONL path; ``fmt``: auto | pope | jsonl. ``n`` samples (None: all of
    a file), chosen by ``seed`` (a seeded subset of a file; for the proxy, its own range of test seeds)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"sample count {n!r} must be a positive integer")
    if spec in ("proxy", "proxy-next"):
        return _proxy("llava" if spec == "proxy" else "next", n or 200, seed)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {spec!r} is neither 'proxy', 'proxy-next' nor an existing JSONL file")
    if fmt not in ("auto", "pope", "jsonl"):
        raise ValueError(f"format {fmt!r} is not one of auto, pope, jsonl")
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        head = json.loads(first) if first else {}
    except json.JSONDecodeError:
        head = {}
    if fmt == "auto":
        fmt = "pope" if isinstance(head, dict) and "label" in head and "text" in head else "jsonl"
    folder = Path(images) if images else path.parent
    if fmt == "pope":
        rows = _read_jsonl(path, ("image", "text", "label"))
        items = []
        for i, r in _subset(rows, n, seed):
            label = str(r["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{path}:{i + 1}: POPE label {r['label']!r} must be 'yes' or 'no'")
            items.append(Item(i, _image_loader(folder, r["image"], f"{path}:{i + 1}"), r["text"], label,
                              "pope", str(r.get("category", "pope"))))
        return Benchmark(path.stem, "pope", items)
    rows = _read_jsonl(path, ("image", "question", "answer"))
    items = [Item(i, _image_loader(folder, r["image"], f"{path}:{i + 1}"), r["question"], str(r["answer"]),
                  str(r.get("category", "all")), str(r.get("category", "all"))) for i, r in _subset(rows, n, seed)]
    return Benchmark(path.stem, "jsonl", items)
