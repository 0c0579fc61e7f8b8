"""Stage 0 of the proxy recipe (evals.proxy.pretrain): crops, the crop forward, mimetic init, the CNN teacher."""
import numpy as np
import pytest
import torch

from evals.proxy import model as pm
from evals.proxy.pretrain import (PatchCNN, crop_batch, crop_scene, crop_tokens, mimetic_init, train_teacher,
                                  train_vision)
from evals.proxy.scenes import make_scene, patch_labels, render, split_seed


def _tiny_llava():
    torch.manual_seed(0)
    return pm.build_model("llava", seed=0)


def test_crops_are_windows_of_the_processed_scene_holding_their_item():
    scene = make_scene(split_seed("train", 5), need_sign=True, need_small=True)
    proc = pm.build_processor("llava")
    full = proc.image_processor([render(scene)], return_tensors="pt")["pixel_values"][0].numpy()
    labels = patch_labels(scene)
    crops = crop_scene(scene, np.random.default_rng(0), side=6, per_scene=10)
    items = [scene.sign] + list(scene.objects)
    assert len(crops) == min(10, len(items))
    for (px, lab, pos), item in zip(crops, items):
        r0, c0 = divmod(int(pos[0]), 24)
        assert np.array_equal(pos.reshape(6, 6), np.arange(r0, r0 + 6)[:, None] * 24 + np.arange(c0, c0 + 6))
        # the processor's own output at that window: an independent path from resize/rescale/normalise
        np.testing.assert_allclose(px, full[:, r0 * 14:(r0 + 6) * 14, c0 * 14:(c0 + 6) * 14], atol=1e-5)
        assert np.array_equal(lab, labels[r0:r0 + 6, c0:c0 + 6].reshape(-1))
        x0, y0, x1, y1 = item.box
        for lo, hi, start in ((x0, x1, c0), (y0, y1, r0)):
            if np.ceil((hi - 84) / 14) <= np.floor(lo / 14):  # some aligned 84 px window holds the item: this one
                assert start * 14 <= lo and hi <= (start + 6) * 14
            else:                                            # none does (a large object): the window is inside it
                assert lo - 14 < start * 14 and (start + 6) * 14 < hi + 14


def test_crop_batch_is_a_pure_function_of_seed_and_step():
    a, b, c = crop_batch(9, 0, 3), crop_batch(9, 0, 3), crop_batch(9, 0, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    assert a["pixel_values"].shape == (9, 3, 84, 84) and a["positions"].shape == (9, 36)
    # present: exactly the object classes among the crop's patch labels
    for lab, pres in zip(a["patch_labels"], a["present"]):
        kinds = {int(x) - 1 for x in lab if 1 <= x <= 30}
        assert set(torch.nonzero(pres).flatten().tolist()) == kinds


def test_crop_sizes_are_checked():
    scene = make_scene(1)
    with pytest.raises(ValueError, match="side 25"):
        crop_scene(scene, np.random.default_rng(0), side=25)
    with pytest.raises(ValueError, match="336x336"):
        crop_scene(make_scene(1, "next"), np.random.default_rng(0))


def test_crop_tokens_on_the_whole_image_equal_the_tower_forward():
    model = _tiny_llava().eval()
    tower = model.model.vision_tower
    px = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        ref = tower(px, output_hidden_states=True).hidden_states
        ours = crop_tokens(tower, px, torch.arange(576)[None].expand(2, -1))
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        crop_tokens(tower, px[:, :, :84, :84], torch.arange(35)[None])


def test_crop_tokens_use_the_positions_of_the_window():
    model = _tiny_llava().eval()
    tower = model.model.vision_tower
    px = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        a = crop_tokens(tower, px, torch.arange(36)[None], layers=0)[0]
        shifted = (torch.arange(6)[:, None] * 24 + torch.arange(6) + 5 * 24 + 7).reshape(1, -1)
        b = crop_tokens(tower, px, shifted, layers=0)[0]
        emb = tower.embeddings
        manual = emb.patch_embedding(px).flatten(2).transpose(1, 2) + emb.position_embedding.weight[1 + shifted[0]]
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b[0, 1:], tower.pre_layrnorm(torch.cat([emb.class_embedding[None] +
                                                                       emb.position_embedding.weight[:1], manual[0]]))[1:])


def test_mimetic_init_sets_the_attention_products():
    model = _tiny_llava()
    tower = model.model.vision_tower
    mimetic_init(tower, seed=0, qk=0.7, vo=0.4)
    for layer in tower.encoder.layers:
        at = layer.self_attn
        hd = at.q_proj.weight.shape[0] // at.num_heads
        for h in range(at.num_heads):
            wq, wk = at.q_proj.weight[h * hd:(h + 1) * hd], at.k_proj.weight[h * hd:(h + 1) * hd]
            prod = wq.T @ wk                              # q.k = x^T (W_q^T W_k) x'
            assert float(prod.diagonal().mean()) > 0.1    # a rank-32 part of 0.7 I + noise: diagonal positive
        vo = at.v_proj.weight.T @ at.out_proj.weight.T   # exact (full rank): 0.4 Z - 0.4 I
        assert abs(float(vo.diagonal().mean()) + 0.4) < 0.05


def test_teacher_and_vision_stage_run_and_distill():
    torch.manual_seed(0)
    teacher = train_teacher(2, 4, seed=0, device=torch.device("cpu"))
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher(torch.zeros(1, 3, 84, 84)).shape == (1, 36, 192)
    model = _tiny_llava()
    from evals.proxy.train import AuxHeads

    before = model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.clone()
    logs = []
    hist = train_vision(model, pm.build_processor("llava"), AuxHeads(192), 2, 4, 1e-3, 0, torch.device("cpu"),
                        logs.append, eval_every=2, teacher=teacher)
    assert hist[-1]["step"] == 2 and "distill" in hist[-1] and "shape" in hist[-1]["patches"]
    assert not torch.equal(before, model.model.vision_tower.encoder.layers[0].mlp.fc1.weight)


def test_teacher_learns_patch_classes_of_held_out_crops():
    """Ten teacher steps lower the patch-class loss on crops it never saw (another seed) well below that of the
    same network untrained."""
    import torch.nn.functional as F

    held = crop_batch(32, 12345, 0, 6)

    def loss(net):
        with torch.no_grad():
            logits = net.head(net(held["pixel_values"]))
        return float(F.cross_entropy(logits.flatten(0, 1), held["patch_labels"].flatten()))

    torch.manual_seed(0)
    fresh = PatchCNN()                               # train_teacher's own starting weights (same seed)
    trained = train_teacher(10, 8, seed=0, device=torch.device("cpu"))
    assert loss(trained) < 0.8 * loss(fresh)
