"""The cost of what actually ran (vlprune.stats) against torch's FlopCounterMode, pruned and unpruned."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlprune
from vlprune import cost
from conftest import HOSTS, inputs_for

cost.register_sdpa_cpu_flop_formula()

CASES = [("random", {"keep": 10**6}), ("pool", {"keep": 64}), ("cls_attn", {"keep": 48}), ("fastv", {"k": 2, "keep": 40}),
         ("random", {"keep": 30})]


def _count(model, inputs, mode):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        if mode == "forward":
            model(**inputs)
        else:
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return counter.get_total_flops()


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{list(c[1].values())[-1]}")
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_stats_cost_matches_flop_counter(hosts, host, case, mode):
    name, kw = case
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
    if name in ("cls_attn", "fastv"):
        assert report.scoring > 0


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
