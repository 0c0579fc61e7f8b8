"""Decoder layers: LLM_LAYER pruning of hidden states, mask, positions and RoPE cos/sin at the layers a method names;
q/k capture for attention rows (computed for the requested rows only, never by switching the kernel); observed
module outputs; per-layer token counts.

Legend: B batch, T sequence, N visual tokens, D hidden, H heads, K kept.
"""
from __future__ import annotations

import time

import torch

from ..methods.base import LayerContext
from ..ops import attention_rows as _attention_rows
from ..ops import repeat_kv
from ..state import Selection, causal_mask, gather_rows
from .cache import _cache_of, _real_len
from .positions import _dropped_before, _last_valid


class LayerRuntime:
    """Decoder-layer hooks; mixed into :class:`vlprune.engine.Engine`."""

    def _layer_pre(self, state, i):
        n_layers = len(self.layers)

        def hook(mod, args, kwargs):
            call = state.call
            if call is None or call["mode"] == "pass":
                if call is not None:
                    self._note_lengths(call, i, args[0].shape[1], kwargs)
                return None
            hs = args[0]
            if call["mode"] == "continue":
                kwargs["attention_mask"] = call["masks"][i]
                shift = call["record"].layer_delta[i] if call["record"].layer_delta else None
                if shift is not None:  # this layer's prefill was renumbered: continue its numbering
                    key = id(shift)
                    if key not in call["positions"]:
                        pos = kwargs["position_ids"] - shift.to(hs.device)[:, None]
                        call["positions"][key] = (pos, self.rotary(hs, pos))
                    kwargs["position_ids"], kwargs["position_embeddings"] = call["positions"][key]
                self._note_lengths(call, i, hs.shape[1], kwargs)
                return None
            seq = state.seq
            for p in self.prune_at.get(i, []):
                pi = self.part_index[id(p)]
                pe = seq.position_embeddings if seq.substitute else kwargs["position_embeddings"]
                ctx = LayerContext(layer=i, n_layers=n_layers, hidden=hs, visual=seq.visual, valid=seq.valid,
                                   last=_last_valid(seq.valid), attention_rows=self._rows_fn(state, hs.shape[1]),
                                   entering_rows=self._entering_fn(state, i, hs, pe, seq.valid),
                                   observed={k[1:]: v for k, v in seq.observed.items() if k[0] == pi},
                                   visual_at_start=seq.per_layer[0][2].sum(1) if seq.per_layer else seq.visual.sum(1),
                                   protected=seq.protected,
                                   report=lambda key, value: state.run.reports.__setitem__(key, value))
                t0 = time.perf_counter()
                keep = p.prune(ctx)
                state.run.method_seconds += time.perf_counter() - t0
                if keep is None:
                    continue
                lists, dropped = [], False
                for b_i, kv in enumerate(keep):
                    vis = seq.visual[b_i].nonzero().squeeze(1)
                    if kv is None:
                        kv = vis
                    kv = torch.as_tensor(kv, dtype=torch.long, device=hs.device).reshape(-1)
                    if kv.numel() and not bool(seq.visual[b_i, kv].all()):
                        raise ValueError(f"{p.name}.prune returned indices that are not visual tokens at layer {i}")
                    dropped |= kv.numel() < vis.numel()
                    text = (~seq.visual[b_i] & seq.valid[b_i]).nonzero().squeeze(1)  # padding goes too
                    lists.append(torch.cat([text, kv]).unique().sort().values)
                if not dropped:
                    continue
                sel = Selection.from_lists(lists, seq.valid, left=call["left"])
                pos = kwargs.get("position_ids") if not seq.substitute else seq.position_ids
                if p.positions == "contiguous" and not self.multi_axis:
                    # renumber without gaps: each kept token moves down by the tokens dropped before it here, and
                    # later calls on the cache continue this layer's numbering (CacheRecord.layer_delta)
                    if pos is None:
                        pos = torch.arange(hs.shape[1], device=hs.device)[None]
                    pos = torch.where(sel.idx >= 0, sel.apply(pos) - _dropped_before(sel, seq.valid),
                                      torch.zeros_like(sel.idx))
                    shift = (seq.valid.sum(1) - sel.valid.sum(1)).to(hs.device)
                    seq.shift = shift if seq.shift is None else seq.shift + shift
                    hs = sel.apply(hs)
                    seq.position_embeddings = self.rotary(hs, pos)
                    seq.position_ids = pos
                else:
                    hs = sel.apply(hs)
                    cos, sin = kwargs["position_embeddings"] if not seq.substitute else seq.position_embeddings
                    seq.position_embeddings = (sel.apply(cos), sel.apply(sin))
                    seq.position_ids = None if pos is None else sel.apply(pos)
                mask = kwargs.get("attention_mask") if not seq.substitute else seq.attention_mask
                if mask is None and sel.padded:
                    seq.attention_mask = causal_mask(sel.valid, hs.shape[1], torch.bool)
                else:
                    seq.attention_mask = sel.apply_mask(mask)
                seq.advance(sel)
                seq.substitute = True
            if seq.substitute:
                kwargs["position_embeddings"] = seq.position_embeddings
                kwargs["position_ids"] = seq.position_ids
                kwargs["attention_mask"] = seq.attention_mask
            seq.per_layer.append((seq.original, seq.valid, seq.visual))
            seq.shifts.append(seq.shift)
            if i in self.score_at:
                cos, sin = kwargs["position_embeddings"]
                seq.captures[i] = {"cos": cos, "sin": sin, "valid": seq.valid}
            self._note_lengths(call, i, hs.shape[1], kwargs)
            return (hs,) + tuple(args[1:]), kwargs

        return hook

    def _note_lengths(self, call, i, q, kwargs):
        cache = _cache_of(kwargs)
        call["q"][i] = int(q)
        call["kv"][i] = int(q) + (0 if cache is None else _real_len(cache, i))

    def _llm_capture(self, state, layer, which):
        def hook(mod, args, out):
            call = state.call
            if call is not None and call["mode"] == "prefill" and layer in state.seq.captures:
                state.seq.captures[layer][which] = out

        return hook

    def _observe(self, state, layer, module):
        def hook(mod, args, kwargs, out):
            call = state.call
            if call is None or call["mode"] != "prefill":
                return None
            x_in = kwargs.get("hidden_states", args[0] if args else None)
            x_out = out[0] if isinstance(out, tuple) else out
            t0 = time.perf_counter()
            seq = state.seq
            for pi, p in self.observe_at[layer]:
                v = p.observe(layer, module, x_in, x_out, seq.valid)
                if v is not None:
                    seq.observed[(pi, layer, module)] = v
            b, t, d = x_in.shape
            state.run.scoring_flops += 8.0 * b * t * d * len(self.observe_at[layer])  # norms and dot products
            state.run.method_seconds += time.perf_counter() - t0
            return None

        return hook

    def _entering_fn(self, state, i, hs, position_embeddings, valid):
        """Attention rows of decoder layer i computed from its input ``hs`` (before it runs)."""

        def entering_rows(rows: torch.Tensor) -> torch.Tensor:
            layer = self.layers[i]
            attn = layer.self_attn
            hd = attn.head_dim
            x = layer.input_layernorm(hs)  # (B, T, D)
            b, t, d = x.shape
            rows = rows.to(x.device)
            r = rows.shape[1]
            q = _qk_norm(attn, "q", attn.q_proj(gather_rows(x, rows)).view(b, r, -1, hd)).transpose(1, 2)  # (B, H, R, hd)
            k = _qk_norm(attn, "k", attn.k_proj(x).view(b, t, -1, hd)).transpose(1, 2)  # (B, Hkv, T, hd)
            cos, sin = position_embeddings
            if cos.shape[0] != b:
                cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
            q, _ = self.apply_rope(q, q, gather_rows(cos, rows), gather_rows(sin, rows))
            k, _ = self.apply_rope(k, k, cos, sin)
            k = repeat_kv(k, attn.num_key_value_groups)
            probs = _attention_rows(q, k, rows, attn.scaling, key_valid=valid, causal=True)
            h_q = q.shape[1]
            state.run.scoring_flops += 2.0 * b * (r * d * h_q * hd + t * d * k.shape[1] // attn.num_key_value_groups * hd
                                                 + h_q * r * t * hd)
            return probs

        return entering_rows

    def _rows_fn(self, state, t_now):
        def rows_fn(layer: int, rows: torch.Tensor) -> torch.Tensor:
            cap = state.seq.captures.get(layer)
            if cap is None or "k" not in cap:
                raise RuntimeError(
                    f"decoder layer {layer} attention was not captured; list it in the method's score_layers() "
                    f"(captured: {sorted(state.seq.captures)})"
                )
            attn = self.layers[layer].self_attn
            hd = attn.head_dim
            b, t, _ = cap["k"].shape
            q = _qk_norm(attn, "q", cap["q"].view(b, t, -1, hd)).transpose(1, 2)  # (B, H, T, hd)
            k = _qk_norm(attn, "k", cap["k"].view(b, t, -1, hd)).transpose(1, 2)  # (B, Hkv, T, hd)
            cos, sin = cap["cos"], cap["sin"]
            if cos.shape[0] != b:
                cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
            rows = rows.to(q.device)
            qr = gather_rows(q.transpose(1, 2), rows).transpose(1, 2)  # (B, H, R, hd)
            qr, _ = self.apply_rope(qr, qr, gather_rows(cos, rows), gather_rows(sin, rows))
            k, _ = self.apply_rope(k, k, cos, sin)
            k = repeat_kv(k, attn.num_key_value_groups)
            # rows index the captured layer's sequence; causal order and padding as that layer saw them
            probs = _attention_rows(qr, k, rows, attn.scaling, key_valid=cap["valid"], causal=True)
            state.run.scoring_flops += 2.0 * b * qr.shape[1] * rows.shape[1] * t * hd
            return probs

        return rows_fn

    def _deepstack(self, state, original):
        """A wrapper of the decoder's ``_deepstack_process(hidden, visual_pos_masks, embeds)`` (Qwen3-VL's DeepStack:
        vision features added at the image tokens after the first decoder layers, from a mask and rows of the whole
        prompt): in a pruned prefill the mask and the rows become those of the image tokens the layer still has."""

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            call = state.call
            if call is None or call["mode"] != "prefill" or not state.seq.per_layer:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            orig, valid, visual = state.seq.per_layer[-1]  # the sequence of the layer that just ran
            if orig.shape == visual_pos_masks.shape and torch.equal(orig, torch.arange(orig.shape[1], device=orig.device)
                                                                    .expand_as(orig)):
                return original(hidden_states, visual_pos_masks, visual_embeds)
            full = visual_pos_masks.to(orig.device)
            rank = (torch.cumsum(full.reshape(-1).long(), 0) - 1).reshape(full.shape)  # row of each image token
            now = visual & valid
            rows = rank.gather(1, orig.clamp(min=0))[now]
            return original(hidden_states, now, visual_embeds[rows.to(visual_embeds.device)])

        return deepstack_process


def _qk_norm(attn, which: str, x: torch.Tensor) -> torch.Tensor:
    """Per-head q/k normalisation where the attention module has one (Qwen3: ``q_norm`` / ``k_norm`` on (..., hd)
    before RoPE); x: (B, T, H, hd)."""
    norm = getattr(attn, f"{which}_norm", None)
    return x if norm is None else norm(x)
