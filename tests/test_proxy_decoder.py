"""The proxy v2 recipe's decoder stages: token path equal to LLaVA's own, batches, resume, a CLI smoke run."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evals.proxy import model as pm
from evals.proxy.decoder import (Stage, TokenCache, _forward, conversation_batch, pool_tokens, tower_tokens,
                                 train_decoder)
from evals.proxy.scenes import FAMILIES, make_sample, split_seed


@pytest.fixture(scope="module")
def tok():
    return pm.build_tokenizer()


def _samples(n, split="train"):
    return [make_sample(split_seed(split, i)) for i in range(n)]


def test_cached_token_path_matches_the_llava_forward(tok):
    """Tower tokens + projector + decoder as the recipe computes them give the logits that transformers'
    LlavaForConditionalGeneration gives on the processor's inputs for the same question."""
    torch.manual_seed(0)
    model = pm.build_model("llava", seed=3).eval()
    proc = pm.build_processor("llava", tok)
    ss = _samples(3, "validation")
    feats = tower_tokens(model, [s.scene for s in ss]).float()
    b = conversation_batch(tok, ss, 1, np.random.default_rng(0), 576)
    with torch.inference_mode():
        ours = model.lm_head(_forward(model, b["input_ids"], feats)[b["rows"], b["at"]])
        for i, s in enumerate(ss):
            inp = proc(images=[__import__("evals.proxy.scenes", fromlist=["render"]).render(s.scene)],
                       text=[pm.prompt(s.question)], return_tensors="pt")
            ref = model(**inp).logits[0, -1]
            assert torch.allclose(ours[i], ref, atol=2e-3, rtol=1e-3), (ours[i] - ref).abs().max()
    assert b["target"].tolist() == [tok.convert_tokens_to_ids(s.answer) for s in ss]


def test_conversation_batch_layout(tok):
    ss = _samples(4)
    b = conversation_batch(tok, ss, 5, np.random.default_rng(1), 64)
    img = tok.convert_tokens_to_ids("<image>")
    assert ((b["input_ids"] == img).sum(1) == 64).all()
    assert b["rows"].bincount().tolist() == [5, 5, 5, 5]
    # each planned question is among its scene's turns, with its answer as the target
    for i, s in enumerate(ss):
        words = tok.convert_ids_to_tokens(b["input_ids"][i].tolist())
        text = " ".join(w for w in words if w != "<image>")
        assert s.question in text
    assert set(b["family"].tolist()) <= set(range(len(FAMILIES)))
    ex = conversation_batch(tok, ss, 5, np.random.default_rng(1), 64, families=("existence",))
    assert (ex["family"] == 0).all()
    assert set(tok.convert_ids_to_tokens(ex["target"].tolist())) <= {"yes", "no"}


def test_pool_tokens():
    x = torch.arange(576, dtype=torch.float32).reshape(1, 576, 1)
    p = pool_tokens(x, 64)
    grid = x.reshape(24, 24)
    assert p.shape == (1, 64, 1) and p[0, 0, 0] == grid[:3, :3].mean() and p[0, 9, 0] == grid[3:6, 3:6].mean()
    assert pool_tokens(x, 576) is x
    with pytest.raises(ValueError, match="tokens 100 is not a square whose side divides 24"):
        pool_tokens(x, 100)


def _run(tmp, tok, max_steps, resume=False):
    model = pm.build_model("llava", seed=0)
    ss = _samples(8)
    cache = TokenCache(ss, torch.randn(8, 576, 192, generator=torch.Generator().manual_seed(0)).half())
    return train_decoder(model, tok, cache, [Stage(64, 4, 2)], tmp, seed=1, warmup=2, turns=3, existence_steps=1,
                         eval_every=1, resume=resume, max_steps=max_steps, log=lambda m: None)


def test_resume_gives_the_same_next_step_loss(tmp_path, tok):
    torch.set_num_threads(1)
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    full = _run(a, tok, 3)
    _run(b, tok, 2)
    assert (b / "checkpoint.pt").exists()
    resumed = _run(b, tok, 3, resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], abs=1e-5)
    assert full[-1]["loss"] != pytest.approx(full[-2]["loss"], abs=1e-5)     # the check can tell steps apart
    with pytest.raises(FileNotFoundError, match="no .*checkpoint.pt"):
        _run(tmp_path / "missing", tok, 1, resume=True)


def test_cli_smoke_run_writes_a_loadable_llava_proxy(tmp_path):
    from evals.proxy import load
    from evals.proxy.recipe import main

    out = tmp_path / "run"
    assert main(["tower", "--out", str(out), "--steps", "2", "--teacher-steps", "1", "--batch-size", "4",
                 "--crop", "6", "--threads", "1"]) == 0
    assert main(["decoder", "--out", str(out), "--cache", "6", "--stages", "64:2:2,576:1:1", "--val-n", "6",
                 "--turns", "2", "--existence-steps", "0", "--threads", "1", "--precision", "fp32"]) == 0
    rec = json.loads((out / "llava-proxy" / "training.json").read_text())
    assert rec["steps_done"] == 3 and rec["stages"][0]["tokens"] == 64 and "answer" in rec["history"][-1]
    model, proc = load(folder=out / "llava-proxy")
    assert model.config.text_config.num_hidden_layers == 16
    with pytest.raises(SystemExit):
        main(["decoder", "--out", str(out), "--stages", "100:2:2"])


def test_grounding_loss_is_minus_log_attention_mass(tok):
    """With q = 0 the head attends uniformly over the positions up to each answer's, so the loss is
    log(allowed / shown) per answer: an independent count."""
    from evals.proxy.decoder import grounding_loss

    model = pm.build_model("llava", seed=0)
    ss = _samples(3)
    b = conversation_batch(tok, ss, 3, np.random.default_rng(2), 64)
    ids, rows, at, ground = b["input_ids"], b["rows"], b["at"], b["ground"]
    cfg = model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    q = torch.zeros(ids.shape[0], ids.shape[1], cfg.num_attention_heads * hd)
    k = torch.randn(ids.shape[0], ids.shape[1], cfg.num_key_value_heads * hd)
    keep = ground.any(-1)
    assert keep.any() and not keep.all()                   # some answers show objects, absent kinds show none
    want = torch.log((at[keep] + 1).float() / ground[keep].sum(-1).float()).mean()
    got = grounding_loss(model, q, k, ids, rows, at, ground)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    # the mask marks the image blocks of the objects asked about: a positive existence answer shows its object
    first = int(torch.nonzero(ids[0] == model.config.image_token_id)[0, 0])
    assert ground.shape[1] == 64 and first == 3
    assert float(grounding_loss(model, q, k, ids, rows, at, torch.zeros_like(ground))) == 0.0


def test_block_words_name_what_covers_each_block(tok):
    """An independent reading of a constructed scene: the block under an object's centre names its colour and
    shape, an empty block names nothing, the digit's block names the digit."""
    import dataclasses

    from evals.proxy.decoder import alignment_loss, block_words
    from evals.proxy.scenes import Obj, Sign, make_scene

    base = make_scene(5, n_objects=0)
    obj = Obj("triangle", "purple", "large", x=3 * 42 + 21, y=1 * 42 + 21, s=40)
    sign = Sign("7", x0=6 * 42 + 4, y0=6 * 42 + 4, scale=4)
    scene = dataclasses.replace(base, objects=(obj,), sign=sign)
    sample = dataclasses.replace(make_sample(split_seed("train", 0)), scene=scene)
    w = block_words(tok, [sample], 64)[0]                                   # (64, 2)
    assert tok.convert_ids_to_tokens(w[1 * 8 + 3].tolist()) == ["purple", "triangle"]
    assert w[0].tolist() == [-100, -100] and w[7 * 8 + 0].tolist() == [-100, -100]
    assert tok.convert_ids_to_tokens(w[6 * 8 + 6].tolist()) == ["7", "7"]
    named = (w[:, 0] >= 0).nonzero().flatten().tolist()
    assert 1 * 8 + 3 in named and len(named) <= 4 + 4                      # the object's and the sign's blocks only
    # the loss is low exactly when the image tokens point at their words (at best log 2 for a block named by
    # two words, 0 for the digit's), and log(vocabulary) for tokens that point nowhere
    model = pm.build_model("llava", seed=0)
    emb = model.model.language_model.embed_tokens.weight.detach()
    good = torch.zeros(1, 64, emb.shape[1])
    for i in named:
        good[0, i] = 300 * (emb[w[i, 0]] + emb[w[i, 1]])
    assert float(alignment_loss(model, good, w[None])) < 1.5
    assert float(alignment_loss(model, torch.zeros_like(good), w[None])) == pytest.approx(math.log(emb.shape[0]), abs=1e-4)
