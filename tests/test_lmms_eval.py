"""The lmms-eval model plugin, end to end: a real ``lmms-eval`` process evaluates the shipped proxy with a vlprune
method on a local task written by ``vlprune_lmms_eval.export``, and must give the same answers and accuracy as
vlprune's own harness on the same samples."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed; install it as the README's lmms-eval section says "
           "(pip install -e '.[lmms]' && pip install --no-deps lmms_eval==0.7.3); .ci/run does")

N = 8


def _env(tmp: Path) -> dict:
    """Offline, with dataset caches in the test's own folder."""
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp / "hf-datasets"),
                HF_HOME=str(tmp / "hf-home"))


def _first_text(x):
    """lmms-eval logs a response as a string, or as a (nested) list holding it."""
    while not isinstance(x, str):
        x = x[0]
    return x


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    from vlprune_lmms_eval.models.vlprune import VlpruneModel

    assert get_model("vlprune") is VlpruneModel


def test_legacy_plugin_variable_registers_the_model(monkeypatch):
    """lmms-eval versions before entry points read LMMS_EVAL_PLUGINS=<package> and its models.AVAILABLE_MODELS."""
    from lmms_eval.models import ModelRegistryV2, _merge_legacy_plugin_models

    from vlprune_lmms_eval.models.vlprune import VlpruneModel

    monkeypatch.setenv("LMMS_EVAL_PLUGINS", "vlprune_lmms_eval")
    registry = ModelRegistryV2()
    with pytest.warns(DeprecationWarning):
        _merge_legacy_plugin_models(registry)
    assert registry.get_model_class("vlprune") is VlpruneModel


def test_bad_model_args_name_the_fix():
    from vlprune_lmms_eval.models.vlprune import VlpruneModel

    with pytest.raises(ValueError, match="hiredd"):
        VlpruneModel(method="hiredd", keep_ratio=0.2)
    with pytest.raises(ValueError, match="without method"):
        VlpruneModel(keep=64)
    with pytest.raises(ValueError, match="dtype"):
        VlpruneModel(method="random", keep=8, dtype="float64")
    with pytest.raises(ValueError, match="batch_size"):
        VlpruneModel(method="random", keep=8, batch_size="auto")


def test_unknown_pretrained_name_fails_at_once(monkeypatch):
    """A name that is no proxy model, no folder and no cached hub id is refused before any hub call (it used to
    spend about a minute retrying the hub), with the proxy names and the closest one."""
    import time

    from vlprune_lmms_eval.models.vlprune import VlpruneModel

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even with the hub allowed
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"pretrained='proxy-nxt' .*\(proxy, proxy-next, proxy-mqt\).*"
                                         r"Did you mean 'proxy-next'\?"):
        VlpruneModel(pretrained="proxy-nxt", method="random", keep=8)
    with pytest.raises(ValueError, match=r"pretrained='\./no-such-folder' is not an existing folder"):
        VlpruneModel(pretrained="./no-such-folder")
    assert time.perf_counter() - t0 < 5


def test_export_writes_a_task_and_a_harness_benchmark(tmp_path):
    from evals.benchmarks import load_benchmark
    from vlprune_lmms_eval.export import export

    data = export("proxy", tmp_path / "vlprune_proxy", n=3, seed=0)
    folder = data.parent
    assert (folder / "vlprune_proxy.yaml").read_text().startswith("task: vlprune_proxy\n")
    assert (folder / "utils.py").is_file()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    orig = load_benchmark("proxy", n=3, seed=0)
    back = load_benchmark(str(data), n=None)
    for r, a, b in zip(rows, orig.items, back.items):
        assert (r["question"], r["answer"]) == (a.question, a.answer) == (b.question, b.answer)
        assert a.image().tobytes() == b.image().tobytes()                 # PNG: the same pixels
    with pytest.raises(ValueError, match="identifier"):
        export("proxy", tmp_path / "bad-name", n=1)


def test_lmms_eval_matches_the_harness(tmp_path):
    from vlprune_lmms_eval.export import export

    data = export("proxy", tmp_path / "vlprune_proxy", n=N, seed=0)
    env = _env(tmp_path)
    out = tmp_path / "lmms-out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vlprune",
           "--model_args", "pretrained=proxy,method=hired,keep_ratio=0.2,dtype=float32",
           "--tasks", "vlprune_proxy", "--include_path", str(data.parent), "--batch_size", "4",
           "--output_path", str(out), "--log_samples"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(out / "**" / "*_results.json"), recursive=True)[0]).read_text())
    lmms_acc = 100.0 * results["results"]["vlprune_proxy"]["exact_match,none"]
    samples = [json.loads(line) for f in glob.glob(str(out / "**" / "*_samples_*.jsonl"), recursive=True)
               for line in open(f)]
    assert len(samples) == N
    lmms_pred = {s["doc_id"]: _first_text(s["filtered_resps"]) for s in samples}

    harness = tmp_path / "harness"
    h = subprocess.run([sys.executable, "-m", "evals.run", "--model", "proxy", "--benchmark", str(data),
                        "--n", str(N), "--methods", "hired", "--keep", "0.2", "--latency-samples", "1",
                        "--dtype", "float32", "--out", str(harness), "--no-progress"], env=env, capture_output=True, text=True,
                       timeout=900)
    assert h.returncode == 0, h.stdout[-3000:] + h.stderr[-3000:]
    rows = json.loads((harness / "results.json").read_text())["results"]
    hired = [r for r in rows if r["method"] == "hired"]
    assert len(hired) == 1
    recs = [json.loads(line) for f in (harness / "records").glob("records.*.jsonl") for line in open(f)]
    harness_pred = {r["index"]: r["prediction"] for r in recs if r["config"] == hired[0]["config"]}
    assert harness_pred == lmms_pred                       # the same answer for every sample
    assert lmms_acc == pytest.approx(hired[0]["accuracy"])

    # two processes under accelerate: lmms-eval shards the samples, the merged answers are the same
    out2 = tmp_path / "lmms-out-2"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd2 = launch + cmd[1:cmd.index("--output_path")] + ["--output_path", str(out2), "--log_samples"]
    p2 = subprocess.run(cmd2, env=env, capture_output=True, text=True, timeout=900)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    assert "4 samples" in p2.stdout + p2.stderr                # each process answered its half
    samples2 = [json.loads(line) for f in glob.glob(str(out2 / "**" / "*_samples_*.jsonl"), recursive=True)
                for line in open(f)]
    assert {s["doc_id"]: _first_text(s["filtered_resps"]) for s in samples2} == lmms_pred
