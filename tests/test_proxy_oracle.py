"""The oracle-feature diagnostic (evals.proxy.oracle): the projector reads true patch classes, not the tower."""
import pytest
import torch

from evals.proxy import model as pm
from evals.proxy.evaluate import samples
from evals.proxy.oracle import OracleFeatures, class_separation, main
from evals.proxy.train import redraw_embeddings, scale_projector
from evals.proxy.scenes import patch_labels, render


def _inputs(proc, scenes):
    return proc(images=[render(s) for s in scenes], text=[pm.prompt("how many objects are there ?")] * len(scenes),
                return_tensors="pt", padding=True)


def test_oracle_replaces_the_tower_features():
    model = pm.build_model("llava", seed=0).eval()
    proc = pm.build_processor("llava")
    a, b = [s.scene for s in samples("validation", 2)]
    labels_a = torch.from_numpy(patch_labels(a).reshape(1, -1))
    with torch.no_grad():
        plain_a = model(**_inputs(proc, [a])).logits
        oracle = OracleFeatures(model)
        oracle.set(labels_a)
        with_a = model(**_inputs(proc, [a])).logits
        b_pixels_a_labels = model(**_inputs(proc, [b])).logits        # another image, the same labels
        oracle.set(torch.from_numpy(patch_labels(b).reshape(1, -1)))
        with_b = model(**_inputs(proc, [b])).logits
        oracle.remove()
        again = model(**_inputs(proc, [a])).logits
    assert not torch.allclose(plain_a, with_a, atol=1e-4)                # the tower's features no longer reach it
    torch.testing.assert_close(with_a, b_pixels_a_labels)               # pixels do not matter, labels do
    assert not torch.allclose(with_a, with_b, atol=1e-4)
    torch.testing.assert_close(again, plain_a)                          # remove() restores the model
    # the features are the documented map of one-hot class and sin-cos position
    f = oracle.features(labels_a)
    assert f.shape == (1, 576, 192)
    onehot = torch.nn.functional.one_hot(labels_a.long(), 42).float() * 2
    torch.testing.assert_close(f, torch.cat([onehot, oracle.positions[None]], -1) @ oracle.map)


def test_oracle_errors_name_the_problem():
    model = pm.build_model("llava", seed=0).eval()
    proc = pm.build_processor("llava")
    scene = samples("validation", 1)[0].scene
    oracle = OracleFeatures(model)
    with pytest.raises(RuntimeError, match="no patch labels"):
        model(**_inputs(proc, [scene]))
    oracle.set(torch.zeros(2, 576, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels \(2, 576\) do not match"):
        model(**_inputs(proc, [scene]))
    with pytest.raises(ValueError, match="must be positive"):
        redraw_embeddings(model, 0.0)


def test_redraw_embeddings_sets_their_scale():
    model = pm.build_model("llava", seed=0)
    w = model.model.language_model.embed_tokens.weight
    assert float(w.detach().std()) < 0.05
    redraw_embeddings(model, 0.5)
    assert abs(float(w.detach().std()) - 0.5) < 0.02


def test_scale_projector_scales_the_image_tokens():
    model = pm.build_model("llava", seed=0).eval()
    x = torch.randn(1, 5, 192)
    with torch.no_grad():
        before = model.model.multi_modal_projector(x)
        scale_projector(model, 3.0)
        after = model.model.multi_modal_projector(x)
    torch.testing.assert_close(after, 3 * before)
    with pytest.raises(ValueError, match="must be positive"):
        scale_projector(model, 0.0)


def test_class_separation_reads_the_decoder_states():
    model = pm.build_model("llava", seed=0)
    proc = pm.build_processor("llava")
    oracle = OracleFeatures(model)
    sep = class_separation(model, proc, oracle, n=2)
    n = pm.TEXT["num_hidden_layers"]
    assert list(sep) == list(range(n + 1))              # the embeddings and each layer's output
    assert sep[0] > 80 and model.training               # the oracle's one-hot classes separate; mode restored
    with torch.no_grad():                               # a projector that writes one vector for every patch
        model.model.multi_modal_projector.linear_2.weight.zero_()
    assert class_separation(model, proc, oracle, n=2)[0] < 50


def test_one_step_of_oracle_training_runs(tmp_path, capsys):
    assert main(["--steps", "1", "--batch-size", "1", "--turns", "2", "--eval-n", "0", "--embed-std", "0.1",
                 "--projector-scale", "2", "--log", str(tmp_path / "log")]) == 0
    lines = (tmp_path / "log").read_text().splitlines()
    assert '"embed_std": 0.1' in lines[0] and '"projector_scale": 2.0' in lines[0]
    assert '"step": 1' in lines[-1] and '"lm"' in lines[-1]
    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    assert "--steps: '0' must be a whole number of at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--embed-std", "-1"])
    assert "--embed-std -1.0 is negative" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--projector-scale", "0"])
    assert "--projector-scale 0.0 is not positive" in capsys.readouterr().err
