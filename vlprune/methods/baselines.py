"""Reference methods that every comparison needs: random, spatial pooling, CLS attention, FastV.

Legend: N visual tokens of one image, T sequence, H heads, K kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import Budget
from ..ops import pool_grid, pooled_grid_shape, topk_sorted
from ..registry import register_method
from .base import (TOKEN_CLS, TOKEN_NEWLINE, BudgetMixin, HostInfo, ImageSelection, ImageTokens, LayerContext, Method,
                   Stage, check_positions)


@register_method
@dataclass
class RandomPrune(BudgetMixin, Method):
    """Keep a seeded uniform random subset of each image's visual tokens before the decoder.

    The draw depends only on ``seed`` and the image's token count: every image with N tokens keeps the same
    positions, whatever the batch, its order or the process it runs in.
    Shapes: features (N, D) -> kept (K,) indices, K = budget.resolve(N).
    """

    name = "random"
    stages = (Stage.PRE_LLM,)
    seed: int = 0
    rope_positions: str = "contiguous"

    def __post_init__(self):
        self._init_budget()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"random: seed must be an integer; got {self.seed!r}")
        check_positions(self.name, self.rope_positions)

    def select(self, image: ImageTokens) -> ImageSelection | None:
        n = image.n
        k = self.budget.resolve(n)
        if k >= n:
            return None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
        return ImageSelection(keep=torch.randperm(n, generator=g)[:k].sort().values)


@register_method
@dataclass
class SpatialPool(BudgetMixin, Method):
    """Average-pool each image's patch grid down to the budget before the decoder.

    The grid (24x24 for LLaVA-1.5; for LLaVA-NeXT the base image and the unpadded crop grid, each with a share of
    the budget proportional to its size) is pooled to the largest (h', w') with h'w' <= share and an aspect ratio
    within a factor 2 of the grid's (``ops.pooled_grid_shape``), so the kept count can fall slightly below the
    budget (e.g. 576 -> 192 is 12x16 = 192, 576 -> 100 is 10x10). LLaVA-NeXT newline tokens are dropped;
    a CLS token (strategy "full") is kept. Pooled tokens take the first slots of the image in raster order and,
    by default, contiguous RoPE positions.
    Shapes: grid (h, w, D) -> pooled (h'*w', D).
    """

    name = "pool"
    stages = (Stage.PRE_LLM,)
    rope_positions: str = "contiguous"

    def __post_init__(self):
        self._init_budget()
        check_positions(self.name, self.rope_positions)

    def select(self, image: ImageTokens) -> ImageSelection | None:
        n = image.n
        k = self.budget.resolve(n)
        if k >= n:
            return None
        lay = image.layout
        cls_tokens = (lay.kind == TOKEN_CLS).nonzero().squeeze(1)
        grids = [p for p in lay.partitions if p.grid[0] > 0]
        if not grids:
            raise ValueError(
                "pool needs whole patch grids, but an earlier method in the composition already dropped tokens from "
                "every grid; put pool first (e.g. [pool, fastv])"
            )
        k_grid = max(len(grids), k - cls_tokens.numel())
        total = sum(p.tokens.numel() for p in grids)
        shares = [max(1, int(k_grid * p.tokens.numel() / total)) for p in grids]
        merged_from = torch.full((n,), -1, dtype=torch.long)  # (N,) pooled slot of each input token
        rows, slot = [image.features[cls_tokens]], 0
        for c in cls_tokens.tolist():
            merged_from[c] = slot
            slot += 1
        for p, share in zip(grids, shares):
            h, w = p.grid
            x = image.features[p.tokens.to(image.features.device)].reshape(h, w, -1)
            pooled, cell = pool_grid(x, pooled_grid_shape(h, w, share))
            rows.append(pooled)
            merged_from[p.tokens] = cell.cpu() + slot
            slot += pooled.shape[0]
        features = torch.cat(rows, 0)
        keep = torch.arange(features.shape[0])
        return ImageSelection(keep=keep, features=features, merged_from=merged_from)


@register_method
@dataclass
class ClsAttention(BudgetMixin, Method):
    """Keep the top-k visual tokens by the CLS token's attention in a chosen ViT layer (FasterVLM-style).

    ``layer`` is a 0-based ViT layer; None means the layer whose output the host feeds the projector (LLaVA:
    22 of 24). Scores are softmax probabilities of the CLS row, averaged over heads, computed from that layer's
    q/k by hooks (SDPA untouched). LLaVA-NeXT: each crop's tokens are scored within their crop; newline tokens
    have no score and are kept last.
    Shapes: CLS logits (crops, H, S) -> scores (N,) -> kept (K,).
    """

    name = "cls_attn"
    stages = (Stage.VISION, Stage.PRE_LLM)
    layer: int | None = None
    rope_positions: str = "contiguous"

    def __post_init__(self):
        self._init_budget()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"cls_attn: layer must be an integer ViT layer index or None; got {self.layer!r}")
        check_positions(self.name, self.rope_positions)

    def check(self, info: HostInfo) -> None:
        if self.layer is not None and not -info.n_vision_layers <= self.layer < info.n_vision_layers:
            raise ValueError(
                f"cls_attn: layer={self.layer} is outside the vision tower's {info.n_vision_layers} layers "
                f"(allowed {-info.n_vision_layers}..{info.n_vision_layers - 1})"
            )

    def vision_layers(self, n_vision_layers: int, feature_layer: int) -> list[int]:
        return [feature_layer if self.layer is None else self.layer]

    def select(self, image: ImageTokens) -> ImageSelection | None:
        k = self.budget.resolve(image.n)
        if k >= image.n:
            return None
        scores = image.cls_attention(image.vision_layer(self.layer))
        scores[image.layout.kind == TOKEN_NEWLINE] = float("nan")
        return ImageSelection(keep=topk_sorted(scores, k))


@register_method
@dataclass
class FastV(BudgetMixin, Method):
    """FastV (Chen et al., ECCV 2024, arXiv 2403.06764): at decoder layer K keep the top-k visual tokens by the
    attention they receive from the last prompt token in layer K-1, heads averaged; drop the rest for all later
    layers, KV cache included.

    ``k`` is the 0-based index of the first layer that sees the pruned sequence (FastV's K=2). The budget counts
    visual tokens per sample (all images of a sample together). Kept tokens keep their original RoPE positions,
    as in FastV's code (``position_ids = keep_indexs``, the kept tokens' indices in the unpruned sequence);
    ``rope_positions="contiguous"`` renumbers the shortened sequence from layer K on instead. Scores come from
    layer K-1's own q/k, for the last row only (SDPA untouched).
    Shapes: attention (B, H, 1, T) -> scores (B, T) -> kept per sample (K,).
    """

    name = "fastv"
    stages = (Stage.LLM_LAYER,)
    k: int = 2
    rope_positions: str = "original"

    def __post_init__(self):
        if self.keep is None and self.keep_ratio is None and self.budget is None:
            self.budget = Budget(keep_ratio=0.5)  # FastV's R = 50%
        self._init_budget()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"fastv: k must be an integer decoder layer >= 1 (pruning before layer k); got k={self.k!r}")
        check_positions(self.name, self.rope_positions)

    def check(self, info: HostInfo) -> None:
        if self.k >= info.n_layers:
            raise ValueError(f"fastv: k={self.k} must be below the decoder's {info.n_layers} layers")

    def prune_layers(self, n_layers: int) -> list[int]:
        return [self.k]

    def score_layers(self, n_layers: int) -> list[int]:
        return [self.k - 1]

    def prune(self, ctx: LayerContext):
        n_vis = ctx.visual.sum(1)
        if all(self.budget.covers(int(n)) for n in n_vis):
            return None
        probs = ctx.attention_rows(self.k - 1, ctx.last[:, None])  # (B, H, 1, T)
        scores = probs.mean(1)[:, 0]  # (B, T)
        out = []
        for b in range(scores.shape[0]):
            vis = ctx.visual[b].nonzero().squeeze(1)
            k = self.budget.resolve(vis.numel())
            out.append(vis[topk_sorted(scores[b, vis], k).to(vis.device)])
        return out
