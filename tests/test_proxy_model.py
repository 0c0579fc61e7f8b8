"""The shipped proxy LVLM: loads offline in transformers' own classes, answers, and its recipe runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals.proxy import PATHS, load
from evals.proxy.evaluate import evaluate
from evals.proxy.scenes import split_seed

ROOT = Path(__file__).resolve().parents[1]
shipped = pytest.mark.skipif(not (PATHS["llava"] / "model.safetensors").exists(),
                             reason="the proxy weights are not in this checkout (evals/proxy/weights)")


@shipped
def test_loads_offline_with_plain_transformers():
    code = ("import torch; from transformers import LlavaForConditionalGeneration, AutoProcessor; "
            f"p = {str(PATHS['llava'])!r}; m = LlavaForConditionalGeneration.from_pretrained(p); "
            "pr = AutoProcessor.from_pretrained(p); print(type(m).__name__, type(pr).__name__, m.dtype)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LlavaForConditionalGeneration LlavaProcessor" in out.stdout


@shipped
def test_answers_a_fixed_set_of_questions():
    model, proc = load()
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    from evals.proxy.evaluate import _inputs, samples

    batch = samples("test", 1)
    assert int((_inputs(proc, batch)["input_ids"] == model.config.image_token_id).sum()) == 576
    r = evaluate(model, proc, seeds=FIXED)
    wrong = [(x["question"], x["answer"], x["prediction"]) for x in r["records"] if not x["correct"]]
    assert not wrong, wrong


@shipped
def test_accuracy_on_a_slice_of_the_test_split_matches_the_card():
    model, proc = load()
    report = json.loads((PATHS["llava"] / "report.json").read_text())
    r = evaluate(model, proc, "test", n=120, batch_size=24)
    assert r["n"] == 120 and set(r["families"]) == {"existence", "attribute", "counting", "spatial", "text", "fine"}
    # 120 samples against the card's 600: within the noise of the smaller sample
    assert abs(r["overall"] - report["test"]["overall"]) < 12, (r["overall"], report["test"]["overall"])
    # the same samples and model give the same answers (deterministic evaluation)
    again = evaluate(model, proc, "test", n=24, batch_size=8)
    assert [x["prediction"] for x in again["records"]] == [x["prediction"] for x in r["records"][:24]]


@pytest.mark.skipif(not (PATHS["next"] / "model.safetensors").exists(), reason="no AnyRes proxy weights here")
def test_anyres_variant_loads_and_generates():
    model, proc = load("next")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    r = evaluate(model, proc, "test", n=6, geometry="next", batch_size=3)
    assert r["n"] == 6 and all(isinstance(x["prediction"], str) for x in r["records"])


def test_one_training_step_runs(tmp_path):
    from evals.proxy.train import main

    rc = main(["--out", str(tmp_path), "--steps", "1", "--batch-size", "1", "--turns", "3", "--next-steps", "1",
               "--next-batch-size", "1", "--eval-n", "0", "--device", "cpu"])
    assert rc == 0
    for name in ("llava-proxy", "llava-next-proxy"):
        meta = json.loads((tmp_path / name / "training.json").read_text())
        losses = meta["history"][-1]
        assert all(torch.isfinite(torch.tensor(v)) for k, v in losses.items() if k in ("lm", "patch", "ground"))
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava-proxy")
    LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "llava-next-proxy")


# test-split seeds the shipped model answers correctly (two per family), fixed when the weights were trained
FIXED = [split_seed("test", i) for i in (2, 8, 9, 10, 16, 17, 18, 19, 21, 23, 25, 36)]    # two per family


def test_vision_stage_then_frozen_tower(tmp_path):
    from evals.proxy.train import main

    rc = main(["--out", str(tmp_path), "--vision-steps", "2", "--vision-batch-size", "3", "--teacher-steps", "1",
               "--freeze-vision",
               "--steps", "1", "--batch-size", "1", "--turns", "2", "--next-steps", "0", "--eval-n", "0",
               "--device", "cpu", "--precision", "fp32"])
    assert rc == 0
    meta = json.loads((tmp_path / "llava-proxy" / "training.json").read_text())
    assert meta["bf16"] is False and meta["args"]["freeze_vision"] is True
    last = meta["vision_stage"]["history"][-1]
    assert last["step"] == 2 and set(last["patches"]) >= {"background", "object", "shape", "digit"}
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("patch", "present", "distill"))
    assert any('"stage": "teacher"' in line for line in (tmp_path / "train.log").read_text().splitlines())

    # a second run starts stage A from the first run's (frozen, hence unchanged) tower instead of a stage 0
    from safetensors.torch import load_file

    again = tmp_path / "again"
    rc = main(["--out", str(again), "--vision-from", str(tmp_path / "llava-proxy"), "--freeze-vision", "--seed", "1",
               "--embed-std", "0.3", "--projector-scale", "4", "--steps", "1", "--batch-size", "1", "--turns", "2",
               "--next-steps", "0", "--eval-n", "0", "--device", "cpu", "--precision", "fp32"])
    assert rc == 0
    first, second = (load_file(str(d / "llava-proxy" / "model.safetensors")) for d in (tmp_path, again))
    tower = [k for k in first if "vision_tower." in k]
    assert tower and all(torch.equal(first[k], second[k]) for k in tower)
    assert any(not torch.equal(first[k], second[k]) for k in first if "language_model" in k)
    meta = json.loads((again / "llava-proxy" / "training.json").read_text())
    assert meta["args"]["vision_from"] == str(tmp_path / "llava-proxy") and meta["vision_stage"] is None
    emb = second["language_model.model.embed_tokens.weight"].float()
    assert abs(float(emb.std()) - 0.3) < 0.03                  # redrawn (one step of lr 6e-4 barely moves it)
    assert meta["args"]["projector_scale"] == 4.0 and meta["args"]["embed_std"] == 0.3


def test_vision_from_errors(tmp_path, capsys):
    from evals.proxy.train import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--vision-from", str(tmp_path), "--vision-steps", "2"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--embed-std", "-1"])
    assert "--embed-std -1.0 is negative" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--projector-scale", "-2"])
    assert "--projector-scale -2.0 is not positive" in capsys.readouterr().err
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:   # refused before anything is built
        main(["--out", str(tmp_path / "run"), "--vision-from", str(tmp_path / "nowhere"), "--steps", "1",
              "--eval-n", "0", "--next-steps", "0", "--device", "cpu"])
    assert e.value.code == 2 and "nowhere' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):   # a folder, but not a saved model
        main(["--out", str(tmp_path / "run"), "--vision-from", str(tmp_path), "--steps", "1", "--eval-n", "0",
              "--next-steps", "0", "--device", "cpu"])


def test_sincos_positions_are_local():
    from evals.proxy.model import build_model
    from evals.proxy.train import sincos_positions

    model = build_model("llava", seed=0)
    sincos_positions(model)
    tower = model.model.vision_tower
    w = getattr(tower, "vision_model", tower).embeddings.position_embedding.weight.detach()
    assert torch.count_nonzero(w[0]) == 0 and w.shape[0] == 577
    grid = w[1:].reshape(24, 24, -1)
    near = torch.cosine_similarity(grid[10, 10], grid[10, 11], dim=0)
    far = torch.cosine_similarity(grid[10, 10], grid[10, 20], dim=0)
    below = torch.cosine_similarity(grid[10, 10], grid[20, 10], dim=0)
    assert near > far and near > below, (near, far, below)
    assert torch.unique(grid.reshape(576, -1), dim=0).shape[0] == 576     # every patch has its own code


def test_precision_choice():
    from evals.proxy.train import native_bf16, use_bf16

    cpu = torch.device("cpu")
    assert use_bf16("fp32", cpu) is False and use_bf16("bf16", cpu) is True
    assert use_bf16("auto", cpu) == native_bf16(cpu)
    with pytest.raises(ValueError, match="'auto', 'bf16' or 'fp32'"):
        use_bf16("half", cpu)
