"""The vision-tower probe: it reads what features carry, per attribute, and runs on the shipped proxy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evals.proxy import PATHS
from evals.proxy.probe import patch_targets as _labels
from evals.proxy.probe import _scores, balanced_accuracy, main, patch_sizes, probe, probe_features, scene_batch
from evals.proxy.scenes import COMBOS, N_PATCH_CLASSES, Obj, Scene, patch_labels

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


def test_balanced_accuracy_is_the_mean_recall_over_classes():
    # class 0: 9 samples, 8 right; class 1: 1 sample, right -> (8/9 + 1) / 2; plain accuracy 9/10
    target = torch.tensor([0] * 9 + [1])
    pred = torch.tensor([0] * 8 + [1, 1])
    everything = torch.ones(10, dtype=torch.bool)
    assert balanced_accuracy(everything, pred, target, range(2)) == round((8 / 9 + 1) / 2, 4)
    assert balanced_accuracy(everything, pred, target, range(5)) == round((8 / 9 + 1) / 2, 4)  # absent: skipped
    assert balanced_accuracy(torch.zeros(10, dtype=torch.bool), pred, target, range(2)) is None


def test_scores_balance_shape_colour_and_digit_and_split_small_objects():
    red_circle, red_square, blue_circle = (1 + COMBOS.index(k) for k in
                                           (("red", "circle"), ("red", "square"), ("blue", "circle")))
    d0, d1 = len(COMBOS) + 1, len(COMBOS) + 2
    # 9 circle patches (8 red, 1 blue) all called red circle; 1 small red square called red circle
    lab = torch.tensor([red_circle] * 8 + [blue_circle] + [red_square] + [d0] * 3 + [d1] + [0])
    pred = torch.tensor([red_circle] * 10 + [d0] * 3 + [0] + [0])
    size = torch.tensor([2] * 9 + [1] + [0] * 5)
    r = _scores(pred, lab, size)
    assert r["shape"] == 0.9 and r["shape_balanced"] == 0.5            # circles 9/9, squares 0/1
    assert r["colour"] == 0.9 and r["colour_balanced"] == 0.5          # red 9/9, blue 0/1
    assert r["digit"] == 0.75 and r["digit_balanced"] == 0.5           # digit 0 3/3, digit 1 called background
    assert r["shape_small"] == 0.0 and r["shape_small_balanced"] == 0.0 and r["shape_large"] == 1.0
    assert r["patches"]["small"] == 1 and r["patches"]["large"] == 9
    # an object patch called background or a digit counts wrong in the balanced shape figure too
    r = _scores(torch.tensor([0] * 9 + [red_square] + [d0] * 5), lab, size)
    assert r["shape_balanced"] == 0.5 and r["shape_small"] == 1.0 and r["shape_large"] == 0.0
    old = _scores(pred, lab)                                           # without a size map
    assert old["shape"] == 0.9 and old["shape_small"] is None and old["shape_large"] is None
    with pytest.raises(ValueError, match="size map"):
        _scores(pred, lab, size[:3])


def test_size_map_marks_small_and_large_objects():
    small = Obj("square", "red", "small", x=3 * 14 + 7, y=5 * 14 + 7, s=14)      # on patch (row 5, col 3)
    big = Obj("circle", "blue", "large", x=16 * 14, y=16 * 14, s=40)
    medium = Obj("cross", "green", "medium", x=8 * 14, y=18 * 14, s=28)
    scene = Scene(1, 336, 336, (128, 128, 128), "plain", (small, big, medium), None)
    lab, size = patch_labels(scene), patch_sizes(scene)
    assert size.shape == lab.shape == (24, 24)
    assert lab[5, 3] == 1 + COMBOS.index(("red", "square")) and size[5, 3] == 1
    assert (size == 1).sum() == (lab == lab[5, 3]).sum()
    for o in (big, medium):
        mine = lab == 1 + COMBOS.index((o.colour, o.shape))
        assert mine.sum() > 1 and (size[mine] == 2).all()
    assert ((size == 0) == (lab == 0)).all()


def test_size_map_agrees_with_the_patch_classes_on_drawn_scenes():
    scenes = scene_batch("validation", 0, 12)
    small_patches = 0
    for sc in scenes:
        lab, size = patch_labels(sc), patch_sizes(sc)
        obj = (lab >= 1) & (lab <= len(COMBOS))
        assert ((size > 0) == obj).all()
        small_patches += int((size == 1).sum())
        if not any(o.size == "small" for o in sc.objects):
            assert not (size == 1).any()
    assert small_patches > 0


def _save_tower(path, seed=1):
    from evals.proxy.model import build_model

    model = build_model("llava", seed=seed)
    torch.save(dict(tower=model.model.vision_tower.state_dict(), record={}), path)
    return model.model.vision_tower.state_dict()


def test_cli_probes_a_stage0_tower_file_and_folder(tmp_path, capsys):
    import json

    from evals.proxy.probe import load_model

    saved = _save_tower(tmp_path / "tower.pt")
    model, proc = load_model(str(tmp_path / "tower.pt"))
    got = model.model.vision_tower.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items())
    assert proc.image_processor.crop_size["height"] == 336
    assert main(["--model", str(tmp_path / "tower.pt"), "--train", "2", "--eval", "1", "--epochs", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["train_scenes"] == 2 and {"shape_balanced", "shape_small", "shape_large"} <= set(r)
    model, _ = load_model(str(tmp_path))                                # a folder holding tower.pt
    assert torch.equal(model.model.vision_tower.state_dict()[next(iter(saved))], next(iter(saved.values())))


def test_cli_rejects_a_bad_model_path(tmp_path, capsys):
    bad = tmp_path / "no-such-tower.pt"
    assert main(["--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err
    assert "'llava'" in err and "config.json" in err and "tower.pt" in err
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "empty")]) == 2
    assert "neither config.json nor tower.pt" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_text("not a tower")
    assert main(["--model", str(tmp_path / "junk.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a stage-0 tower file" in err


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


def test_card_shows_blind_row_intervals_targets_curve_and_probe():
    from evals.proxy.report import card

    fams = ("existence", "attribute", "counting", "spatial", "text", "fine")
    fam = {f: 50.0 for f in fams}
    res = {"n": 60, "overall": 50.0, "families": fam, "counts": {f: 10 for f in fams}}
    fresh = dict(res, overall=91.0, families=dict(fam, existence=95.0))
    blind = {"overall": 27.0, "families": {f: 20.0 for f in fams}, "chance": {f: 18.0 for f in fams}, "n_train": 3000}
    probe_r = {"background": 0.97, "colour": 0.998, "shape": 0.915, "shape_balanced": 0.9, "digit": 0.041,
               "sign": 0.63, "train_scenes": 256, "eval_scenes": 64}
    report = {"vocab_size": 154, "test": res, "random64": dict(res, overall=35.0), "fresh": fresh, "probe": probe_r,
              "blind": blind}
    training = {"tower": {"steps": 100, "batch_size": 96, "sides": [6, 24], "teacher_steps": 40, "seconds": 600.0,
                          "device": "cpu"},
                "stages": [{"tokens": 64, "steps": 10, "batch_size": 4}], "cache": 50, "turns": 8,
                "existence_steps": 3, "lr": 1e-3, "steps_total": 10, "seconds": 120.0, "threads": 2, "bf16": True,
                "history": [{"step": 10, "tokens": 64, "answer": 1.25,
                             "validation": {"overall": 40.0, "families": dict(fam, text=12.5)}}]}
    text = card("llava", training, report)
    assert "100 steps of 96 crops of 6x6 / 24x24 patches" in text and "40-step CNN teacher" in text
    assert "10 steps at 64 image tokens (4 scenes per step)" in text and "bf16 autocast" in text
    # 30 of 60 right: Wilson 95% interval [37.7, 62.3], half width 12.3
    assert "| test, all 576 tokens | 50.0 ±12.3 |" in text
    assert "| blind: question only (commonest training answer per question) | 27.0 | 20.0 |" in text
    assert "| chance (uniform over the question's answers) | - | 18.0 |" in text
    assert "overall at least 80% on fresh seeds: 91.0 (met)" in text
    assert "existence at least 90%: 95.0 (met)" in text and "text at least 25 points above blind: +30.0 (met)" in text
    assert "a random 64 of 576 tokens loses at least 10 points: 15.0 (met)" in text
    assert "fresh seeds within 3 points of the test split: 41.0 (not met)" in text
    assert "| 10 | 64 | 1.250 | 40.0 | 50.0 | 50.0 | 50.0 | 50.0 | 12.5 | 50.0 |" in text
    assert "| 97.0 | 99.8 | 91.5 | 90.0 | 4.1 | 63.0 |" in text
    text = card("llava", training, {k: v for k, v in report.items() if k not in ("probe", "blind")})
    assert "What the visual tokens carry" not in text and "blind:" not in text