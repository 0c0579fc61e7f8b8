"""The evaluation harness (evals.run): POPE metrics, sharding over processes, resuming, bad input.

The runs use a tiny random-weight LLaVA saved to a temporary folder (the harness loads it like any local model),
so these tests check the harness's bookkeeping, not accuracy; the shipped proxy is exercised in test_proxy_model.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evals.benchmarks import load_benchmark, pope_label, pope_metrics
from evals.run import main as eval_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from vlprune.testing import tiny_llava

    d = tmp_path_factory.mktemp("tiny-llava")
    model, proc = tiny_llava(seed=0)
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


def _run(out, *extra, model=None):
    argv = ["--model", str(model), "--out", str(out), "--no-progress", "--latency-samples", "0", *extra]
    return eval_main(argv)


def _results(out):
    return json.loads((Path(out) / "results.json").read_text())


def _records(out):
    recs = {}
    for f in sorted((Path(out) / "records").glob("records.*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:        # the line an interruption cut; the harness skips it too
                continue
            recs[(r["config"], r["index"])] = r["prediction"]
    return recs


# ------------------------------------------------------------------------------------------------ POPE
def test_pope_label_reads_answers_as_pope_does():
    assert pope_label("Yes, there is.") == "yes"
    assert pope_label("No.") == "no"
    assert pope_label("There is not a dog in the image") == "no"
    assert pope_label("I see a snowboard. No other objects.") == "yes"      # only the first sentence counts
    assert pope_label("") == "yes"


def test_pope_metrics_against_hand_computed_values():
    preds = ["yes", "yes", "no", "no", "yes", "no", "yes", "yes", "no", "no"]
    labels = ["yes", "no", "no", "yes", "yes", "no", "no", "yes", "no", "no"]
    m = pope_metrics(preds, labels)
    # tp = 3 (0, 4, 7), fp = 2 (1, 6), tn = 4 (2, 5, 8, 9), fn = 1 (3)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 2, 4, 1)
    assert m["accuracy"] == pytest.approx(70.0)
    assert m["precision"] == pytest.approx(60.0)
    assert m["recall"] == pytest.approx(75.0)
    assert m["f1"] == pytest.approx(100 * 2 * 0.6 * 0.75 / 1.35)
    assert m["yes_ratio"] == pytest.approx(50.0)


def _pope_fixture(tmp_path, n=8, bad_line=None, missing_image=False):
    from evals.proxy.scenes import make_sample, render

    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        s = make_sample(1000 + i, family="existence")
        name = f"scene_{i}.png"
        if not (missing_image and i == 3):
            render(s.scene).save(img_dir / name)
        cat = s.category.split("/")[1]
        lines.append(json.dumps({"question_id": i, "image": name, "text": s.question, "label": s.answer,
                                 "category": "random" if cat == "positive" else cat}))
    if bad_line is not None:
        lines.insert(bad_line, '{"question_id": 99, "image": "x.png", "text": "is there')
    f = tmp_path / "pope.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f, img_dir


def test_pope_fixture_scored_with_pope_metrics(tmp_path, tiny_dir):
    bench, imgs = _pope_fixture(tmp_path)
    out = tmp_path / "run"
    assert _run(out, "--benchmark", str(bench), "--images", str(imgs), "--methods", "pool", "--keep", "64",
                "--n", "8", "--max-new-tokens", "3", model=tiny_dir) == 0
    res = _results(out)
    recs = _records(out)
    labels = [json.loads(line)["label"] for line in bench.read_text().splitlines()]
    cats = [json.loads(line)["category"] for line in bench.read_text().splitlines()]
    for row in res["results"]:
        preds = [recs[(row["config"], i)] for i in range(8)]
        said = ["no" if ("no" in p.split(".")[0].replace(",", " ").lower().split()
                         or "not" in p.split(".")[0].replace(",", " ").lower().split()) else "yes" for p in preds]
        tp = sum(s == "yes" and l == "yes" for s, l in zip(said, labels))
        fp = sum(s == "yes" and l == "no" for s, l in zip(said, labels))
        tn = sum(s == "no" and l == "no" for s, l in zip(said, labels))
        fn = sum(s == "no" and l == "yes" for s, l in zip(said, labels))
        pope = row["pope"]["all"]
        assert (pope["tp"], pope["fp"], pope["tn"], pope["fn"]) == (tp, fp, tn, fn)
        assert pope["accuracy"] == pytest.approx(100 * (tp + tn) / 8)
        assert row["accuracy"] == pytest.approx(100 * (tp + tn) / 8)
        assert pope["yes_ratio"] == pytest.approx(100 * (tp + fp) / 8)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        assert pope["precision"] == pytest.approx(100 * prec)
        assert pope["recall"] == pytest.approx(100 * rec)
        assert pope["f1"] == pytest.approx(100 * (2 * prec * rec / (prec + rec) if prec + rec else 0.0))
        assert set(row["pope"]) == {"all", *cats}


def test_kv_column_follows_the_tokens_kept(tmp_path, tiny_dir):
    """The KV cache after generating: pruning to 64 of 576 visual tokens before the decoder removes exactly
    (576 - 64) tokens x layers x (K and V) x KV heads x head size x 4 bytes per sample, counted from the config."""
    from transformers import AutoConfig

    out = tmp_path / "kv"
    assert _run(out, "--methods", "pool", "--keep", "64", "--n", "3", "--max-new-tokens", "3",
                "--latency-samples", "2", model=tiny_dir) == 0
    rows = {r["method"]: r for r in _results(out)["results"]}
    tc = AutoConfig.from_pretrained(tiny_dir).text_config
    head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    per_token = tc.num_hidden_layers * 2 * tc.num_key_value_heads * head * 4          # float32 cache
    removed = rows["unpruned"]["kv_cache_kib"] - rows["pool"]["kv_cache_kib"]
    assert removed == pytest.approx((576 - 64) * per_token / 1024)
    assert rows["random"]["kv_cache_kib"] == pytest.approx(rows["pool"]["kv_cache_kib"])
    assert "| KV KiB |" in (out / "results.md").read_text()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_clear_errors(tmp_path, tiny_dir, capsys):
    out = tmp_path / "bad"
    assert _run(out, "--methods", "fastvv", "--keep", "64", "--n", "2", model=tiny_dir) == 2
    assert "unknown method 'fastvv'; did you mean 'fastv'?" in capsys.readouterr().err
    assert _run(out, "--methods", "pool", "--keep", "600", "--n", "2", model=tiny_dir) == 2
    err = capsys.readouterr().err
    assert "--keep 600 is above the 576 visual tokens" in err
    assert _run(out, "--methods", "pool", "--keep", "sixty", "--n", "2", model=tiny_dir) == 2
    assert "--keep value 'sixty' is neither a token count nor a share" in capsys.readouterr().err
    assert _run(out, "--methods", "pool", "--keep", "1.5", "--n", "2", model=tiny_dir) == 2
    assert "--keep share 1.5 must be in (0, 1]" in capsys.readouterr().err
    assert _run(out, "--methods", "pool", "--param", "fastv:k=3", "--n", "2", model=tiny_dir) == 2
    assert "must look like METHOD.NAME=VALUE" in capsys.readouterr().err

    (tmp_path / "missing").mkdir()
    bench, imgs = _pope_fixture(tmp_path / "missing", missing_image=True)
    assert _run(out, "--benchmark", str(bench), "--images", str(imgs), "--n", "8", model=tiny_dir) == 2
    err = capsys.readouterr().err
    assert "image 'scene_3.png' not found" in err and "--images" in err

    (tmp_path / "malformed").mkdir()
    bench, imgs = _pope_fixture(tmp_path / "malformed", bad_line=4)
    assert _run(out, "--benchmark", str(bench), "--images", str(imgs), model=tiny_dir) == 2
    err = capsys.readouterr().err
    assert "pope.jsonl:5: not valid JSON" in err
    # the malformed line is an error, never a silently smaller sample
    with pytest.raises(ValueError, match=":5: not valid JSON"):
        load_benchmark(str(bench), n=None, images=str(imgs))
    assert not (out / "results.json").exists()


# ------------------------------------------------------------------------------------------------ resume
GRID = ("--methods", "random,pool,fastv", "--keep", "576,64", "--n", "6", "--batch-size", "4")


def test_resumed_run_equals_uninterrupted(tmp_path, tiny_dir):
    full = tmp_path / "full"
    assert _run(full, *GRID, model=tiny_dir) == 0
    # an interrupted run: half of what a complete run writes, the last line cut mid-way, no results yet
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "results.json").unlink()
    rec = part / "records" / "records.0.jsonl"
    lines = rec.read_text().splitlines()
    keep = lines[: len(lines) // 2]
    rec.write_text("\n".join(keep) + "\n" + lines[len(keep)][:17])
    assert _run(part, *GRID, model=tiny_dir) == 0
    a, b = _results(full), _results(part)
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert {k: ra[k] for k in ("config", "accuracy", "agreement", "families", "categories", "n")} == \
               {k: rb[k] for k in ("config", "accuracy", "agreement", "families", "categories", "n")}
    assert _records(full) == _records(part)
    # other settings on the same folder: a clear refusal, not a mixed result
    assert _run(part, "--methods", "pool", "--keep", "64", "--n", "6", model=tiny_dir) == 2


# ------------------------------------------------------------------------------------------------ processes
def _accelerate():
    exe = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    return exe if Path(exe).exists() else None


@pytest.mark.skipif(_accelerate() is None, reason="accelerate is not installed (pip install -e '.[dev]')")
def test_two_processes_give_the_same_answers_as_one(tmp_path, tiny_dir):
    grid = ("--methods", "random,pool", "--keep", "64", "--n", "7", "--batch-size", "3")
    one = tmp_path / "one"
    assert _run(one, *grid, model=tiny_dir) == 0
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "evals.run", "--model", str(tiny_dir), "--out", str(two),
           "--no-progress", "--latency-samples", "0", *grid]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (two / "records").glob("*.jsonl")) == ["records.0.jsonl", "records.1.jsonl"]
    a, b = _results(one), _results(two)
    assert b["meta"]["processes"] == 2 and a["meta"]["processes"] == 1
    assert _records(one) == _records(two)
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert (ra["config"], ra["accuracy"], ra["families"], ra["agreement"]) == \
               (rb["config"], rb["accuracy"], rb["families"], rb["agreement"])


def test_vlprune_eval_help_runs():
    proc = subprocess.run([sys.executable, "-m", "vlprune.cli", "eval", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "--methods" in proc.stdout and "--keep" in proc.stdout


@pytest.mark.skipif(not (Path(ROOT) / "evals/proxy/weights/llava-next-proxy/model.safetensors").exists(),
                    reason="no AnyRes proxy weights in this checkout")
def test_anyres_proxy_through_the_harness(tmp_path):
    out = tmp_path / "next"
    assert eval_main(["--model", "proxy-next", "--out", str(out), "--no-progress", "--methods", "pool",
                      "--keep", "576", "--n", "2", "--batch-size", "2", "--latency-samples", "1"]) == 0
    res = _results(out)
    n_vis = res["meta"]["visual_tokens_per_image"]
    assert n_vis > 576                                   # base view plus crops plus newline tokens
    rows = {r["config"]: r for r in res["results"]}
    assert set(rows) == {"unpruned", "random@576", "pool@576"}
    assert rows["unpruned"]["equivalent_tokens"] == pytest.approx(n_vis)
    assert rows["pool@576"]["equivalent_tokens"] <= 576
    assert rows["pool@576"]["tflops_prefill"] < rows["unpruned"]["tflops_prefill"]
    assert (out / "accuracy_vs_tflops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| unpruned | all |" in table and "| pool | 576 |" in table and "proxy figures" in table


def test_share_budgets_build_keep_ratio_configs():
    from evals.run import budget_label, build_grid, parse_keep

    keeps = parse_keep("0.1,64,0.4,1.0,576")
    assert keeps == [576, 64, 1.0, 0.4, 0.1]
    grid = build_grid(["hired", "fastv"], keeps, 576, {}, 0)
    by = {c.key: dict(c.kwargs) for c in grid}
    assert by["hired@0.4"] == {"keep_ratio": 0.4} and by["hired@64"] == {"keep": 64}
    assert by["fastv@0.1"] == {"keep_ratio": 0.1, "k": 2}
    assert "hired@1.0" not in by and "hired@576" not in by  # the unpruned point is the unpruned row
    assert [budget_label(k) for k in (None, 64, 0.25)] == ["all", "64", "25%"]


def test_method_variants_in_one_grid():
    from evals.run import build_grid, parse_variant

    assert parse_variant("mustdrop[preset=64;decode=false]") == ("mustdrop", {"preset": 64, "decode": False})
    with pytest.raises(ValueError, match="NAME\\[key=value"):
        parse_variant("mustdrop[preset=64")
    grid = build_grid(["mustdrop[keep=null;preset=64]", "todre[stage2=false]", "todre"], [64], 576, {}, 0)
    by = {c.key: dict(c.kwargs) for c in grid}
    assert by["mustdrop[keep=null;preset=64]@64"] == {"preset": 64}  # runs at its preset, no budget
    assert by["todre[stage2=false]@64"] == {"keep": 64, "stage2": False}
    assert by["todre@64"] == {"keep": 64}
    with pytest.raises(ValueError, match="unknown method 'mustdropp'"):
        build_grid(["mustdropp[preset=64]"], [64], 576, {}, 0)


def test_summary_merges_runs_of_two_models(tmp_path):
    from evals.summary import main as summary_main

    def run(folder, model, rows):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"meta": {"model": model}, "results": rows}))

    row = lambda m, k, acc, tf: {"method": m, "keep": k, "accuracy": acc, "agreement": 100.0,  # noqa: E731
                                "equivalent_tokens": 8.0, "tflops_prefill": tf}
    run(tmp_path / "a", "proxy", [row("unpruned", None, 50.0, 0.014), row("pool", 64, 40.0, 0.006)])
    run(tmp_path / "b", "proxy-mqt", [row("unpruned", None, 34.0, 0.009), row("mqt", 16, 32.0, 0.005)])
    out = tmp_path / "sum"
    assert summary_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert "| a | pool | 64 | 40.0 |" in md and "| b | mqt (proxy-mqt) | 16 | 32.0 |" in md
    assert "| b | unpruned (proxy-mqt) | all | 34.0 |" in md
    assert (out / "accuracy_vs_tflops.png").stat().st_size > 0
    assert summary_main([str(tmp_path / "missing"), "--out", str(out)]) == 2
