"""MustDrop: window similarity and merging by hand and against a hand-run vision tower, the key set, the dual
threshold rule, the KV cut, generate with the decode-stage policy against a no-cache reference, batches."""
from __future__ import annotations

import math

import pytest
import torch

import vlprune
from conftest import HOSTS, greedy_reference, inputs_for, renumbered
from test_generate import _generate
from vlprune.methods.base import CacheContext, LayerContext
from vlprune.methods.mustdrop import (PRESETS, MustDropFilter, OutputAwareCache, dual_threshold_keep,
                                      scale_score_layers)
from vlprune.ops import merge_tokens, window_merge_plan, window_similarity

N_NEW = 5


# --------------------------------------------------------------------------------------------- by hand
def test_window_similarity_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = torch.zeros(3, 6, 2)
    x[:, :3] = e1  # window 0: nine equal tokens -> 1
    flat = torch.stack([e1] * 4 + [-e1] * 5)  # window 1: 4 x e1, 5 x -e1 -> (4*3 + 5*4 - 2*4*5) / 72 = -1/9
    x[:, 3:] = flat.reshape(3, 3, 2)
    sim = window_similarity(x, 3)
    assert sim.shape == (1, 2)
    torch.testing.assert_close(sim, torch.tensor([[1.0, -1.0 / 9]]))
    y = torch.stack([e1] * 3 + [e2] * 6).reshape(3, 3, 2)  # 3 e1, 6 e2: (3*2 + 6*5) / 72 = 0.5
    torch.testing.assert_close(window_similarity(y, 3), torch.tensor([[0.5]]))


def test_window_merge_plan_by_hand():
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(6, 6, 4, generator=g)  # 4 windows of 3x3; random tokens are dissimilar
    grid[0:3, 3:6] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # window (0, 1): identical tokens
    grid[3:6, 0:3] = torch.tensor([1.0, 0.0, 0.0, 0.0]) * torch.arange(1, 10.0).reshape(3, 3, 1)  # parallel: cos 1
    x = torch.cat([torch.zeros(1, 4), grid.reshape(36, 4)])  # CLS + 36 patches
    plan = window_merge_plan(x, (6, 6), window=3, threshold=0.8, prefix=1)
    assert plan.n_new == 1 + 36 - 16
    # representatives: the window's last token in raster order (patch 2*6+5 = 17 and 5*6+2 = 32), CLS first
    merged_reps = [int(r) for r, s in zip(plan.rep, plan.score) if not math.isnan(float(s))]
    assert merged_reps == [1 + 17, 1 + 32]
    assert plan.score[~torch.isnan(plan.score)].tolist() == pytest.approx([1.0, 1.0])
    assert int(plan.assign[0]) == 0
    members = (plan.assign == plan.assign[1 + 32]).nonzero().squeeze(1) - 1
    assert sorted(members.tolist()) == [18, 19, 20, 24, 25, 26, 30, 31, 32]
    merged = merge_tokens(x, plan.assign, plan.n_new)
    torch.testing.assert_close(merged[plan.assign[1 + 32]], torch.tensor([5.0, 0.0, 0.0, 0.0]))  # mean of 1..9
    assert torch.equal(plan.rep, torch.sort(plan.rep).values)  # new slots in raster order of representatives


def test_dual_threshold_rule_by_hand():
    g = torch.tensor([0.50, 0.30, 0.15, 0.04, 0.01])  # sum 1
    u = torch.tensor([0.20, 0.10, 0.02, 0.30, 0.001])
    # keep iff g >= 0.1 * 1.0 or u >= 0.25: tokens 0, 1, 2 by the global score, 3 by the individual one
    assert dual_threshold_keep(g, u, 0.1, 0.25).tolist() == [True, True, True, True, False]
    assert dual_threshold_keep(g, u, 0.2, 0.5).tolist() == [True, True, False, False, False]


def test_scaled_layers_and_presets():
    assert scale_score_layers((2, 6, 10, 14), 32, 32) == [2, 6, 10, 14]
    assert scale_score_layers((2, 6, 10, 14), 32, 8) == [0, 1, 2, 3]
    assert MustDropFilter().prune_layers(32) == [3, 7, 11, 15]
    assert PRESETS == {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}
    f = MustDropFilter(preset=64)
    assert (f.global_thr, f.individual_thr) == (0.011, 0.01)


def _filter_ctx(att, visual, protected=None, layer=1):
    """A LayerContext over one sample whose attention rows (text queries) are ``att`` (R, T)."""
    t = visual.shape[0]
    valid = torch.ones(1, t, dtype=torch.bool)

    def rows(layer, r):
        return att[None, None][:, :, : r.shape[1]].expand(1, 2, -1, -1)  # same for 2 heads

    return LayerContext(layer=layer, n_layers=8, hidden=torch.zeros(1, t, 4), visual=visual[None], valid=valid,
                        last=torch.tensor([t - 1]), attention_rows=rows, visual_at_start=visual.sum()[None],
                        protected=None if protected is None else protected[None])


def test_key_set_is_protected_from_the_filter():
    # T = 7: [system, v, v, v, v, text, text]; token 4 has no attention from the text
    visual = torch.tensor([False, True, True, True, True, False, False])
    att = torch.tensor([[0.1, 0.3, 0.3, 0.3, 0.0, 0.0, 0.0], [0.1, 0.2, 0.2, 0.2, 0.0, 0.3, 0.0]])
    f = MustDropFilter(global_thr=0.05, individual_thr=0.05, layers=(0, 2, 4, 6), ref_depth=8)
    kept = f.prune(_filter_ctx(att, visual))[0]
    assert kept.tolist() == [1, 2, 3]
    prot = torch.zeros(7, dtype=torch.bool)
    prot[4] = True
    kept = f.prune(_filter_ctx(att, visual, prot))[0]
    assert kept is None or kept.tolist() == [1, 2, 3, 4]


def test_fixed_budget_mode_hits_the_count():
    visual = torch.tensor([False] + [True] * 10 + [False, False])
    att = torch.softmax(torch.randn(2, 13, generator=torch.Generator().manual_seed(1)), -1)
    for keep in (1, 4, 9):
        f = MustDropFilter(keep=keep, layers=(0, 2, 4, 6), ref_depth=8)
        # the last stage (scoring layer 6 of 8 -> pruning at 7) lands exactly on the budget
        kept = f.prune(_filter_ctx(att, visual, layer=7))[0]
        assert kept.numel() == keep
    f = MustDropFilter(keep=4, layers=(0, 2, 4, 6), ref_depth=8)
    assert [f._target(100, s, 4) for s in range(4)] == [round(100 * 0.04 ** 0.25), round(100 * 0.04 ** 0.5),
                                                         round(100 * 0.04 ** 0.75), 4]


def _layered_cache(n_layers, visual_by_layer, n_prompt):
    """A CacheContext of one sample: visual_by_layer(l) -> the visual prompt positions cached at layer l."""
    orig, vis = [], []
    for l in range(n_layers):
        v = set(visual_by_layer(l))
        pos = [p for p in range(n_prompt) if p in v or p not in (1, 2, 3, 4)]
        orig.append(torch.tensor([pos]))
        vis.append(torch.tensor([[p in v for p in pos]]))
    return CacheContext(n_layers=n_layers, visual=vis, valid=[torch.ones_like(v) for v in vis], original=orig)


def test_decode_cut_starts_at_the_first_filtering_layer():
    # prompt [s, v1, v2, v3, v4, t] in a 32-layer decoder; the filter at layer 2 drops nothing, the one at layer 6
    # drops v4 (from layer 7 on), the one at 10 drops v3: the official code cuts layers 2..14 to {v1, v2}
    ctx = _layered_cache(32, lambda l: [1, 2, 3, 4] if l < 7 else [1, 2, 3] if l < 11 else [1, 2], 6)
    kv = vlprune.get_method("mustdrop").methods[-1]
    assert isinstance(kv, OutputAwareCache)
    plan = kv.evict(ctx)
    assert sorted(plan) == list(range(2, 11))  # layers 11.. hold only the survivors already
    for l in (2, 6, 7, 10):
        kept = ctx.original[l][0][plan[l][0]].tolist()
        assert kept == [0, 1, 2, 5]
    # scaled to a 4-layer decoder the first filtering layer is 0
    small = _layered_cache(4, lambda l: [1, 2, 3, 4] if l < 2 else [1, 2], 6)
    assert sorted(kv.evict(small)) == [0, 1]
    # without filter layers (composed with another method) the cut starts before the first change
    assert sorted(OutputAwareCache().evict(ctx)) == list(range(6, 11))


def _synthetic_image(n_per_crop, logits, merge_score=None):
    """ImageTokens of one image whose crops hold n_per_crop patches; features row i = token i; logits
    (n_crops, H, S) the last ViT layer's CLS logits (slot 0 = CLS)."""
    from vlprune.methods.base import TOKEN_PATCH, ImageLayout, ImageTokens, Partition

    crop = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_crop)])
    vit = torch.cat([torch.arange(1, n + 1) for n in n_per_crop])
    n = int(crop.numel())
    lay = ImageLayout(kind=torch.full((n,), TOKEN_PATCH), crop=crop, vit_index=vit,
                      partitions=[Partition("image", torch.arange(n), (-1, -1))], n_crops=len(n_per_crop))
    return ImageTokens(features=torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3), layout=lay, sample=0,
                       index=0, _vision=lambda layer: logits, merge_score=merge_score)


def test_official_order_moves_the_key_set_with_its_tokens():
    from vlprune.methods.mustdrop import MustDropVision

    n = 36
    logits = torch.zeros(1, 2, n + 1)
    for tok, v in ((10, 5.0), (16, 4.0), (26, 3.0)):  # the key set (ceil(0.08 * 36) = 3): tokens 10, 16, 26
        logits[0, :, 1 + tok] = v
    score = torch.full((n,), float("nan"))
    score[[8, 20, 35]] = torch.tensor([0.9, 0.95, 0.85])  # three merged windows' representatives
    img = _synthetic_image([n], logits, score)
    spatial = MustDropVision(order="spatial").select(img)
    assert spatial.protect.tolist() == [10, 16, 26]
    sel = MustDropVision(order="official").select(img)
    # slots: merged first by similarity (20, 8, 35), then the rest in raster order
    assert sel.features[:4, 0].tolist() == [20.0, 8.0, 35.0, 0.0]
    assert sorted(sel.features[sel.protect, 0].tolist()) == [10.0, 16.0, 26.0]
    assert sel.protect.tolist() == [12, 18, 27]


def test_key_set_is_chosen_per_view():
    from vlprune.methods.mustdrop import MustDropVision

    # view 0 (base image) has 30 patches, view 1 (a crop) 10: the crop's softmax shares are larger, so one top-4
    # over the image would take all 4 from the crop; per view it is ceil(0.08 * 30) = 3 and ceil(0.08 * 10) = 1
    s = 31
    logits = torch.full((2, 2, s), float("-inf"))
    g = torch.Generator().manual_seed(0)
    logits[0, :, :31] = 0.01 * torch.randn(31, generator=g)
    logits[1, :, :11] = 0.01 * torch.randn(11, generator=g)
    img = _synthetic_image([30, 10], logits)
    prot = MustDropVision(merging=False).select(img).protect
    assert int((prot < 30).sum()) == 3 and int((prot >= 30).sum()) == 1
    attn = img.cls_attention(-1)
    assert set(prot[prot < 30].tolist()) == set(torch.topk(attn[:30], 3).indices.tolist())


def test_equivalent_tokens_official_count(hosts):
    model, proc = hosts["llava_next"]
    inputs = inputs_for("llava_next", proc)  # 640x480: base image + 4 crops = 5 views
    with vlprune.pruned(model, "mustdrop", merging=False):
        with torch.no_grad():
            model(**inputs)
        st = vlprune.stats(model)
    v = st["visual_per_layer"][0]
    assert v[-1] < v[0]
    assert st["equivalent_tokens"][0] == pytest.approx(sum(v) / 4)
    # the official code counts each layer after its pruning (what enters the next layer) and divides by the views
    assert st["equivalent_tokens_official"][0] == pytest.approx((v[1] + v[2] + v[3] + v[3]) / 4 / 5)


def test_kv_cut_of_a_constructed_cache():
    # 3 layers, one sample, prompt [s, v1, v2, v3, t]: layer 0 sees all, layer 1 drops v3, layer 2 drops v2 too
    orig = [torch.tensor([[0, 1, 2, 3, 4]]), torch.tensor([[0, 1, 2, 4]]), torch.tensor([[0, 1, 4]])]
    vis = [torch.tensor([[False, True, True, True, False]]), torch.tensor([[False, True, True, False]]),
           torch.tensor([[False, True, False]])]
    valid = [torch.ones_like(v) for v in vis]
    ctx = CacheContext(n_layers=3, visual=vis, valid=valid, original=orig)
    plan = OutputAwareCache().evict(ctx)  # first change at layer 1 -> cut from layer 0 on, to the survivor v1
    assert sorted(plan) == [0, 1]
    assert plan[0][0].tolist() == [0, 1, 4] and plan[1][0].tolist() == [0, 1, 3]
    plan = OutputAwareCache(from_layer=1).evict(ctx)
    assert sorted(plan) == [1]


# --------------------------------------------------------------------------------------------- on the models
def test_merge_matches_a_hand_run_vision_tower(hosts):
    model, proc = hosts["llava"]
    inputs = inputs_for("llava", proc)
    vt = model.model.vision_tower
    captured = {}

    def grab(mod, args, kwargs):
        captured.setdefault("emb", kwargs["inputs_embeds"].clone())

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vlprune.pruned(model, "mustdrop", threshold=0.5, prefill=False, decode=False, key_set=False):
            h0 = model.model.language_model.layers[0].register_forward_pre_hook(
                lambda mod, args: captured.setdefault("layer0", args[0].clone()))
            with torch.no_grad():
                model(**inputs)
            h0.remove()
            st = vlprune.stats(model)
    finally:
        hook.remove()
    with torch.no_grad():
        h1 = vt(inputs["pixel_values"], output_hidden_states=True).hidden_states[1][0]  # output of ViT layer 0
        plan = window_merge_plan(h1, (24, 24), 3, 0.5, prefix=1)
        x = merge_tokens(h1, plan.assign, plan.n_new)[None]
        for layer in vt.encoder.layers[1:3]:  # feature layer -2 of 4 = output of layer 2
            x = layer(x, None)
        full = x[0][plan.assign][1:]  # each patch gets its merged token; CLS dropped
        feats = model.model.multi_modal_projector(full)  # (576, D)
    n_merged = int((~torch.isnan(plan.score)).sum())
    assert n_merged > 0
    assert st["images"][0]["kept"] == 576 - 8 * n_merged
    assert st["schedule"].vision[0].tokens_per_layer == [577] + [plan.n_new] * 3
    reps = plan.rep[1:] - 1  # patch index of each slot's representative
    ids = inputs["input_ids"][0]
    span = (ids == model.config.image_token_id).nonzero().squeeze(1)
    assert torch.equal(st["images"][0]["kept_indices"], reps)
    into = st["images"][0]["merged_into"]
    assert int((into >= 0).sum()) == 8 * n_merged
    # the host's own decoder input (captured before vlprune's pre-LLM step): every patch carries its merged token
    torch.testing.assert_close(captured["emb"][0, span], feats, atol=1e-5, rtol=1e-4)
    # what the decoder ran on: one token per merged window, in its representative's place
    start = int(span[0])
    torch.testing.assert_close(captured["layer0"][0, start:start + reps.numel()], feats[reps], atol=1e-5, rtol=1e-4)
    assert captured["layer0"].shape[1] == ids.numel() - 8 * n_merged


@pytest.mark.parametrize("host", HOSTS)
def test_key_set_is_top_8_percent_and_survives(hosts, host):
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    with vlprune.pruned(model, "mustdrop", merging=False, global_thr=0.5, individual_thr=0.5):  # drop almost all
        with torch.no_grad():
            model(**inputs)
        st = vlprune.stats(model)
    n = st["images"][0]["visual_tokens"]
    n_patch = n - st["images"][0]["partitions"].get("newline", 0)
    final = st["visual_per_layer"][0][-1]
    assert final >= math.ceil(0.08 * n_patch)  # the key set is never dropped
    assert final < n


def _decode_policy_reference(model, inputs, st, n_new, cut_from=None, renumber=False):
    """No-cache reference of prefill stages + the KV cut: prompt rows of layer l see the visual tokens that entered
    layer l in prefill; decode rows of layers >= cut_from (default: the layer before the first change) see only the
    final survivors. With ``renumber`` (the "contiguous" policy) layer l numbers the tokens that entered it in
    prefill 0.. without gaps, decode rows after them (the cut does not renumber)."""
    ids = inputs["input_ids"]
    am = inputs["attention_mask"]
    p_len = ids.shape[1]
    img = ids[0] == model.config.image_token_id
    vis_all = img.nonzero().squeeze(1)
    stages = sorted(st["visual_positions"])
    final = st["kept_positions"][0]
    if cut_from is None:
        cut_from = stages[1] - 1  # the layer before the first change
    layers = model.model.language_model.layers

    def visible(layer):
        s = max(k for k in stages if k <= layer)
        return st["visual_positions"][s][0]

    def pre(mod, args, kwargs, i):
        L = args[0].shape[1]
        m = torch.tril(torch.ones(L, L, dtype=torch.bool))
        hide_prompt = vis_all[~torch.isin(vis_all, visible(i))]
        m[:p_len, hide_prompt] = False
        hide_decode = vis_all[~torch.isin(vis_all, final)] if i >= cut_from else hide_prompt
        m[p_len:, hide_decode] = False
        valid = torch.cat([am[0], torch.ones(L - p_len, dtype=am.dtype)]).bool()
        m &= valid[None]
        kwargs["attention_mask"] = m[None, None]
        if renumber:
            present = valid.clone()
            present[hide_prompt] = False
            kwargs["position_ids"], kwargs["position_embeddings"] = renumbered(model, args[0], present[None])
        return args, kwargs

    hs = [l.register_forward_pre_hook(lambda mod, a, k, i=i: pre(mod, a, k, i), with_kwargs=True)
          for i, l in enumerate(layers)]
    try:
        return greedy_reference(model, inputs, n_new)[0]
    finally:
        for h in hs:
            h.remove()


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("kw", [{"preset": 192}, {"keep": 48}, {"keep": 48, "rope_positions": "original"}])
def test_generate_with_the_decode_policy_matches_no_cache_reference(hosts, host, kw):
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    with vlprune.pruned(model, "mustdrop", merging=False, **kw):
        toks, _ = _generate(model, inputs, n=N_NEW)
        st = vlprune.stats(model)
    assert st["evicted"], "the decode stage cut nothing"
    if "keep" in kw:
        assert st["kept_positions"][0].numel() == kw["keep"]
    n_layers = model.config.text_config.num_hidden_layers
    ref = _decode_policy_reference(model, inputs, st, N_NEW, cut_from=scale_score_layers((2, 6, 10, 14), 32, n_layers)[0],
                                   renumber=kw.get("rope_positions", "contiguous") == "contiguous")
    assert torch.equal(toks, ref)


def test_decode_stage_composes_with_fastv(hosts):
    model, proc = hosts["llava"]
    inputs = inputs_for("llava", proc)
    with vlprune.pruned(model, [vlprune.get_method("fastv", k=2, keep=40), OutputAwareCache()]):
        toks, _ = _generate(model, inputs, n=N_NEW)
        st = vlprune.stats(model)
        kv_cut = st["cost"].kv_bytes
    assert sorted(st["evicted"]) == [1]  # fastv prunes at the input of layer 2; layer 1 scored, then cut
    ref = _decode_policy_reference(model, inputs, st, N_NEW)
    assert torch.equal(toks, ref)
    with vlprune.pruned(model, "fastv", k=2, keep=40):
        _generate(model, inputs, n=N_NEW)
        kv_plain = vlprune.stats(model)["cost"].kv_bytes
    assert kv_cut < kv_plain


@pytest.mark.parametrize("host", HOSTS)
def test_batch_matches_batch_of_one(hosts, host):
    model, proc = hosts[host]
    batch = inputs_for(host, proc, n=2, padding_side="left")
    with vlprune.pruned(model, "mustdrop", threshold=0.6):
        toks, _ = _generate(model, batch, n=N_NEW)
        st = vlprune.stats(model)
        singles = []
        for b in range(2):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            n_pad = int((one["attention_mask"][0] == 0).sum())
            one = {k: (v[:, n_pad:] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}
            singles.append((_generate(model, one, n=N_NEW)[0], vlprune.stats(model)))
    kept = [i["kept"] for i in st["images"]]
    assert kept[0] != kept[1]  # different merges per image: the vision tower ran a padded, masked batch
    for b in range(2):
        assert torch.equal(toks[b], singles[b][0][0])
        assert st["visual_per_layer"][b] == singles[b][1]["visual_per_layer"][0]


def test_sdpa_is_kept_everywhere(hosts):
    model, proc = hosts["llava_next"]
    with vlprune.pruned(model, "mustdrop"):
        assert model.config.vision_config._attn_implementation == "sdpa"
        assert model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kwargs, match", [
    ({"preset": 100}, "preset must be one of"),
    ({"global_thr": 0.1}, "both global_thr and individual_thr"),
    ({"threshold": 2}, "threshold"),
    ({"order": "front"}, "order"),
    ({"vision": False, "prefill": False, "decode": False}, "all off"),
    ({"layers": (6, 2)}, "increasing"),
])
def test_bad_hyperparameters_raise(hosts, kwargs, match):
    model, _ = hosts["llava"]
    with pytest.raises(ValueError, match=match):
        vlprune.apply(model, "mustdrop", **kwargs)
    assert not vlprune.is_applied(model)
