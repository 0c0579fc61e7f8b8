"""TransPrune and ToDRE: hand-computed TTV, IGA and attention shares against eager attention, greedy diversity
against brute force, generate on the pruned cache against a masked no-cache reference, batches."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch

import vlprune
from conftest import HOSTS, build_host, drop_mask, greedy_reference, inputs_for, renumbered
from test_generate import _generate
from vlprune.methods.base import LayerContext, Method, Stage
from vlprune.methods.todre import ToDRE, greedy_k_center, greedy_max_sum, modal_shares
from vlprune.methods.transprune import TransPrune, token_transition

N_NEW = 6


# --------------------------------------------------------------------------------------------- TTV by hand
def test_token_transition_by_hand():
    x_in = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]]])
    x_out = torch.tensor([[[2.0, 0.0], [0.0, -1.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False]])
    e2 = math.exp(2.0)
    # magnitudes 2 and 1; cos 1 and -1 -> 1 - cos = 0 and 2 -> softmax 1/(1+e^2), e^2/(1+e^2); padding 0
    torch.testing.assert_close(token_transition(x_in, x_out, valid),
                               torch.tensor([[2 / (1 + e2), e2 / (1 + e2), 0.0]]))
    # the paper's 1 - |cos| is 0 for both -> softmax 1/2 each
    torch.testing.assert_close(token_transition(x_in, x_out, valid, abs_cos=True), torch.tensor([[1.0, 0.5, 0.0]]))
    # per sample: a second sample in the batch does not change the first one's values
    two = token_transition(torch.cat([x_in, torch.randn(1, 3, 2)]), torch.cat([x_out, torch.randn(1, 3, 2)]),
                           torch.cat([valid, torch.ones(1, 3, dtype=torch.bool)]))
    torch.testing.assert_close(two[:1], token_transition(x_in, x_out, valid))


def test_transprune_layers_scale_with_depth():
    m = TransPrune()
    assert m.prune_layers(32) == [7, 9, 12]  # pruning after 1-based 7, 9, 12 = at the input of 0-based 7, 9, 12
    assert m.observe_layers(32) == [6, 7, 8, 9, 10, 11]  # 1-based 7-12
    assert m._plan(32) == {7: 0.875, 9: 0.625, 12: 0.125}
    assert m._plan(8) == {2: 0.625, 3: 0.125}  # 7 and 9 both land on 2: the later ratio wins
    assert m.observe_layers(8) == [1, 2]
    # the released scripts' budget on LLaVA-1.5: 504, 360, 72 of 576 (layer average 236.25 over 32 layers)
    assert [m._counts(576, r) for r in m.ratios] == [504, 360, 72]
    per_layer = [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    assert sum(per_layer) / 32 == 236.25


# --------------------------------------------------------------------------------------------- probes
@dataclass
class _Probe(Method):
    """Reads the entering layer's attention rows and the observed TTV at one layer; prunes nothing."""

    name = "probe"
    stages = (Stage.LLM_LAYER,)
    at: int = 2

    def prune_layers(self, n_layers):
        return [self.at]

    def observe_layers(self, n_layers):
        return list(range(self.at))

    def observe(self, layer, module, x_in, x_out, valid):
        return token_transition(x_in, x_out, valid)

    def prune(self, ctx: LayerContext):
        t = ctx.hidden.shape[1]
        self.rows = torch.tensor([[t - 3, t - 2, t - 1]])
        self.probs = ctx.entering_rows(self.rows)
        self.observed = {k: v.clone() for k, v in ctx.observed.items()}
        return None


def _eager_run(host, inputs):
    """Eager model: attentions, and each layer's attention/MLP inputs and outputs, with independent hooks."""
    model, _ = build_host(host, attn="eager")
    io = {}
    hooks = []
    for i, layer in enumerate(model.model.language_model.layers):
        def attn_hook(mod, args, kwargs, out, i=i):
            io[(i, "attn")] = (kwargs["hidden_states"], out[0])

        def mlp_hook(mod, args, out, i=i):
            io[(i, "mlp")] = (args[0], out)

        hooks.append(layer.self_attn.register_forward_hook(attn_hook, with_kwargs=True))
        hooks.append(layer.mlp.register_forward_hook(mlp_hook))
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    for h in hooks:
        h.remove()
    return out, io


@pytest.mark.parametrize("host", HOSTS)
def test_entering_rows_and_observed_ttv_match_eager(hosts, host):
    """On the eager model (same hidden states as the reference): IGA's attention rows and the observed TTV."""
    _, proc = hosts[host]
    model, _ = build_host(host, attn="eager")
    inputs = inputs_for(host, proc)
    probe = _Probe()
    with vlprune.pruned(model, probe):
        with torch.no_grad():
            model(**inputs)
    ref, io = _eager_run(host, inputs)
    eager = ref.attentions[probe.at][:, :, probe.rows[0]]  # (B, H, R, T)
    assert (probe.probs - eager).abs().max() < 1e-5
    for (layer, module), v in probe.observed.items():
        x_in, x_out = io[(layer, module)]
        m = x_out.norm(dim=-1) / x_in.norm(dim=-1)
        cos = (x_out * x_in).sum(-1) / (x_out.norm(dim=-1) * x_in.norm(dim=-1))
        torch.testing.assert_close(v, torch.softmax(1 - cos, dim=1) * m, atol=1e-5, rtol=1e-4)
    assert set(probe.observed) == {(l, m) for l in range(probe.at) for m in ("attn", "mlp")}


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("use_iga", [True, False])
def test_transprune_first_stage_against_eager_reference(hosts, host, use_iga):
    """The first prune's kept set equals top-k of alpha*TTV/sum + (1-alpha)*IGA/sum built from eager attention."""
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    with vlprune.pruned(model, "transprune", use_iga=use_iga):
        with torch.no_grad():
            model(**inputs)
        st = vlprune.stats(model)
    first = min(k for k in st["visual_positions"] if k > 0)  # 1 on the 4-layer host
    ref, io = _eager_run(host, inputs)
    ids = inputs["input_ids"][0]
    vis = (ids == model.config.image_token_id).nonzero().squeeze(1)
    ttv = 0
    for layer in range(first):
        for module in ("attn", "mlp"):
            x_in, x_out = io[(layer, module)]
            ttv = ttv + token_transition(x_in, x_out)[0]
    score = ttv[vis] / ttv[vis].sum()
    if use_iga:
        instr = torch.arange(ids.numel())[(ids != model.config.image_token_id)]
        instr = instr[instr > vis[0]]
        att = ref.attentions[first][0].mean(0)[instr].mean(0)  # heads, then instruction rows: (T,)
        score = 0.5 * score + 0.5 * att[vis] / att[vis].sum()
    n_keep = st["visual_per_layer"][0][first]
    assert n_keep == int(vis.numel() * 0.625)  # the 4-layer host merges 0.875 and 0.625 into its layer 1
    want = vis[torch.topk(score, n_keep).indices].sort().values
    assert torch.equal(st["visual_positions"][first][0], want)


def test_text_rows_after_the_first_visual_token_by_hand():
    """The instruction rows TransPrune, ToDRE and MustDrop read: non-visual, valid tokens after the first visual one."""
    from vlprune.methods.base import padded_rows

    # sample 0: [sys, v, v, t, t]; sample 1: [pad, sys, v, t, pad]; sample 2: no visual token
    visual = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ctx = LayerContext(layer=1, n_layers=2, hidden=torch.zeros(3, 5, 1), visual=visual, valid=valid,
                       last=torch.tensor([4, 3, 4]), attention_rows=None)
    text = ctx.text_after_image()
    assert text.tolist() == [[False, False, False, True, True], [False, False, False, True, False], [False] * 5]
    rows, real = ctx.text_rows()
    assert rows.tolist() == [[3, 4], [3, 3], [0, 0]] and real.tolist() == [[True, True], [True, False], [False, False]]
    assert torch.equal(padded_rows(text)[0], rows)


# --------------------------------------------------------------------------------------------- greedy diversity
def _cos(x):
    xn = x / x.norm(dim=-1, keepdim=True)
    return xn @ xn.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_max_sum_each_step_is_the_brute_force_argmin(seed):
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(seed))
    chosen = greedy_max_sum(x, 6, pivot=3).tolist()
    assert chosen[0] == 3 and len(set(chosen)) == 6
    sim = _cos(x)
    for step in range(1, 6):
        sel = chosen[:step]
        sums = {j: sum(float(sim[j, i]) for i in sel) for j in range(9) if j not in sel}
        assert chosen[step] == min(sums, key=sums.get)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_k_center_against_brute_force(seed):
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(seed))
    k = 4
    chosen = greedy_k_center(x, k, pivot=0).tolist()
    dist = 1 - _cos(x)
    for step in range(1, k):
        sel = chosen[:step]
        near = {j: min(float(dist[j, i]) for i in sel) for j in range(9) if j not in sel}
        assert chosen[step] == max(near, key=near.get)

    def radius(centres):
        return max(min(float(dist[j, c]) for c in centres) for j in range(9))

    best = min(radius(c) for c in itertools.combinations(range(9), k) if 0 in c)
    assert radius(chosen) <= 2 * best + 1e-6  # the greedy 2-approximation, against the brute-force optimum


def test_modal_shares_by_hand():
    # one sample, T = 4: [system, visual, visual, text]; the text row puts 0.3 + 0.2 on visual keys
    p_text = torch.tensor([[[0.1, 0.3, 0.2, 0.4]]])
    p_vis = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0]]])
    text = torch.tensor([[False, False, False, True]])
    visual = torch.tensor([[False, True, True, False]])
    s = modal_shares(p_text, p_vis, text, visual, torch.ones(1, 1), torch.ones(1, 2))
    torch.testing.assert_close(s, torch.tensor([[0.5, 0.0]]))


@pytest.mark.parametrize("host", HOSTS)
def test_todre_shares_against_eager_attention(hosts, host):
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    with vlprune.pruned(model, "todre", stage1=False, tau=0.0):
        with torch.no_grad():
            model(**inputs)
        rep = vlprune.stats(model)["reports"]["todre"]
    ref, _ = _eager_run(host, inputs)
    ids = inputs["input_ids"][0]
    vis = ids == model.config.image_token_id
    pos = torch.arange(ids.numel())
    text = ~vis & (pos > vis.nonzero()[0, 0])
    att = ref.attentions[rep["layer"]][0].mean(0)  # (T, T)
    a_tv = att[text][:, vis].sum() / text.sum()
    a_vt = att[vis][:, text].sum() / vis.sum()
    assert rep["layer"] == 2  # 0-based round(7 * 4 / 8) - 1 on the 4-layer decoder; 27 of 32
    assert ToDRE()._layer(32) == 27 and ToDRE().prune_layers(32) == [28]
    assert abs(rep["alpha_t2v"][0] - float(a_tv)) < 1e-5
    assert abs(rep["alpha_v2t"][0] - float(a_vt)) < 1e-6
    assert rep["dropped"] == [False]


def test_todre_visual_to_text_share_with_text_before_the_image(hosts):
    """A prompt whose question precedes the image: visual rows do attend to text keys; chunked rows agree."""
    model, proc = hosts["llava"]
    from vlprune.testing import synthetic_image, tiny_inputs

    inputs = tiny_inputs(proc, [synthetic_image((336, 336))], ["USER: Describe this picture please <image> ASSISTANT:"])
    ref, _ = _eager_run("llava", inputs)
    ids = inputs["input_ids"][0]
    vis = ids == model.config.image_token_id
    pos = torch.arange(ids.numel())
    text = ~vis & (pos > vis.nonzero()[0, 0])
    att = ref.attentions[2][0].mean(0)
    got = []
    for chunk in (7, 1000):
        with vlprune.pruned(model, "todre", stage1=False, tau=0.0, row_chunk=chunk):
            with torch.no_grad():
                model(**inputs)
            got.append(vlprune.stats(model)["reports"]["todre"])
    assert abs(got[0]["alpha_t2v"][0] - float(att[text][:, vis].sum() / text.sum())) < 1e-5
    assert abs(got[0]["alpha_v2t"][0] - float(att[vis][:, text].sum() / vis.sum())) < 1e-6
    assert abs(got[0]["alpha_v2t"][0] - got[1]["alpha_v2t"][0]) < 1e-7


def test_todre_stage1_pivot_and_selection(hosts):
    """Stage 1 = greedy max-sum on the projected features from the pivot of highest last-layer CLS attention."""
    model, proc = hosts["llava"]
    inputs = inputs_for("llava", proc)
    from conftest import merged_embeddings
    from test_hires_methods import _eager_cls_logits

    with vlprune.pruned(model, "todre", keep=50, stage2=False):
        with torch.no_grad():
            model(**inputs)
        kept = vlprune.stats(model)["images"][0]["kept_indices"]
    attn = torch.softmax(_eager_cls_logits("llava", inputs, 3), -1).mean(1)[0, 1:]
    pivot = int(attn.argmax())
    emb = merged_embeddings(model, inputs)[0]
    feats = emb[(inputs["input_ids"][0] == model.config.image_token_id)]
    assert torch.equal(kept, greedy_max_sum(feats, 50, pivot).sort().values)
    assert pivot in kept.tolist()


# --------------------------------------------------------------------------------------------- generate, batches
def _stage_masks(model, inputs, st):
    """Per pruning layer: a no-cache mask that hides the visual tokens dropped before that layer, and the (B, L)
    tokens still present there (padding and dropped tokens excluded)."""
    am = inputs["attention_mask"]
    img = inputs["input_ids"] == model.config.image_token_id
    stages = sorted(k for k in st["visual_positions"] if k > 0)

    def full(L):
        return torch.cat([am, torch.ones(am.shape[0], L - am.shape[1], dtype=am.dtype)], 1).bool()

    out = []
    for layer in stages:
        dropped = []
        for b in range(img.shape[0]):
            vis = img[b].nonzero().squeeze(1)
            dropped.append(vis[~torch.isin(vis, st["visual_positions"][layer][b])])

        def present(L, dropped=dropped):
            p = full(L)
            for b, d in enumerate(dropped):
                p[b, d] = False
            return p

        out.append((layer, drop_mask(full, dropped), present))
    return out


def _staged_reference(model, inputs, st, n_new, renumber=False):
    """No-cache reference: from each pruning layer on, the dropped visual tokens are masked and, with ``renumber``,
    the tokens still present are numbered 0.. without gaps (the "contiguous" policy)."""
    stages = _stage_masks(model, inputs, st)
    layers = model.model.language_model.layers

    def pre(mod, args, kwargs, i):
        build = None
        for layer, b, present in stages:
            if i >= layer:
                build = (b, present)
        if build is not None:
            kwargs["attention_mask"] = build[0](args[0].shape[1])
            if renumber:
                kwargs["position_ids"], kwargs["position_embeddings"] = renumbered(
                    model, args[0], build[1](args[0].shape[1]))
        return args, kwargs

    hs = [l.register_forward_pre_hook(lambda m, a, k, i=i: pre(m, a, k, i), with_kwargs=True)
          for i, l in enumerate(layers)]
    try:
        return greedy_reference(model, inputs, n_new)[0]
    finally:
        for h in hs:
            h.remove()


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("positions", ["contiguous", "original"])
@pytest.mark.parametrize("spec", [("transprune", {}), ("transprune", {"keep": 40, "abs_cos": True}),
                                  ("todre", {"stage1": False, "tau": 1.0}), ("fastv", {"k": 2, "keep": 40})])
def test_in_llm_generate_matches_masked_no_cache_reference(hosts, host, spec, positions):
    """Both RoPE policies: "contiguous" renumbers the shortened sequence at every pruning layer (prefill and the
    decode steps' positions continue that numbering), "original" keeps the prompt's positions."""
    name, kw = spec
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    with vlprune.pruned(model, name, rope_positions=positions, **kw):
        toks, _ = _generate(model, inputs, n=N_NEW)
        st = vlprune.stats(model)
    assert len([k for k in st["visual_positions"] if k > 0]) >= 1
    ref = _staged_reference(model, inputs, st, N_NEW, renumber=positions == "contiguous")
    assert torch.equal(toks, ref)
    if name == "transprune" and not kw:  # the policy matters: the other numbering gives other tokens
        other = _staged_reference(model, inputs, st, N_NEW, renumber=positions != "contiguous")
        assert not torch.equal(toks, other)


def test_in_llm_rope_position_defaults_follow_the_official_codes():
    """TransPrune and MustDrop renumber after each prune (their released codes); FastV keeps the original positions
    (its code sets position_ids to the kept indices); ToDRE (no code) renumbers like its pre-LLM stage."""
    from vlprune.methods.mustdrop import MustDrop

    assert TransPrune().positions == "contiguous"
    assert vlprune.get_method("fastv").positions == "original"
    assert ToDRE().positions == ToDRE(stage1=False).positions == "contiguous"
    for policy in ("contiguous", "original"):  # the merge (before the decoder) and the filter (inside it)
        md = MustDrop(rope_positions=policy) if policy == "original" else MustDrop()
        assert [p.positions for p in md.methods if p.name != "mustdrop_kv"] == [policy, policy]
    for name in ("transprune", "fastv", "todre", "mustdrop"):
        with pytest.raises(ValueError, match="rope_positions must be one of"):
            vlprune.get_method(name, rope_positions="shifted")


def test_contiguous_prefill_positions_are_renumbered(hosts):
    """What each decoder layer receives under "contiguous": position ids 0..L'-1 after every prune (one sample, no
    padding), and a decode step at L'_layer + t."""
    model, proc = hosts["llava"]
    inputs = inputs_for("llava", proc)
    seen = {}
    layers = model.model.language_model.layers

    def rec(mod, args, kwargs, i):
        seen.setdefault(i, []).append(kwargs["position_ids"].clone())

    with vlprune.pruned(model, "transprune", keep=40):
        hs = [l.register_forward_pre_hook(lambda m, a, k, i=i: rec(m, a, k, i), with_kwargs=True)
              for i, l in enumerate(layers)]
        try:
            _generate(model, inputs, n=3)
        finally:
            for h in hs:
                h.remove()
        st = vlprune.stats(model)
    n = inputs["input_ids"].shape[1]
    for i in range(len(layers)):
        L = st["tokens_per_layer"][0][i]
        assert torch.equal(seen[i][0][0], torch.arange(L)), i  # prefill
        assert [int(p[0, -1]) for p in seen[i][1:]] == [L, L + 1], i  # decode steps continue from L
    assert st["tokens_per_layer"][0][-1] < n


@pytest.mark.parametrize("host", HOSTS)
def test_todre_both_stages_generate_matches_reference(hosts, host):
    """Stage 1 removes tokens before the decoder (contiguous positions), stage 2 removes the rest at 7L/8."""
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    with vlprune.pruned(model, "todre", keep=40, tau=1.0):
        toks, _ = _generate(model, inputs, n=N_NEW)
        st = vlprune.stats(model)
    n_vis = 40  # stage 1 keeps 40 visual tokens, LLaVA-NeXT's newline tokens counted among them
    assert st["visual_per_layer"][0] == [n_vis] * 3 + [0]
    assert st["reports"]["todre"]["dropped"] == [True]
    assert st["kept_positions"][0].numel() == 0
    # reference: stage 1 by hand-built embeddings, stage 2 by hiding the kept visual tokens from layer 3 on
    from conftest import embeds_reference, merged_embeddings

    emb = merged_embeddings(model, inputs)[0]
    ids = inputs["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().squeeze(1)
    kept = img[st["images"][0]["kept_indices"]]
    keep = torch.cat([(ids != model.config.image_token_id).nonzero().squeeze(1), kept]).sort().values
    E, A = emb[keep][None], torch.ones(1, keep.numel(), dtype=torch.long)
    vis_new = torch.isin(keep, kept).nonzero().squeeze(1)
    mask = drop_mask(lambda L: torch.ones(1, L, dtype=torch.long), [vis_new])

    def present(L):  # stage 2 renumbers the text that follows the removed visual tokens (the default policy)
        p = torch.ones(1, L, dtype=torch.bool)
        p[0, vis_new] = False
        return p

    ref = embeds_reference(model, E, A, N_NEW, layer_mask=mask, from_layer=3, layer_present=present)
    assert torch.equal(toks, ref)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("spec", [("transprune", {}), ("todre", {"keep_ratio": 0.1, "tau": 0.5}),
                                  ("transprune", {"rope_positions": "original"}),
                                  ("fastv", {"keep": 40, "rope_positions": "contiguous"})])
def test_batch_matches_batch_of_one(hosts, host, spec):
    name, kw = spec
    model, proc = hosts[host]
    batch = inputs_for(host, proc, n=2, padding_side="left")
    assert (batch["attention_mask"] == 0).any()
    with vlprune.pruned(model, name, **kw):
        toks, _ = _generate(model, batch, n=N_NEW)
        st = vlprune.stats(model)
        singles = []
        for b in range(2):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            n_pad = int((one["attention_mask"][0] == 0).sum())
            one = {k: (v[:, n_pad:] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}
            singles.append((_generate(model, one, n=N_NEW)[0], vlprune.stats(model)))
    for b in range(2):
        assert torch.equal(toks[b], singles[b][0][0])
        assert st["visual_per_layer"][b] == singles[b][1]["visual_per_layer"][0]


@pytest.mark.parametrize("name, kwargs, match", [
    ("transprune", {"ratios": (0.5, 0.9, 0.1)}, "non-increasing"),
    ("transprune", {"ratios": (0.5, 0.2)}, "one share per pruning layer"),
    ("transprune", {"prune_at": (9, 7, 12)}, "strictly increasing"),
    ("transprune", {"alpha": 2}, "alpha"),
    ("todre", {"diversity": "dpp"}, "max_sum"),
    ("todre", {"tau": -0.1}, "tau"),
    ("todre", {"stage1": False, "stage2": False}, "both off"),
    ("todre", {"layer": 3}, "must be in 0..2"),
])
def test_bad_hyperparameters_raise(hosts, name, kwargs, match):
    model, _ = hosts["llava"]
    with pytest.raises(ValueError, match=match):
        vlprune.apply(model, name, **kwargs)
    assert not vlprune.is_applied(model)


def test_transprune_schedule_on_a_32_layer_model_gives_the_papers_tflops():
    """The released schedule on a 32-layer decoder: stats show 576 x 7, 504 x 2, 360 x 3, 72 x 20 visual tokens,
    and the paper's FLOPs convention on LLaVA-1.5-7B's dimensions gives its 1.56 TFLOPs (3.82 unpruned)."""
    from transformers import LlamaConfig

    from vlprune import cost
    from vlprune.testing import tiny_llava

    model, proc = tiny_llava(seed=0, text_overrides={"num_hidden_layers": 32})
    inputs = inputs_for("llava", proc)
    with vlprune.pruned(model, "transprune"):
        with torch.no_grad():
            model(**inputs)
        st = vlprune.stats(model)
    schedule = [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    assert st["visual_per_layer"][0] == schedule
    assert sorted(st["visual_positions"]) == [0, 7, 9, 12]
    assert st["equivalent_tokens"][0] == 236.25
    llava_7b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           intermediate_size=11008, vocab_size=32000)
    paper = cost.llm_prefill_flops(llava_7b, st["visual_per_layer"][0], convention="paper") / 1e12
    full = cost.llm_prefill_flops(llava_7b, [576] * 32, convention="paper") / 1e12
    assert round(paper, 2) == 1.56 and round(full, 2) == 3.82
    assert round(100 * paper / full, 1) == 40.8  # the paper's 40.8%
