"""Write one of vlprune's harness benchmarks as a local lmms-eval task folder.

    python -m vlprune_lmms_eval.export --benchmark proxy --n 50 --out tasks/vlprune_proxy
    lmms-eval --model vlprune --model_args pretrained=proxy,method=hired,keep_ratio=0.2 \\
        --tasks vlprune_proxy --include_path tasks/vlprune_proxy --batch_size 8

The folder holds ``images/`` (PNG, lossless, so both runners see the same pixels), ``data.jsonl`` (``image``,
``question``, ``answer``, ``category``: also a generic JSONL benchmark of vlprune's own harness,
``vlprune eval --benchmark tasks/vlprune_proxy/data.jsonl``), ``utils.py`` and ``<task>.yaml``. The task scores
as the harness scores JSONL benchmarks (normalised exact match, ``exact_match``), greedy; the answer length is the
model's default (the ``vlprune`` model: 2 new tokens on the proxy models, 16 otherwise, as the harness) unless
``--max-new-tokens`` fixes it in the task.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:{max_new}
  temperature: 0
  until: []
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
  source: "vlprune benchmark {source} (n={n}, seed={seed})"
"""


def export(benchmark: str, out: str | Path, n: int | None = 50, seed: int = 0, task: str | None = None,
           images: str | None = None, max_new_tokens: int | None = None) -> Path:
    """Write the task folder; returns the path of its ``data.jsonl``."""
    from evals.benchmarks import load_benchmark

    out = Path(out).resolve()
    task = task or out.name
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", task):
        raise ValueError(f"task name {task!r} must be an identifier (letters, digits, underscores); pass --task NAME")
    bench = load_benchmark(benchmark, n=n, seed=seed, images=images)
    if bench.kind == "pope":
        raise ValueError(f"{benchmark!r} is a POPE benchmark; lmms-eval has its own POPE task (--tasks pope); export "
                         f"takes the proxy benchmarks or a generic JSONL (image, question, answer)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for it in bench.items:
        name = f"images/{it.index:06d}.png"
        it.image().save(out / name)
        rows.append(dict(image=name, question=it.question, answer=it.answer, category=it.category))
    data = out / "data.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    shutil.copyfile(Path(__file__).with_name("task_utils.py"), out / "utils.py")
    # without max_new_tokens the model's own default applies (vlprune's: as its harness, 2 on the proxy models)
    max_new = f"\n  max_new_tokens: {int(max_new_tokens)}" if max_new_tokens else ""
    (out / f"{task}.yaml").write_text(YAML.format(task=task, data=data, max_new=max_new, source=benchmark,
                                                  n=len(rows), seed=seed))
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlprune_lmms_eval.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="proxy", help="proxy, proxy-next or a JSONL file (image, question, answer)")
    ap.add_argument("--n", type=int, default=50, help="samples (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", default=None, help="image folder of a JSONL benchmark (default: its folder)")
    ap.add_argument("--task", default=None, help="task name (default: the folder's name)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--out", required=True, help="task folder to write")
    a = ap.parse_args(argv)
    data = export(a.benchmark, a.out, n=a.n, seed=a.seed, task=a.task, images=a.images,
                  max_new_tokens=a.max_new_tokens)
    print(f"wrote {data.parent} ({sum(1 for _ in open(data))} samples); run lmms-eval with "
          f"--include_path {data.parent} --tasks {a.task or data.parent.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
