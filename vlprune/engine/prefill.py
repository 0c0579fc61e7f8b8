"""The decoder's input: where the image tokens are, the PRE_LLM splice and compaction of ``inputs_embeds`` (per-sample
keep indices, padded to a batch), and the masks and positions of calls that continue a pruned cache.

Legend: B batch, T sequence, N visual tokens, D hidden, K kept.
"""
from __future__ import annotations

import time
import warnings
import weakref

import torch

from ..methods.base import ImageTokens
from ..state import Selection, SeqState, to_mask_dtype
from .cache import _cache_of, _real_len
from .positions import _dropped_before, gather_positions
from .selection import run_selections


class PrefillRuntime:
    """Decoder-input hooks; mixed into :class:`vlprune.engine.Engine`."""

    def _mm_pre(self, state, image_id: int):
        """Pre-hook on the multimodal model: the image-token mask of this call, from ``input_ids == image_id`` (or,
        without ids, from the embedding of ``image_id``)."""

        def hook(mod, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            has_images = kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs") is not None
            state.pending = None
            if not has_images:
                return None
            if ids is not None:
                mask = ids == image_id
            else:
                emb = kwargs.get("inputs_embeds")
                tok = mod.get_input_embeddings()(torch.tensor(image_id, device=emb.device))
                mask = (emb == tok).all(-1)
            if bool(mask.any()):
                # image sizes and count are read at the decoder's input, after the host encoded the images
                state.pending = {"image_mask": mask, "image_sizes": kwargs.get("image_sizes")}
            return None

        return hook

    # ------------------------------------------------------------------------------------------------ decoder input
    def _text_pre(self, state):
        def hook(mod, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            if emb is None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                emb_len, bsz = ids.shape[1], ids.shape[0]
            else:
                bsz, emb_len = emb.shape[:2]
            cache = _cache_of(kwargs)
            pending, state.pending = state.pending, None
            call = {"mode": "pass", "q": [0] * len(self.layers), "kv": [0] * len(self.layers), "batch": bsz}
            state.call = call
            rec = state.record_for(cache)
            past = 0 if cache is None else _real_len(cache, 0)
            if rec is not None:
                if pending is not None:
                    warnings.warn(
                        "vlprune: this call adds images to a conversation whose cache was pruned; the new images pass "
                        "unpruned (pruning applies to the prompt that starts a cache)",
                        stacklevel=2,
                    )
                if emb_len > 1:  # a new turn on the pruned cache is a new call for stats
                    state.new_run()
                return self._continue(state, rec, call, kwargs, emb_len)
            if past == 0 and state.run.llm:  # a fresh prompt starts a new call for stats
                vis = state.run.vision[-1:] if pending is not None else []
                state.new_run()
                state.run.vision = vis
            if past > 0 or pending is None:
                if pending is not None:
                    warnings.warn(
                        "vlprune: images in a call that continues an unpruned cache pass unpruned",
                        stacklevel=2,
                    )
                    state.run.notes.append("images continued an unpruned cache: not pruned")
                return None
            return self._prefill(state, call, kwargs, pending, emb, cache)

        return hook

    def _prefill(self, state, call, kwargs, pending, emb, cache):
        img_mask = pending["image_mask"].to(emb.device)  # (B, T)
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise ValueError(
                f"vlprune needs a 2-D attention_mask (B, T) in prefill; got shape {tuple(am.shape)}. "
                f"Pass the processor's attention_mask unchanged."
            )
        b, t, _ = emb.shape
        valid = am.bool() if am is not None else torch.ones(b, t, dtype=torch.bool, device=emb.device)
        left = am is None or bool(am[:, -1].all())
        call.update(mode="prefill", left=left, prompt_len=t, cache=None if cache is None else weakref.ref(cache))
        state.run.images = []
        if self.multi_axis and self.renumbered:
            state.run.notes.append(
                f"{', '.join(self.renumbered)}: rope_positions='contiguous' is applied as 'original' on "
                f"{type(self.model).__name__}: kept tokens keep their M-RoPE (t, h, w) positions")

        t_sel = time.perf_counter()
        images = self._split_images(state, pending, emb, img_mask)
        changed = False
        keep_lists = []
        new_feats = {}  # (sample, prompt position) -> feature row
        for b_i in range(b):
            # text tokens; the sample's padding goes (each row is padded again to the longest kept row)
            keep_lists.append([(~img_mask[b_i] & valid[b_i]).nonzero().squeeze(1)])
        protected = []  # (sample, prompt position) of protected tokens
        for img, span, crop_offset in images:
            sel_keep = torch.arange(img.n)
            merged = None
            cur = img
            if state.vit_merge is not None:
                sel_keep, merged = self._dedup(img, state.vit_merge, crop_offset)
                cur = img.subset(sel_keep)
            info = {}
            sel_keep, feats, merged, prot = run_selections(self.pre_parts, cur, sel_keep, img.n, merged, info)
            state.run.scoring_flops += info.get("flops", 0.0)
            dropped = sel_keep.numel() < img.n or feats is not None
            changed |= dropped
            pos = span[sel_keep.to(span.device)]
            protected.extend((img.sample, int(span[i])) for i in prot.tolist())
            keep_lists[img.sample].append(pos)
            if feats is not None:
                for j, ppos in enumerate(pos.tolist()):
                    new_feats[(img.sample, ppos)] = feats[j]
            state.run.images.append(
                {"sample": img.sample, "visual_tokens": img.n, "kept": int(sel_keep.numel()), "kept_indices": sel_keep,
                 "merged_into": merged, "partitions": img.layout.partition_counts(), "budget": info.get("budget"),
                 "kept_per_partition": None if merged is not None else img.layout.partition_counts(sel_keep)}
            )
        state.run.method_seconds += time.perf_counter() - t_sel
        seq = SeqState(
            original=torch.arange(t, device=emb.device)[None].expand(b, t).clone(),
            valid=valid,
            visual=img_mask.clone(),
        )
        if protected:
            seq.protected = torch.zeros(b, t, dtype=torch.bool, device=emb.device)
            for s_i, ppos in protected:
                seq.protected[s_i, ppos] = True
        state.seq = seq
        call["changed_pre"] = changed
        if not changed:
            return None
        keeps = [torch.cat(k).sort().values for k in keep_lists]
        sel = Selection.from_lists(keeps, valid, left=left)
        new_emb = sel.apply(emb)
        if new_feats:
            for (s_i, ppos), f in new_feats.items():
                col = int((sel.idx[s_i] == ppos).nonzero()[0, 0])
                new_emb[s_i, col] = f.to(new_emb.dtype)
        seq.advance(sel)
        kwargs["inputs_embeds"] = new_emb
        kwargs.pop("input_ids", None)
        kwargs["attention_mask"] = sel.valid.long()  # explicit: positions may have gaps (no packed-sequence guess)
        pos = kwargs.get("position_ids")  # generate passes padding-aware positions; a plain forward passes none
        if pos is None:
            pos = torch.arange(t, device=emb.device)[None]
        kept_pos = gather_positions(sel, pos, b)
        if self.positions == "contiguous":
            # renumber without gaps: each kept token moves down by the prompt tokens dropped before it
            kept_pos = kept_pos - _dropped_before(sel, valid)
            call["delta"] = valid.sum(1) - sel.valid.sum(1)  # (B,)
        kwargs["position_ids"] = torch.where(sel.idx >= 0, kept_pos, torch.zeros_like(kept_pos))
        return (), kwargs

    def _split_images(self, state, pending, emb, img_mask):
        """Cut the image tokens of the prompt into per-image spans with their layouts and vision scores."""
        b = emb.shape[0]
        total = int(img_mask.sum())
        noted = state.image_call or {}
        sizes = pending.get("image_sizes")
        sizes = noted.get("image_sizes") if sizes is None else sizes
        n_images = noted.get("n_images")
        if self.anyres:
            n_images = len(sizes) if sizes is not None else n_images
        elif n_images is None:
            n_images = total // self.layouts(1, None)[0].n
        layouts = self.layouts(n_images, sizes, noted.get("crops"))
        if sum(l.n for l in layouts) != total:
            raise ValueError(
                f"image tokens and image features do not line up: tokens: {total}, features: "
                f"{sum(l.n for l in layouts)} ({[l.n for l in layouts]} per image)"
            )
        crop_offsets, off = [], 0
        for lay in layouts:
            crop_offsets.append(off)
            off += lay.n_crops
        out, img_i = [], 0
        for s in range(b):
            positions = img_mask[s].nonzero().squeeze(1)
            used = 0
            while used < positions.numel():
                lay = layouts[img_i]
                span = positions[used : used + lay.n]
                used += lay.n
                co, nc = crop_offsets[img_i], lay.n_crops

                def vision(layer, co=co, nc=nc):
                    l0 = (layer + self.info.n_vision_layers) % self.info.n_vision_layers
                    if l0 not in state.vision_logits:
                        raise RuntimeError(
                            f"ViT layer {layer} attention was not captured; captured: {sorted(state.vision_logits)}. "
                            f"List it in the method's vision_layers()."
                        )
                    return state.vision_logits[l0][co : co + nc]

                def vision_merge(layer, co=co, nc=nc):
                    vm = state.vit_merge
                    l0 = (layer + self.info.n_vision_layers) % self.info.n_vision_layers
                    if vm is None or l0 <= self.merge_at:
                        return None
                    return vm["assign"][co: co + nc], vm["valid"][co: co + nc]

                merge_score = None
                vm = state.vit_merge
                if vm is not None:
                    ok = lay.vit_index >= 0
                    crops = lay.crop[ok] + co
                    slot = vm["assign"].cpu()[crops, lay.vit_index[ok]]
                    scores = torch.stack([torch.nn.functional.pad(p.score, (0, vm["merged_length"] - p.n_new),
                                                                  value=float("nan")) for p in vm["plans"]])
                    merge_score = torch.full((lay.n,), float("nan"))
                    merge_score[ok] = scores[crops, slot]
                out.append((ImageTokens(features=emb[s, span], layout=lay, sample=s, index=img_i,
                                        n_vision_layers=self.info.n_vision_layers, feature_layer=self.feature_layer,
                                        _vision=vision if state.vision_logits else None,
                                        _vision_merge=vision_merge, merge_score=merge_score), span, co))
                img_i += 1
        return out

    def _continue(self, state, rec, call, kwargs, q):
        """A call on a pruned cache (decode step or a later turn): per-layer masks and positions."""
        call.update(mode="continue", record=rec, positions={})
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise ValueError(f"vlprune needs a 2-D attention_mask when continuing a pruned cache; got {tuple(am.shape)}")
        dtype = torch.bool if self.tcfg._attn_implementation != "eager" else self._dtype()
        masks, by_prefix = [], {}
        for l in range(len(self.layers)):
            key = id(rec.prefix[l][0])
            if key not in by_prefix:
                cols, ok = rec.columns(l, am, q)
                if q == 1 and bool(ok.all()) and dtype == torch.bool:
                    by_prefix[key] = None
                else:
                    rows = torch.arange(rec.covered, rec.covered + q, device=cols.device)
                    m = (cols[:, None, None, :] <= rows[None, None, :, None]) & ok[:, None, None, :]
                    eye_col = cols.shape[1] - q + torch.arange(q, device=cols.device)
                    m[:, 0, torch.arange(q), eye_col] = True
                    by_prefix[key] = to_mask_dtype(m, dtype)
            masks.append(by_prefix[key])
        call["masks"] = masks
        kwargs["attention_mask"] = masks[0]
        if rec.layer0_pruned:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.arange(rec.covered, rec.covered + q, device=rec.prefix[0][0].device)[None]
            if rec.positions == "contiguous":
                pos = pos - rec.delta.to(pos.device)[:, None]
            kwargs["position_ids"] = pos
        return (), kwargs

    def _dtype(self):
        return next(self.text.parameters()).dtype
