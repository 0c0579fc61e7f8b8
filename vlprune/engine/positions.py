"""Token positions under pruning: what kept tokens' positions become, for 1-D RoPE position ids (B, T).

Where positions are touched (all 1-D today): ``PrefillRuntime._prefill`` (kept tokens' ids after a PRE_LLM drop,
``Selection.apply`` on (B, T), renumbered under "contiguous"), ``PrefillRuntime._continue`` (later calls on a pruned
cache: ids minus the tokens dropped), ``LayerRuntime._layer_pre`` (ids and cos/sin sliced at a pruned layer,
``Engine.rotary`` for renumbered ones). A multi-axis host (M-RoPE, position ids (3, B, T)) gathers each axis with
the same Selection along dim 2 and shifts every axis alike; its rope deltas move with them.

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
