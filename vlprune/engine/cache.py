"""After the decoder: the prefill's stats records, the cache record that later calls follow, KV_CACHE eviction and
the cache-length report that ``generate`` reads.

Legend: B batch, T sequence, N visual tokens, K kept.
"""
from __future__ import annotations

import time
import types
import weakref

import torch

from .. import cost
from ..methods.base import CacheContext
from ..state import CacheRecord, Selection


class CacheRuntime:
    """Hooks after the decoder and on the LM head; mixed into :class:`vlprune.engine.Engine`."""

    def _text_post(self, state):
        def hook(mod, args, kwargs, out):
            call, state.call = state.call, None
            if call is None:
                return None
            state.run.llm.append(cost.LLMCall(batch=call["batch"], q_per_layer=list(call["q"]),
                                              kv_per_layer=list(call["kv"]), lm_head_rows=0))
            if call["mode"] == "continue":
                call["record"].covered += call["q"][0]
                return None
            if call["mode"] != "prefill":
                return None
            seq = state.seq
            run = state.run
            run.visual_per_layer = [v.sum(1).tolist() for (_, _, v) in seq.per_layer]
            run.tokens_per_layer = [v.sum(1).tolist() for (_, v, _) in seq.per_layer]
            last_o, _, last_v = seq.per_layer[-1]
            run.kept_positions = [last_o[b_i][last_v[b_i]].cpu() for b_i in range(last_o.shape[0])]
            run.visual_positions = {}
            for li, (o, _, v) in enumerate(seq.per_layer):
                if li == 0 or o.shape != seq.per_layer[li - 1][0].shape or not torch.equal(v, seq.per_layer[li - 1][2]):
                    run.visual_positions[li] = [o[b_i][v[b_i]].cpu() for b_i in range(o.shape[0])]
            seq.captures.clear()
            cache = _cache_of(out) if hasattr(out, "get") else None
            if cache is None or not (call["changed_pre"] or seq.substitute or self.kv_parts):
                return None
            prefix = list(seq.per_layer)
            delta = call.get("delta", torch.zeros(call["batch"], dtype=torch.long))
            rec = CacheRecord(cache=weakref.ref(cache), prompt_len=call["prompt_len"], covered=call["prompt_len"],
                              prefix=prefix, delta=delta,
                              layer0_pruned=call["changed_pre"], positions=self.positions,
                              layer_delta=list(seq.shifts))
            self._evict(state, rec, cache)
            if rec.layer0_pruned:
                _report_original_length(cache, rec)
            state.records.append(rec)
            return None

        return hook

    def _evict(self, state, rec, cache):
        for p in self.kv_parts:
            ctx = CacheContext(n_layers=len(self.layers), visual=[x[2] for x in rec.prefix],
                               valid=[x[1] for x in rec.prefix], original=[x[0] for x in rec.prefix])
            t0 = time.perf_counter()
            plan = p.evict(ctx)
            state.run.method_seconds += time.perf_counter() - t0
            if not plan:
                continue
            for l, keep in plan.items():
                orig, valid, visual = rec.prefix[l]
                lists = []
                for b_i, kv in enumerate(keep):
                    kv = torch.as_tensor(kv, dtype=torch.long, device=orig.device).reshape(-1)
                    lists.append(kv.unique().sort().values)
                sel = Selection.from_lists(lists, valid, left=True)
                layer = cache.layers[l]
                layer.keys = sel.apply(layer.keys, dim=2)
                layer.values = sel.apply(layer.values, dim=2)
                new_orig = torch.where(sel.idx >= 0, sel.apply(orig), torch.full_like(sel.idx, -1))
                rec.prefix[l] = (new_orig, sel.valid, sel.apply(visual) & sel.valid)
                state.run.evicted[l] = [int(v.sum()) - int(n.sum()) for v, n in zip(valid, sel.valid)]
                if l == 0:
                    rec.layer0_pruned = True

    def _lm_head_hook(self, state):
        def hook(mod, args, out):
            if state.run.llm:
                state.run.llm[-1].lm_head_rows = int(args[0].shape[1])

        return hook


def _cache_of(mapping):
    """The cache from call kwargs or a model output (``cache`` in transformers >= 5.2, ``past_key_values`` before)."""
    cache = mapping.get("cache")
    return mapping.get("past_key_values") if cache is None and "past_key_values" in mapping else cache


def _real_len(cache, layer: int) -> int:
    """Entries the layer's cache holds now (what the next step attends to besides itself). A sliding-window layer
    reports its cumulative length in get_seq_length, which an eviction does not change, so its tensor is read."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer >= len(layers):
        return 0
    keys = getattr(layers[layer], "keys", None)
    if torch.is_tensor(keys) and keys.dim() >= 3:
        return int(keys.shape[-2])
    return layers[layer].get_seq_length()


def _report_original_length(cache, rec: CacheRecord) -> None:
    """Make ``cache.get_seq_length()`` report the prompt-frame length the cache covers.

    ``generate`` reads it to decide which tokens of a later turn are new; after pruning before the decoder the
    tensors hold fewer entries than the conversation has tokens. Only this cache object is changed.
    """
    real = type(cache).get_seq_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        r = rec
        if layer_idx == 0 and r.cache() is self:
            return r.covered
        return real(self, layer_idx)

    cache.get_seq_length = types.MethodType(get_seq_length, cache)
