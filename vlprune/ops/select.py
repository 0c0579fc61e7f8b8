from __future__ import annotations

import torch


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a 1-D ``scores`` (N,), returned in ascending index order (K,).

    NaN scores rank below every number. Ties break toward the lower index, so the result is deterministic.
    """
    if scores.dim() != 1:
        raise ValueError(f"topk_sorted expects a 1-D score vector, got shape {tuple(scores.shape)}")
    n = scores.shape[0]
    k = max(0, min(int(k), n))
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    # stable descending sort: ties keep index order
    order = torch.sort(s, descending=True, stable=True).indices[:k]
    return order.sort().values
