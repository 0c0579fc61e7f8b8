"""The vision-tower side of the runtime: ViT token counts, CLS-attention capture, ViT token merging and the
projector's row count. Hooks go on the modules the host description names (``vision``, ``vision_layers``,
``get_projector()``); nothing here knows which host it runs in.

Legend: B batch, S ViT sequence, N visual tokens, D hidden, H heads, K kept.
"""
from __future__ import annotations

import time

import torch

from .. import cost
from ..ops import cls_logits_from_qk, log_share, merge_batch, received_attention
from .selection import runs as _runs


def vision_layers_of(tower):
    """The encoder layers of a CLIP/SigLIP-style transformers vision tower."""
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        obj = tower
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
            return obj
        except AttributeError:
            continue
    raise TypeError(
        f"vision tower {type(tower).__name__} has no encoder.layers; vlprune's VISION seams support CLIP/SigLIP-style "
        f"towers from transformers"
    )


class VisionRuntime:
    """ViT-side hooks; mixed into :class:`vlprune.engine.Engine`.

    ``cls_token``: whether the tower's sequence starts with a CLS token. Without one (SigLIP, Qwen-VL's ViT) the
    CLS-attention scores that methods read (``ImageTokens.cls_logits`` / ``cls_attention``) are replaced by the mean
    attention each patch receives from all patches of its sequence in the same layer, as log-probabilities
    (``ops.received_attention`` over the sequence length): the rule of VisionZip and VisPruner for encoders without
    CLS.
    """

    cls_token = True

    def _vision_pre(self, state):
        def hook(mod, args):
            if state.run.llm:
                state.new_run()
            state.vision_logits = {}
            state._vision_q = {}
            state.vit_merge = None
            pv = args[0] if args else None
            batch = int(pv.shape[0]) if pv is not None else 0
            state.run.vision.append(cost.VisionCall(batch=batch, tokens_per_layer=[]))

        return hook

    def _vision_layer_pre(self, state):
        def hook(mod, args):
            if state.run.vision:
                state.run.vision[-1].tokens_per_layer.append(int(args[0].shape[1]))

        return hook

    def _vit_q(self, state, layer):
        def hook(mod, args, out):
            state._vision_q[layer] = out

        return hook

    def _vit_k(self, state, layer, attn):
        heads = getattr(attn, "num_heads", None) or self.vcfg.num_attention_heads
        scale = getattr(attn, "scale", None) or (attn.head_dim**-0.5)

        def hook(mod, args, out):
            q = state._vision_q.pop(layer, None)
            if q is None:
                return
            t0 = time.perf_counter()
            b, s, hd_all = out.shape
            if self.cls_token:
                logits = cls_logits_from_qk(q, out, heads, scale)  # (Bv, H, S)
                state.run.scoring_flops += 2.0 * b * s * hd_all
            else:  # no CLS row: the mean attention each patch receives, as log-shares
                hd = hd_all // heads
                qh = q.reshape(b, s, heads, hd).transpose(1, 2)
                kh = out.reshape(b, s, heads, hd).transpose(1, 2)
                got, flops = received_attention(qh, kh, scale)
                logits = log_share(got / s)
                state.run.scoring_flops += flops
            state.vision_logits[layer] = logits.detach()
            state.run.method_seconds += time.perf_counter() - t0

        return hook

    def _vision_merge_pre(self, state, i):
        """ViT layer i > merge layer: the first one shortens each crop's sequence by the method's MergePlan (padding
        crops to a common length with a key mask); later ones receive that mask."""
        first = i == self.merge_at + 1

        def hook(mod, args):
            if not first:
                vm = state.vit_merge
                if vm is None or vm["mask"] is None:
                    return None
                return (args[0], vm["mask"]) + tuple(args[2:])
            x = args[0]  # (Bv, S, D)
            t0 = time.perf_counter()
            method = self.method_of(state)
            wanted = self._merge_wanted(state, method, x.shape[0])
            plans = [method.merge(x[c], (self.side, self.side)) if wanted[c] else None for c in range(x.shape[0])]
            if all(p is None or p.n_new == x.shape[1] for p in plans):
                state.run.method_seconds += time.perf_counter() - t0
                return None
            bv, s, _ = x.shape
            out, valid, plans = merge_batch(x, plans)
            n_new = out.shape[1]
            mask = None
            if not bool(valid.all()):
                mask = torch.zeros(bv, 1, n_new, n_new, dtype=x.dtype, device=x.device)
                mask = mask.masked_fill(~valid[:, None, None, :], torch.finfo(x.dtype).min)
            state.vit_merge = {"plans": plans, "assign": torch.stack([p.assign for p in plans]).to(x.device),
                               "valid": valid, "mask": mask, "length": s, "merged_length": n_new,
                               "duplicates": sum(s - p.n_new for p in plans)}
            state.run.method_seconds += time.perf_counter() - t0
            return (out, mask) + tuple(args[2:])

        return hook

    def _merge_wanted(self, state, method, n_crops: int) -> list[bool]:
        """Per crop of the vision batch: whether the method merges it (``Method.merges`` of the decoder tokens of
        the crop's image: a budget that covers the image leaves it unmerged)."""
        noted = state.image_call or {}
        sizes = noted.get("image_sizes")
        n_images = len(sizes) if self.anyres and sizes is not None else noted.get("n_images")
        if n_images is None or (self.anyres and sizes is None):
            return [True] * n_crops
        per_crop = [lay.n for lay in self.layouts(n_images, sizes, noted.get("crops")) for _ in range(lay.n_crops)]
        if len(per_crop) != n_crops:
            return [True] * n_crops
        return [method.merges(n) for n in per_crop]

    def _vision_unmerge(self, state):
        """The vision tower's output: merged hidden states go back to one row per original token (a merged token in
        each of its members' places), so that the host's own packing and placeholder count stay as they are; the
        decoder input then keeps one token per group (see ``_dedup``)."""

        def hook(mod, args, out):
            vm = state.vit_merge
            if vm is None:
                return None
            assign, n_new = vm["assign"], vm["merged_length"]

            def expand(t):
                if not torch.is_tensor(t) or t.dim() != 3 or t.shape[1] != n_new or t.shape[0] != assign.shape[0]:
                    return t
                return torch.gather(t, 1, assign[:, :, None].to(t.device).expand(-1, -1, t.shape[2]))

            if getattr(out, "hidden_states", None) is not None:
                out.hidden_states = tuple(expand(t) for t in out.hidden_states)
            if getattr(out, "last_hidden_state", None) is not None:
                out.last_hidden_state = expand(out.last_hidden_state)
            return out

        return hook

    def method_of(self, state):
        return state.method

    def _dedup(self, img, vm, crop_offset):
        """One token per merged group: the group's last member present in the layout (raster order) represents it.
        Returns (kept image-token indices (K,) ascending, merged_into (N,) image index of each token's representative
        or -1 for tokens that represent themselves)."""
        lay = img.layout
        assign = vm["assign"].cpu()
        ok = lay.vit_index >= 0
        group = torch.full((lay.n,), -1, dtype=torch.long)
        crops = lay.crop[ok] + crop_offset
        group[ok] = crops * (vm["length"] + 1) + assign[crops, lay.vit_index[ok]]
        keep = torch.ones(lay.n, dtype=torch.bool)
        merged_into = torch.full((lay.n,), -1, dtype=torch.long)
        order = torch.argsort(group, stable=True)
        g_sorted = group[order]
        for a, b in _runs(g_sorted):
            if g_sorted[a] < 0 or b - a == 1:
                continue
            members = order[a:b]
            rep = members[torch.argmax(lay.vit_index[members])]
            keep[members] = False
            keep[rep] = True
            merged_into[members[members != rep]] = rep
        return keep.nonzero().squeeze(1), merged_into

    def _projector_hook(self, state):
        def hook(mod, args, out):
            x = args[0]
            rows = int(x.numel() // x.shape[-1])  # every row, merged duplicates included: the projector runs on all
            if hasattr(mod, "mqt"):  # a query transformer: its own cost, not the MLP's
                state.run.projector_extra_flops += mod.mqt.flops(x.shape[0], x.shape[1], mod.m)
                return
            state.run.projector_rows += rows

        return hook
