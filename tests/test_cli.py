"""Every command a user can type, with good arguments and with each kind of bad value, in one table.

A bad value must end with exit code 2 (a refused argument) or 1, one or two lines on stderr that name the value,
what is allowed and the fix, no traceback, and nothing written to the output folder. ``--help``, ``--version`` and
argument errors of ``vlprune`` import neither torch nor transformers (read from ``sys.modules`` in the
subprocess). A new command joins by adding rows.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
VLPRUNE = [PY, "-m", "vlprune.cli"]
EVAL = VLPRUNE + ["eval"]
RECIPE = [PY, "-m", "evals.proxy.recipe"]
TRAIN = [PY, "-m", "evals.proxy.train"]
TRAIN_MQT = [PY, "-m", "evals.proxy.train_mqt"]
REPORT = [PY, "-m", "evals.proxy.report"]
PROBE = [PY, "-m", "evals.proxy.probe"]
ORACLE = [PY, "-m", "evals.proxy.oracle"]
APP = [PY, str(ROOT / "app.py")]
BENCH = [PY, str(ROOT / "benchmarks" / "bench_prefill.py")]
GPU_SH = ["bash", str(ROOT / "benchmarks" / "gpu.sh")]

# runs the command's main in-process after recording, at exit, whether torch / transformers were imported
_WRAP = r"""
import atexit, json, os, runpy, sys
def _report():
    with open(os.environ["VLPRUNE_TEST_MODULES"], "w") as f:
        json.dump({m: m in sys.modules for m in ("torch", "transformers")}, f)
atexit.register(_report)
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@dataclass
class Row:
    id: str
    argv: list[str]
    code: int = 0                              # expected exit code
    says: tuple[str, ...] = ()                 # stderr (or stdout when code 0) must contain each
    out: str | None = None                     # an output folder ({tmp}/...) that must stay absent on failure
    light: bool = False                        # torch and transformers must not be imported
    stdout: tuple[str, ...] = ()               # stdout must contain each
    files: tuple[str, ...] = ()                # files the run must write (relative to {tmp})
    slow: bool = field(default=False)          # builds a model: runs only once per kind


def _bad(id, argv, *says, code=2, out=None, light=False):
    return Row(id, argv, code=code, says=says, out=out, light=light)


ROWS = [
    # ---------------------------------------------------------------------------------------------- vlprune
    Row("vlprune --version", VLPRUNE + ["--version"], stdout=("0.1.0",), light=True),
    Row("vlprune --help", VLPRUNE + ["--help"], stdout=("demo", "eval", "methods"), light=True),
    Row("vlprune demo --help", VLPRUNE + ["demo", "--help"], stdout=("--keep",), light=True),
    Row("vlprune eval --help", EVAL + ["--help"], stdout=("--full", "--dtype"), light=True),
    Row("vlprune methods", VLPRUNE + ["methods"],
        stdout=("mustdrop  (MustDrop; stages: vision, pre_llm, llm_layer, kv_cache)", "transprune", "keep_ratio")),
    Row("vlprune methods --json", VLPRUNE + ["methods", "--json"], stdout=('"stages": "llm_layer"',)),
    Row("vlprune demo tiny", VLPRUNE + ["demo", "--hosts", "llava-1.5", "--methods", "pool", "mustdrop", "--repeats",
                                        "1", "--new-tokens", "2", "--json", "{tmp}/demo.json"],
        stdout=("(unpruned)", "pool", "mustdrop"), files=("demo.json",), slow=True),
    # a host whose methods run or are refused row by row: exit 0 either way (mqt replaces LLaVA's projector, so
    # Qwen2-VL refuses it with the reason; while vlprune has no Qwen2-VL adapter every method is such a row)
    Row("vlprune demo qwen2-vl host", VLPRUNE + ["demo", "--hosts", "qwen2-vl", "--methods", "pool", "mqt", "--keep",
                                                 "8", "--repeats", "1", "--new-tokens", "2"],
        stdout=("qwen2-vl        (unpruned)", "qwen2-vl        pool", "qwen2-vl        mqt"), slow=True),
    _bad("vlprune unknown command", VLPRUNE + ["prune"], "'prune'", "demo", "eval", "methods", light=True),
    _bad("vlprune methods unknown option", VLPRUNE + ["methods", "--jsn"], "--jsn", light=True),
    _bad("demo zero repeats", VLPRUNE + ["demo", "--repeats", "0"], "--repeats", "'0'", "at least 1", light=True),
    _bad("demo negative keep", VLPRUNE + ["demo", "--keep", "-5"], "--keep", "'-5'", "at least 1", light=True),
    # a budget above the image's tokens prunes nothing, as in the API and the harness: said, not refused
    Row("vlprune demo budget above the image", VLPRUNE + ["demo", "--hosts", "llava-1.5", "--methods", "pool",
                                                          "--keep", "100000", "--repeats", "1", "--new-tokens", "2"],
        stdout=("keep=100000 is at or above this image's 576 visual tokens", "576    576"), slow=True),
    _bad("demo keep wrong type", VLPRUNE + ["demo", "--keep", "many"], "'many'", "whole number", light=True),
    _bad("demo unknown method", VLPRUNE + ["demo", "--methods", "nosuch"], "'nosuch'", "choose from", "fastv",
         light=True),
    _bad("demo method typo", VLPRUNE + ["demo", "--methods", "hird"], "'hird'", "did you mean 'hired'",
         light=True),
    _bad("demo FastV layer zero", VLPRUNE + ["demo", "--k", "0"], "--k", "'0'", light=True),
    _bad("demo FastV layer too large", VLPRUNE + ["demo", "--k", "9"], "--k 9", "1..3", light=True),
    _bad("demo unknown host", VLPRUNE + ["demo", "--hosts", "qwen"], "'qwen'", "llava-1.5", "qwen2.5-vl",
         "llava-onevision", light=True),
    _bad("demo host typo", VLPRUNE + ["demo", "--hosts", "llava-1.5", "qwen2vl"], "--hosts", "'qwen2vl'",
         "did you mean 'qwen2-vl'", light=True),
    _bad("demo json folder missing", VLPRUNE + ["demo", "--json", "/nonexistent/dir/rows.json"],
         "/nonexistent/dir", light=True),
    # ---------------------------------------------------------------------------------------------- eval
    _bad("eval missing model path", EVAL + ["--model", "/nonexistent/model", "--out", "{tmp}/e1"],
         "'/nonexistent/model'", "does not exist", "proxy-next", out="{tmp}/e1", light=True),
    _bad("eval proxy name typo", EVAL + ["--model", "proxy-nxt", "--out", "{tmp}/e2"], "'proxy-nxt'",
         "Did you mean 'proxy-next'", out="{tmp}/e2", light=True),
    _bad("eval wrong model type", EVAL + ["--model", "{tmp}/bert", "--out", "{tmp}/e3"], "'bert'",
         "'llava'", "'qwen2_vl'", "'qwen2_5_vl'", "'llava_onevision'", out="{tmp}/e3", light=True),
    _bad("eval folder without config", EVAL + ["--model", "{tmp}", "--out", "{tmp}/e4"], "without a config.json",
         out="{tmp}/e4", light=True),
    _bad("eval unknown method", EVAL + ["--methods", "pool,nosuch", "--out", "{tmp}/e5"], "'nosuch'",
         "choose from", out="{tmp}/e5", light=True),
    _bad("eval method typo", EVAL + ["--methods", "fastvv", "--out", "{tmp}/e6"], "'fastvv'",
         "did you mean 'fastv'", out="{tmp}/e6", light=True),
    _bad("eval zero batch size", EVAL + ["--batch-size", "0", "--out", "{tmp}/e7"], "--batch-size", "'0'",
         out="{tmp}/e7", light=True),
    _bad("eval negative samples", EVAL + ["--n", "-3", "--out", "{tmp}/e8"], "--n", "'-3'", out="{tmp}/e8",
         light=True),
    _bad("eval zero budget", EVAL + ["--keep", "0", "--out", "{tmp}/e9"], "--keep", "0", "at least 1",
         out="{tmp}/e9", light=True),
    _bad("eval share too large", EVAL + ["--keep", "1.5", "--out", "{tmp}/e10"], "1.5", "(0, 1]",
         out="{tmp}/e10", light=True),
    _bad("eval budget wrong type", EVAL + ["--keep", "sixty", "--out", "{tmp}/e11"], "'sixty'", "--keep 576",
         out="{tmp}/e11", light=True),
    _bad("eval unknown dtype", EVAL + ["--dtype", "float8", "--out", "{tmp}/e12"], "'float8'", "auto",
         out="{tmp}/e12", light=True),
    _bad("eval missing benchmark", EVAL + ["--benchmark", "/nonexistent/pope.jsonl", "--out", "{tmp}/e13"],
         "/nonexistent/pope.jsonl", out="{tmp}/e13", light=True),
    _bad("eval param syntax", EVAL + ["--param", "fastv:k=3", "--out", "{tmp}/e14"], "fastv:k=3",
         "METHOD.NAME=VALUE", out="{tmp}/e14", light=True),
    # hyperparameters are checked by the methods themselves: torch is imported, no model is built
    _bad("eval unknown hyperparameter", EVAL + ["--methods", "fastv", "--param", "fastv.kk=3", "--out", "{tmp}/e15"],
         "'kk'", "Did you mean 'k'", "Allowed", out="{tmp}/e15"),
    _bad("eval bad hyperparameter value", EVAL + ["--methods", "fastv", "--param", "fastv.k=0", "--out",
                                                  "{tmp}/e16"], "fastv", "k", out="{tmp}/e16"),
    Row("eval quick run", EVAL + ["--methods", "pool", "--keep", "64", "--n", "4", "--latency-samples", "1",
                                  "--dtype", "float32", "--no-progress", "--out", "{tmp}/eok"],
        stdout=("| pool | 64 |", "blind (question only)", "vlprune eval --full"),
        files=("eok/results.json", "eok/results.md"), slow=True),
    # ---------------------------------------------------------------------------------------------- proxy
    _bad("recipe unknown stage", RECIPE + ["towr", "--out", "{tmp}/r1"], "'towr'", "tower", out="{tmp}/r1"),
    _bad("recipe zero steps", RECIPE + ["tower", "--out", "{tmp}/r2", "--steps", "0"], "--steps", "'0'",
         out="{tmp}/r2"),
    _bad("recipe missing tower", RECIPE + ["decoder", "--out", "{tmp}/r3"], "tower.pt",
         "python -m evals.proxy.recipe tower", out="{tmp}/r3"),
    _bad("recipe missing --from", RECIPE + ["tower", "--out", "{tmp}/r4", "--from", "/nonexistent/tower.pt"],
         "/nonexistent/tower.pt", out="{tmp}/r4"),
    _bad("recipe bad stages", RECIPE + ["decoder", "--out", "{tmp}/r5", "--stages", "65:10:4"], "'65:10:4'",
         "64, 144, 576", out="{tmp}/r5"),
    _bad("recipe no cuda", RECIPE + ["tower", "--out", "{tmp}/r6", "--device", "cuda"], "'cuda'", "cpu",
         out="{tmp}/r6") if not os.environ.get("CUDA_VISIBLE_DEVICES") else None,
    _bad("recipe next without proxy", RECIPE + ["next", "--out", "{tmp}/r7"], "llava-proxy", "decoder",
         out="{tmp}/r7"),
    Row("recipe tower tiny", RECIPE + ["tower", "--out", "{tmp}/rok", "--steps", "1", "--teacher-steps", "0",
                                       "--batch-size", "2", "--crop", "6", "--device", "cpu"],
        files=("rok/tower.pt",), slow=True),
    _bad("train zero steps", TRAIN + ["--steps", "0", "--out", "{tmp}/t1"], "--steps", "'0'", out="{tmp}/t1"),
    _bad("train negative lr", TRAIN + ["--lr", "-1", "--out", "{tmp}/t2"], "--lr", "'-1'", out="{tmp}/t2"),
    _bad("train wrong type", TRAIN + ["--batch-size", "six", "--out", "{tmp}/t3"], "'six'", out="{tmp}/t3"),
    _bad("train missing vision folder", TRAIN + ["--vision-from", "/nonexistent/llava-proxy", "--out", "{tmp}/t4"],
         "/nonexistent/llava-proxy", out="{tmp}/t4"),
    _bad("train unknown precision", TRAIN + ["--precision", "fp8", "--out", "{tmp}/t5"], "'fp8'", "bf16",
         out="{tmp}/t5"),
    _bad("train_mqt queries not square", TRAIN_MQT + ["--queries", "10", "--out", "{tmp}/m1"], "--queries 10",
         "16", out="{tmp}/m1"),
    _bad("train_mqt heads", TRAIN_MQT + ["--heads", "5", "--out", "{tmp}/m2"], "--heads 5", "192", out="{tmp}/m2"),
    _bad("train_mqt unknown keys", TRAIN_MQT + ["--keys", "pos", "--out", "{tmp}/m3"], "'pos'", "position",
         out="{tmp}/m3"),
    _bad("report missing weights", REPORT + ["--weights", "/nonexistent/weights"], "/nonexistent/weights",
         "--weights"),
    _bad("report negative n", REPORT + ["--n", "-1"], "--n", "'-1'"),
    _bad("report unknown geometry", REPORT + ["--only", "nxt"], "'nxt'", "next"),
    Row("report tiny", REPORT + ["--weights", "{tmp}/weights", "--only", "llava", "--n", "6", "--probe", "0",
                                 "--device", "cpu"],
        files=("weights/llava-proxy/README.md", "weights/llava-proxy/report.json"), slow=True),
    _bad("probe missing model", PROBE + ["--model", "/nonexistent/tower.pt"], "/nonexistent/tower.pt",
         "stage-0 tower"),
    _bad("probe zero epochs", PROBE + ["--epochs", "0"], "--epochs", "'0'"),
    _bad("oracle zero steps", ORACLE + ["--steps", "0", "--log", "{tmp}/o1/log"], "--steps", "'0'"),
    # ---------------------------------------------------------------------------------------------- benchmarks
    Row("bench --help", BENCH + ["--help"], stdout=("--batch", "--device", "--attn")),
    _bad("bench zero batch", BENCH + ["--batch", "0", "--out", "{tmp}/b1/x.json"], "--batch 0", out="{tmp}/b1"),
    _bad("bench negative keep", BENCH + ["--keep", "-1", "--out", "{tmp}/b2/x.json"], "--keep -1", out="{tmp}/b2"),
    _bad("bench method typo", BENCH + ["--methods", "hird", "--out", "{tmp}/b3/x.json"], "'hird'", "hired",
         out="{tmp}/b3"),
    _bad("bench unknown dtype", BENCH + ["--dtype", "float8"], "'float8'", "auto"),
    _bad("bench unknown size", BENCH + ["--size", "huge"], "'huge'", "bench-S"),
    _bad("bench unknown host", BENCH + ["--host", "qwen"], "'qwen'", "qwen2.5-vl"),
    _bad("bench qwen image too small", BENCH + ["--host", "qwen2.5-vl", "--image-size", "20x20", "--out",
                                                "{tmp}/b4/x.json"], "--image-size 20x20", "28 px", out="{tmp}/b4"),
    _bad("bench qwen k beyond tiny", BENCH + ["--host", "qwen2.5-vl", "--size", "tiny", "--k", "4"], "--k 4",
         "4 layers"),
    _bad("bench qwen mqt", BENCH + ["--host", "qwen2.5-vl", "--methods", "mqt", "--keep", "16", "--out",
                                    "{tmp}/b5/x.json"], "--methods mqt", "patch merger", out="{tmp}/b5"),
    _bad("gpu.sh missing folder argument", GPU_SH, "OUT"),
    # ---------------------------------------------------------------------------------------------- demo app
    Row("app --help", APP + ["--help"], stdout=("--model", "--dtype")),
    _bad("app zero port", APP + ["--port", "0"], "--port", "'0'"),
    _bad("app unknown dtype", APP + ["--dtype", "float8"], "'float8'", "auto"),
    _bad("app proxy name typo", APP + ["--model", "proxy-nxt", "--no-warmup"], "'proxy-nxt'", "proxy-next"),
]
ROWS = [r for r in ROWS if r is not None]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "bert").mkdir()
    (d / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shutil.copytree(ROOT / "evals" / "proxy" / "weights" / "llava-proxy", d / "weights" / "llava-proxy")
    for stale in ("README.md", "report.json"):  # the run must write them itself
        (d / "weights" / "llava-proxy" / stale).unlink(missing_ok=True)
    return d


def _fill(argv, tmp):
    return [a.replace("{tmp}", str(tmp)) for a in argv]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_command(row: Row, tmp):
    modules = tmp / f"modules-{abs(hash(row.id))}.json"
    argv = _fill(row.argv, tmp)
    if argv[:2] == [PY, "-m"]:                   # through the wrapper that records the imported modules
        argv = [PY, "-c", _WRAP, argv[2]] + argv[3:]
    env = dict(os.environ, VLPRUNE_TEST_MODULES=str(modules), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    err_lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == row.code, f"exit {p.returncode}, expected {row.code}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if row.code:
        # one or two lines: what was refused and why (plus, at most, a pointer to --help)
        assert 1 <= len(err_lines) <= 2, p.stderr
        for s in row.says:
            assert s in p.stderr, f"{s!r} not in stderr: {p.stderr}"
        if row.out:
            out = Path(_fill([row.out], tmp)[0])
            assert not out.exists() or not any(out.iterdir()), f"{out} was written: {list(out.iterdir())}"
    else:
        for s in row.says + row.stdout:
            assert s in p.stdout, f"{s!r} not in stdout: {p.stdout[-3000:]}"
        for f in row.files:
            assert (tmp / f).is_file(), f"{f} was not written"
    if row.light:
        seen = json.loads(modules.read_text())
        assert seen == {"torch": False, "transformers": False}, f"{row.id} imported {seen}"


def test_every_row_kind_is_covered():
    """Each subcommand has a good row, and the bad rows cover every kind of bad value at least once."""
    ids = " ".join(r.id for r in ROWS)
    for kind in ("unknown", "typo", "zero", "negative", "too large", "wrong type", "missing", "wrong model type"):
        assert kind in ids, kind
    for good in ("vlprune methods", "vlprune demo tiny", "eval quick run", "recipe tower tiny", "report tiny", "app --help"):
        assert good in ids, good


def test_builtin_method_names_match_the_registry():
    """The command line checks method names without importing the methods; the list must be the registry's."""
    import vlprune
    from vlprune.registry import BUILTIN_METHODS

    assert tuple(vlprune.list_methods()) == BUILTIN_METHODS


def test_demo_token_counts_match_the_tiny_hosts():
    """``vlprune demo`` refuses budgets from a table of the tiny hosts' visual tokens and layers; the table must
    be what the built models give."""
    from vlprune.cli import DEMO_LAYERS, DEMO_VISUAL_TOKENS, _demo_host
    from vlprune.testing import synthetic_image

    for host in DEMO_VISUAL_TOKENS:
        model, inputs = _demo_host(host, 0, synthetic_image((336, 336), seed=0))
        assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == DEMO_VISUAL_TOKENS[host]
        assert model.config.text_config.num_hidden_layers == DEMO_LAYERS
