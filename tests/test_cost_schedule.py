"""The cost of what actually ran (vlprune.stats) against torch's FlopCounterMode, pruned and unpruned."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlprune
from vlprune import cost
from conftest import HOSTS, inputs_for, tiny_mqt_folder

cost.register_sdpa_cpu_flop_formula()

CASES = [("random", {"keep": 10**6}), ("pool", {"keep": 64}), ("cls_attn", {"keep": 48}), ("fastv", {"k": 2, "keep": 40}),
         ("random", {"keep": 30}),
         # the six methods, each with what it spends on scoring (ViT and decoder attention rows, ToDRE's greedy
         # selection, TransPrune's transition norms); MustDrop with a threshold at which the tiny tower merges
         ("transprune", {}), ("todre", {"keep_ratio": 0.25}), ("hired", {"keep_ratio": 0.2}),
         ("globalcom2", {"keep_ratio": 0.25}), ("mustdrop", {"threshold": 0.5}), ("mqt", {"keep": 8})]


def _count(model, inputs, mode):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        if mode == "forward":
            model(**inputs)
        else:
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return counter.get_total_flops()


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join([c[0]] + [str(v) for v in c[1].values()][-1:]))
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_stats_cost_matches_flop_counter(hosts, host, case, mode):
    name, kw = case
    if name == "mqt":
        if host != "llava":
            pytest.skip("mqt: MQT-LLaVA is a LLaVA-1.5 model")
        kw = dict(kw, weights=tiny_mqt_folder())
    model, proc = hosts[host]
    inputs = inputs_for(host, proc, n=2 if mode == "generate" else 1)
    unpruned = _count(model, inputs, mode)
    with vlprune.pruned(model, name, **kw):
        counted = _count(model, inputs, mode)
        st = vlprune.stats(model)
    report = st["cost"]
    assert report.total == pytest.approx(counted, rel=0.01)
    if kw.get("keep", 0) < 10**5:
        assert counted < unpruned
    else:
        assert counted == unpruned
    if name not in ("random", "pool", "mqt"):
        assert report.scoring > 0


def test_projector_counts_every_row_merged_duplicates_included(hosts):
    model, proc = hosts["llava"]
    inputs = inputs_for("llava", proc)
    with vlprune.pruned(model, "mustdrop", threshold=0.5, prefill=False, decode=False, key_set=False):
        with torch.no_grad():
            model(**inputs)
        st = vlprune.stats(model)
    assert st["images"][0]["kept"] < 576  # windows were merged: the decoder sees fewer tokens
    assert st["schedule"].projector_rows == 576  # but the projector ran on all 576 rows
    assert st["cost"].projector == cost.projector_flops(model.config, 576)


def test_todre_scoring_counts_the_greedy_selection(hosts):
    from vlprune.methods.todre import greedy_flops

    model, proc = hosts["llava_next"]
    inputs = inputs_for("llava_next", proc)
    with vlprune.pruned(model, "todre", keep_ratio=0.25, stage2=False):
        with torch.no_grad():
            model(**inputs)
        st = vlprune.stats(model)
    im = st["images"][0]
    n_patch = im["visual_tokens"] - im["partitions"]["newline"]
    k = im["kept"] - im["partitions"]["newline"]  # the newline tokens are kept inside the budget
    greedy = greedy_flops(n_patch, model.config.text_config.hidden_size, k)
    assert greedy > 0
    vit_rows = st["cost"].scoring - greedy  # what is left: the pivot layer's CLS logits
    assert 0 < vit_rows < greedy
    # LLaVA-NeXT-7B at 25%: 720 of 2880 tokens of 4096 dimensions
    assert greedy_flops(2880, 4096, 720) == pytest.approx(17.0e9, rel=0.01)


def test_equivalent_tokens_and_schedule(hosts):
    model, proc = hosts["llava"]
    inputs = inputs_for("llava", proc)
    with vlprune.pruned(model, "fastv", k=2, keep=40):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        st = vlprune.stats(model)
    assert st["visual_per_layer"] == [[576, 576, 40, 40]]
    assert st["equivalent_tokens"] == [pytest.approx((576 * 2 + 40 * 2) / 4)]
    sched = st["schedule"]
    T = inputs["input_ids"].shape[1]
    assert sched.llm[0].q_per_layer == [T, T, T - 536, T - 536]
    assert [c.q_per_layer for c in sched.llm[1:]] == [[1] * 4] * 2
    assert sched.llm[1].kv_per_layer == [T + 1, T + 1, T - 536 + 1, T - 536 + 1]
    tc = model.config.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    by_hand = 2 * 4 * tc.num_key_value_heads * head_dim * (2 * (T + 2) + 2 * (T - 536 + 2))  # K and V, fp32
    assert cost.schedule_cost(model.config, sched, kv_dtype=torch.float32).kv_bytes == by_hand


def test_paper_convention_reproduces_transprune_table():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000)
    full = cost.llm_prefill_flops(cfg, [576] * 32, convention="paper")
    sched = [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    assert full / 1e12 == pytest.approx(3.82, rel=0.005)
    assert cost.llm_prefill_flops(cfg, sched, convention="paper") / 1e12 == pytest.approx(1.557, rel=0.005)
