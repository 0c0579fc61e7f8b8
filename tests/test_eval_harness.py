"""The evaluation harness (evals.run): POPE metrics, intervals and paired tests, the blind baseline, sharding over
processes, resuming, bad input.

The runs use a tiny random-weight LLaVA saved to a temporary folder (the harness loads it like any local model),
so these tests check the harness's bookkeeping, not accuracy; the shipped proxy is exercised in test_proxy_model.
"""
from __future__ import annotations

import json
import math
import os
import shlex
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
    # float32 unless a test asks otherwise: "auto" depends on the CPU (bfloat16 only where it is native)
    argv = ["--model", str(model), "--out", str(out), "--no-progress", "--latency-samples", "0", "--dtype", "float32",
            *extra]
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


# ------------------------------------------------------------------------------------------------ intervals
def test_wilson_interval_against_hand_computed_values():
    from evals.stats import Z95, wilson

    # 0 of 10, z = 1.96: the upper end is (z^2 / n) / (1 + z^2 / n) = 0.38416 / 1.38416 = 0.277540
    assert wilson(0, 10, z=1.96) == pytest.approx((0.0, 27.7540), abs=1e-3)
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.716745, half width
    # 1.96 / 1.38416 * sqrt(0.016 + 0.009604) = 1.416022 * 0.160012 = 0.226581
    assert wilson(8, 10, z=1.96) == pytest.approx((49.0164, 94.3326), abs=1e-3)
    # 123 of 200 at z = Z95: z^2 = 3.841459, 1 + z^2 / n = 1.0192073, centre 0.6246036 / 1.0192073 = 0.612833,
    # half width 1.923027 * sqrt(0.001183875 + 0.0000240091) = 1.923027 * 0.0347546 = 0.066834
    assert wilson(123, 200) == pytest.approx((54.600, 67.967), abs=2e-3)
    p, n, z = 123 / 200, 200, Z95
    d = 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z / d * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson(123, 200) == pytest.approx((100 * (centre - half), 100 * (centre + half)))
    assert wilson(10, 10)[1] == 100.0 and wilson(0, 10)[0] == 0.0
    lo, hi = wilson(1, 2)
    assert lo + hi == pytest.approx(100.0)                       # symmetric about 50% at k = n / 2
    with pytest.raises(ValueError, match=r"k = 11 correct is more than the n = 10 samples; k must be in 0\.\.10"):
        wilson(11, 10)
    with pytest.raises(ValueError, match="n is 0"):
        wilson(0, 0)
    with pytest.raises(ValueError, match="k must be a non-negative integer count; got -1"):
        wilson(-1, 10)


def test_mcnemar_exact_against_hand_computed_values():
    from evals.stats import mcnemar_exact

    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2 ** 10)          # 22 / 1024 = 0.0215
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 2 ** 5)                       # 0.0625: 5 of 5 is not enough
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 2 ** 6)                       # 0.03125: 6 of 6 is
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(4, 5) == 1.0
    # worked example (Fagerland, Lydersen and Laake, BMC Med Res Methodol 2013, 13:91: airway hyper-responsiveness
    # before and after stem cell transplantation, 1 and 7 discordant pairs): exact conditional p = 0.070
    assert mcnemar_exact(1, 7) == pytest.approx(18 / 256) and round(mcnemar_exact(1, 7), 3) == 0.070
    # larger counts stay exact: 40 and 60 discordant, the tail summed with integers
    tail = sum(math.comb(100, i) for i in range(41))
    assert mcnemar_exact(40, 60) == pytest.approx(2 * tail / 2 ** 100) and 0.05 < mcnemar_exact(40, 60) < 0.06


def test_paired_difference_against_a_worked_example():
    from evals.stats import fmt_difference, fmt_versus, paired_difference

    # Agresti, Categorical Data Analysis, 10.1: approval of the Prime Minister in two surveys of the same 1600
    # people: 794 approve both times, 150 first only, 86 second only, 570 neither. Difference of the second
    # minus the first -0.04, SE sqrt(236 - 64^2 / 1600) / 1600 = 0.009549, 95% interval -0.04 +- 0.018716
    first = [True] * 794 + [True] * 150 + [False] * 86 + [False] * 570
    second = [True] * 794 + [False] * 150 + [True] * 86 + [False] * 570
    d = paired_difference(second, first)
    assert (d["a_only"], d["b_only"], d["n"]) == (86, 150, 1600)
    assert d["diff"] == pytest.approx(-4.0)
    assert d["ci"] == pytest.approx([-5.8716, -2.1284], abs=1e-3)
    assert d["p"] < 1e-4 and d["verdict"] == "worse"
    assert fmt_difference(d) == "-4.0 [-5.9, -2.1]"
    assert fmt_versus(d).startswith("worse: -4.0 [-5.9, -2.1], p=")
    # 1 and 3 discordant of 10: +20 points, but McNemar p = 2 * (1 + 4) / 16 = 0.625: no difference
    a = [True] * 5 + [True, True, True, False] + [False]
    b = [True] * 5 + [False, False, False, True] + [False]
    d = paired_difference(a, b)
    assert d["diff"] == pytest.approx(20.0) and d["p"] == pytest.approx(0.625)
    se = math.sqrt(4 - 2 ** 2 / 10) / 10
    assert d["ci"] == pytest.approx([100 * (0.2 - 1.959963984540054 * se), 100 * (0.2 + 1.959963984540054 * se)])
    assert d["verdict"] == "no difference"
    assert fmt_difference(d).startswith("no difference: +20.0 [")
    assert fmt_versus(d) == "no difference (p=0.62)"
    same = paired_difference([True, False, True], [True, False, True])
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0] and same["p"] == 1.0 and same["verdict"] == "no difference"
    with pytest.raises(ValueError, match="different numbers of samples: 3 and 2"):
        paired_difference([True, True, False], [True, False])


def test_markdown_shows_blind_row_intervals_and_no_difference():
    """A table built from rows whose comparisons are known: intervals in every accuracy cell, the blind and chance
    rows, 'no difference' for a method inside the noise and a verdict for one beyond it."""
    from evals.run import markdown
    from evals.stats import paired_difference, wilson

    base = [True] * 30 + [False] * 10
    rand = [True] * 20 + [False] * 20
    near = [True] * 21 + [False] * 19                          # one more right than random: noise
    far = [True] * 30 + [False] * 10                           # ten more right than random, none fewer: p = 0.002
    fams = lambda xs: {"counting": 100.0 * sum(xs[:20]) / 20, "text": 100.0 * sum(xs[20:]) / 20}  # noqa: E731

    def row(method, keep, xs):
        r = dict(config="unpruned" if keep is None else f"{method}@{keep}", method=method, keep=keep, n=40,
                 accuracy=100.0 * sum(xs) / 40, correct=sum(xs), accuracy_ci=list(wilson(sum(xs), 40)),
                 families=fams(xs), families_ci={"counting": list(wilson(sum(xs[:20]), 20)),
                                                 "text": list(wilson(sum(xs[20:]), 20))}, agreement=90.0)
        if keep is None:
            r.update(vs_unpruned=None, vs_random=None)
        else:
            r["vs_unpruned"] = paired_difference(xs, base)
            r["vs_random"] = None if method == "random" else paired_difference(xs, rand)
        return r

    rows = [row("unpruned", None, base), row("random", 64, rand), row("near", 64, near), row("far", 64, far)]
    blind = dict(method="blind (question only)", accuracy=25.0, overall=25.0, correct=10, n=40,
                 accuracy_ci=list(wilson(10, 40)), families={"counting": 20.0, "text": 30.0},
                 families_ci={"counting": list(wilson(4, 20)), "text": list(wilson(6, 20))},
                 family_counts={"counting": 20, "text": 20}, chance={"counting": 16.7, "text": 10.0}, n_train=3000)
    meta = dict(model="m", benchmark="proxy", n=40, seed=0, device="cpu", processes=1, proxy=True)
    md = markdown(rows, meta, blind)
    lo, hi = wilson(10, 40)
    assert f"| blind (question only) | - | 25.0 [{lo:.1f}, {hi:.1f}] |" in md
    lo, hi = wilson(30, 40)
    assert f"| unpruned | all | 75.0 [{lo:.1f}, {hi:.1f}] | - | - |" in md
    near_line = next(line for line in md.splitlines() if line.startswith("| near | 64 |"))
    assert "no difference (p=1)" in near_line
    far_line = next(line for line in md.splitlines() if line.startswith("| far | 64 |"))
    assert "better: +25.0 [" in far_line and "p=0.002" in far_line
    assert "| chance (uniform guess) | - | 16.7 | 10.0 |" in md
    assert f"| blind (question only) | - | 20.0 [{wilson(4, 20)[0]:.1f}, {wilson(4, 20)[1]:.1f}] |" in md
    assert "samples per family: counting 20, text 20" in md
    assert "| blind (question only) | - | n/a |" in markdown(rows, meta, None)


def test_harness_records_blind_baseline_intervals_and_the_command_once(tmp_path, tiny_dir):
    """A run through ``vlprune eval`` on the proxy benchmark: results.json holds the blind baseline of exactly the
    samples evaluated (every family, with chance), each row's interval and paired comparisons, the table shows
    them, and the command is recorded as typed, with one 'eval'."""
    from evals.proxy.scenes import FAMILIES, blind_baseline, make_sample, split_seed
    from evals.stats import mcnemar_exact, wilson
    from vlprune.cli import main as cli_main

    out = tmp_path / "blind"
    args = ["--model", str(tiny_dir), "--out", str(out), "--no-progress", "--latency-samples", "0", "--methods",
            "pool", "--keep", "64", "--n", "12", "--seed", "3", "--max-new-tokens", "2", "--batch-size", "6"]
    assert cli_main(["eval", *args]) == 0
    res = _results(out)
    assert res["meta"]["command"] == "vlprune eval " + shlex.join(args)
    assert "eval eval" not in res["meta"]["command"]

    blind = res["blind"]
    samples = [make_sample(split_seed("test", 3 * 1_000_000 + i)) for i in range(12)]
    want = blind_baseline(samples)
    assert set(blind["families"]) == set(FAMILIES) and set(blind["chance"]) == set(FAMILIES)
    assert blind["families"] == want["families"] and blind["chance"] == want["chance"]
    assert blind["accuracy"] == want["overall"] and blind["n"] == 12 and blind["n_train"] == 3000
    assert blind["correct"] == round(want["overall"] * 12 / 100)
    assert blind["accuracy_ci"] == pytest.approx(list(wilson(blind["correct"], 12)))
    assert blind["family_counts"] == {f: 2 for f in sorted(FAMILIES)}

    rows = {r["config"]: r for r in res["results"]}
    recs = _records(out)
    bench = load_benchmark("proxy", 12, 3)
    right = {key: [bench.score(recs[(key, it.index)], it) for it in bench.items] for key in rows}
    for key, r in rows.items():
        assert r["correct"] == sum(right[key])
        assert r["accuracy_ci"] == pytest.approx(list(wilson(sum(right[key]), 12)))
    assert rows["unpruned"]["vs_unpruned"] is None and rows["random@64"]["vs_random"] is None
    pool = rows["pool@64"]
    only_pool = sum(a and not b for a, b in zip(right["pool@64"], right["random@64"]))
    only_random = sum(b and not a for a, b in zip(right["pool@64"], right["random@64"]))
    assert (pool["vs_random"]["a_only"], pool["vs_random"]["b_only"]) == (only_pool, only_random)
    assert pool["vs_random"]["p"] == pytest.approx(mcnemar_exact(only_pool, only_random))
    assert pool["vs_random"]["reference"] == "random@64"
    assert pool["vs_unpruned"]["diff"] == pytest.approx(pool["accuracy"] - rows["unpruned"]["accuracy"])
    assert (pool["vs_random"]["verdict"] == "no difference") == (pool["vs_random"]["p"] >= 0.05)

    md = (out / "results.md").read_text()
    lo, hi = blind["accuracy_ci"]
    assert f"| blind (question only) | - | {blind['accuracy']:.1f} [{lo:.1f}, {hi:.1f}] |" in md
    lo, hi = rows["unpruned"]["accuracy_ci"]
    assert f"| unpruned | all | {rows['unpruned']['accuracy']:.1f} [{lo:.1f}, {hi:.1f}] |" in md
    assert "| chance (uniform guess) |" in md and "95% Wilson" in md
    pool_line = next(line for line in md.splitlines() if line.startswith("| pool | 64 |"))
    verdict = pool["vs_random"]["verdict"]
    assert ("no difference (p=" if verdict == "no difference" else f"{verdict}: ") in pool_line


def test_proxy_evaluate_summary_carries_wilson_intervals():
    from evals.proxy.evaluate import summarize
    from evals.stats import wilson

    records = ([dict(family="text", category="text/number", correct=c) for c in (True, False, False, False)]
               + [dict(family="existence", category="existence/random", correct=c) for c in (True,) * 5 + (False,)])
    out = summarize(records)
    assert out["overall"] == 60.0 and out["overall_ci"] == pytest.approx([round(v, 2) for v in wilson(6, 10)])
    assert out["families_ci"] == {"existence": pytest.approx([round(v, 2) for v in wilson(5, 6)]),
                                  "text": pytest.approx([round(v, 2) for v in wilson(1, 4)])}


def test_blind_is_null_off_the_proxy_benchmark(tmp_path, tiny_dir):
    bench, imgs = _pope_fixture(tmp_path)
    out = tmp_path / "pope"
    assert _run(out, "--benchmark", str(bench), "--images", str(imgs), "--methods", "pool", "--keep", "64",
                "--n", "4", "--max-new-tokens", "2", model=tiny_dir) == 0
    res = _results(out)
    assert "blind" in res and res["blind"] is None
    assert all("accuracy_ci" in r for r in res["results"])
    assert "| blind (question only) | - | n/a |" in (out / "results.md").read_text()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_clear_errors(tmp_path, tiny_dir, capsys):
    out = tmp_path / "bad"
    assert _run(out, "--methods", "fastvv", "--keep", "64", "--n", "2", model=tiny_dir) == 2
    assert "unknown method 'fastvv' (did you mean 'fastv'?)" in capsys.readouterr().err
    # a budget above the image's tokens keeps them all, as vlprune.apply does: the unpruned row stands for it
    assert _run(tmp_path / "above", "--methods", "pool", "--keep", "600", "--n", "2", model=tiny_dir) == 0
    err = capsys.readouterr().err
    assert "--keep 600 is above the 576 visual tokens per image" in err
    assert [r["method"] for r in _results(tmp_path / "above")["results"]] == ["unpruned"]
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
           "--no-progress", "--latency-samples", "0", "--dtype", "float32", *grid]
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
    # runs written before the harness recorded intervals, comparisons and the blind baseline: n/a in those cells
    assert "| a | pool | 64 | 40.0 [n/a] | n/a | n/a |" in md and "| b | mqt (proxy-mqt) | 16 | 32.0 [n/a] |" in md
    assert "| b | unpruned (proxy-mqt) | all | 34.0 [n/a] | - | - |" in md
    assert "| a | blind (question only) | - | n/a |" in md
    assert (out / "accuracy_vs_tflops.png").stat().st_size > 0
    assert summary_main([str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_equivalent_tokens_show_the_official_count_where_it_differs():
    """MustDrop's two counts: vlprune's (tokens entering each layer) and, in parentheses, the one the official
    code prints; a method whose counts agree shows one number."""
    from evals.run import _fmt_equivalent

    assert _fmt_equivalent({"equivalent_tokens": 160.25, "equivalent_tokens_official": 131.5}) == "160.2 (131.5)"
    assert _fmt_equivalent({"equivalent_tokens": 64.0, "equivalent_tokens_official": 64.0}) == "64.0"
    assert _fmt_equivalent({"equivalent_tokens": 64.0, "equivalent_tokens_official": None}) == "64.0"
    assert _fmt_equivalent({}) == "-"
