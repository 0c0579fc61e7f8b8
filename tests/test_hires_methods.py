"""HiRED and GlobalCom2: hand-computed allocations, constructed attention maps, eager references, generate, batches."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlprune
from conftest import HOSTS, build_host, inputs_for
from test_generate import _generate, _pre_llm_reference
from vlprune.adapters import find_adapter
from vlprune.methods.base import TOKEN_NEWLINE, TOKEN_PATCH, ImageTokens
from vlprune.methods.globalcom2 import GlobalCom2, crop_ratios, crop_scores, global_scores
from vlprune.methods.hired import HiRED, allocate, region_scores

N_NEW = 6


# --------------------------------------------------------------------------------------------- hand-computed
def _left_half_map():
    m = torch.zeros(4, 4)
    m[:, :2] = 1.0  # all mass in the left two columns
    return m


@pytest.mark.parametrize("tiles, spatial, stripes", [
    # 1x2: spatial = left/right halves; stripes = top two rows / bottom two rows of the raster list
    ((1, 2), [8.0, 0.0], [4.0, 4.0]),
    # 2x1: one column, both mappings read top/bottom halves
    ((2, 1), [4.0, 4.0], [4.0, 4.0]),
    # 2x2: spatial = quadrants; stripes = one thumbnail row each, with 2 of the top-8 tokens in every row
    ((2, 2), [4.0, 0.0, 4.0, 0.0], [2.0, 2.0, 2.0, 2.0]),
])
def test_region_scores_spatial_and_raster_stripes(tiles, spatial, stripes):
    m = _left_half_map()
    assert region_scores(m, tiles, "spatial").tolist() == spatial
    assert region_scores(m, tiles, "raster_stripes", alpha=0.5).tolist() == stripes


def test_region_scores_stripes_differ_for_a_top_heavy_map_on_1x2():
    m = torch.zeros(4, 4)
    m[:2] = 1.0  # top half
    assert region_scores(m, (1, 2), "spatial").tolist() == [4.0, 4.0]
    assert region_scores(m, (1, 2), "raster_stripes").tolist() == [8.0, 0.0]
    assert region_scores(m, (2, 1), "spatial").tolist() == [8.0, 0.0]


def test_allocate_by_hand():
    # N = floor(5 * 16 * 0.2) = 16 -> thumbnail floor(0.5 * 16) = 8, crops 8 split 4:0:4:0
    assert allocate(16, 4, 16, 0.5, torch.tensor([4.0, 0.0, 4.0, 0.0])) == (8, [4, 0, 4, 0])
    assert allocate(16, 4, 16, 0.5, torch.tensor([2.0, 2.0, 2.0, 2.0])) == (8, [2, 2, 2, 2])
    # shares are floored: 7 * 1/3 = 2.33 -> 2 each, one token lost
    assert allocate(15, 3, 16, 0.5, torch.tensor([1.0, 1.0, 1.0])) == (7, [2, 2, 2])
    # the thumbnail is capped at P and crops at P: N = 40, P = 16 -> 16 + min(24, 32) = 24 -> [24 -> 16, 0]
    assert allocate(40, 2, 16, 0.5, torch.tensor([1.0, 0.0])) == (16, [16, 0])
    # alpha = 1 gives everything to the thumbnail (the official code default)
    assert allocate(16, 4, 16, 1.0, torch.tensor([1.0, 1.0, 1.0, 1.0])) == (16, [0, 0, 0, 0])


def test_crop_ratios_by_hand_and_mean_is_r():
    s = torch.tensor([10 * math.log(2), 0.0, 0.0, 0.0])  # softmax(s / 10) = [2, 1, 1, 1] / 5
    r = crop_ratios(s, 0.3, 10.0)
    torch.testing.assert_close(r, torch.tensor([0.3 * 1.15, 0.3 * 0.95, 0.3 * 0.95, 0.3 * 0.95], dtype=r.dtype))
    assert abs(float(r.mean()) - 0.3) < 1e-12
    for n in (2, 3, 6):
        rr = crop_ratios(torch.randn(n) * 50, 0.25)
        assert abs(float(rr.mean()) - 0.25) < 1e-12
        assert float(rr.min()) >= 0.25 * (1 - 1 / n) - 1e-12 and float(rr.max()) <= 0.25 * (2 - 1 / n) + 1e-12
    # clipped at 1: the mean falls below R
    rc = crop_ratios(torch.tensor([1000.0, 0.0]), 0.9)
    assert rc.tolist() == [1.0, pytest.approx(0.9 * 0.5)]


def test_crop_scores_mapping_by_hand():
    m = torch.arange(16.0).reshape(4, 4)
    # 2x2: quadrants
    assert crop_scores(m, (2, 2)).tolist() == [0 + 1 + 4 + 5, 2 + 3 + 6 + 7, 8 + 9 + 12 + 13, 10 + 11 + 14 + 15]
    # 3 rows on 4: row index min(i // 1, 2) -> rows 0, 1, 2, 2
    assert crop_scores(m, (3, 1)).tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9 + 10 + 11 + 12 + 13 + 14 + 15]


def test_global_scores_bilinear_by_hand():
    m = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    r4 = torch.tensor([0.0, 0.25, 0.75, 1.0])  # align_corners=False sample points, clamped at the edges
    torch.testing.assert_close(global_scores(m, (4, 4)), 2 * r4[:, None] + r4[None, :])
    r3 = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(global_scores(m, (3, 4)), 2 * r3[:, None] + r4[None, :])


# --------------------------------------------------------------------------------------------- constructed maps
def _constructed(hw, logits_by_layer, n_heads=2):
    """ImageTokens over the tiny LLaVA-NeXT layout of an image of size hw=(height, width), whose ViT logits per
    layer are given as (n_crops, S) tensors (the same for every head)."""
    model, _ = build_host("llava_next")
    lay = find_adapter(model).layouts(1, torch.tensor([hw]))[0]
    feats = torch.arange(lay.n, dtype=torch.float32)[:, None].repeat(1, 4)

    def vision(layer):
        return logits_by_layer[layer][:, None, :].expand(-1, n_heads, -1)

    return ImageTokens(features=feats, layout=lay, sample=0, index=0, _vision=vision, n_vision_layers=4,
                       feature_layer=2), lay


def _counts(lay, keep):
    return lay.partition_counts(keep)


def test_hired_on_a_constructed_2x2_map():
    n_crops, s = 5, 577
    alloc = torch.zeros(n_crops, s)
    grid = alloc[0, 1:].reshape(24, 24)
    grid[:, 12:] = -1e4  # thumbnail attention only on its left half: crops (0,0) and (1,0) get everything
    ramp = torch.zeros(n_crops, s)
    ramp[:, 1:] = torch.arange(576.0) / 576  # selection: higher ViT index = higher attention
    img, lay = _constructed((672, 672), {0: alloc, 2: ramp})
    assert lay.tiles == (2, 2)
    for allocation, expected in [("spatial", [144, 0, 144, 0]), ("raster_stripes", [72, 72, 72, 72])]:
        m = HiRED(keep_ratio=0.2, allocation=allocation, newlines="keep")
        m.vision_layers(4, 2)
        sel = m.select(img)
        got = _counts(lay, sel.keep)
        assert got == {"base": 288, "crop1": expected[0], "crop2": expected[1], "crop3": expected[2],
                       "crop4": expected[3], "newline": 48}, allocation
        # inside each partition: the top ViT indices (bottom rows), by construction of the ramp
        for c, n in zip(range(5), [288] + expected):
            vit = lay.vit_index[sel.keep][(lay.crop[sel.keep] == c) & (lay.kind[sel.keep] == TOKEN_PATCH)]
            assert sorted(vit.tolist()) == list(range(577 - n, 577))
    drop = HiRED(keep_ratio=0.2, selection_layer=2)  # default newlines, as the official code: none, at most N = 576
    drop.vision_layers(4, 2)
    sel = drop.select(img)
    assert _counts(lay, sel.keep) == {"base": 288, "crop1": 144, "crop2": 0, "crop3": 144, "crop4": 0, "newline": 0}
    assert sel.budget == 576
    count = HiRED(keep_ratio=0.2, selection_layer=2, newlines="count")  # the 48 newline tokens inside N: 528 patches
    count.vision_layers(4, 2)
    sel = count.select(img)
    got = _counts(lay, sel.keep)
    assert got["newline"] == 48 and sel.keep.numel() == 576 and got["base"] == 264


def test_globalcom2_on_a_constructed_2x2_map():
    n_crops, s = 5, 577
    last = torch.randn(n_crops, s, generator=torch.Generator().manual_seed(0))
    thumb = torch.zeros(24, 24)
    thumb[:12, :12] = 10 * math.log(2) / 144  # crop scores [10 ln 2, 0, 0, 0] -> softmax/10 = [2, 1, 1, 1] / 5
    last[0, 1:] = thumb.reshape(-1)
    img, lay = _constructed((672, 672), {3: last})
    m = GlobalCom2(keep_ratio=0.3, newlines="keep")
    m.vision_layers(4, 2)
    sel = m.select(img)
    got = _counts(lay, sel.keep)
    n1, n_other = math.floor(576 * 0.3 * 1.15), math.floor(576 * 0.3 * 0.95)  # 198, 164
    assert got == {"base": math.floor(576 * 0.3), "crop1": n1, "crop2": n_other, "crop3": n_other,
                   "crop4": n_other, "newline": 48}
    # holistic scores by hand on the 48x48 crop grid: local logits + interpolated thumbnail, L2-normalised per crop
    glob = F.interpolate(thumb[None, None], size=(48, 48), mode="bilinear", align_corners=False)[0, 0]
    kept = sel.keep
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)], start=1):
        local = last[k, 1:]
        g = glob[24 * r:24 * r + 24, 24 * c:24 * c + 24].reshape(-1)
        h = local / local.norm() + g / g.norm()
        n = n1 if k == 1 else n_other
        want = set((torch.topk(h, n).indices + 1).tolist())
        vit = lay.vit_index[kept][(lay.crop[kept] == k) & (lay.kind[kept] == TOKEN_PATCH)]
        assert set(vit.tolist()) == want
    # the thumbnail: its top floor(576 R) = 172 logits: the 144 of the raised block, then ties by lowest index
    tvit = lay.vit_index[kept][(lay.crop[kept] == 0)]
    want = torch.sort(thumb.reshape(-1), descending=True, stable=True).indices[:172] + 1
    assert set(tvit.tolist()) == set(want.tolist())


# --------------------------------------------------------------------------------------------- eager references
def _eager_cls_logits(host, inputs, layer):
    """CLS-row logits (crops, H, S) of ViT layer ``layer`` recomputed by hand from the eager tower's hidden states."""
    from test_seams import _crops

    model, _ = build_host(host, attn="eager")
    pv = inputs["pixel_values"] if host == "llava" else _crops(model, inputs)
    vt = model.model.vision_tower
    with torch.no_grad():
        hs = vt(pv, output_hidden_states=True).hidden_states[layer]  # input of layer ``layer``
        lyr = vt.encoder.layers[layer]
        x = lyr.layer_norm1(hs)
        q, k = lyr.self_attn.q_proj(x), lyr.self_attn.k_proj(x)
    nh = model.config.vision_config.num_attention_heads
    b, s, d = k.shape
    q = q[:, 0].reshape(b, nh, d // nh)
    k = k.reshape(b, s, nh, d // nh)
    return torch.einsum("bhd,bshd->bhs", q, k) * (d // nh) ** -0.5


def test_hired_llava15_is_topk_of_feature_layer_attention(hosts):
    model, proc = hosts["llava"]
    inputs = inputs_for("llava", proc)
    with vlprune.pruned(model, "hired", keep_ratio=0.2):
        with torch.no_grad():
            model(**inputs)
        st = vlprune.stats(model)
    attn = torch.softmax(_eager_cls_logits("llava", inputs, 2), -1).sum(1)[0, 1:]  # heads summed, (576,)
    assert st["images"][0]["kept"] == 115 == math.floor(576 * 0.2)
    assert set(st["images"][0]["kept_indices"].tolist()) == set(torch.topk(attn, 115).indices.tolist())


@pytest.mark.parametrize("allocation", ["spatial", "raster_stripes"])
def test_hired_anyres_against_eager_attention(hosts, allocation):
    model, proc = hosts["llava_next"]
    inputs = inputs_for("llava_next", proc, sizes=[(640, 480)])
    with vlprune.pruned(model, "hired", keep_ratio=0.2, allocation=allocation):
        with torch.no_grad():
            model(**inputs)
        st = vlprune.stats(model)
    lay = find_adapter(model).layouts(1, inputs["image_sizes"])[0]
    a0 = torch.softmax(_eager_cls_logits("llava_next", inputs, 0), -1).sum(1)[:, 1:]  # (crops, 576)
    a2 = torch.softmax(_eager_cls_logits("llava_next", inputs, 2), -1).sum(1)[:, 1:]
    n_budget = math.floor(lay.n_crops * 576 * 0.2)
    n_base, n_crop = allocate(n_budget, lay.n_crops - 1, 576, 0.5,
                              region_scores(a0[0].reshape(24, 24), lay.tiles, allocation))
    kept = st["images"][0]["kept_indices"]
    want = {"base": n_base, **{f"crop{i}": n for i, n in enumerate(n_crop, 1)}, "newline": 0}  # dropped (default)
    assert st["images"][0]["kept_per_partition"] == want
    for c in range(lay.n_crops):
        toks = ((lay.kind == TOKEN_PATCH) & (lay.crop == c)).nonzero().squeeze(1)
        n = n_base if c == 0 else min(n_crop[c - 1], toks.numel())
        scores = a2[c][lay.vit_index[toks] - 1]
        assert set(toks[torch.topk(scores, n).indices].tolist()) == set(kept[lay.crop[kept] == c].tolist())


def test_globalcom2_anyres_against_eager_logits(hosts):
    model, proc = hosts["llava_next"]
    inputs = inputs_for("llava_next", proc, sizes=[(640, 480)])
    with vlprune.pruned(model, "globalcom2", keep_ratio=0.25, newlines="keep"):  # newlines on top: R as given
        with torch.no_grad():
            model(**inputs)
        st = vlprune.stats(model)
    lay = find_adapter(model).layouts(1, inputs["image_sizes"])[0]
    lg = _eager_cls_logits("llava_next", inputs, 3).mean(1)[:, 1:]  # (crops, 576) head mean
    kept = st["images"][0]["kept_indices"]
    assert set(kept[lay.crop[kept] == 0].tolist()) == set(torch.topk(lg[0], 144).indices.tolist())
    ratios = crop_ratios(crop_scores(lg[0].reshape(24, 24), lay.tiles), 0.25)
    got = st["images"][0]["kept_per_partition"]
    for c in range(1, lay.n_crops):
        n_valid = int(((lay.kind == TOKEN_PATCH) & (lay.crop == c)).sum())
        assert got[f"crop{c}"] == math.floor(n_valid * float(ratios[c - 1]) + 1e-9)
    assert got["newline"] == int((lay.kind == TOKEN_NEWLINE).sum())


# --------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("name", ["hired", "globalcom2", "todre"])
def test_budgets_mean_what_they_say(hosts, name):
    """On LLaVA-NeXT a budget counts every visual token the image keeps, newline tokens included (or they are
    dropped), so no image keeps more than its budget ("up to N"); a budget at or above its tokens keeps all."""
    model, proc = hosts["llava_next"]
    inputs = inputs_for("llava_next", proc, sizes=[(640, 480)])
    kw = {"tau": 0.0} if name == "todre" else {}

    def run(**budget):
        with vlprune.pruned(model, name, **budget, **kw):
            with torch.no_grad():
                model(**inputs)
            return vlprune.stats(model)["images"][0]

    full = run(keep=10**6)
    n, n_patch = full["visual_tokens"], full["visual_tokens"] - full["partitions"]["newline"]
    assert full["kept"] == n
    for budget, up_to in [({"keep": 64}, 64), ({"keep_ratio": 0.1}, math.floor(0.1 * n_patch + 0.5)),
                          ({"keep": n - 1}, n - 1)]:
        im = run(**budget)
        if name == "hired" and "keep_ratio" in budget:
            up_to = math.floor(5 * 576 * 0.1)  # HiRED's N = floor(views * 576 * rate)
        assert im["budget"] == up_to, budget
        assert im["kept"] <= up_to, (budget, im["kept"], up_to)
        if up_to < n_patch // 2:  # small budgets are spent (GlobalCom2's per-crop ratios, clipped at 1, and
            assert im["kept"] >= up_to - 8, (budget, im["kept"], up_to)  # HiRED's dropped newlines lose some)
    assert run(keep=n)["kept"] == n and run(keep_ratio=1.0)["kept"] == n


# --------------------------------------------------------------------------------------------- generate, batches
SPECS = [("hired", {"keep_ratio": 0.1}), ("hired", {"keep_ratio": 0.4, "allocation": "raster_stripes", "newlines": "drop"}),
         ("globalcom2", {"keep_ratio": 0.1}), ("globalcom2", {"keep_ratio": 0.25, "thumbnail_order": "score"})]


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("spec", SPECS)
def test_generate_matches_no_cache_reference(hosts, host, spec):
    name, kw = spec
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    with vlprune.pruned(model, name, **kw):
        toks, _ = _generate(model, inputs, n=N_NEW)
        st = vlprune.stats(model)
    info = st["images"][0]
    assert info["kept"] < info["visual_tokens"]
    assert sum(info["kept_per_partition"].values()) == info["kept"]
    assert st["visual_per_layer"][0] == [info["kept"]] * model.config.text_config.num_hidden_layers
    override = None
    if kw.get("thumbnail_order") == "score":  # the thumbnail's slots carry its kept tokens in score order
        override = [_score_ordered(model, inputs, info, host)]
    ref = _pre_llm_reference(model, inputs, st, N_NEW, feats_override=override)
    assert torch.equal(toks, ref)


def _score_ordered(model, inputs, info, host):
    from conftest import merged_embeddings

    emb = merged_embeddings(model, inputs)[0]
    span = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    lay = find_adapter(model).layouts(1, inputs.get("image_sizes"))[0]
    kept = info["kept_indices"]
    feats = emb[span[kept]].clone()
    thumb = kept[lay.crop[kept] == 0]
    lg = _eager_cls_logits(host, inputs, 3).mean(1)[0, 1:]
    order = thumb[torch.argsort(lg[lay.vit_index[thumb] - 1], descending=True)]
    feats[: thumb.numel()] = emb[span[order]]
    return feats


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("spec", [("hired", {"keep_ratio": 0.2}), ("globalcom2", {"keep_ratio": 0.25})])
def test_batch_of_different_grids_matches_batch_of_one(hosts, host, spec):
    name, kw = spec
    model, proc = hosts[host]
    sizes = [(640, 480), (300, 900)] if host == "llava_next" else None
    batch = inputs_for(host, proc, n=2, sizes=sizes)
    with vlprune.pruned(model, name, **kw):
        toks, _ = _generate(model, batch, n=N_NEW)
        st = vlprune.stats(model)
        singles = []
        for b in range(2):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            n_pad = int((one["attention_mask"][0] == 0).sum())
            one = {k: (v[:, n_pad:] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}
            singles.append((_generate(model, one, n=N_NEW)[0], vlprune.stats(model)["images"][0]))
    for b in range(2):
        single = singles[b][0][0]  # stops at EOS; the batch row goes on with padding after it
        assert torch.equal(toks[b][:single.numel()], single)
        assert set(toks[b][single.numel():].tolist()) <= {model.generation_config.pad_token_id,
                                                          model.generation_config.eos_token_id}
        assert torch.equal(st["images"][b]["kept_indices"], singles[b][1]["kept_indices"])
    if host == "llava_next":
        assert st["images"][0]["visual_tokens"] != st["images"][1]["visual_tokens"]  # different grids


def test_sdpa_stays_in_the_vision_tower(hosts):
    model, proc = hosts["llava_next"]
    with vlprune.pruned(model, "globalcom2"):
        assert model.config.vision_config._attn_implementation == "sdpa"
        with vlprune.pruned(model, "hired"):
            assert model.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name, kwargs, match", [
    ("hired", {"alpha": 1.5}, "alpha"),
    ("hired", {"allocation": "stripes"}, "raster_stripes"),
    ("hired", {"newlines": "none"}, "newlines"),
    ("hired", {"selection_layer": 30}, "outside the vision tower"),
    ("globalcom2", {"temperature": 0}, "temperature"),
    ("globalcom2", {"thumbnail_order": "desc"}, "thumbnail_order"),
    ("globalcom2", {"layer": -9}, "outside the vision tower"),
    ("globalcom2", {"keep_ratio": 1.5}, "keep_ratio"),
])
def test_bad_hyperparameters_raise(hosts, name, kwargs, match):
    model, _ = hosts["llava"]
    with pytest.raises(ValueError, match=match):
        vlprune.apply(model, name, **kwargs)
    assert not vlprune.is_applied(model)


def test_defaults_are_the_papers():
    h, g = HiRED(), GlobalCom2()
    assert (h.keep_ratio, h.alpha, h.allocation_layer, h.allocation, h.newlines) == (0.2, 0.5, 0, "spatial", "drop")
    assert GlobalCom2().newlines == "count" and vlprune.get_method("todre").newlines == "count"
    assert (g.keep_ratio, g.temperature, g.layer, g.thumbnail_order) == (0.25, 10.0, -1, "raster")
