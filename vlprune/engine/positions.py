"""Token positions under pruning: what kept tokens' positions become, for 1-D RoPE position ids (B, T) and for
multi-axis ones (M-RoPE: (A, B, T), A = 3 axes (t, h, w), or 4 with the 1-D text position first as ``generate``
passes them).

Where positions are touched: ``PrefillRuntime._prefill`` (kept tokens' ids after a PRE_LLM drop, every axis gathered
with the same Selection by ``gather_positions``, renumbered under "contiguous" on 1-D hosts),
``PrefillRuntime._continue`` (later calls on a pruned cache: ids minus the tokens dropped, 1-D "contiguous" only),
``LayerRuntime._layer_pre`` (ids and cos/sin sliced at a pruned layer, ``Engine.rotary`` for renumbered ones).

Multi-axis hosts (``Engine.multi_axis``): a kept token keeps its (t, h, w) position from the host's own rope index,
and later calls continue from the host's own rope deltas, so positions are always "original". An image's M-RoPE
positions span max(h, w) / merge steps, not one step per token: dropping image tokens leaves no run of positions to
close, and "contiguous" (a method's default on 1-D hosts) is applied as "original" there, with a note in
``vlprune.stats(model)["notes"]``.

Legend: B batch, T sequence, K kept.
"""
from __future__ import annotations

import torch

from ..state import Selection


def _dropped_before(sel: Selection, valid: torch.Tensor) -> torch.Tensor:
    """(B, K): for each slot of ``sel``, the valid tokens of the (B, T) sequence that ``sel`` drops before it."""
    b, t = valid.shape
    kept = torch.zeros(b, t + 1, dtype=torch.bool, device=valid.device)
    slot = sel.idx >= 0
    kept.scatter_(1, torch.where(slot, sel.idx, t), slot)  # padding slots (-1) write to a spare column t
    before = torch.cumsum((valid & ~kept[:, :t]).long(), 1)
    return sel.apply(before)


def _last_valid(valid: torch.Tensor) -> torch.Tensor:
    t = valid.shape[1]
    ar = torch.arange(t, device=valid.device)[None].expand_as(valid)
    return torch.where(valid, ar, -1).max(1).values


def gather_positions(sel: Selection, pos: torch.Tensor, b: int) -> torch.Tensor:
    """Kept tokens' position ids: (B|1, T) -> (B, K), or (A, B|1, T) -> (A, B, K) axis by axis."""
    if pos.dim() == 3:
        return torch.stack([sel.apply(p.expand(b, -1)) for p in pos])
    return sel.apply(pos.expand(b, -1))
