from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def window_similarity(x: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Mean pairwise cosine similarity inside each non-overlapping ``window`` x ``window`` window of a token grid,
    self-pairs excluded: sum_{i != j} cos(x_i, x_j) / (w^2 (w^2 - 1)).

    x: (h, w, D) with h and w multiples of ``window`` (a remainder is ignored). Returns (h // window, w // window).
    """
    h, w, d = x.shape
    gh, gw = h // window, w // window
    xw = x[: gh * window, : gw * window].float().reshape(gh, window, gw, window, d).permute(0, 2, 1, 3, 4)
    xw = F.normalize(xw.reshape(gh, gw, window * window, d), dim=-1)  # (gh, gw, w2, D)
    s = xw.sum(2)  # (gh, gw, D)
    n = window * window
    pair_sum = (s * s).sum(-1) - n  # sum over i != j of cos = |sum x|^2 - sum |x|^2
    return pair_sum / (n * (n - 1))


@dataclass
class MergePlan:
    """How one ViT sequence is shortened: old token i goes to new slot ``assign[i]`` (new features = mean of the
    old tokens of a slot). ``rep[k]`` is the old token whose place slot k takes (the last token of its group in
    raster order); ``score[k]`` the window similarity of merged slots (NaN for single tokens)."""

    assign: torch.Tensor  # (S,)
    rep: torch.Tensor  # (S',)
    score: torch.Tensor  # (S',)

    @property
    def n_new(self) -> int:
        return int(self.rep.numel())


def window_merge_plan(x: torch.Tensor, grid: tuple[int, int], window: int = 3, threshold: float = 0.8,
                      prefix: int = 1) -> MergePlan:
    """Merge every ``window`` x ``window`` window of the patch grid whose mean pairwise cosine similarity is at least
    ``threshold`` into one token. x: (S, D) a ViT sequence with ``prefix`` leading tokens (CLS) kept as they are and
    h*w patches in raster order. New slots follow the raster order of their representatives (prefix first)."""
    h, w = grid
    s_len = x.shape[0]
    patches = x[prefix:prefix + h * w].reshape(h, w, -1)
    sim = window_similarity(patches, window)  # (gh, gw)
    gh, gw = sim.shape
    group = torch.arange(h * w).reshape(h, w).clone()  # group id = its representative's patch index
    wsim = torch.full((h * w,), float("nan"))
    for a in range(gh):
        for b in range(gw):
            if float(sim[a, b]) >= threshold:
                rows = slice(a * window, (a + 1) * window)
                cols = slice(b * window, (b + 1) * window)
                rep = int(group[rows, cols].max())
                group[rows, cols] = rep
                wsim[rep] = float(sim[a, b])
    group = group.reshape(-1)
    reps = torch.unique(group)  # ascending = raster order of representatives
    slot_of = torch.full((h * w,), -1, dtype=torch.long)
    slot_of[reps] = torch.arange(reps.numel()) + prefix
    assign = torch.empty(s_len, dtype=torch.long)
    assign[:prefix] = torch.arange(prefix)
    assign[prefix:prefix + h * w] = slot_of[group]
    rep_old = torch.cat([torch.arange(prefix), reps + prefix])
    score = torch.cat([torch.full((prefix,), float("nan")), wsim[reps]])
    return MergePlan(assign=assign, rep=rep_old, score=score)


def merge_tokens(x: torch.Tensor, assign: torch.Tensor, n_new: int) -> torch.Tensor:
    """Average the tokens of each slot: x (S, D), assign (S,) -> (n_new, D) in x's dtype."""
    out = torch.zeros(n_new, x.shape[-1], dtype=torch.float32, device=x.device)
    out.index_add_(0, assign.to(x.device), x.float())
    count = torch.bincount(assign.to(x.device), minlength=n_new).clamp_min(1).to(torch.float32)
    return (out / count[:, None]).to(x.dtype)


def merge_batch(x: torch.Tensor, plans: list) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Apply one MergePlan per sequence of x (B, S, D) (None = keep all): (out (B, S', D), valid (B, S') bool,
    plans with None replaced by the identity). Shorter results are right-padded with zero rows (valid False);
    S' is the longest merged length."""
    b, s, d = x.shape
    plans = [p if p is not None else identity_plan(s) for p in plans]
    n_new = max(p.n_new for p in plans)
    out = x.new_zeros(b, n_new, d)
    valid = torch.zeros(b, n_new, dtype=torch.bool, device=x.device)
    for i, p in enumerate(plans):
        out[i, : p.n_new] = merge_tokens(x[i], p.assign, p.n_new)
        valid[i, : p.n_new] = True
    return out, valid, plans


def identity_plan(s: int) -> MergePlan:
    """The plan that keeps all s tokens as they are."""
    return MergePlan(assign=torch.arange(s), rep=torch.arange(s), score=torch.full((s,), float("nan")))
