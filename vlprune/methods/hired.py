"""HiRED (arXiv 2408.10945): a fixed visual-token budget over AnyRes partitions, spent before the decoder."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import Budget
from ..ops import topk_sorted
from ..registry import register_method
from .base import (TOKEN_PATCH, BudgetMixin, HostInfo, ImageSelection, ImageTokens, Method, Stage,
                   check_newlines, check_positions, patch_selection, split_budget)

ALLOCATIONS = ("spatial", "raster_stripes")


def _cuts(n: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` near-equal consecutive ranges of ``range(n)``: [0, ..., n]."""
    return [(i * n) // parts for i in range(parts + 1)]


def region_scores(attn: torch.Tensor, tiles: tuple[int, int], allocation: str = "spatial",
                  alpha: float = 0.5) -> torch.Tensor:
    """Visual-content score of each crop from the thumbnail's attention map.

    attn: (s, s) the thumbnail's CLS attention (raster order); tiles: (rows, cols) of the AnyRes crop grid.
    Returns (rows*cols,) scores in crop order (crop 1 = tile (0, 0), then along the row).
    "spatial": sum of attn over the block of thumbnail rows/columns under each tile.
    "raster_stripes": count of the top floor(s*s*(1-alpha)) tokens in each of rows*cols consecutive stripes of
    the flattened map.
    """
    rows, cols = tiles
    h, w = attn.shape
    if allocation == "spatial":
        rc, cc = _cuts(h, rows), _cuts(w, cols)
        return torch.stack([attn[rc[r]:rc[r + 1], cc[c]:cc[c + 1]].sum() for r in range(rows) for c in range(cols)])
    if allocation == "raster_stripes":
        flat = attn.reshape(-1)
        n_top = int(math.floor(flat.numel() * (1.0 - alpha) + 1e-9))
        mask = torch.zeros(flat.numel())
        mask[topk_sorted(flat, n_top)] = 1.0
        cuts = _cuts(flat.numel(), rows * cols)
        return torch.stack([mask[cuts[i]:cuts[i + 1]].sum() for i in range(rows * cols)])
    raise ValueError(f"hired: allocation must be one of {ALLOCATIONS}; got {allocation!r}")


def allocate(n_budget: int, n_crops: int, per_partition: int, alpha: float,
             scores: torch.Tensor) -> tuple[int, list[int]]:
    """HiRED's budget split: (thumbnail tokens, [tokens of crop 1..k]).

    n_budget: N; n_crops: k; per_partition: P; scores: (k,) visual-content scores of the crops.
    """
    n_base = min(int(math.floor(alpha * n_budget + 1e-9)), per_partition)
    n_sub = min(n_budget - n_base, n_crops * per_partition)
    total = float(scores.sum())
    if total <= 0:
        shares = [n_sub // n_crops] * n_crops  # no signal: split evenly
    else:
        shares = [int(math.floor(n_sub * float(s) / total + 1e-9)) for s in scores]
    return n_base, [min(s, per_partition) for s in shares]


@register_method
@dataclass
class HiRED(BudgetMixin, Method):
    """HiRED: High-Resolution Early Dropping (Arif et al., AAAI 2025, arXiv 2408.10945).

    A fixed visual-token budget, spent before the decoder. For an AnyRes image (the base image, or "thumbnail", and k
    crops, each a P = 24x24 patch grid in LLaVA-NeXT) the budget is ``N = floor((k+1) * P * keep_ratio)``:

    1. Allocation. The thumbnail gets ``N0 = min(floor(alpha * N), P)``; the crops share ``Ns = min(N - N0, k * P)``
       in proportion to a visual-content score of each crop, read from the thumbnail's CLS attention in ViT layer
       ``allocation_layer`` (0): ``Ni = min(floor(Ns * s_i / sum_j s_j), P)``.
    2. Selection. Each partition keeps its top-``Ni`` patches by its own CLS attention in ``selection_layer`` (the
       layer the host takes its features from: 22 of 24 in LLaVA's CLIP).

    CLS attention is the softmax of the CLS query over the partition's whole ViT sequence, summed over heads, computed
    from the layer's q/k by hooks (the tower keeps SDPA).

    Where the paper and the official code differ, the default follows the paper and the code is an option:

    * ``allocation="spatial"`` (paper): s_i = sum of the thumbnail's attention over the block of the thumbnail grid
      that covers crop i (the thumbnail grid cut into the AnyRes tile grid's rows and columns).
      ``allocation="raster_stripes"`` (official code): s_i = how many of the thumbnail's top ``floor(P * (1 - alpha))``
      tokens fall in stripe i of the raster-ordered token list: on a 2x2 grid tile (0, 0) reads thumbnail rows 0-5,
      (0, 1) rows 6-11, (1, 0) rows 12-17, (1, 1) rows 18-23 (horizontal stripes, not quadrants; the two mappings
      agree only for one-column grids).
    * Newline tokens: ``newlines="drop"`` (default) removes them as the official code does, so an image keeps at
      most N tokens (the paper's "20% = up to 576" on a 5-view image). ``newlines="count"`` keeps every newline
      token of the host's layout (the row structure the decoder was trained with) and counts them in N;
      ``newlines="keep"`` keeps them on top of N (see ``vlprune.methods.base.split_budget``). The official code
      drops them even at a full budget; here a budget at or above the image's tokens keeps everything.
    * Crops are selected among the tokens the host keeps after unpadding, so no budget is spent on padding (the
      official code selects on the padded 24x24 grid and unpadding then removes padded picks, so its count can fall
      below the budget). A budget at or above the image's patch count keeps every patch (the official allocation
      would still clamp crops at P and floor the shares).

    LLaVA-1.5 (one partition): the top ``floor(P * keep_ratio)`` patches (115 of 576 at 0.2) by selection-layer CLS
    attention. A LLaVA-NeXT image with no crops is treated the same way. ``keep=<tokens>`` sets N directly.
    Kept tokens stay in raster order; RoPE positions are contiguous (as in the official code) unless
    ``rope_positions="original"``.

    Shapes: CLS logits (crops, H, S) -> attention (N,) -> per partition top-k -> kept (K,) ascending.
    """

    name = "hired"
    stages = (Stage.VISION, Stage.PRE_LLM)
    paper = "arXiv 2408.10945"
    alpha: float = 0.5
    allocation_layer: int = 0
    selection_layer: int | None = None
    allocation: str = "spatial"
    newlines: str = "drop"
    rope_positions: str = "contiguous"

    def __post_init__(self):
        if self.keep is None and self.keep_ratio is None and self.budget is None:
            self.budget = Budget(keep_ratio=0.2)  # the paper's default budget
        self._init_budget()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"hired: alpha (the thumbnail's share of the budget) must be in [0, 1]; got {a!r}")
        for field_name in ("allocation_layer", "selection_layer"):
            v = getattr(self, field_name)
            if v is None and field_name == "selection_layer":
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"hired: {field_name} must be an integer ViT layer (0-based); got {v!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"hired: allocation must be one of {ALLOCATIONS}; got {self.allocation!r}")
        check_newlines(self.name, self.newlines)
        check_positions(self.name, self.rope_positions)

    def check(self, info: HostInfo) -> None:
        nv = info.n_vision_layers
        for field_name in ("allocation_layer", "selection_layer"):
            v = getattr(self, field_name)
            if v is not None and not -nv <= v < nv:
                raise ValueError(f"hired: {field_name}={v} is outside the vision tower's {nv} layers "
                                 f"(allowed {-nv}..{nv - 1})")

    def vision_layers(self, n_vision_layers: int, feature_layer: int) -> list[int]:
        sel = feature_layer if self.selection_layer is None else self.selection_layer
        return sorted({sel % n_vision_layers, self.allocation_layer % n_vision_layers})

    def n_budget(self, n_partitions: int, per_partition: int) -> int:
        """N: ``keep`` as given, or floor(partitions * P * keep_ratio)."""
        if self.budget.keep is not None:
            return self.budget.keep
        return int(math.floor(n_partitions * per_partition * self.budget.keep_ratio + 1e-9))

    def select(self, image: ImageTokens) -> ImageSelection | None:
        lay = image.layout
        patch = lay.kind == TOKEN_PATCH
        n_patch = int(patch.sum())
        base = lay.partitions[0]
        if base.grid[0] <= 0:
            raise ValueError("hired needs the image's whole patch grids; apply it before methods that drop tokens")
        per_part = base.grid[0] * base.grid[1]
        n_parts = lay.n_crops if lay.tiles is not None else 1
        if self.budget.covers(lay.n):
            return None
        total = self.n_budget(n_parts, per_part)
        fixed, n_budget = split_budget(lay, total, self.newlines)
        if n_budget >= n_patch:
            return patch_selection(lay, fixed, [patch.nonzero().squeeze(1)], budget=total)
        sel_scores = image.cls_attention(image.vision_layer(self.selection_layer), reduce="sum")  # (N,)
        if lay.tiles is None:
            toks = patch.nonzero().squeeze(1)
            picks = [toks[topk_sorted(sel_scores[toks], n_budget)]]
        else:
            base_toks = base.tokens
            attn0 = image.cls_attention(self.allocation_layer, reduce="sum")[base_toks].reshape(base.grid)
            scores = region_scores(attn0, lay.tiles, self.allocation, self.alpha)
            n_base, n_crop = allocate(n_budget, lay.n_crops - 1, per_part, self.alpha, scores)
            picks = [base_toks[topk_sorted(sel_scores[base_toks], n_base)]]
            for i, k in enumerate(n_crop, start=1):
                toks = (patch & (lay.crop == i)).nonzero().squeeze(1)
                picks.append(toks[topk_sorted(sel_scores[toks], k)])
        return patch_selection(lay, fixed, picks, budget=total)
