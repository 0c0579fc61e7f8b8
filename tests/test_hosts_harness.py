"""The harness (``vlprune eval``) and ``vlprune demo`` on Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision.

Each host is the tiny random-weight model of ``vlprune.hosts_tiny`` saved to a temporary folder with
``save_pretrained`` (the processor through ``evals.models.save_processor``: it has no video processor), so the
harness loads it as it loads any local model. The path of a class vlprune has no adapter for (refused at once with
``vlprune.apply``'s message) is simulated. Outputs of random weights carry no meaning: these tests check the
plumbing, not accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.run import main as eval_main

# model_type -> (demo host name, builder name in vlprune.hosts_tiny, visual tokens of a 336 x 336 image)
HOSTS = {
    "qwen2_vl": ("qwen2-vl", "tiny_qwen2_vl", 64),
    "qwen2_5_vl": ("qwen2.5-vl", "tiny_qwen2_5_vl", 64),
    "llava_onevision": ("llava-onevision", "tiny_llava_onevision", 664),
}


def _build(model_type: str, seed: int = 0):
    from vlprune import hosts_tiny

    return getattr(hosts_tiny, HOSTS[model_type][1])(seed=seed)


def apply_refusal(model) -> str | None:
    """``vlprune.apply``'s TypeError message for ``model`` (no adapter for its class), or None when it prunes it."""
    import vlprune

    try:
        vlprune.apply(model, "pool", keep=8)
    except TypeError as e:
        return str(e)
    finally:
        vlprune.remove(model)
    return None


class Host:
    def __init__(self, model_type: str, folder: Path, model, processor):
        self.model_type, self.folder, self.model, self.processor = model_type, folder, model, processor
        self.demo_name, _, self.tokens_336 = HOSTS[model_type]
        self.refusal = apply_refusal(model)

    def require_adapter(self) -> None:
        """Each of these hosts has an adapter: a refusal here is a failure, not a skip."""
        assert self.refusal is None, f"vlprune.apply refuses {type(self.model).__name__}: {self.refusal}"


@pytest.fixture(scope="module", params=list(HOSTS))
def host(request, tmp_path_factory) -> Host:
    from evals.models import save_processor

    model, processor = _build(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    save_processor(processor, folder)
    return Host(request.param, folder, model, processor)


def _images(sizes=((336, 336), (112, 84), (168, 112), (224, 140))):
    from vlprune.testing import synthetic_image

    return [synthetic_image(s, seed=i) for i, s in enumerate(sizes)]


def _run(out, model, *extra) -> int:
    argv = ["--model", str(model), "--out", str(out), "--no-progress", "--dtype", "float32", *extra]
    return eval_main(argv)


# ------------------------------------------------------------------------------------------ loading and prompts
def test_processor_round_trips_offline(host, monkeypatch):
    """The saved folder loads back offline into the same processor class, with the same chat template, giving the
    same tensors for images of several sizes in one left-padded batch."""
    import torch

    from evals.models import load_processor
    from evals.run import batch_inputs, build_prompt
    from vlprune.hosts_tiny import host_prompt, tiny_host_inputs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_processor(str(host.folder))
    assert type(loaded) is type(host.processor)
    assert loaded.chat_template == host.processor.chat_template
    prompts = [build_prompt(loaded, q, proxy=False) for q in ("What is it?", "How many?", "Where?", "Why?")]
    assert prompts[0] == host_prompt(host.processor, "What is it?")   # the host's chat template, one image
    images = _images()
    got = batch_inputs(loaded, images, prompts, "cpu")
    want = tiny_host_inputs(host.processor, images, prompts, padding_side="left")
    assert sorted(got.keys()) == sorted(want.keys())                # everything the processor returns, no more
    for k in want:
        assert torch.equal(got[k], want[k]), k
    mask = got["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()     # padded on the left
    assert loaded.tokenizer.padding_side == host.processor.tokenizer.padding_side   # restored


def test_model_type_accepted_and_others_refused_with_the_list(host, tmp_path, capsys):
    from evals.run import parse_args

    assert parse_args(["--model", str(host.folder)]).model == str(host.folder)
    other = tmp_path / "qwen3"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", str(other)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for name in ("'qwen3_vl'", "'llava'", "'llava_next'", "'qwen2_vl'", "'qwen2_5_vl'", "'llava_onevision'"):
        assert name in err, (name, err)


def test_load_model_uses_the_host_class(host):
    import torch

    from evals.run import load_model

    model, processor, label = load_model(str(host.folder), torch.float32, torch.device("cpu"))
    assert type(model) is type(host.model) and label == str(host.folder)
    assert type(processor) is type(host.processor)
    sd, ref = model.state_dict(), host.model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------ the harness
def test_eval_end_to_end(host, tmp_path, capsys):
    """``vlprune eval --model <folder> --n 4 --methods random,pool --keep 8``: the table with the blind row and
    intervals, on the proxy benchmark (336 x 336 scenes)."""
    host.require_adapter()
    out = tmp_path / "out"
    assert _run(out, host.folder, "--n", "4", "--methods", "random,pool", "--keep", "8",
                "--latency-samples", "1") == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in res["results"]] == ["unpruned", "random@8", "pool@8"]
    assert res["meta"]["visual_tokens_per_image"] == host.tokens_336
    assert res["blind"] is not None and len(res["blind"]["accuracy_ci"]) == 2
    for r in res["results"]:
        assert r["n"] == 4 and len(r["accuracy_ci"]) == 2 and r["tflops_prefill"] > 0
    base = res["results"][0]
    for r in res["results"][1:]:
        assert r["tflops_prefill"] < base["tflops_prefill"]
        assert r["vs_unpruned"] is not None
    md = (out / "results.md").read_text()
    assert "| blind (question only) |" in md and "| pool | 8 |" in md and "| random | 8 |" in md
    assert (out / "accuracy_vs_tflops.png").is_file()
    assert "| pool | 8 |" in capsys.readouterr().out


def test_batched_answers_equal_one_at_a_time(host, tmp_path):
    """Images of different sizes give prompts of different lengths: a batch is padded on the left, and the
    unpruned model answers each sample as it does alone."""
    host.require_adapter()
    images = _images()
    rows = []
    for i, im in enumerate(images):
        im.save(tmp_path / f"im{i}.png")
        rows.append({"image": f"im{i}.png", "question": "What is shown?", "answer": "x"})
    bench = tmp_path / "mixed.jsonl"
    bench.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = {}
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}"
        assert _run(out, host.folder, "--benchmark", str(bench), "--n", "4", "--methods", "random,pool", "--keep",
                    "8", "--latency-samples", "0", "--max-new-tokens", "4", "--batch-size", str(bs)) == 0
        recs[bs] = {(r["config"], r["index"]): r["prediction"]
                    for f in (out / "records").glob("*.jsonl") for r in map(json.loads, f.read_text().splitlines())}
    assert len(recs[1]) == 12 and recs[1].keys() == recs[4].keys()
    unpruned = [k for k in recs[1] if k[0] == "unpruned"]
    assert [recs[4][k] for k in unpruned] == [recs[1][k] for k in unpruned]


def test_refusal_path_without_an_adapter(tmp_path, capsys, monkeypatch):
    """The refusal, simulated for a class vlprune prunes today: the message is ``find_adapter``'s TypeError and
    no benchmark is loaded and no model weight read."""
    import vlprune.adapters
    from evals import run as harness
    from vlprune.hosts_tiny import tiny_qwen2_vl

    model, processor = tiny_qwen2_vl(seed=0)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    from evals.models import save_processor

    save_processor(processor, folder)
    message = "vlprune does not support model class 'Qwen2VLForConditionalGeneration'. Supported: (none here)."

    def refuse(m):
        raise TypeError(message)

    def no_data(*a, **k):
        raise AssertionError("the benchmark was loaded before the refusal")

    def no_weights(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(vlprune.adapters, "find_adapter", refuse)
    monkeypatch.setattr(harness, "load_benchmark", no_data)
    monkeypatch.setattr(harness, "load_model", no_weights)
    out = tmp_path / "out"
    capsys.readouterr()                                  # what saving the model printed
    assert _run(out, folder, "--n", "4", "--methods", "random,pool", "--keep", "8") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"vlprune eval: error: {message}"]
    assert not out.exists()


# ------------------------------------------------------------------------------------------ the demo
def _demo(host_name: str, methods, keep: int = 8):
    from vlprune.cli import run_demo

    lines: list[str] = []
    rows = run_demo(keep=keep, k=2, new_tokens=2, repeats=1, hosts=[host_name], methods=methods, out=lines.append)
    return rows, lines


def test_demo_rows_per_method(host):
    """``vlprune demo --hosts <host>``: the unpruned row, then one row per method; a method the host refuses is a
    row with the reason (MQT replaces LLaVA's projector)."""
    host.require_adapter()
    rows, lines = _demo(host.demo_name, ["pool", "random", "mqt"])
    assert [r["method"] for r in rows] == ["(unpruned)", "pool", "random", "mqt"]
    assert all(r["host"] == host.demo_name for r in rows)
    unpruned, pool, rnd, mqt = rows
    assert unpruned["visual_in"] == unpruned["kept"] == host.tokens_336 and unpruned["skipped"] is None
    for r in (pool, rnd):
        assert r["skipped"] is None and r["visual_in"] == host.tokens_336 and 0 < r["kept"] <= 8
        assert r["prefill_tflops"] < unpruned["prefill_tflops"]
    assert mqt["skipped"] and "mqt" in mqt["skipped"] and mqt["prefill_tflops"] is None
    assert any("mqt" in ln and "skipped: " in ln for ln in lines)


def test_demo_host_without_adapter_lists_every_method_with_the_reason(monkeypatch):
    """A host class vlprune has no adapter for: the unpruned model is timed (no cost), every method is a row with
    ``vlprune.apply``'s TypeError message; nothing raises. Simulated on the LLaVA-OneVision host."""
    import vlprune.api

    message = "vlprune does not support model class 'LlavaOnevisionForConditionalGeneration'. Supported: none."

    def refuse(m):
        raise TypeError(message)

    monkeypatch.setattr(vlprune.api, "find_adapter", refuse)
    rows, lines = _demo("llava-onevision", ["pool", "fastv"])
    assert [r["method"] for r in rows] == ["(unpruned)", "pool", "fastv k=2"]
    assert rows[0]["skipped"] is None and rows[0]["visual_in"] == 664 and rows[0]["prefill_tflops"] is None
    assert rows[0]["prefill_s"] > 0
    assert [r["skipped"] for r in rows[1:]] == [message, message]
    assert sum("skipped: " + message in ln for ln in lines) == 2
