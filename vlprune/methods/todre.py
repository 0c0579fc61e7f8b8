"""ToDRE (arXiv 2505.18757): diverse visual tokens before the decoder, and all of them dropped inside it once the
text stops attending to them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget import Budget
from ..registry import register_method
from .base import (TOKEN_PATCH, BudgetMixin, HostInfo, ImageSelection, ImageTokens,
                   LayerContext, Method, Stage, check_newlines, check_positions, padded_rows, patch_selection,
                   split_budget)

DIVERSITY = ("max_sum", "k_center")


def greedy_max_sum(x: torch.Tensor, k: int, pivot: int) -> torch.Tensor:
    """Greedy max-sum diversification (ToDRE v2, appendix Algorithm 1): start from ``pivot``; repeatedly add the
    token whose summed cosine similarity to the selected set is smallest. x: (N, D). Returns (k,) indices in the
    order chosen (pivot first)."""
    n = x.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    xn = F.normalize(x.float(), dim=-1)
    chosen = [int(pivot)]
    s = (xn @ xn[pivot, :, None])[:, 0]  # (N,) summed similarity to the chosen set
    s[pivot] = float("inf")
    for _ in range(k - 1):
        c = int(torch.argmin(s))
        chosen.append(c)
        s = s + (xn @ xn[c, :, None])[:, 0]  # chosen tokens stay at +inf
        s[c] = float("inf")
    return torch.tensor(chosen, dtype=torch.long)


def greedy_k_center(x: torch.Tensor, k: int, pivot: int) -> torch.Tensor:
    """Greedy k-center (ToDRE v1, farthest-point sampling in cosine distance): start from ``pivot``; repeatedly add
    the token farthest from its nearest selected token. x: (N, D). Returns (k,) indices in the order chosen."""
    n = x.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    xn = F.normalize(x.float(), dim=-1)
    chosen = [int(pivot)]
    dist = 1.0 - (xn @ xn[pivot, :, None])[:, 0]  # (N,) distance to the nearest chosen token
    dist[pivot] = float("-inf")
    for _ in range(k - 1):
        c = int(torch.argmax(dist))
        chosen.append(c)
        dist = torch.minimum(dist, 1.0 - (xn @ xn[c, :, None])[:, 0])  # chosen tokens stay at -inf
        dist[c] = float("-inf")
    return torch.tensor(chosen, dtype=torch.long)


def greedy_flops(n: int, d: int, k: int) -> float:
    """FLOPs (2 x MACs) of ``greedy_max_sum`` / ``greedy_k_center`` choosing k of n d-dimensional tokens: one
    (n, d) x (d, 1) product per chosen token, 2*n*d*k (17 GFLOPs for LLaVA-NeXT's 2880 tokens of 4096 at k=720)."""
    return 2.0 * n * d * max(0, min(int(k), n))


def modal_shares(probs_text: torch.Tensor, probs_visual: torch.Tensor, text: torch.Tensor, visual: torch.Tensor,
                 w_text: torch.Tensor, w_visual: torch.Tensor) -> torch.Tensor:
    """ToDRE's cross-modal attention shares of one layer.

    probs_text: (B, R, T) head-averaged attention rows of the text queries; probs_visual: (B, V, T) of the visual
    queries; text / visual: (B, T) bool key sets; w_text (B, R), w_visual (B, V): 1 for real rows, 0 for padding.
    Returns (B, 2): alpha_t->v = sum over text rows of their attention on visual keys / number of text rows, and
    alpha_v->t = sum over visual rows of their attention on text keys / number of visual rows.
    """
    tv = (probs_text * visual[:, None, :]).sum(-1)  # (B, R)
    vt = (probs_visual * text[:, None, :]).sum(-1)  # (B, V)
    a_tv = (tv * w_text).sum(1) / w_text.sum(1).clamp_min(1)
    a_vt = (vt * w_visual).sum(1) / w_visual.sum(1).clamp_min(1)
    return torch.stack([a_tv, a_vt], 1)


@register_method
@dataclass
class ToDRE(BudgetMixin, Method):
    """ToDRE: Token Diversity and task RElevance (Li et al., arXiv 2505.18757, v2).

    Stage 1 (before the decoder): from each image's projected visual tokens keep ``budget`` tokens chosen by greedy
    diversity in the decoder's embedding space, starting from a pivot: the patch with the highest CLS attention
    (softmax, heads averaged) in the last ViT layer (``pivot_layer``), taken over the thumbnail for AnyRes images
    (over all patches for LLaVA-1.5). ``diversity="max_sum"`` is v2's greedy max-sum (default; repeatedly add the
    token least similar in sum to those chosen); ``"k_center"`` is v1's greedy k-center (farthest point).
    Kept tokens stay in raster order. Newline tokens of LLaVA-NeXT are not candidates; by default they are kept
    and count in the budget (``newlines="count"``: 10% of a 2880-patch image keeps at most 288 tokens, newlines
    included, the paper's "up to 288"), or kept on top of it (``"keep"``), or dropped (``"drop"``); see
    ``vlprune.methods.base.split_budget``. A budget at or above the image's tokens (or ``keep_ratio=1``) keeps
    everything. The greedy selection's matrix work (``greedy_flops``) is counted as the method's scoring cost.

    Stage 2 (inside the decoder): at decoder layer ``layer`` (default: the 1-based layer nearest 7L/8, i.e.
    0-based round(7L/8) - 1: 27 of 32), the share of the text queries' attention that lands on visual keys
    (alpha_t->v) and of the visual queries' attention on text keys (alpha_v->t), heads averaged, are computed from
    that layer's own q/k for those rows only (SDPA untouched). Where both are below ``tau`` (0.10) every visual
    token of that sample is removed from the next layer on, KV cache included. Text = the prompt tokens after the
    first visual token; the system prompt before it is neither. With LLaVA's layout (image before the question) a
    causal mask keeps alpha_v->t near 0, so the rule is in effect alpha_t->v < tau. Both shares are reported in
    ``vlprune.stats(model)["reports"]["todre"]``.

    RoPE positions (``rope_positions``, both stages): "contiguous" (default) renumbers the sequence without gaps after
    stage 1 and again after stage 2 (the text after the image moves down; decode steps continue each layer's
    numbering); "original" keeps every token's position in the unpruned prompt. ToDRE has no released code; the
    default is what LLaVA-codebase code does after pre-LLM selection and what the official TransPrune and MustDrop
    codes do after pruning inside the decoder.

    ``stage1=False`` or ``stage2=False`` runs one stage alone (stage 2 alone needs no budget). ``row_chunk`` bounds
    the memory of the visual rows' attention (computed only for visual queries placed after some text token).
    Shapes: features (N, D) -> greedy over patches -> kept (K,); attention rows (B, H, R, T) -> shares (B, 2).
    """

    name = "todre"
    stages = (Stage.VISION, Stage.PRE_LLM, Stage.LLM_LAYER)
    paper = "arXiv 2505.18757"
    diversity: str = "max_sum"
    stage1: bool = True
    stage2: bool = True
    tau: float = 0.10
    layer: int | None = None
    pivot_layer: int = -1
    newlines: str = "count"
    rope_positions: str = "contiguous"
    row_chunk: int = 256

    def __post_init__(self):
        for f in ("stage1", "stage2"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"todre: {f} must be True or False; got {getattr(self, f)!r}")
        if not (self.stage1 or self.stage2):
            raise ValueError("todre: stage1 and stage2 are both off; enable at least one")
        if self.stage1:
            if self.keep is None and self.keep_ratio is None and self.budget is None:
                self.budget = Budget(keep_ratio=0.25)
            self._init_budget()
        if self.diversity not in DIVERSITY:
            raise ValueError(f"todre: diversity must be one of {DIVERSITY}; got {self.diversity!r}")
        t = self.tau
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise ValueError(f"todre: tau must be a share in [0, 1] (paper: 0.10); got {t!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"todre: layer must be a 0-based decoder layer or None (7L/8); got {self.layer!r}")
        if isinstance(self.pivot_layer, bool) or not isinstance(self.pivot_layer, int):
            raise ValueError(f"todre: pivot_layer must be an integer ViT layer; got {self.pivot_layer!r}")
        if isinstance(self.row_chunk, bool) or not isinstance(self.row_chunk, int) or self.row_chunk < 1:
            raise ValueError(f"todre: row_chunk (visual query rows per attention chunk) must be >= 1; "
                             f"got {self.row_chunk!r}")
        check_newlines(self.name, self.newlines)
        check_positions(self.name, self.rope_positions)

    def check(self, info: HostInfo) -> None:
        nv = info.n_vision_layers
        if not -nv <= self.pivot_layer < nv:
            raise ValueError(f"todre: pivot_layer={self.pivot_layer} is outside the vision tower's {nv} layers")
        if self.stage2:
            l = self._layer(info.n_layers)
            if not 0 <= l < info.n_layers - 1:
                raise ValueError(f"todre: layer={l} must be in 0..{info.n_layers - 2} (visual tokens are removed "
                                 f"from the next layer on) for this {info.n_layers}-layer decoder")

    def _layer(self, n_layers: int) -> int:
        if self.layer is not None:
            return self.layer
        return min(n_layers - 2, max(0, int(math.floor(7 * n_layers / 8 + 0.5)) - 1))

    # -- stage 1
    def vision_layers(self, n_vision_layers: int, feature_layer: int) -> list[int]:
        return [self.pivot_layer % n_vision_layers] if self.stage1 else []

    def select(self, image: ImageTokens) -> ImageSelection | None:
        if not self.stage1:
            return None
        lay = image.layout
        patch = (lay.kind == TOKEN_PATCH).nonzero().squeeze(1)
        if self.budget.covers(lay.n):
            return None
        # keep=<tokens> counts every visual token; keep_ratio is a share of the patches (the papers' "10% of 2880")
        total = self.budget.keep if self.budget.keep is not None else self.budget.resolve(patch.numel())
        fixed, k = split_budget(lay, total, self.newlines)
        if k >= patch.numel():
            return patch_selection(lay, fixed, [patch], budget=total)
        attn = image.cls_attention(self.pivot_layer)  # (N,)
        pool = patch[lay.crop[patch] == 0] if lay.tiles is not None else patch  # the thumbnail for AnyRes
        pivot_tok = pool[torch.argmax(torch.nan_to_num(attn[pool], nan=float("-inf")))]
        pivot = int((patch == pivot_tok).nonzero()[0, 0])
        pick = greedy_max_sum if self.diversity == "max_sum" else greedy_k_center
        chosen = pick(image.features[patch.to(image.features.device)], k, pivot)
        return patch_selection(lay, fixed, [patch[chosen.cpu()]], budget=total,
                               flops=greedy_flops(patch.numel(), image.features.shape[-1], k))

    # -- stage 2
    def score_layers(self, n_layers: int) -> list[int]:
        return [self._layer(n_layers)] if self.stage2 else []

    def prune_layers(self, n_layers: int) -> list[int]:
        return [self._layer(n_layers) + 1] if self.stage2 else []

    def prune(self, ctx: LayerContext):
        b, t = ctx.visual.shape
        if not bool(ctx.visual.any()):
            return None
        layer = ctx.layer - 1
        idx = torch.arange(t, device=ctx.visual.device)
        text = ctx.text_after_image()
        rows_t, real_t = padded_rows(text)
        w_t = real_t.float()
        p_t = ctx.attention_rows(layer, rows_t).mean(1)  # (B, R, T)
        shares = modal_shares(p_t, p_t[:, :0], text, ctx.visual, w_t, w_t[:, :0])
        # visual queries: under the causal mask only those after some text token can attend to text keys; the
        # others contribute exactly 0 and are not computed. The rest go in chunks of rows to bound memory.
        first_text = torch.where(text.any(1), text.float().argmax(1), torch.full((b,), t, device=idx.device))
        reach = ctx.visual & (idx[None] > first_text[:, None])
        if bool(reach.any()):
            total = torch.zeros(b, device=idx.device)
            rows_v, real_v = padded_rows(reach)
            w_v = real_v.float()
            for c0 in range(0, rows_v.shape[1], self.row_chunk):
                rv, wv = rows_v[:, c0:c0 + self.row_chunk], w_v[:, c0:c0 + self.row_chunk]
                p_v = ctx.attention_rows(layer, rv).mean(1)  # (B, r, T)
                total += ((p_v * text[:, None, :]).sum(-1) * wv).sum(1)
            shares[:, 1] = total / ctx.visual.sum(1).clamp_min(1)
        drop = (shares < self.tau).all(1) & ctx.visual.any(1)
        if ctx.report is not None:
            ctx.report("todre", {"layer": layer, "alpha_t2v": shares[:, 0].tolist(),
                                 "alpha_v2t": shares[:, 1].tolist(), "dropped": drop.tolist()})
        if not bool(drop.any()):
            return None
        empty = torch.empty(0, dtype=torch.long, device=ctx.visual.device)
        return [empty if bool(drop[i]) else None for i in range(b)]
