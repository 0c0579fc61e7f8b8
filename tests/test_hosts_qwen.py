"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL hosts against independent references: the received-attention score recomputed by hand
from the tower's blocks, M-RoPE no-cache decoding of the kept tokens at their own (t, h, w) positions, FastV against
a masked no-cache run, batch = one by one, a second turn, and the refusals (video, ViT merging, MQT). Qwen3-VL as
well: its references add the DeepStack rows of the kept image tokens."""
from __future__ import annotations

import sys

import pytest
import torch

import vlprune
from conftest import drop_mask, greedy_reference
from conftest import new_host as host
from conftest import new_host_images as images
from vlprune import hosts_tiny as H
from vlprune.testing import synthetic_image

BUILDERS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# LLM tokens of each of NEW_HOST_SIZES (Qwen3: 32 px per merged token)
TOKENS = {"qwen2_vl": [12, 24], "qwen2_5_vl": [12, 24], "qwen3_vl": [12, 20]}


def one(proc, i):
    return H.tiny_host_inputs(proc, [images()[i]])


# ------------------------------------------------------------------------------------------------ the score rule
def _reference_shares(model, inputs, layer):
    """(per image (N_i,)) mean over heads of the attention each LLM token's 2x2 patches receive in ViT block
    ``layer``, recomputed from the block's input with the full attention matrix of each group the block attends
    in (image, or window for Qwen2.5-VL's windowed blocks)."""
    visual = model.model.visual
    blk = visual.blocks[layer]
    seen = {}

    def pre(mod, args, kwargs):
        seen["x"], seen["cu"], seen["pe"] = args[0], kwargs["cu_seqlens"], kwargs["position_embeddings"]

    h = blk.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        h.remove()
    with torch.no_grad():
        return _shares(model, visual, blk, seen, inputs)


def _shares(model, visual, blk, seen, inputs):
    x = blk.norm1(seen["x"])
    s = x.shape[0]
    heads = visual.config.num_heads
    qkv = blk.attn.qkv(x).reshape(s, 3, heads, -1)
    rope = sys.modules[type(blk.attn).__module__].apply_rotary_pos_emb_vision
    q, k = rope(qkv[:, 0], qkv[:, 1], *seen["pe"])
    received = torch.zeros(heads, s)
    cu = seen["cu"].tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * blk.attn.scaling, -1)
        received[:, a:b] = att.sum(1)
    tok = received.reshape(heads, s // 4, 4).sum(-1)
    if hasattr(visual, "fullatt_block_indexes"):  # window order -> raster order
        from transformers.vision_utils import get_vision_window_index

        idx, _ = get_vision_window_index(inputs["image_grid_thw"], 2, visual.window_size, visual.patch_size)
        raster = torch.empty_like(tok)
        raster[:, idx] = tok
        tok = raster
    out, off = [], 0
    for t, hh, ww in inputs["image_grid_thw"].tolist():
        n = t * hh * ww // 4
        out.append((tok[:, off:off + n] / (t * hh * ww)).mean(0))
        off += n
    return out


@pytest.mark.parametrize("name, layer", [("qwen2_vl", 1), ("qwen2_vl", 0), ("qwen2_5_vl", 3), ("qwen2_5_vl", 0),
                                         ("qwen3_vl", 3), ("qwen3_vl", 1)])
def test_cls_attn_keeps_the_top_received_attention(name, layer):
    """layer 0 of Qwen2.5-VL attends in windows, layer 3 over the whole image."""
    model, proc = host(name)
    inputs = H.tiny_host_inputs(proc, images())
    ref = _reference_shares(model, inputs, layer)
    assert [r.numel() for r in ref] == TOKENS[name]
    for r in ref:  # shares of an image's tokens add up to 1 (every query's attention is spread over its image)
        assert abs(float(r.sum()) - 1.0) < 1e-4
    with vlprune.pruned(model, "cls_attn", keep=5, layer=layer):
        with torch.no_grad():
            model(**inputs)
        st = vlprune.stats(model)
    for r, img in zip(ref, st["images"]):
        assert torch.equal(img["kept_indices"], r.topk(5).indices.sort().values)


# ------------------------------------------------------------------------------------------------ decoding
def _kept_positions(model, inputs, st, b):
    img = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
    info = [i for i in st["images"] if i["sample"] == b]
    kept, used = [], 0
    for i in info:
        kept.append(img[used:used + i["visual_tokens"]][i["kept_indices"]])
        used += i["visual_tokens"]
    return torch.cat(kept), img


def _mrope_reference(model, inputs, kept_img, n_new, extra_ids=None):
    """Greedy no-cache decoding of one sample (batch 1, no padding) from the host's own embeddings and M-RoPE
    positions, with the dropped image tokens removed: kept tokens at their (t, h, w) positions from get_rope_index,
    every later token at its 1-D position plus the host's rope delta on all three axes."""
    base = model.model
    ids = inputs["input_ids"]
    pos, delta = base.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                     image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    with torch.no_grad():
        out = base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        feats = torch.cat(list(out.pooler_output))
        emb = model.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == model.config.image_token_id)[..., None], feats)
    img = ids[0] == model.config.image_token_id
    keep = torch.cat([(~img).nonzero().squeeze(1), kept_img]).sort().values
    E, P = emb[0, keep], pos[:, 0, keep]
    deepstack = {}
    if getattr(out, "deepstack_features", None):  # Qwen3-VL: the taps' rows of the kept image tokens
        rank = torch.cumsum(img.long(), 0) - 1
        rows = rank[kept_img.sort().values]
        deepstack = {"mask": img[keep], "embeds": [torch.cat(list(t))[rows] for t in out.deepstack_features]}
    t = ids.shape[1]
    later = [] if extra_ids is None else extra_ids.tolist()
    out = []
    with torch.no_grad():
        for step in range(len(later) + n_new):
            if step >= len(later):
                extra = {}
                if deepstack:
                    mask = torch.zeros(1, E.shape[0], dtype=torch.bool)
                    mask[0, :deepstack["mask"].numel()] = deepstack["mask"]
                    extra = {"visual_pos_masks": mask, "deepstack_visual_embeds": deepstack["embeds"]}
                hs = base.language_model(inputs_embeds=E[None], position_ids=P[:, None],
                                         attention_mask=torch.ones(1, E.shape[0], dtype=torch.long),
                                         **extra).last_hidden_state
                nxt = int(model.lm_head(hs[:, -1]).argmax(-1))
                out.append(nxt)
            else:
                nxt = later[step]
            E = torch.cat([E, model.get_input_embeddings()(torch.tensor([nxt]))])
            p = t + step + int(delta[0, 0])
            P = torch.cat([P, torch.full((3, 1), p)], 1)
    return out


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("method", ["random", "cls_attn", "hired"])
def test_pre_llm_generate_matches_mrope_no_cache_reference(name, method):
    model, proc = host(name)
    inputs = one(proc, 1)
    with vlprune.pruned(model, method, keep=9):
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        st = vlprune.stats(model)
    kept, img = _kept_positions(model, inputs, st, 0)
    assert kept.numel() == 9 < img.numel()
    ref = _mrope_reference(model, inputs, kept, 6)
    assert gen.tolist() == ref
    assert ref != _mrope_reference(model, inputs, img, 6)  # sensitive to the drop


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fastv_generate_matches_masked_no_cache_reference(name):
    model, proc = host(name)
    inputs = one(proc, 1)
    with vlprune.pruned(model, "fastv", k=2, keep=8):
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        st = vlprune.stats(model)
    img = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    assert st["visual_per_layer"][0] == [img.numel()] * 2 + [8, 8]
    dropped = img[~torch.isin(img, st["kept_positions"][0])]
    ref, ref_logits = greedy_reference(model, inputs, 6, drop_mask(lambda L: torch.ones(1, L), [dropped]),
                                       from_layer=2)
    assert torch.equal(gen, ref)
    _, full_logits = greedy_reference(model, inputs, 6)
    assert not torch.allclose(full_logits, ref_logits, atol=1e-3)  # sensitive to the drop


SPECS = [("random", {"keep": 7}), ("pool", {"keep": 6}), ("cls_attn", {"keep": 7}), ("hired", {"keep": 7}),
         ("globalcom2", {"keep": 7}), ("todre", {"keep": 7}), ("fastv", {"k": 2, "keep": 7}),
         ("transprune", {"keep": 7}), ("mustdrop", {"keep": 7, "merging": False})]


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("method, kw", SPECS, ids=[s[0] for s in SPECS])
def test_batch_with_padding_equals_one_by_one(name, method, kw):
    """Two images of different sizes, left padded, against each alone: kept tokens and greedy tokens."""
    model, proc = host(name)
    batch = H.tiny_host_inputs(proc, images(), padding_side="left")
    t = batch["input_ids"].shape[1]
    with vlprune.pruned(model, method, **kw):
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, t:]
        kept_b = vlprune.stats(model)["kept_positions"]
        for b in range(2):
            single = one(proc, b)
            with torch.no_grad():
                g1 = model.generate(**single, max_new_tokens=4, do_sample=False)[0, single["input_ids"].shape[1]:]
            kept_1 = vlprune.stats(model)["kept_positions"][0]
            pad = int((batch["attention_mask"][b] == 0).sum())
            assert torch.equal(kept_b[b] - pad, kept_1)
            assert gen[b].tolist() == g1.tolist()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_two_images_in_one_prompt(name):
    model, proc = host(name)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[prompt], images=images(), return_tensors="pt")
    with vlprune.pruned(model, "random", keep=5):
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        st = vlprune.stats(model)
    assert [(i["sample"], i["visual_tokens"], i["kept"]) for i in st["images"]] == [(0, n, 5) for n in TOKENS[name]]
    kept, img = _kept_positions(model, inputs, st, 0)
    assert gen.tolist() == _mrope_reference(model, inputs, kept, 4)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_second_turn_on_the_pruned_cache(name):
    model, proc = host(name)
    inputs = one(proc, 1)
    tok = proc.tokenizer
    t = inputs["input_ids"].shape[1]
    with vlprune.pruned(model, "random", keep=9):
        with torch.no_grad():
            out1 = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        st = vlprune.stats(model)
        cache = out1.past_key_values if getattr(out1, "past_key_values", None) is not None else out1.cache
        turn2 = tok("<|im_end|>\n<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n",
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids2 = torch.cat([out1.sequences, turn2], 1)
        types2 = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, ids2.shape[1] - t, dtype=torch.long)], 1)
        with torch.no_grad():
            out2 = model.generate(input_ids=ids2, attention_mask=torch.ones_like(ids2), mm_token_type_ids=types2,
                                  cache=cache, max_new_tokens=5, do_sample=False)[0, ids2.shape[1]:]
        st2 = vlprune.stats(model)
    assert st2["schedule"].llm[0].q_per_layer == [ids2.shape[1] - t - 3] * 4  # only the new tokens ran
    kept, _ = _kept_positions(model, inputs, st, 0)
    ref = _mrope_reference(model, inputs, kept, 5, extra_ids=ids2[0, t:])
    assert out2.tolist() == ref


def test_full_budget_and_remove_are_exact():
    for name in BUILDERS:
        model, proc = host(name)
        inputs = H.tiny_host_inputs(proc, images())
        with torch.no_grad():
            ref = model(**inputs).logits
            gen_ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for method, kw in SPECS:
            with vlprune.pruned(model, method, **dict(kw, keep=10**6)):
                with torch.no_grad():
                    assert torch.equal(model(**inputs).logits, ref), (name, method)
            vlprune.apply(model, method, **kw)
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert [v[-1] for v in vlprune.stats(model)["visual_per_layer"]] == [kw["keep"]] * 2  # of 12 and 24
            vlprune.remove(model)
            assert "get_image_features" not in vars(model.model) and "get_video_features" not in vars(model.model)
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, ref)
                assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen_ref)


# ------------------------------------------------------------------------------------------------ refusals
def test_refusals_name_the_host_and_the_fix():
    model, proc = host("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"mustdrop: .*Qwen2_5_VLForConditionalGeneration.*merging=False"):
        vlprune.apply(model, "mustdrop", keep=8)
    with pytest.raises(ValueError, match=r"mqt: .*Qwen2_5_VLForConditionalGeneration.*patch merger"):
        vlprune.apply(model, "mqt", keep=8)
    assert not vlprune.is_applied(model)


def test_video_is_refused_with_a_clear_message():
    model, proc = host("qwen2_vl")
    inputs = one(proc, 0)
    grid = torch.tensor([[2, 4, 4]])
    video = torch.randn(32, 3 * 2 * 14 * 14)
    with vlprune.pruned(model, "random", keep=4):
        with pytest.raises(ValueError, match=r"vlprune prunes image tokens; video inputs \(pixel_values_videos\) of "
                                             r"Qwen2VLForConditionalGeneration are not supported"):
            with torch.no_grad():
                model(**inputs, pixel_values_videos=video, video_grid_thw=grid)


def test_contiguous_is_applied_as_original_with_a_note():
    model, proc = host("qwen2_vl")
    inputs = one(proc, 1)
    with torch.no_grad():
        with vlprune.pruned(model, "random", keep=9, seed=1, rope_positions="contiguous"):
            a = model(**inputs).logits
            notes = vlprune.stats(model)["notes"]
        with vlprune.pruned(model, "random", keep=9, seed=1, rope_positions="original"):
            b = model(**inputs).logits
            assert vlprune.stats(model)["notes"] == []
    assert torch.equal(a, b)
    assert any("applied as 'original'" in n for n in notes)


# ------------------------------------------------------------------------------------------------ cost
COST_CASES = [("random", {"keep": 10**6}), ("random", {"keep": 7}), ("cls_attn", {"keep": 7}),
              ("fastv", {"k": 2, "keep": 7}), ("todre", {"keep_ratio": 0.25}), ("hired", {"keep_ratio": 0.25}),
              ("transprune", {}), ("globalcom2", {"keep_ratio": 0.25}), ("mustdrop", {"keep": 7, "merging": False})]


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("case", COST_CASES, ids=lambda c: "-".join([c[0]] + [str(v) for v in c[1].values()][:1]))
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_stats_cost_matches_flop_counter(name, case, mode):
    """vlprune.stats(model)["cost"] (tower with its attention groups, merger, decoder, lm_head, the method's own
    scoring) against torch's FlopCounterMode over the same pruned call, two images of different sizes."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlprune import cost

    cost.register_sdpa_cpu_flop_formula()
    model, proc = host(name)
    method, kw = case
    inputs = H.tiny_host_inputs(proc, images())
    with vlprune.pruned(model, method, **kw):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            if mode == "forward":
                model(**inputs)
            else:
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
        report = vlprune.stats(model)["cost"]
    assert report.total == pytest.approx(counter.get_total_flops(), rel=0.01)
    assert report.vision > 0 and report.projector > 0


@pytest.mark.parametrize("device_path", ["fused", "chunked"])
def test_received_attention_equals_the_softmax_column_sums(device_path):
    """fused: torch's CPU attention kernel (the default on the CPU); chunked: the path of other devices."""
    from vlprune.ops import received_attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 70, 16, generator=g), torch.randn(2, 3, 70, 16, generator=g)
    got, flops = received_attention(q, k, 0.25, chunk=32, fused=device_path == "fused")
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1).sum(2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert flops == (4.0 * 2 * 3 * 70 * 70 * 33 if device_path == "fused" else 2.0 * 2 * 3 * 70 * 70 * 17)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("method, kw", [("random", {"keep": 7}), ("fastv", {"k": 2, "keep": 7})])
def test_right_padding_forward_equals_one_by_one(name, method, kw):
    """Right padding: each sample's rows come first in the compacted batch, so its last real token is at the lone
    run's last index."""
    model, proc = host(name)
    batch = H.tiny_host_inputs(proc, images(), padding_side="right")
    with vlprune.pruned(model, method, **kw), torch.no_grad():
        out = model(**batch).logits
        assert out.shape[1] < batch["input_ids"].shape[1]
        for b in range(2):
            ref = model(**one(proc, b)).logits[0]
            torch.testing.assert_close(out[b, ref.shape[0] - 1], ref[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, kw, at", [("random", {"keep": 8}, 0), ("fastv", {"k": 2, "keep": 8}, 2)])
def test_a_pruned_batch_drops_its_padding_too(method, kw, at):
    """Images of very different sizes: the short sample's padding goes with the dropped tokens, so the batch runs at
    the longest kept row, not at the padded prompt's length."""
    model, proc = host("qwen2_vl")
    batch = H.tiny_host_inputs(proc, [synthetic_image((112, 84)), synthetic_image((224, 224), seed=1)])
    valid = batch["attention_mask"].sum(1)
    n_img = (batch["input_ids"] == model.config.image_token_id).sum(1)
    with vlprune.pruned(model, method, **kw), torch.no_grad():
        model(**batch)
        q = vlprune.stats(model)["schedule"].llm[0].q_per_layer
    assert n_img.tolist() == [12, 64] and q[:at] == [batch["input_ids"].shape[1]] * at
    assert q[at:] == [int((valid - n_img + 8).max())] * (4 - at)
