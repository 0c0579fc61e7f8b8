"""MustDrop (arXiv 2411.10803): multi-stage vision token dropping — merge in the vision tower, dual-attention
filter in prefill, output-aware cache policy for decoding."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..budget import Budget, as_budget
from ..ops import topk_sorted, window_merge_plan
from ..registry import register_method
from .base import (TOKEN_PATCH, BudgetMixin, CacheContext, Compose, HostInfo, ImageSelection, ImageTokens,
                   LayerContext, Method, Stage, check_positions)

# the released scripts' thresholds (global_thr, individual_thr) for LLaVA-1.5-7B at its 192/128/64-token settings
PRESETS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}
ORDERS = ("spatial", "official")


def dual_threshold_keep(g: torch.Tensor, u: torch.Tensor, global_thr: float, individual_thr: float) -> torch.Tensor:
    """MustDrop's prefill rule: a visual token is dropped iff its global score g_j = sum over text rows of its
    attention is below ``global_thr * sum(g)`` AND its individual score u_j = max over text rows is below
    ``individual_thr``. g, u: (V,). Returns (V,) bool, True = kept."""
    return (g >= global_thr * g.sum()) | (u >= individual_thr)


def scale_score_layers(layers: tuple, ref_depth: int, depth: int) -> list[int]:
    """0-based scoring layers of a ref_depth-layer decoder (pruning right after each) -> a depth-layer decoder:
    layer l -> round((l + 1) * depth / ref_depth) - 1, clipped to 0..depth-2, duplicates merged."""
    out = []
    for l in layers:
        s = min(depth - 2, max(0, int(math.floor((l + 1) * depth / ref_depth + 0.5)) - 1))
        if s not in out:
            out.append(s)
    return out


@dataclass
class MustDropVision(Method):
    """MustDrop's vision stage. After ViT layer ``merge_after`` (0), every 3x3 window of the patch grid whose mean
    pairwise cosine similarity is at least ``threshold`` (0.8) becomes one averaged token, and the later ViT layers
    run on the shorter sequence (``vlprune.ops.window_merge_plan``; per crop, where the official code merges the
    batch minimum count). The key set is, per crop (LLaVA-1.5: the image; LLaVA-NeXT: the base image and each
    crop, 8% of each, as the official code selects it per crop), the top ``ceil(key_ratio * n_c)`` of the crop's
    n_c remaining patches by the CLS attention (softmax over the merged sequence, heads averaged) of the last ViT
    layer, computed from that layer's q/k by hooks (the official code runs that layer eagerly); later stages never
    drop it. ``order="spatial"`` keeps the merged token in its window's last (bottom-right) place, raster order;
    ``order="official"`` emits merged tokens first in descending window similarity, then the others (the official
    code's order); the key set follows its tokens into their new slots. With a ``budget`` that covers an image
    (``Budget.covers``: keep >= its visual tokens, or keep_ratio=1), that image is not merged.
    Shapes: ViT sequence (S, D) -> (S', D); decoder tokens N -> N - 8 * merged windows.
    """

    name = "mustdrop_vision"
    stages = (Stage.VISION, Stage.PRE_LLM)
    merging: bool = True
    key_set: bool = True
    threshold: float = 0.8
    window: int = 3
    key_ratio: float = 0.08
    merge_after: int = 0
    order: str = "spatial"
    budget: Budget | None = None  # a budget that covers an image turns the merge off for it (no pruning at all)
    rope_positions: str = "contiguous"  # merged-away tokens leave no gap (the official merged sequence is shorter)

    def merge_layer(self, n_vision_layers: int) -> int | None:
        return self.merge_after if self.merging else None

    def merge(self, x: torch.Tensor, grid: tuple[int, int]):  # type: ignore[override]
        # tokens ahead of the patch grid (LLaVA's CLIP: the CLS token; a tower without CLS: none)
        return window_merge_plan(x, grid, self.window, self.threshold, prefix=x.shape[0] - grid[0] * grid[1])

    def vision_layers(self, n_vision_layers: int, feature_layer: int) -> list[int]:
        return [n_vision_layers - 1] if self.key_set else []

    def merges(self, n_visual: int) -> bool:
        return self.budget is None or not self.budget.covers(n_visual)

    def key_tokens(self, image: ImageTokens) -> torch.Tensor:
        """The key set: per crop (the base image and each AnyRes crop, as the official code offsets its indices by
        crop), the top ``ceil(key_ratio * n_c)`` of the crop's n_c patches by the last ViT layer's CLS attention.
        Returns (P,) token indices, ascending."""
        lay = image.layout
        patch = (lay.kind == TOKEN_PATCH).nonzero().squeeze(1)
        scores = image.cls_attention(-1)  # (N,) merged tokens once each (the decoder input is de-duplicated)
        picks = []
        for c in lay.crop[patch].unique().tolist():
            toks = patch[lay.crop[patch] == c]
            k = int(math.ceil(self.key_ratio * toks.numel() - 1e-9))
            picks.append(toks[topk_sorted(scores[toks], k)])
        return torch.cat(picks).sort().values if picks else patch[:0]

    def select(self, image: ImageTokens) -> ImageSelection | None:
        keep = torch.arange(image.n)
        protect = self.key_tokens(image) if self.key_set else None
        feats = None
        if self.order == "official" and self.merging:
            merged = image.merge_score  # window similarity of the merged tokens (NaN: not merged)
            if merged is not None and bool((~torch.isnan(merged)).any()):
                is_m = ~torch.isnan(merged)
                first = is_m.nonzero().squeeze(1)
                first = first[torch.sort(merged[first], descending=True, stable=True).indices]
                order = torch.cat([first, (~is_m).nonzero().squeeze(1)])  # slot j carries token order[j]
                feats = image.features[order.to(image.features.device)]
                if protect is not None:  # the key set moves with its tokens' features
                    slot = torch.empty_like(order)
                    slot[order] = torch.arange(order.numel())
                    protect = slot[protect].sort().values
        if protect is None and feats is None:
            return None
        return ImageSelection(keep=keep, features=feats, protect=protect)


@dataclass
class MustDropFilter(BudgetMixin, Method):
    """MustDrop's prefill stage (dual-attention filtering). At decoder layers ``layers`` (0-based 2, 6, 10, 14 of a
    32-layer decoder, scaled for other depths), from that layer's attention of the text rows (every prompt token
    after the first visual one) to the visual keys, heads averaged — computed from the layer's q/k for those rows
    only, SDPA kept (the official code switches every layer from the first pruning layer on to a manual softmax
    attention) — a visual token is dropped from the next layer on iff g_j < global_thr * sum(g) and u_j <
    individual_thr (``dual_threshold_keep``), unless it is in the key set. ``rope_positions="contiguous"`` (default,
    the official code's: it truncates ``position_ids`` to 0..L'-1 after each filter) renumbers the shortened
    sequence; ``"original"`` keeps the kept tokens' positions. Thresholds: ``preset`` 192 / 128 / 64 (the released scripts' values), or
    ``global_thr`` / ``individual_thr`` given directly. ``keep=<tokens>`` asks for a token count instead: stage i
    of n targets N * (keep / N) ** (i / n) tokens (keep after the last one), the dual rule with both thresholds
    scaled by one factor (bisection) keeps at most the target, and top global scores fill up to it.
    """

    name = "mustdrop_filter"
    stages = (Stage.LLM_LAYER,)
    preset: int | None = 192
    global_thr: float | None = None
    individual_thr: float | None = None
    layers: tuple = (2, 6, 10, 14)
    ref_depth: int = 32
    rope_positions: str = "contiguous"

    def __post_init__(self):
        if self.keep is not None or self.keep_ratio is not None or self.budget is not None:
            self._init_budget()
        if self.global_thr is None and self.individual_thr is None and self.preset is not None:
            self.global_thr, self.individual_thr = PRESETS[self.preset]
        check_positions(self.name, self.rope_positions)

    def _score_layers(self, n_layers):
        return scale_score_layers(self.layers, self.ref_depth, n_layers)

    def score_layers(self, n_layers: int) -> list[int]:
        return self._score_layers(n_layers)

    def prune_layers(self, n_layers: int) -> list[int]:
        return [s + 1 for s in self._score_layers(n_layers)]

    def _target(self, n0: int, stage: int, n_stages: int) -> int:
        final = self.budget.resolve(n0)
        if stage == n_stages - 1:
            return final
        return int(round(n0 * (final / max(1, n0)) ** ((stage + 1) / n_stages)))

    def prune(self, ctx: LayerContext):
        layers = self._score_layers(ctx.n_layers)
        stage = layers.index(ctx.layer - 1)
        b = ctx.visual.shape[0]
        rows, real = ctx.text_rows()  # every prompt token after the first visual one (B, R)
        att = ctx.attention_rows(ctx.layer - 1, rows).mean(1)  # (B, R, T) heads averaged
        out = []
        for i in range(b):
            vis = ctx.visual[i].nonzero().squeeze(1)
            if vis.numel() == 0 or not bool(real[i].any()):
                out.append(None)
                continue
            a = att[i][real[i]][:, vis].float().cpu()  # (R_i, V)
            g, u = a.sum(0), a.max(0).values
            prot = ctx.protected[i, vis].cpu() if ctx.protected is not None else torch.zeros(vis.numel(), dtype=torch.bool)
            if self.budget is None:
                keep = dual_threshold_keep(g, u, self.global_thr, self.individual_thr) | prot
            else:
                target = self._target(int(ctx.visual_at_start[i]), stage, len(layers))
                keep = self._fixed(g, u, prot, target)
            if bool(keep.all()):
                out.append(None)
            else:
                out.append(vis[keep.nonzero().squeeze(1).to(vis.device)])
        return out

    def _fixed(self, g, u, prot, target):
        """Keep exactly min(target, V) tokens: the key set first (by g if it alone exceeds the target), then the
        dual rule at the largest threshold scale that keeps at most the target, then top g."""
        v = g.numel()
        target = min(target, v)
        if int(prot.sum()) >= target:
            cand = prot.nonzero().squeeze(1)
            keep = torch.zeros(v, dtype=torch.bool)
            keep[cand[topk_sorted(g[cand], target)]] = True
            return keep
        g0, i0 = (self.global_thr, self.individual_thr) if self.global_thr is not None else PRESETS[192]
        lo, hi = 0.0, 1.0
        while int((dual_threshold_keep(g, u, g0 * hi, i0 * hi) | prot).sum()) > target and hi < 1e12:
            lo, hi = hi, hi * 4
        for _ in range(40):  # smallest scale whose kept count is <= target
            mid = (lo + hi) / 2
            if int((dual_threshold_keep(g, u, g0 * mid, i0 * mid) | prot).sum()) > target:
                lo = mid
            else:
                hi = mid
        keep = dual_threshold_keep(g, u, g0 * hi, i0 * hi) | prot
        missing = target - int(keep.sum())
        if missing > 0:
            rest = (~keep).nonzero().squeeze(1)
            keep[rest[topk_sorted(g[rest], missing)]] = True
        return keep


@dataclass
class OutputAwareCache(Method):
    """MustDrop's decode stage, the output-aware cache policy as the official code implements it: after prefill,
    the KV cache of the layers that still hold visual tokens dropped later in the prefill is cut to the visual
    tokens that reached the last layer, so decoding attends over the final survivors only. Layers from
    ``from_layer`` on are cut. ``filter_layers`` (0-based scoring layers of a ``ref_depth``-layer decoder, scaled to
    the host's depth as ``MustDropFilter`` scales them) means from the first of them, whether or not that layer
    dropped anything, as the official code always cuts from its first filtering layer (2 of 32; layers 0-1 keep
    their full cache): ``MustDrop`` builds it so. With neither, the cut starts at the layer before the first layer
    whose visual tokens differ from the decoder input's.
    Composable with any method that prunes inside the decoder:
    ``vlprune.apply(model, [vlprune.get_method("fastv", keep=64), vlprune.methods.OutputAwareCache()])``.
    The paper describes the policy as output-aware; the released code does exactly this cut and no scoring with
    generated tokens, which is what is implemented. What "output-aware" adds beyond this cut in the paper's text
    (for instance eviction driven by the generated tokens' attention) could not be confirmed and is not implemented.
    RoPE positions of decode steps: each layer continues the numbering its prefill used (the original positions, or
    under a "contiguous" prefill the renumbered ones), the cut keys keeping the positions they were cached with.
    The released code instead gives a decode query the layer's cache length after the cut as its position, which in
    the cut layers puts it before the positions of the prompt's last keys.
    """

    name = "mustdrop_kv"
    stages = (Stage.KV_CACHE,)
    from_layer: int | None = None
    filter_layers: tuple | None = None
    ref_depth: int = 32

    def __post_init__(self):
        if self.from_layer is not None and (isinstance(self.from_layer, bool) or not isinstance(self.from_layer, int)
                                            or self.from_layer < 0):
            raise ValueError(f"mustdrop_kv: from_layer must be a 0-based decoder layer >= 0 or None; "
                             f"got {self.from_layer!r}")

    def evict(self, ctx: CacheContext):
        n = ctx.n_layers
        last_orig, last_vis = ctx.original[-1], ctx.visual[-1]
        b = last_orig.shape[0]
        survivors = [last_orig[i][last_vis[i]] for i in range(b)]
        start = self.from_layer
        if start is None and self.filter_layers:
            start = scale_score_layers(tuple(self.filter_layers), self.ref_depth, n)[0]
        if start is None:
            first = next((l for l in range(1, n) if ctx.visual[l].sum() != ctx.visual[0].sum()
                          or ctx.visual[l].shape != ctx.visual[0].shape), None)
            if first is None:
                return None
            start = max(0, first - 1)
        plan = {}
        for l in range(start, n):
            vis, orig = ctx.visual[l], ctx.original[l]
            keep, changed = [], False
            for i in range(b):
                stale = vis[i] & ~torch.isin(orig[i], survivors[i].to(orig.device))
                changed |= bool(stale.any())
                keep.append((~stale).nonzero().squeeze(1))
            if changed:
                plan[l] = keep
        return plan or None


@register_method
@dataclass
class MustDrop(Compose):
    """MustDrop: Multi-Stage Vision Token Dropping (Liu et al., arXiv 2411.10803) — all three stages:

    1. vision (``MustDropVision``): 3x3 window merging after ViT layer 0 (similarity >= 0.8) and the 8% key set from
       the last ViT layer's CLS attention;
    2. prefill (``MustDropFilter``): dual-attention filtering at decoder layers 2, 6, 10, 14 (of 32) with the
       preset thresholds (192: 0.001 / 0.001, 128: 0.0012 / 0.001, 64: 0.011 / 0.01) or ``keep=<tokens>``;
    3. decode (``OutputAwareCache``): the KV cache of the pruning layers cut to the final survivors.

    ``vision`` / ``prefill`` / ``decode`` switch stages off (``merging`` and ``key_set`` the vision stage's two
    parts; the key set only matters to the prefill stage). Token counts are adaptive: ``vlprune.stats`` reports the
    final count (``kept_positions``), vlprune's layer-averaged count (``equivalent_tokens``: mean visual tokens
    entering each decoder layer) and, beside it, the count the official code prints
    (``equivalent_tokens_official``: the visual tokens each layer leaves, a pruning layer counted after its
    pruning, averaged over the layers and divided by the image's views: 1 for LLaVA-1.5, base + crops for
    LLaVA-NeXT). Which of the two the paper's "192 / 128 / 64 tokens" are could not be checked against the paper's
    text; the released scripts print the second. LLaVA-NeXT runs on the host's own packed layout (the official
    code forces a flat layout without unpadding or newline tokens); the key set is chosen per view (8% of each).

    Budgets: with ``keep`` / ``keep_ratio`` the prefill stage keeps that many tokens; a budget at or above an
    image's visual tokens prunes nothing at all (no merge either), as for every method. Without a budget (the
    presets) every stage runs.

    RoPE positions: ``rope_positions="contiguous"`` (default, the official code's) renumbers the sequence without
    gaps after the merge and after each filter, and decode steps continue each layer's numbering (see
    ``OutputAwareCache`` for the one difference from the code); ``"original"`` keeps every token's position in the
    unpruned prompt throughout.
    """

    name = "mustdrop"
    paper = "arXiv 2411.10803"
    keep: int | None = None
    keep_ratio: float | None = None
    preset: int | None = 192
    global_thr: float | None = None
    individual_thr: float | None = None
    layers: tuple = (2, 6, 10, 14)
    ref_depth: int = 32
    threshold: float = 0.8
    key_ratio: float = 0.08
    order: str = "spatial"
    merging: bool = True
    key_set: bool = True
    vision: bool = True
    prefill: bool = True
    decode: bool = True
    rope_positions: str = "contiguous"

    def __post_init__(self):
        check_positions(self.name, self.rope_positions)
        for f in ("merging", "key_set", "vision", "prefill", "decode"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"mustdrop: {f} must be True or False; got {getattr(self, f)!r}")
        if not (self.vision or self.prefill or self.decode):
            raise ValueError("mustdrop: vision, prefill and decode are all off; enable at least one stage")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"mustdrop: preset must be one of {sorted(PRESETS)} (the paper's token settings) or None; "
                             f"got {self.preset!r}")
        for f in ("global_thr", "individual_thr"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                raise ValueError(f"mustdrop: {f} must be a share in [0, 1]; got {v!r}")
        if (self.global_thr is None) != (self.individual_thr is None):
            raise ValueError("mustdrop: give both global_thr and individual_thr, or neither (then preset applies)")
        if self.global_thr is None and self.preset is None and self.keep is None and self.keep_ratio is None:
            raise ValueError("mustdrop: preset=None needs global_thr/individual_thr or a budget (keep=<tokens>)")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not -1 <= t <= 1:
            raise ValueError(f"mustdrop: threshold (window cosine similarity) must be in [-1, 1]; got {t!r}")
        k = self.key_ratio
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 <= k <= 1:
            raise ValueError(f"mustdrop: key_ratio must be a share in [0, 1]; got {k!r}")
        if self.order not in ORDERS:
            raise ValueError(f"mustdrop: order must be one of {ORDERS}; got {self.order!r}")
        layers = tuple(self.layers)
        if not layers or any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers) or \
                list(layers) != sorted(set(layers)):
            raise ValueError(f"mustdrop: layers must be increasing 0-based decoder layers; got {self.layers!r}")
        self.layers = layers
        parts = []
        if self.vision and (self.merging or self.key_set):
            parts.append(MustDropVision(merging=self.merging, key_set=self.key_set and self.prefill,
                                        threshold=self.threshold, key_ratio=self.key_ratio, order=self.order,
                                        budget=as_budget(self.keep, self.keep_ratio),
                                        rope_positions=self.rope_positions))
        if self.prefill:
            parts.append(MustDropFilter(keep=self.keep, keep_ratio=self.keep_ratio, preset=self.preset,
                                        global_thr=self.global_thr, individual_thr=self.individual_thr,
                                        layers=self.layers, ref_depth=self.ref_depth,
                                        rope_positions=self.rope_positions))
        if self.decode:
            parts.append(OutputAwareCache(filter_layers=self.layers if self.prefill else None,
                                          ref_depth=self.ref_depth))
        if not parts:
            raise ValueError("mustdrop: the chosen switches leave no stage to run")
        Compose.__init__(self, parts)

    @property
    def label(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                           if getattr(self, f.name) != f.default)
        return f"mustdrop({fields})"

    def __repr__(self) -> str:
        return self.label

    def check(self, info: HostInfo) -> None:
        if info.n_layers < 3:
            raise ValueError(f"mustdrop needs a decoder of at least 3 layers; this one has {info.n_layers}")
        super().check(info)
