"""generate with the KV cache against independent no-cache references; batches; a second chat turn."""
from __future__ import annotations

import pytest
import torch

import vlprune
from conftest import HOSTS, drop_mask, embeds_reference, greedy_reference, inputs_for, merged_embeddings

N_NEW = 8


def _generate(model, inputs, n=N_NEW, **kw):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)
    seqs = out.sequences if hasattr(out, "sequences") else out
    return seqs[:, inputs["input_ids"].shape[1]:], out


def _dropped_visual(model, inputs, kept_positions):
    img = inputs["input_ids"] == model.config.image_token_id
    out = []
    for b, kept in enumerate(kept_positions):
        vis = img[b].nonzero().squeeze(1)
        out.append(vis[~torch.isin(vis, kept)])
    return out


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("k", [1, 2])
def test_fastv_generate_matches_masked_no_cache_reference(hosts, host, k):
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    with vlprune.pruned(model, "fastv", k=k, keep=48):
        toks, _ = _generate(model, inputs)
        st = vlprune.stats(model)
    assert st["visual_per_layer"][0][k - 1] > 48 and st["visual_per_layer"][0][k:] == [48] * (4 - k)
    dropped = _dropped_visual(model, inputs, st["kept_positions"])
    assert all(d.numel() > 0 for d in dropped)
    ref_toks, _ = greedy_reference(model, inputs, N_NEW, drop_mask(lambda L: torch.ones(1, L), dropped), from_layer=k)
    assert torch.equal(toks, ref_toks)
    # the no-cache reference of the unpruned model differs: the test is sensitive to the drop
    full_toks, _ = greedy_reference(model, inputs, N_NEW)
    assert not torch.equal(full_toks, ref_toks)


@pytest.mark.parametrize("host", HOSTS)
def test_fastv_selection_is_topk_of_eager_attention(host):
    from conftest import build_host

    model, proc = build_host(host, attn="eager")
    inputs = inputs_for(host, proc)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1, (B, H, T, T)
    scores = att[0, :, -1].mean(0)
    img = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    expected = img[scores[img].topk(40).indices].sort().values
    with vlprune.pruned(model, "fastv", k=2, keep=40):
        with torch.no_grad():
            model(**inputs)
        kept = vlprune.stats(model)["kept_positions"][0]
    assert torch.equal(kept.sort().values, expected)


def _pre_llm_reference(model, inputs, st, n_new, feats_override=None):
    """Remove the dropped image tokens before the decoder by hand and decode without a cache."""
    emb = merged_embeddings(model, inputs)
    img = inputs["input_ids"] == model.config.image_token_id
    rows, masks = [], []
    i = 0
    for b in range(emb.shape[0]):
        vis = img[b].nonzero().squeeze(1)
        keep = (~img[b]).nonzero().squeeze(1).tolist()
        row = emb[b].clone()
        used = 0
        while used < vis.numel():
            info = st["images"][i]
            span = vis[used: used + info["visual_tokens"]]
            kept = span[info["kept_indices"]]
            keep += kept.tolist()
            if feats_override is not None:
                row[kept] = feats_override[i]
            used += info["visual_tokens"]
            i += 1
        keep = torch.tensor(sorted(keep))
        rows.append(row[keep])
        masks.append(inputs["attention_mask"][b][keep])
    L = max(r.shape[0] for r in rows)
    E = torch.zeros(len(rows), L, emb.shape[-1])
    A = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (r, m) in enumerate(zip(rows, masks)):
        E[b, L - r.shape[0]:] = r
        A[b, L - r.shape[0]:] = m
    return embeds_reference(model, E, A, n_new)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ["random", "cls_attn"])
def test_pre_llm_generate_matches_no_cache_reference(hosts, host, name):
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    with vlprune.pruned(model, name, keep=40):
        toks, _ = _generate(model, inputs)
        st = vlprune.stats(model)
    assert [i["kept"] for i in st["images"]] == [40]
    assert st["visual_per_layer"][0] == [40] * 4
    ref = _pre_llm_reference(model, inputs, st, N_NEW)
    assert torch.equal(toks, ref)


def test_pool_features_match_adaptive_pooling(hosts):
    model, proc = hosts["llava"]
    inputs = inputs_for("llava", proc)
    with vlprune.pruned(model, "pool", keep=36):
        toks, _ = _generate(model, inputs)
        st = vlprune.stats(model)
    assert st["images"][0]["kept"] == 36
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]  # (576, D)
    pooled = torch.nn.functional.avg_pool2d(feats.T.reshape(1, -1, 24, 24), 4).reshape(feats.shape[1], 36).T
    ref = _pre_llm_reference(model, inputs, st, N_NEW, feats_override=[pooled])
    assert torch.equal(toks, ref)


def test_random_selection_is_seeded(hosts):
    model, proc = hosts["llava"]
    inputs = inputs_for("llava", proc)
    kept = []
    for seed in (0, 0, 1):
        with vlprune.pruned(model, "random", keep=32, seed=seed):
            with torch.no_grad():
                model(**inputs)
            kept.append(vlprune.stats(model)["images"][0]["kept_indices"])
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("spec", [("fastv", {"k": 2, "keep": 40}), ("random", {"keep": 40}),
                                  ("pool", {"keep": 36}), ("cls_attn", {"keep_ratio": 0.1})])
def test_batch_matches_batch_of_one(hosts, host, spec):
    name, kw = spec
    model, proc = hosts[host]
    batch = inputs_for(host, proc, n=2, padding_side="left")
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths
    with vlprune.pruned(model, name, **kw):
        toks, _ = _generate(model, batch)
        singles = []
        for b in range(2):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            n_pad = int((one["attention_mask"][0] == 0).sum())
            one = {k: (v[:, n_pad:] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}
            singles.append(_generate(model, one)[0])
    assert torch.equal(toks[0], singles[0][0])
    assert torch.equal(toks[1], singles[1][0])


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ["fastv", "pool", "random"])
def test_right_padding_forward_matches_batch_of_one(hosts, host, name):
    """random: contiguous RoPE positions with samples that keep different numbers of rows (padding slots)."""
    model, proc = hosts[host]
    batch = inputs_for(host, proc, n=2, padding_side="right")
    kw = {"k": 2, "keep": 40} if name == "fastv" else {"keep": 36}
    with vlprune.pruned(model, name, **kw):
        with torch.no_grad():
            out = model(**batch).logits
            st = vlprune.stats(model)
            for b in range(2):
                n = int(batch["attention_mask"][b].sum())
                one = {k: (v[b:b + 1, :n] if k in ("input_ids", "attention_mask") else v[b:b + 1])
                       for k, v in batch.items()}
                single = model(**one).logits[0]
                valid = st["tokens_per_layer"][b][-1]
                # right padding: the sample's valid rows come first
                torch.testing.assert_close(out[b, :valid], single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ["fastv", "fastv-contiguous", "random"])
def test_second_turn_reuses_pruned_cache(hosts, host, name):
    """fastv-contiguous: a later turn continues each layer's renumbered prefill."""
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    kw = {"k": 2, "keep": 40} if name.startswith("fastv") else {"keep": 40}
    if name == "fastv-contiguous":
        name, kw["rope_positions"] = "fastv", "contiguous"
    tok = proc.tokenizer
    with vlprune.pruned(model, name, **kw):
        _, out1 = _generate(model, inputs, n=5, return_dict_in_generate=True)
        st = vlprune.stats(model)
        cache = out1.past_key_values if getattr(out1, "past_key_values", None) is not None else out1.cache
        turn2 = tok(" USER: How many objects are there? ASSISTANT:", add_special_tokens=False, return_tensors="pt")
        ids2 = torch.cat([out1.sequences, turn2["input_ids"]], 1)
        am2 = torch.ones_like(ids2)
        with torch.no_grad():
            out2 = model.generate(input_ids=ids2, attention_mask=am2, cache=cache, max_new_tokens=6, do_sample=False)
        toks2 = out2[:, ids2.shape[1]:]
        st2 = vlprune.stats(model)
    # turn 2 ran only the new tokens, through every layer, untouched
    new = turn2["input_ids"].shape[1] + 1
    assert st2["schedule"].llm[0].q_per_layer == [new] * 4
    if name == "fastv":
        dropped = _dropped_visual(model, inputs, st["kept_positions"])
        images = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}

        def present(L):
            p = torch.ones(1, L, dtype=torch.bool)
            p[0, dropped[0]] = False
            return p

        ref, _ = greedy_reference(model, {"input_ids": ids2, "attention_mask": am2, **images}, 6,
                                  drop_mask(lambda L: torch.ones(1, L), dropped), from_layer=2,
                                  layer_present=present if kw.get("rope_positions") == "contiguous" else None)
    else:
        emb = merged_embeddings(model, inputs)[0]
        img = (inputs["input_ids"][0] == model.config.image_token_id)
        vis = img.nonzero().squeeze(1)
        keep = torch.cat([(~img).nonzero().squeeze(1), vis[st["images"][0]["kept_indices"]]]).sort().values
        rest = model.get_input_embeddings()(ids2[0, inputs["input_ids"].shape[1]:])
        with torch.no_grad():
            E = torch.cat([emb[keep], rest], 0)[None]
        ref = embeds_reference(model, E, torch.ones(1, E.shape[1], dtype=torch.long), 6)
    assert torch.equal(toks2, ref)


@pytest.mark.parametrize("spec", [("fastv", {"k": 2, "keep": 40}), ("random", {"keep": 40})])
def test_eager_attention_batch_matches_batch_of_one(spec):
    """The eager kernel takes additive float masks: decoding on a pruned, padded cache must build those too."""
    from conftest import build_host

    name, kw = spec
    model, proc = build_host("llava", attn="eager")
    batch = inputs_for("llava", proc, n=2, padding_side="left")
    with vlprune.pruned(model, name, **kw):
        toks, _ = _generate(model, batch)
        n_pad = int((batch["attention_mask"][0] == 0).sum())
        one = {k: (v[:1, n_pad:] if k in ("input_ids", "attention_mask") else v[:1]) for k, v in batch.items()}
        single, _ = _generate(model, one)
    assert torch.equal(toks[0], single[0])
