"""GlobalCom2 (arXiv 2501.05179): the thumbnail commands how much of each AnyRes crop is kept, before the decoder."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget import Budget
from ..ops import topk_sorted
from ..registry import register_method
from .base import (TOKEN_PATCH, BudgetMixin, HostInfo, ImageSelection, ImageTokens, Method, Stage,
                   check_newlines, check_positions, patch_selection, split_budget)

ORDERS = ("raster", "score")


def crop_scores(thumb: torch.Tensor, tiles: tuple[int, int]) -> torch.Tensor:
    """Sum of the thumbnail's CLS logits over the tokens mapped to each crop, as the official code maps them:
    token (i, j) of the (s, s) map goes to tile (min(i // (s // rows), rows - 1), min(j // (s // cols), cols - 1)).

    thumb: (s, s) head-mean logits; tiles: (rows, cols). Returns (rows*cols,) in crop order.
    """
    rows, cols = tiles
    h, w = thumb.shape
    r = torch.clamp(torch.arange(h) // max(1, h // rows), max=rows - 1)
    c = torch.clamp(torch.arange(w) // max(1, w // cols), max=cols - 1)
    tile = (r[:, None] * cols + c[None, :]).reshape(-1)
    return torch.zeros(rows * cols, dtype=torch.float32).index_add_(0, tile, thumb.reshape(-1).float())


def crop_ratios(scores: torch.Tensor, retention: float, temperature: float = 10.0) -> torch.Tensor:
    """Per-crop retention ratios r_k = R * (1 + softmax(s / tau)_k - 1/n), clipped at 1 (their mean is R
    unless the clip binds). scores: (n,). Returns (n,)."""
    n = scores.numel()
    s = scores.double()
    sigma = torch.softmax((s - s.max()) / temperature, dim=0)
    return torch.clamp(retention * (1.0 + sigma - 1.0 / n), max=1.0)


def global_scores(thumb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The thumbnail's (s, s) logit map interpolated (bilinear, align_corners=False) to the unpadded crop grid
    (H, W): every crop token's global score. Returns (H, W)."""
    return F.interpolate(thumb[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def _l2n(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-12)


@register_method
@dataclass
class GlobalCom2(BudgetMixin, Method):
    """GlobalCom2: Global Compression Commander (Liu et al., AAAI 2026, arXiv 2501.05179).

    Retention ratio R (``keep_ratio``, default 0.25; ``keep=<tokens>`` means R = keep / the image's patch tokens).
    Scores are the CLS query's pre-softmax logits to each patch in ViT layer ``layer`` (the last, as the official
    code), averaged over heads, computed from that layer's q/k by hooks (the tower keeps SDPA).

    1. Thumbnail (AnyRes base image): keep its top ``floor(P * R)`` tokens (144 of 576 at R = 0.25).
    2. Per-crop ratios: s_k = sum of the thumbnail logits over the tokens that map to crop k (``crop_scores``),
       ``r_k = R * (1 + softmax(s / temperature)_k - 1/n)`` clipped at 1, temperature 10: their mean stays R.
    3. Each crop's tokens (those the host keeps after unpadding) are scored by
       ``l2norm(local logits) + l2norm(global)``, where global is the thumbnail map interpolated to the unpadded
       grid (``global_scores``), both normalised over the crop's tokens; crop k keeps its top ``floor(N_k * r_k)``.

    Packing follows the host: kept tokens in raster order, and by default every newline token of the host's
    layout, counted in the budget (``newlines="count"``: the patches get R less the newline tokens' share, so an
    image keeps at most ``floor(R * its patches)`` tokens, the papers' "10% = up to 288" on a 2880-patch image;
    where per-crop floors of unequal crops would overshoot, the largest crop shares give way). ``newlines="keep"``
    keeps them on top of the budget, as the official code does; ``"drop"`` removes them (see
    ``vlprune.methods.base.split_budget``). A budget at or above the image's tokens keeps everything. The official
    code differs in two more places that are not the default: it emits the thumbnail's tokens in descending score order (offered as
    ``thumbnail_order="score"``: the thumbnail's kept slots carry its kept tokens sorted by score) and it writes
    each crop's kept tokens by their index in the unpadded token list into a padded 24x24 grid with a newline per
    padded row (not offered: it adds tokens the host does not lay out, and misplaces tokens of column-padded crops).

    LLaVA-1.5 (one partition, not covered by the official code): the top ``floor(P * R)`` patches by the same
    logits. RoPE positions are contiguous (as the official code) unless ``rope_positions="original"``.

    Shapes: CLS logits (crops, H, S) -> head mean (N,) -> thumbnail top-k, per-crop ratios, holistic top-k ->
    kept (K,) ascending.
    """

    name = "globalcom2"
    stages = (Stage.VISION, Stage.PRE_LLM)
    paper = "arXiv 2501.05179"
    temperature: float = 10.0
    layer: int = -1
    thumbnail_order: str = "raster"
    newlines: str = "count"
    rope_positions: str = "contiguous"

    def __post_init__(self):
        if self.keep is None and self.keep_ratio is None and self.budget is None:
            self.budget = Budget(keep_ratio=0.25)  # the released code's retention_ratio
        self._init_budget()
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"globalcom2: temperature must be a positive number (paper: 10); got {t!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"globalcom2: layer must be an integer ViT layer (-1 = last); got {self.layer!r}")
        if self.thumbnail_order not in ORDERS:
            raise ValueError(f"globalcom2: thumbnail_order must be one of {ORDERS}; got {self.thumbnail_order!r}")
        check_newlines(self.name, self.newlines)
        check_positions(self.name, self.rope_positions)

    def check(self, info: HostInfo) -> None:
        nv = info.n_vision_layers
        if not -nv <= self.layer < nv:
            raise ValueError(f"globalcom2: layer={self.layer} is outside the vision tower's {nv} layers "
                             f"(allowed {-nv}..{nv - 1})")

    def vision_layers(self, n_vision_layers: int, feature_layer: int) -> list[int]:
        return [self.layer % n_vision_layers]

    def retention(self, n_patch: int) -> float:
        if self.budget.keep is not None:
            return min(1.0, self.budget.keep / max(1, n_patch))
        return self.budget.keep_ratio

    def select(self, image: ImageTokens) -> ImageSelection | None:
        lay = image.layout
        patch = lay.kind == TOKEN_PATCH
        n_patch = int(patch.sum())
        base = lay.partitions[0]
        if any(p.grid[0] <= 0 for p in lay.partitions):
            raise ValueError("globalcom2 needs the image's whole patch grids; apply it before methods that drop tokens")
        if self.budget.covers(lay.n):
            return None
        r = self.retention(n_patch)
        total = self.budget.keep if self.budget.keep is not None else int(math.floor(n_patch * r + 1e-9))
        fixed, k_patch = split_budget(lay, total, self.newlines)
        if self.newlines == "count":
            r = min(r, k_patch / max(1, n_patch))  # the ratio left to the patches once the newline tokens count
        logits = image.cls_logits(self.layer).mean(0)  # (N,) head mean, NaN for newlines
        per_part = base.grid[0] * base.grid[1]
        n_thumb = per_part if r >= 1.0 else int(math.floor(per_part * r + 1e-9))
        if self.budget.keep is not None and lay.tiles is None:
            n_thumb = min(k_patch, per_part)
        if n_thumb >= per_part and (lay.tiles is None or r >= 1.0):
            return patch_selection(lay, fixed, [patch.nonzero().squeeze(1)], budget=total)
        thumb_sel = base.tokens[topk_sorted(logits[base.tokens], n_thumb)]
        picks = [thumb_sel]
        if lay.tiles is not None:
            grid = lay.partitions[1]
            thumb = logits[base.tokens].reshape(base.grid)
            ratios = crop_ratios(crop_scores(thumb, lay.tiles), r, self.temperature)
            glob = global_scores(thumb, grid.grid).reshape(-1)  # (H*W,) in the grid partition's raster order
            gscore = torch.full((lay.n,), float("nan"))
            gscore[grid.tokens] = glob
            crops = [(patch & (lay.crop == k)).nonzero().squeeze(1) for k in range(1, lay.n_crops)]
            n_ks = [int(math.floor(t.numel() * float(ratios[k]) + 1e-9)) for k, t in enumerate(crops)]
            while n_ks and n_thumb + sum(n_ks) > k_patch:  # per-crop floors of unequal crops overshot the budget
                n_ks[max(range(len(n_ks)), key=lambda i: n_ks[i])] -= 1
            for toks, n_k in zip(crops, n_ks):
                if toks.numel() == 0:
                    continue
                holistic = _l2n(logits[toks]) + _l2n(gscore[toks])
                picks.append(toks[topk_sorted(holistic, n_k)])
        keep = torch.cat([fixed] + picks).sort().values
        if self.thumbnail_order == "score" and thumb_sel.numel():
            order = thumb_sel[torch.sort(logits[thumb_sel], descending=True, stable=True).indices]
            slots = (keep[:, None] == thumb_sel[None, :]).any(1).nonzero().squeeze(1)  # thumbnail slots, ascending
            feats = image.features[keep.to(image.features.device)].clone()
            feats[slots.to(feats.device)] = image.features[order.to(image.features.device)]
            return ImageSelection(keep=keep, features=feats, budget=total)
        return ImageSelection(keep=keep, budget=total)
