"""Vision towers that pack every image of a call into one sequence (Qwen2-VL, Qwen2.5-VL): token counts, the
no-CLS score and the per-image layouts, for the engine's PRE_LLM and stats code.

Such a tower takes ``(patches, grid_thw)``: the patch rows of all images one after another (S = sum t*h*w), with
attention confined to groups that each block receives as ``cu_seqlens`` (one group per image, or per window where the
tower attends in windows). A block's attention module has a fused ``qkv`` projection and applies a 2-D rotary
embedding (``position_embeddings``) to q and k. After the last block a merger turns each run of ``unit`` = m*m
consecutive rows into one LLM token (m x m neighbouring patches), optionally after reordering (a window order).

The no-CLS score (the engine's rule for towers without a CLS token): the attention each patch receives, summed over
every query of its attention group in the chosen block (computed from that block's own q/k after its rotary
embedding, the block's attention call untouched), divided by the image's patch count: the mean attention the patch
receives from all patches of its image (queries outside its window give it none). An LLM token's score is the sum
over its m x m patches (the merger's grouping), so the scores of an image's tokens sum to 1; methods read them as
log-probabilities (``ImageTokens.cls_logits``), exactly like a CLS row's.

What the host description adds (besides the :class:`~vlprune.engine.Engine` fields): ``vision`` (the tower),
``vision_layers`` (its blocks, each with ``attn.qkv``), ``unit`` (patches per LLM token), ``vit_heads``,
``vision_rope(q, k, cos, sin)`` (the tower's rotary function on (S, H, hd)) and ``token_order(grid_thw)``: None, or
(N,) for each LLM-token slot of the merger's input order the token's index in raster order.

Legend: S packed patches, N LLM tokens, H heads, hd head size.
"""
from __future__ import annotations

import time

import torch

from .. import cost
from ..methods.base import TOKEN_PATCH, ImageLayout, Partition
from ..ops import log_share, received_attention


def token_grid_layout(rows: int, cols: int, frames: int = 1) -> ImageLayout:
    """An image of ``frames`` x rows x cols LLM tokens in raster order, with no CLS or newline: each token is its own
    score slot (``vit_index`` = token index in crop 0)."""
    n = frames * rows * cols
    kind = torch.full((n,), TOKEN_PATCH)
    grid = (rows, cols) if frames == 1 else (-1, -1)
    return ImageLayout(kind=kind, crop=torch.zeros(n, dtype=torch.long), vit_index=torch.arange(n),
                       partitions=[Partition("image", torch.arange(n), grid)], n_crops=1)


class PackedVisionRuntime:
    """Hooks on a packed tower; mixed in ahead of :class:`vlprune.engine.Engine` by the host description."""

    cls_token = False
    token_order = None  # or a method grid_thw -> (N,) raster index of each merger-order token slot

    def attach_vision(self, state) -> None:
        method = state.method
        nv = len(self.vision_layers)
        if method.merge_layer(nv) is not None:
            raise ValueError(
                f"{method.name}: token merging inside the vision tower needs a tower that runs images as a batch of "
                f"equal grids; {type(self.model).__name__}'s tower packs all images into one sequence. Turn the ViT "
                f"merge off (for mustdrop: merging=False) or use another method")
        self.merge_at = None
        h = state.handles
        h.append(self.vision.register_forward_pre_hook(self._packed_pre(state), with_kwargs=True))
        for i, blk in enumerate(self.vision_layers):
            h.append(blk.register_forward_pre_hook(self._packed_block_pre(state, i), with_kwargs=True))
        for l in self.vit_layers:
            h.append(self.vision_layers[l].attn.qkv.register_forward_hook(self._packed_qkv(state, l)))

    def _packed_pre(self, state):
        def hook(mod, args, kwargs):
            if state.run.llm:
                state.new_run()
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            state.vision_logits = {}
            state.vit_merge = None
            order = self.token_order(grid) if self.token_order is not None else None
            state._packed = {"grid": grid, "order": order, "at": {}}
            state.run.vision.append(cost.VisionCall(batch=int(grid.shape[0]), tokens_per_layer=[], groups=[]))
            return None

        return hook

    def _packed_block_pre(self, state, i):
        def hook(mod, args, kwargs):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            cu = kwargs.get("cu_seqlens")
            call = state.run.vision[-1] if state.run.vision else None
            if call is not None:
                call.tokens_per_layer.append(int(hs.shape[0]))
                call.groups.append((cu[1:] - cu[:-1]).tolist())
            if i in self.vit_layers:
                state._packed["at"][i] = (cu, kwargs.get("position_embeddings"))
            return None

        return hook

    def _packed_qkv(self, state, layer):
        attn = self.vision_layers[layer].attn
        heads = self.vit_heads

        def hook(mod, args, out):
            cu, pe = state._packed["at"].pop(layer)
            t0 = time.perf_counter()
            s = out.shape[0]
            qkv = out.reshape(s, 3, heads, -1)
            q, k = qkv[:, 0], qkv[:, 1]  # (S, H, hd)
            if pe is not None:
                q, k = self.vision_rope(q, k, *pe)
            total = torch.zeros(heads, s, dtype=torch.float32, device=out.device)
            bounds = cu.tolist()
            for a, b in zip(bounds[:-1], bounds[1:]):
                qg = q[a:b].transpose(0, 1)[None]
                kg = k[a:b].transpose(0, 1)[None]
                got, flops = received_attention(qg, kg, attn.scaling)
                total[:, a:b] = got[0]
                state.run.scoring_flops += flops
            state.vision_logits[layer] = self._token_scores(state, total)
            state.run.method_seconds += time.perf_counter() - t0

        return hook

    def _token_scores(self, state, total: torch.Tensor) -> torch.Tensor:
        """(H, S) attention received per patch (merger input order) -> (n_images, H, N_max) log-shares per LLM token
        in raster order, padded with the log of 0."""
        h, s = total.shape
        tok = total.view(h, s // self.unit, self.unit).sum(-1)  # the merger's m x m groups
        order = state._packed["order"]
        if order is not None:
            raster = torch.empty_like(tok)
            raster[:, order.to(tok.device)] = tok
            tok = raster
        grid = state._packed["grid"].tolist()
        n_tok = [t * hh * ww // self.unit for t, hh, ww in grid]
        out = torch.zeros(len(grid), h, max(n_tok), dtype=torch.float32, device=tok.device)
        off = 0
        for i, ((t, hh, ww), n) in enumerate(zip(grid, n_tok)):
            out[i, :, :n] = tok[:, off:off + n] / (t * hh * ww)
            off += n
        return log_share(out).detach()
