"""The tiny Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision / Qwen3-VL hosts of vlprune.hosts_tiny: they run, batch like
single samples, and show the layout facts recorded in the module docstring, which the adapters
(``vlprune/adapters/hf_qwen_vl.py``, ``hf_onevision.py``) rely on."""
from __future__ import annotations

import pytest
import torch

import vlprune
from vlprune import hosts_tiny as H
from conftest import new_host as host
from conftest import new_host_images as images
from vlprune.testing import synthetic_image

BUILDERS = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen3_vl")
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def image_token_id(model):
    return model.config.image_token_id


@pytest.mark.parametrize("name", list(BUILDERS))
def test_batch_forward_and_generate(name):
    model, proc = host(name)
    inputs = H.tiny_host_inputs(proc, images(), padding_side="left")
    b, t = inputs["input_ids"].shape
    assert b == 2 and inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum()  # padded rows differ
    with torch.no_grad():
        out = model(**inputs)
        assert out.logits.shape == (2, t, model.config.text_config.vocab_size)
        assert torch.isfinite(out.logits).all()
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, t + 3) and torch.equal(gen[:, :t], inputs["input_ids"])


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_logits_equal_one_by_one(name, padding_side):
    model, proc = host(name)
    inputs = H.tiny_host_inputs(proc, images(), padding_side=padding_side)
    with torch.no_grad():
        batch = model(**inputs).logits
        for b, im in enumerate(images()):
            one = H.tiny_host_inputs(proc, [im])
            am = inputs["attention_mask"][b].bool()
            assert torch.equal(inputs["input_ids"][b][am], one["input_ids"][0])
            # LLaVA-OneVision's plain forward numbers left-padded rows from 0 at the pad: same relative positions,
            # float noise only
            torch.testing.assert_close(batch[b][am], model(**one).logits[0], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_batch_greedy_equals_one_by_one(name):
    model, proc = host(name)
    inputs = H.tiny_host_inputs(proc, images())
    t = inputs["input_ids"].shape[1]
    with torch.no_grad():
        batch = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, t:]
        for b, im in enumerate(images()):
            one = H.tiny_host_inputs(proc, [im])
            single = model.generate(**one, max_new_tokens=3, do_sample=False)[0, one["input_ids"].shape[1]:]
            assert batch[b].tolist() == single.tolist()
    assert len(set(batch[0].tolist())) > 1 or len(set(batch[1].tolist())) > 1  # not one token over and over


@pytest.mark.parametrize("name", list(BUILDERS))
def test_apply_recognises_the_host_and_remove_leaves_it_as_it_was(name):
    """Each host has an adapter now (what each method does there: tests/test_hosts_contract.py and
    tests/test_hosts_qwen.py); apply attaches, remove leaves the model's hooks and attributes as they were."""
    model, proc = host(name)
    inputs = H.tiny_host_inputs(proc, images())
    with torch.no_grad():
        ref = model(**inputs).logits  # transformers leaves output-capturing hooks on the tower after its first call

    def hooks():
        return [(n, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()]

    before, attrs = hooks(), set(vars(model.model))
    vlprune.apply(model, "random", keep=8)
    try:
        with torch.no_grad():
            model(**inputs)
        assert [i["kept"] for i in vlprune.stats(model)["images"]] == [8, 8]
    finally:
        vlprune.remove(model)
    assert getattr(model, "_vlprune", None) is None and hooks() == before and set(vars(model.model)) == attrs
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_processors_need_no_video_processor_and_keep_host_tokens():
    for name in QWEN:
        _, proc = host(name)
        assert proc.video_processor is None and type(proc.image_processor).__name__ == "Qwen2VLImageProcessorPil"
        assert proc.image_token == "<|image_pad|>" and proc.video_token == "<|video_pad|>"
        assert "<|vision_start|><|image_pad|><|vision_end|>" in H.host_prompt(proc)
    _, proc = host("llava_onevision")
    assert proc.video_processor is None and proc.image_token == "<image>" and proc.video_token == "<video>"
    assert H.host_prompt(proc).startswith("<|im_start|>user <image>\n")
    with pytest.raises(ValueError, match="one image per prompt"):
        H.tiny_host_inputs(proc, images(), ["<image>\nhi"])


# ---------------------------------------------------------------------------------------------- Qwen family facts

# (width, height) -> image tokens; Qwen2/2.5-VL resize to multiples of 28 px (patch 14 x merge 2), Qwen3-VL of 32
QWEN_TOKENS = {
    "qwen2_vl": {(112, 84): 12, (168, 112): 24, (56, 56): 4, (224, 224): 64},
    "qwen2_5_vl": {(112, 84): 12, (168, 112): 24, (56, 56): 4, (224, 224): 64},
    "qwen3_vl": {(112, 84): 12, (168, 112): 20, (64, 64): 4, (256, 256): 64},
}


@pytest.mark.parametrize("name", QWEN)
def test_qwen_image_tokens_and_merge(name):
    model, proc = host(name)
    visual = model.model.visual
    assert visual is model.model.get_submodule("visual") and len(visual.blocks) >= 2
    assert visual.spatial_merge_size == 2
    for (w, h), n in QWEN_TOKENS[name].items():
        inputs = H.tiny_host_inputs(proc, [synthetic_image((w, h))])
        thw = inputs["image_grid_thw"]
        assert (inputs["input_ids"] == image_token_id(model)).sum() == n == thw.prod() // 4
        assert inputs["pixel_values"].shape[0] == thw.prod()  # one row per ViT patch (temporal pair flattened in)
        assert proc._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"] == [n]
        with torch.no_grad():
            feats = model.model.get_image_features(inputs["pixel_values"], thw, return_dict=True)
        assert [tuple(f.shape) for f in feats.pooler_output] == [(n, model.config.text_config.hidden_size)]
        assert feats.last_hidden_state.shape[0] == 4 * n  # 2 x 2 ViT patches per LLM token
    # ViT patch rows come block-major: rows 4k..4k+3 are the 2 x 2 patches of merged token k (raster order)
    from transformers.vision_utils import get_vision_position_ids

    hw = get_vision_position_ids(torch.tensor([[1, 4, 6]]), 2)
    assert hw[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


@pytest.mark.parametrize("name", QWEN)
def test_qwen_mrope_positions(name):
    model, proc = host(name)
    inputs = H.tiny_host_inputs(proc, images())
    b, t = inputs["input_ids"].shape
    pos, deltas = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    assert pos.shape == (3, b, t) and deltas.shape == (b, 1)
    # image tokens: (t, h, w) = (s, s + row, s + col) on the merged grid; text after the image resumes at
    # s + max(rows, cols), hence rope_deltas = max position + 1 - length < 0
    for i in range(b):
        img = (inputs["input_ids"][i] == image_token_id(model)).nonzero().squeeze(1)
        _, gh, gw = (inputs["image_grid_thw"][i] // torch.tensor([1, 2, 2])).tolist()
        s = int(pos[0, i, img[0]])
        rows = torch.arange(gh).repeat_interleave(gw)
        cols = torch.arange(gw).repeat(gh)
        assert torch.equal(pos[:, i, img], torch.stack([torch.full_like(rows, s), s + rows, s + cols]))
        assert int(pos[0, i, img[-1] + 1]) == s + max(gh, gw)
        n_valid = int(inputs["attention_mask"][i].sum())
        assert int(deltas[i]) == int(pos[:, i].max()) + 1 - n_valid < 0

    seen, layer0 = [], []
    lm = model.model.language_model

    def at_layer0(m, a, kw):
        p = kw.get("position_ids")
        layer0.append((None if p is None else tuple(p.shape), tuple(kw["position_embeddings"][0].shape), "cache" in kw))

    hooks = [lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True),
             lm.layers[0].register_forward_pre_hook(at_layer0, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    # plain forward: (3, B, T); generate: (4, B, T) with the 1-D text positions (for the mask) in row 0
    assert [tuple(p.shape) for p in seen] == [(3, b, t), (4, b, t), (4, b, 1)]
    assert torch.equal(seen[1][1:], pos)  # generate's prefill rows 1..3 are get_rope_index's
    # decode step: the 1-D text position (padding-aware: valid tokens so far) plus rope_deltas, on all three rows
    am = inputs["attention_mask"]
    n_valid = am.sum(1, keepdim=True)
    assert torch.equal(seen[2][0], n_valid) and torch.equal(seen[2][1:], (n_valid + deltas)[None].expand(3, b, 1))
    hd = lm.layers[0].self_attn.head_dim
    assert layer0 == [(None, (b, t, hd), True), ((b, t), (b, t, hd), True), ((b, 1), (b, 1, hd), True)]
    assert torch.equal(model.model.rope_deltas, deltas)  # kept on the inner model for the decode steps


@pytest.mark.parametrize("name", list(BUILDERS))
def test_generate_encodes_images_once_before_prefill(name):
    """generate calls ``model.model.get_image_features`` once, by keyword, with the arguments it finds in that
    method's signature (a wrapper must keep it: functools.wraps), pops them, and hands the result to the prefill
    forward as ``mm_encoder_outputs``; a plain forward calls it positionally."""
    import functools

    model, proc = host(name)
    inputs = H.tiny_host_inputs(proc, images())
    orig = model.model.get_image_features
    calls, tower, fwd = [], [], []

    @functools.wraps(orig)
    def wrapped(*args, **kwargs):
        calls.append((len(args), sorted(kwargs)))
        return orig(*args, **kwargs)

    tower_module = model.model.visual if name in QWEN else model.model.vision_tower

    def seen(m, a, kw):
        fwd.append(sorted(k for k, v in kw.items() if v is not None))

    hooks = [tower_module.register_forward_hook(lambda m, a, o: tower.append(1)),
             model.model.register_forward_pre_hook(seen, with_kwargs=True)]
    model.model.get_image_features = wrapped
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert len(tower) == 1 and calls[0][0] == 0 and "pixel_values" in calls[0][1]
            grid = "image_grid_thw" if name in QWEN else "image_sizes"
            assert grid in calls[0][1] and len(calls) == 1
            assert "mm_encoder_outputs" in fwd[0] and "pixel_values" not in fwd[0] and grid not in fwd[0]
            model(**inputs)
            assert len(calls) == 2 and calls[1][0] == 2 and "pixel_values" in fwd[-1]
    finally:
        del model.model.get_image_features
        for h in hooks:
            h.remove()


def test_qwen2_5_vl_window_attention():
    model, proc = host("qwen2_5_vl")
    visual = model.model.visual
    assert list(visual.fullatt_block_indexes) == [1, 3] and visual.window_size == 112
    inputs = H.tiny_host_inputs(proc, images())  # grids 6x8 and 8x12 patches: 1 and 2 windows of 8x8 patches
    thw = inputs["image_grid_thw"]
    seen, hooks = [], []
    for blk in visual.blocks:
        hooks.append(blk.register_forward_pre_hook(
            lambda m, a, kw: seen.append((a[0], kw["cu_seqlens"].tolist())), with_kwargs=True))
    emb = []
    hooks.append(visual.patch_embed.register_forward_hook(lambda m, a, o: emb.append(o)))
    try:
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], thw, return_dict=True)
            merged = visual.merger(out.last_hidden_state)
    finally:
        for h in hooks:
            h.remove()
    per_image = [0, 48, 48 + 96]
    windows = [0, 48, 48 + 64, 48 + 96]  # window boundaries, in ViT patches
    assert [c for _, c in seen] == [windows, per_image, windows, per_image]
    # blocks see the patches window by window (groups of 4 = one merged token, permuted by window_index)
    from transformers.vision_utils import get_vision_window_index

    widx, _ = get_vision_window_index(thw, 2, 112, 14)
    torch.testing.assert_close(seen[0][0], emb[0].reshape(-1, 4, emb[0].shape[-1])[widx].reshape(emb[0].shape))
    # last_hidden_state stays in window order; the merged tokens (pooler_output) are put back in raster order
    torch.testing.assert_close(torch.cat(out.pooler_output), merged[torch.argsort(widx)])
    assert not torch.allclose(torch.cat(out.pooler_output), merged)


def test_qwen3_vl_deepstack():
    model, proc = host("qwen3_vl")
    visual, lm = model.model.visual, model.model.language_model
    assert list(visual.deepstack_visual_indexes) == [0, 1, 2] and len(visual.deepstack_merger_list) == 3
    inputs = H.tiny_host_inputs(proc, images())
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    assert [[tuple(x.shape) for x in d] for d in feats.deepstack_features] == [[(12, 128), (20, 128)]] * 3
    outs, ins, kws = {}, {}, []
    hooks = [lm.register_forward_pre_hook(lambda m, a, kw: kws.append(kw), with_kwargs=True)]
    for i, layer in enumerate(lm.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)))
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0])))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    vis = inputs["input_ids"] == image_token_id(model)
    assert torch.equal(kws[0]["visual_pos_masks"], vis)
    # after decoder layers 0, 1, 2 (not inside them) the tap of the same index is added at the image tokens
    for i in range(3):
        added = ins[i + 1] - outs[i]
        assert torch.equal(added[~vis], torch.zeros_like(added[~vis]))
        torch.testing.assert_close(added[vis], torch.cat(feats.deepstack_features[i]), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- LLaVA-OneVision facts

# (width, height) -> (views = base + crops, image tokens)
ONEVISION_TOKENS = {(112, 84): (2, 118), (112, 112): (2, 136), (168, 112): (3, 168), (300, 100): (4, 264),
                    (448, 448): (17, 664)}


def test_onevision_anyres_tokens_newline_and_pooling():
    model, proc = host("llava_onevision")
    tower = model.model.vision_tower
    assert type(tower).__name__ == "SiglipVisionModel" and len(tower.encoder.layers) == 4
    assert model.config.vision_feature_select_strategy == "full" and model.config.vision_feature_layer == -1
    newline = model.model.image_newline
    for (w, h), (views, n) in ONEVISION_TOKENS.items():
        inputs = H.tiny_host_inputs(proc, [synthetic_image((w, h))])
        assert inputs["pixel_values"].shape[:2] == (1, views) and inputs["image_sizes"].tolist() == [[h, w]]
        assert (inputs["input_ids"] == image_token_id(model)).sum() == n
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
        assert out.last_hidden_state.shape == (views, 64, 64)  # SigLIP: 8 x 8 patches per view, no CLS
        (feat,) = out.pooler_output
        assert feat.shape == (n, 128)
        is_newline = (feat == newline).all(-1)
        assert not is_newline[:64].any()  # the base view first: 64 tokens, no newline
        rows = int(is_newline.sum())
        cols = (n - 64 - rows) // rows
        assert n == 64 + rows * (cols + 1) and is_newline[64:].view(rows, cols + 1)[:, -1].all()
        if views == 17:  # 4 x 4 crops = 32 x 32 tokens > 9 views: bilinear down to 24 x 24 ("anyres_max_9")
            assert (rows, cols) == (24, 24)


def test_onevision_positions_are_1d():
    model, proc = host("llava_onevision")
    inputs = H.tiny_host_inputs(proc, images(), padding_side="left")
    b, t = inputs["input_ids"].shape
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    assert seen[0] is None  # plain forward: the decoder numbers 0..T-1, padding included
    am = inputs["attention_mask"]
    assert seen[1].shape == (b, t) and torch.equal(seen[1][am.bool()], ((am.cumsum(1) - 1)[am.bool()]))


def test_onevision_multi_image_prompt_uses_base_views_only():
    model, proc = host("llava_onevision")
    prompt = "<|im_start|>user <image>\n<image>\nCompare.<|im_end|>\n<|im_start|>assistant\n"
    inputs = proc(text=[prompt], images=[images()], return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [2] and inputs["pixel_values"].shape[:2] == (2, 1)
    assert (inputs["input_ids"] == image_token_id(model)).sum() == 2 * (64 + 1)  # base view + one newline each
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                             batch_num_images=inputs["batch_num_images"], return_dict=True)
    assert [tuple(f.shape) for f in out.pooler_output] == [(65, 128)] * 2
    assert all((f[-1] == model.model.image_newline).all() for f in out.pooler_output)


def test_builders_are_deterministic_by_seed():
    a, pa = H.tiny_qwen2_vl(seed=0)
    b, pb = H.tiny_qwen2_vl(seed=0)
    c, _ = H.tiny_qwen2_vl(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.language_model.embed_tokens.weight"], sc["model.language_model.embed_tokens.weight"])
    assert pa.tokenizer.get_vocab() == pb.tokenizer.get_vocab()
