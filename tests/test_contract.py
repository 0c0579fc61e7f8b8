"""Contract tests over every registered method on both hosts: identity, exact removal, replacement, errors."""
from __future__ import annotations

import pytest
import torch

import vlprune
from conftest import HOSTS, contract_kwargs, image_for, inputs_for

ALL = vlprune.list_methods()


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ALL)
def test_full_budget_is_bit_identical(hosts, host, name):
    model, proc = hosts[host]
    inputs = inputs_for(host, proc, n=2)
    ref = _logits(model, inputs)
    with vlprune.pruned(model, name, keep=10**6, **contract_kwargs(name, host, full_budget=True)):
        out = _logits(model, inputs)
        st = vlprune.stats(model)
    assert torch.equal(out, ref)
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum(1)[0])
    assert st["visual_per_layer"][0] == [n_vis] * len(st["visual_per_layer"][0])


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ALL)
def test_remove_restores_exactly(hosts, host, name):
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    ref = _logits(model, inputs)
    hooks_before = _hook_count(model)
    attrs_before = set(vars(model.model))
    projector = model.model.multi_modal_projector
    vlprune.apply(model, name, keep=16, **contract_kwargs(name, host))
    assert vlprune.is_applied(model)
    pruned = _logits(model, inputs)
    assert pruned.shape[1] < ref.shape[1] or not torch.equal(pruned, ref)
    vlprune.remove(model)
    assert not hasattr(model, "_vlprune")
    assert _hook_count(model) == hooks_before
    assert set(vars(model.model)) == attrs_before
    assert model.model.multi_modal_projector is projector
    assert torch.equal(_logits(model, inputs), ref)
    vlprune.remove(model)  # a second remove is a no-op


@pytest.mark.parametrize("host", HOSTS)
def test_apply_twice_equals_second(hosts, host):
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    vlprune.apply(model, "pool", keep=36)
    ref = _logits(model, inputs)
    vlprune.apply(model, "random", keep=16, seed=3)
    hooks_twice = _hook_count(model)
    twice = _logits(model, inputs)
    vlprune.remove(model)
    vlprune.apply(model, "random", keep=16, seed=3)
    once = _logits(model, inputs)
    assert _hook_count(model) == hooks_twice
    vlprune.remove(model)
    assert torch.equal(twice, once)
    assert not torch.equal(twice[:, -1], ref[:, -1])


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ALL)
def test_text_only_passes_through(hosts, host, name):
    model, proc = hosts[host]
    enc = proc.tokenizer(["USER: How many objects are there? ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
        gen_ref = model.generate(**enc, max_new_tokens=5, do_sample=False)
    with vlprune.pruned(model, name, keep=8, **contract_kwargs(name, host)):
        with torch.no_grad():
            model(**inputs_for(host, proc))  # an image call first: its stats must not leak into the next call
            out = model(**enc).logits
            gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
        st = vlprune.stats(model)
    assert st["schedule"].vision == [] and st["images"] == [] and st["schedule"].projector_rows == 0
    assert [c.q_per_layer[0] for c in st["schedule"].llm] == [enc["input_ids"].shape[1]] + [1] * 4
    assert torch.equal(out, ref)
    assert torch.equal(gen, gen_ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep": 0}, r"keep=0"),
        ({"keep": -5}, r"keep=-5"),
        ({"keep": 1.5}, r"1\.5"),
        ({"keep": "64"}, r"'64'"),
        ({"keep_ratio": 0.0}, r"keep_ratio=0\.0"),
        ({"keep_ratio": 1.5}, r"keep_ratio=1\.5"),
        ({"keep": 8, "keep_ratio": 0.5}, r"exactly one"),
    ],
)
@pytest.mark.parametrize("name", ["random", "pool", "cls_attn", "fastv"])
def test_bad_budgets_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vlprune.get_method(name, **kwargs)


def test_missing_budget_raises():
    with pytest.raises(ValueError, match="needs a budget"):
        vlprune.get_method("pool")


def test_unknown_method_did_you_mean(hosts):
    model, _ = hosts["llava"]
    with pytest.raises(ValueError, match=r"unknown method 'fastvv'.*Did you mean 'fastv'"):
        vlprune.apply(model, "fastvv", keep=8)
    assert not vlprune.is_applied(model)


def test_unknown_hyperparameter(hosts):
    model, _ = hosts["llava"]
    with pytest.raises(ValueError, match=r"fastv: unknown hyperparameter 'layer_k'.*Allowed: keep, keep_ratio, k, .*budget"):
        vlprune.apply(model, "fastv", keep=8, layer_k=3)
    # the same message on every path: by name, and a close typo gets its suggestion
    with pytest.raises(ValueError, match=r"hired: unknown hyperparameter 'alpah'. Did you mean 'alpha'\?"):
        vlprune.get_method("hired", keep=8, alpah=0.5)


def test_unsupported_model_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(TypeError, match=r"'LlamaForCausalLM'.*Supported: transformers LlavaForConditionalGeneration"):
        vlprune.apply(model, "pool", keep=8)
    assert not hasattr(model, "_vlprune")


def test_layer_out_of_range(hosts):
    model, _ = hosts["llava"]
    with pytest.raises(ValueError, match=r"k=4 must be below the decoder's 4 layers"):
        vlprune.apply(model, "fastv", k=4, keep=8)
    with pytest.raises(ValueError, match=r"k=0"):
        vlprune.apply(model, "fastv", k=0, keep=8)
    with pytest.raises(ValueError, match=r"layer=7 is outside the vision tower's 4 layers"):
        vlprune.apply(model, "cls_attn", layer=7, keep=8)
    assert not vlprune.is_applied(model)


def test_registry_is_sorted_and_checked():
    assert ALL == sorted(ALL)
    assert {"random", "pool", "cls_attn", "fastv"} <= set(ALL)
    from vlprune.registry import register_method

    with pytest.raises(ValueError, match="already registered"):
        @register_method
        class Dup(vlprune.Method):
            name = "pool"
    with pytest.raises(ValueError, match="lower-case"):
        @register_method
        class Bad(vlprune.Method):
            name = "Bad-Name"


def test_budget_resolve():
    B = vlprune.Budget
    assert B(keep=64).resolve(576) == 64
    assert B(keep=1000).resolve(576) == 576 and B(keep=1000).covers(576)
    assert B(keep_ratio=0.25).resolve(576) == 144
    assert B(keep_ratio=0.001).resolve(576) == 1
    assert B(keep_ratio=1.0).covers(2928)


def test_pool_after_a_selection_explains_the_order(hosts):
    model, proc = hosts["llava"]
    with vlprune.pruned(model, [vlprune.get_method("random", keep=100), vlprune.get_method("pool", keep=16)]):
        with pytest.raises(ValueError, match="put pool first"):
            with torch.no_grad():
                model(**inputs_for("llava", proc))


@pytest.mark.parametrize("name", ["cls_attn", "globalcom2", "hired", "todre"])  # the selections that read the ViT
def test_select_needs_nothing_from_other_hooks(hosts, name):
    """``select`` reads what it needs from its image (ViT depth, the host's feature layer): a fresh method, never asked
    for its vision layers, selects exactly as one that was."""
    from vlprune.adapters import find_adapter
    from vlprune.methods.base import ImageTokens

    model, _ = hosts["llava_next"]
    lay = find_adapter(model).layouts(1, torch.tensor([[672, 672]]))[0]
    g = torch.Generator().manual_seed(0)
    logits = {l: torch.randn(lay.n_crops, 2, 577, generator=g) for l in range(4)}
    img = ImageTokens(features=torch.randn(lay.n, 8, generator=g), layout=lay, sample=0, index=0,
                      _vision=lambda layer: logits[layer], n_vision_layers=4, feature_layer=2)
    kw = dict(contract_kwargs(name, "llava_next"), keep_ratio=0.2)
    fresh = vlprune.get_method(name, **kw)
    asked = vlprune.get_method(name, **kw)
    asked.vision_layers(4, 2)
    a, b = fresh.select(img), asked.select(img)
    assert torch.equal(a.keep, b.keep) and a.keep.numel() < lay.n


@pytest.mark.parametrize("name", [n for n in ALL if n != "mqt"])
def test_one_position_policy_check(name):
    """Every method that drops tokens names its RoPE policy ``rope_positions`` and refuses a bad one the same way."""
    import dataclasses

    cls = type(vlprune.get_method(name, **contract_kwargs(name, "llava"), keep=40))
    assert "rope_positions" in {f.name for f in dataclasses.fields(cls)}
    with pytest.raises(ValueError, match=rf"^{name}: rope_positions must be one of \('original', 'contiguous'\); "
                                         rf"got 'shifted'$"):
        vlprune.get_method(name, **contract_kwargs(name, "llava"), keep=40, rope_positions="shifted")
