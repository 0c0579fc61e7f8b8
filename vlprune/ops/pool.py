from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pooled_grid_shape(h: int, w: int, k: int) -> tuple[int, int]:
    """Output grid (h', w') for pooling an (h, w) grid to at most ``k`` cells.

    Picks the largest h'*w' <= k with h' <= h, w' <= w and an aspect ratio within a factor 2 of the input's,
    breaking ties toward the closest aspect ratio. ``k >= h*w`` returns (h, w).
    """
    if k >= h * w:
        return h, w
    if k < 1:
        raise ValueError(f"pooling needs at least one output cell; got k={k}")
    target = math.log(h / w)
    best, best_key = (1, 1), None
    for hh in range(1, h + 1):
        ww = min(w, k // hh)
        if ww < 1:
            break
        for cand in {ww, max(1, ww - 1)}:
            dist = abs(math.log(hh / cand) - target)
            if dist > math.log(2) + 1e-9 and not (hh == 1 and cand == 1):
                continue
            key = (hh * cand, -dist)
            if best_key is None or key > best_key:
                best, best_key = (hh, cand), key
    return best


def pool_grid(x: torch.Tensor, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling of a grid of tokens.

    x: (h, w, D). Returns (pooled (h'*w', D), cell (h*w,) index of the pooled cell each input token fell into).
    Bins follow ``torch.nn.functional.adaptive_avg_pool2d`` (floor/ceil bin edges).
    """
    h, w, d = x.shape
    oh, ow = out_hw
    pooled = F.adaptive_avg_pool2d(x.permute(2, 0, 1)[None].float(), (oh, ow))[0]  # (D, h', w')
    pooled = pooled.permute(1, 2, 0).reshape(oh * ow, d).to(x.dtype)
    rows = torch.tensor([(i * oh) // h for i in range(h)], device=x.device)
    cols = torch.tensor([(j * ow) // w for j in range(w)], device=x.device)
    cell = (rows[:, None] * ow + cols[None, :]).reshape(-1)
    return pooled, cell
