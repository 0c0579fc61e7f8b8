"""The seams themselves: attention rows against eager attention, AnyRes layouts against the host's packing,
KV_CACHE and PROJECTOR extension points used by test methods, and composition of stages."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vlprune
import vlprune.adapters
from conftest import HOSTS, build_host, drop_mask, embeds_reference, greedy_reference, inputs_for, merged_embeddings
from vlprune.methods.base import TOKEN_NEWLINE, ImageSelection, Method, Stage


@dataclass
class _Probe(Method):
    """Records the vision tower's CLS attention and decoder attention rows without pruning anything."""

    name = "probe"
    stages = (Stage.VISION, Stage.LLM_LAYER)
    vit_layer: int = 1
    llm_layer: int = 1

    def vision_layers(self, n_vision_layers, feature_layer):
        return [self.vit_layer]

    def prune_layers(self, n_layers):
        return [self.llm_layer + 1]

    def score_layers(self, n_layers):
        return [self.llm_layer]

    def prune(self, ctx):
        t = ctx.hidden.shape[1]
        self.rows = torch.tensor([[t - 1, t - 5, 3]])
        self.probs = ctx.attention_rows(self.llm_layer, self.rows)
        return None


@pytest.mark.parametrize("host", HOSTS)
def test_attention_rows_match_eager_with_sdpa_kept(host):
    model, proc = build_host(host, attn="sdpa")
    eager, _ = build_host(host, attn="eager")
    inputs = inputs_for(host, proc)
    probe = _Probe()
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True)
        vis_ref = eager.model.vision_tower(
            inputs["pixel_values"] if host == "llava" else _crops(eager, inputs), output_attentions=True
        ).attentions[probe.vit_layer][:, :, 0]  # (crops, H, S)
    with vlprune.pruned(model, probe):
        assert model.config.text_config._attn_implementation == "sdpa"
        assert model.config.vision_config._attn_implementation == "sdpa"
        with torch.no_grad():
            out = model(**inputs).logits
        vis = torch.softmax(model._vlprune.vision_logits[probe.vit_layer], -1)
    torch.testing.assert_close(vis, vis_ref, atol=1e-5, rtol=1e-4)
    llm_ref = ref.attentions[probe.llm_layer][:, :, probe.rows[0]]  # (B, H, R, T)
    torch.testing.assert_close(probe.probs, llm_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, ref.logits, atol=1e-3, rtol=1e-3)  # sdpa vs eager kernels


def _crops(model, inputs):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    n = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
         for s in inputs["image_sizes"].tolist()]
    return torch.cat([pv[:k] for pv, k in zip(inputs["pixel_values"], n)])


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (336, 336), (1000, 300), (300, 900)])
def test_anyres_layout_matches_host_packing(hosts, size):
    model, _ = hosts["llava_next"]
    adapter = vlprune.adapters.find_adapter(model)
    hw = torch.tensor([[size[1], size[0]]])
    lay = adapter.layouts(1, hw)[0]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    n_crops = image_size_to_num_patches(hw[0], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    assert lay.n_crops == n_crops
    d = cfg.text_config.hidden_size
    feats = torch.zeros(n_crops, 576, d)
    feats[:, :, 0] = torch.arange(n_crops)[:, None].float()
    feats[:, :, 1] = torch.arange(1, 577)[None].float()
    packed, lens = model.model.pack_image_features([feats], hw, "default", image_newline=torch.full((d,), -1.0))
    packed = packed[0]
    assert packed.shape[0] == lay.n
    newline = lay.kind == TOKEN_NEWLINE
    assert torch.equal(newline, packed[:, 0] == -1)
    assert torch.equal(lay.crop[~newline], packed[~newline, 0].long())
    assert torch.equal(lay.vit_index[~newline], packed[~newline, 1].long())
    grid = [p for p in lay.partitions if p.name == "grid"][0]
    assert grid.tokens.numel() == grid.grid[0] * grid.grid[1] == int((~newline).sum()) - 576


@dataclass
class _EvictLate(Method):
    """KV_CACHE test method: after prefill, keep only the first ``n`` visual entries in layers >= ``from_layer``."""

    name = "evict_late"
    stages = (Stage.KV_CACHE,)
    from_layer: int = 2
    n: int = 10

    def evict(self, ctx):
        plan = {}
        for l in range(self.from_layer, ctx.n_layers):
            keep = []
            for b in range(ctx.visual[l].shape[0]):
                vis = ctx.visual[l][b].nonzero().squeeze(1)
                non = (~ctx.visual[l][b]).nonzero().squeeze(1)
                keep.append(torch.cat([non, vis[: self.n]]).sort().values)
            plan[l] = keep
        return plan


@pytest.mark.parametrize("host", HOSTS)
def test_kv_cache_stage_evicts_for_decoding(hosts, host):
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    T = inputs["input_ids"].shape[1]
    m = _EvictLate()
    with vlprune.pruned(model, m):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        st = vlprune.stats(model)
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    lens = [cache.layers[l].keys.shape[2] for l in range(4)]
    assert lens[:2] == [T + 5] * 2 and lens[2:] == [T - n_vis + m.n + 5] * 2
    assert st["evicted"][2] == [n_vis - m.n]
    toks = out.sequences[:, T:]
    vis = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    gone = vis[m.n:]

    def mask(L):  # prompt rows see everything; generated rows do not see the evicted entries
        mm = torch.tril(torch.ones(L, L, dtype=torch.bool))
        rows = torch.arange(L) >= T
        mm[rows[:, None] & torch.isin(torch.arange(L), gone)[None, :]] = False
        return mm[None, None]

    ref, _ = greedy_reference(model, inputs, 6, mask, from_layer=2)
    assert torch.equal(toks, ref)
    full, _ = greedy_reference(model, inputs, 6)
    assert not torch.equal(full, ref)


class _ChunkMean(torch.nn.Module):
    """Test compressor: the host's projector, then the mean of consecutive chunks -> m tokens (padded to N)."""

    def __init__(self, original, m):
        super().__init__()
        self.original, self.m = original, m

    def forward(self, x):  # (B, N, Dv) -> (B, N, D): first m rows are the compressed tokens
        y = self.original(x)
        b, n, d = y.shape
        z = y.reshape(b, self.m, n // self.m, d).mean(2)
        return torch.cat([z, torch.zeros(b, n - self.m, d, dtype=y.dtype)], 1)


@dataclass
class _Compressor(Method):
    name = "chunk_mean"
    stages = (Stage.PROJECTOR,)
    m: int = 16

    def build_projector(self, model, original):
        return _ChunkMean(original, self.m)

    def select(self, image):
        return ImageSelection(keep=torch.arange(self.m))


def test_projector_stage_emits_m_tokens(hosts):
    model, proc = hosts["llava"]
    inputs = inputs_for("llava", proc)
    original = model.model.multi_modal_projector
    with vlprune.pruned(model, _Compressor(m=16)):
        assert model.model.multi_modal_projector is not original
        with torch.no_grad():
            toks = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        st = vlprune.stats(model)
    assert model.model.multi_modal_projector is original
    assert st["visual_per_layer"][0] == [16] * 4
    with torch.no_grad():
        hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        z = original(hs).reshape(1, 16, 36, -1).mean(2)[0]
    ids = inputs["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().squeeze(1)
    emb = model.get_input_embeddings()(ids).detach()
    E = torch.cat([emb[: img[0]], z, emb[img[-1] + 1:]])[None]
    ref = embeds_reference(model, E, torch.ones(1, E.shape[1], dtype=torch.long), 6)
    assert torch.equal(toks, ref)


@pytest.mark.parametrize("host", HOSTS)
def test_composition_pool_then_fastv(hosts, host):
    model, proc = hosts[host]
    inputs = inputs_for(host, proc)
    combo = [vlprune.get_method("pool", keep=144), vlprune.get_method("fastv", k=2, keep=32)]
    with vlprune.pruned(model, combo):
        with torch.no_grad():
            toks = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        st = vlprune.stats(model)
    n_pool = st["images"][0]["kept"]
    assert n_pool <= 144 and st["visual_per_layer"][0] == [n_pool, n_pool, 32, 32]
    # reference: pooled tokens built by a pool-only run's stats, then layers >= 2 mask the tokens FastV dropped
    with vlprune.pruned(model, "pool", keep=144):
        with torch.no_grad():
            model(**inputs)
        pool_st = vlprune.stats(model)
    kept_pool = pool_st["kept_positions"][0]
    ids = inputs["input_ids"][0]
    img = ids == model.config.image_token_id
    keep = torch.cat([(~img).nonzero().squeeze(1), kept_pool]).sort().values
    # pooled features as the pool method produced them: recover from the pool-only prefill's input embeddings
    captured = {}
    def grab(mod, args, kwargs):
        captured["e"] = kwargs["inputs_embeds"]

    with vlprune.pruned(model, "pool", keep=144):
        h = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)  # runs after vlprune's
        with torch.no_grad():
            model(**inputs)
        h.remove()
    E = captured["e"]
    assert E.shape[1] == keep.numel()
    dropped_orig = kept_pool[~torch.isin(kept_pool, st["kept_positions"][0])]
    dropped = [torch.searchsorted(keep, dropped_orig)]
    ref = embeds_reference(model, E, torch.ones(1, E.shape[1], dtype=torch.long), 6,
                           drop_mask(lambda L: torch.ones(1, L), dropped), from_layer=2)
    assert torch.equal(toks, ref)
