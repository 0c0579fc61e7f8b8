"""PRE_LLM selections composed per image, and the run-length helper used by ViT-merge deduplication.

Legend: N visual tokens of one image, D hidden, K kept.
"""
from __future__ import annotations

import torch


def run_selections(parts, cur, keep, n: int, merged=None, info: dict | None = None):
    """Apply the PRE_LLM ``select`` of each part in turn to one image's tokens, composing the results.

    cur: the ImageTokens the first part sees; keep: (K0,) their indices in the image of n tokens (all of them, or
    one representative per ViT-merged group); merged: (n,) representative of each merged token or None.
    Returns (keep (K,) image indices kept, features (K, D) or None when the host's own rows stay, merged (n,) or
    None, protected image indices (kept ones only)). ``info``, where given, receives "flops" (the selections' own
    matrix work, ``ImageSelection.flops``, summed) and "budget" (the last ``ImageSelection.budget`` given).
    """
    feats = None
    prot = torch.empty(0, dtype=torch.long)
    for part in parts:
        sel = part.select(cur)
        if sel is None:
            continue
        if info is not None:
            info["flops"] = info.get("flops", 0.0) + float(sel.flops)
            if sel.budget is not None:
                info["budget"] = int(sel.budget)
        k = sel.keep.cpu()
        if sel.protect is not None:
            prot = torch.cat([prot, keep[k[sel.protect.cpu()]]])
        if sel.features is not None:
            feats = sel.features
            if sel.merged_from is not None:
                merged_full = torch.full((n,), -1, dtype=torch.long)
                mf = sel.merged_from.cpu()
                merged_full[keep[mf >= 0]] = keep[k[mf[mf >= 0]]]
                merged = merged_full
        elif feats is not None:
            feats = feats[k.to(feats.device)]
        keep = keep[k]
        cur = cur.subset(k, sel.features)
    return keep, feats, merged, prot[torch.isin(prot, keep)]


def runs(sorted_vals: torch.Tensor):
    """(start, end) of each run of equal values in a sorted 1-D tensor."""
    n = sorted_vals.numel()
    if n == 0:
        return []
    change = torch.nonzero(sorted_vals[1:] != sorted_vals[:-1]).squeeze(1) + 1
    bounds = [0] + change.tolist() + [n]
    return list(zip(bounds[:-1], bounds[1:]))
