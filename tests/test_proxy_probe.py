"""The vision-tower probe: it reads what features carry, per attribute, and runs on the shipped proxy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evals.proxy import PATHS
from evals.proxy.probe import patch_targets as _labels
from evals.proxy.probe import probe, probe_features, scene_batch
from evals.proxy.scenes import COMBOS, N_PATCH_CLASSES

TRAIN, EVAL = scene_batch("train", 7_000_000, 96), scene_batch("validation", 0, 12)


def test_features_that_hold_the_patch_class_are_read_exactly():
    def oracle(scenes):
        return F.one_hot(_labels(scenes), N_PATCH_CLASSES).float()

    r = probe_features(oracle, TRAIN, EVAL, epochs=30, lr=3e-2)
    assert r["patches"]["object"] > 100 and r["patches"]["digit"] > 5
    for k in ("background", "object", "colour", "shape", "digit", "sign"):
        assert r[k] > 0.97, (k, r)


def test_colour_only_features_leave_shape_at_chance():
    n_obj = len(COMBOS)

    def colour_only(scenes):               # object patches keep their colour, lose their shape
        lab = _labels(scenes)
        col = torch.where((lab >= 1) & (lab <= n_obj), 1 + (lab - 1) // 5, lab)
        return F.one_hot(col, N_PATCH_CLASSES).float()

    r = probe_features(colour_only, TRAIN, EVAL, epochs=30, lr=3e-2)
    assert r["colour"] > 0.97 and r["digit"] > 0.97, r
    assert r["shape"] < 0.5, r             # five shapes: the best guess per colour is the commonest one
    assert r["object"] < 0.5, r


def test_mismatched_features_are_refused():
    with pytest.raises(ValueError, match="patch grid"):
        probe_features(lambda s: torch.zeros(len(s), 10, 8), TRAIN[:2], EVAL[:1], epochs=1)


@pytest.mark.skipif(not (PATHS["llava"] / "model.safetensors").exists(), reason="no shipped proxy weights here")
def test_probe_of_the_shipped_tower():
    from evals.proxy import load

    model, proc = load()
    r = probe(model, proc, n_train=24, n_eval=8, epochs=6)
    assert r["train_scenes"] == 24 and r["eval_scenes"] == 8
    assert r["background"] > 0.9 and r["colour"] > 0.7, r


def test_card_shows_the_probe_and_the_stages_that_ran():
    from evals.proxy.report import card

    fam = {f: 50.0 for f in ("existence", "attribute", "counting", "spatial", "text", "fine")}
    res = {"overall": 50.0, "families": fam, "counts": {f: 10 for f in fam}}
    probe_r = {"background": 0.97, "object": 0.2, "colour": 0.998, "shape": 0.195, "shape_outline": 0.2,
               "shape_inner": 0.16, "digit": 0.041, "sign": 0.63, "train_scenes": 256, "eval_scenes": 64}
    report = {"vocab_size": 154, "test": res, "random64": res, "fresh": res, "probe": probe_r}
    staged = {"command": "python -m evals.proxy.train --vision-steps 100", "stage": "A", "seconds": 1200,
              "args": {"seed": 0, "vision_steps": 100, "vision_batch_size": 96, "crop": [6, 24], "teacher_steps": 40,
                       "freeze_vision": True, "turns": 16},
              "vision_stage": {"seconds": 600.0, "history": []}, "history": []}
    text = card("llava", staged, report)
    assert ("Stage 0 trains the vision tower alone (100 steps, 96 crops of 6x6 patches or as many tokens of crops "
            "of 6x6 / 24x24 patches in turn, 24x24 being the whole scene; 10.0 min)") in text
    assert "CNN teacher trained first (40 steps)" in text
    assert "the projector and the decoder, the tower frozen" in text and "Stages 0 and A took 20.0 min" in text
    assert "| 97.0 | 20.0 | 99.8 | 19.5 | 20.0 | 16.0 | 4.1 | 63.0 |" in text
    joint = {"command": "python -m evals.proxy.train", "stage": "A", "seconds": 1200, "args": {"seed": 0},
             "history": []}
    text = card("llava", joint, {k: v for k, v in report.items() if k != "probe"})
    assert "Stage 0" not in text and "trains every weight jointly" in text
    assert "What the visual tokens carry" not in text
    reused = dict(joint, args={"seed": 0, "vision_from": "/runs/v2/llava-proxy", "freeze_vision": True})
    text = card("llava", reused, report)
    assert ("Stage A starts from the vision tower of the checkpoint `/runs/v2/llava-proxy` and trains the projector "
            "and the decoder, the tower frozen") in text and "Stage 0" not in text
