"""Stages, the Method base class, composition, and the inputs each stage hands to a method.

Legend for shape comments: B batch, N visual tokens of one image, T sequence, D hidden, H heads, K kept.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from ..budget import Budget, as_budget

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class Stage(str, Enum):
    """Where a method acts. A multi-stage method is a composition of stages."""

    VISION = "vision"  # inside the vision tower: CLS attention rows of chosen ViT layers, token merging
    PRE_LLM = "pre_llm"  # after the projector, before the decoder: select or merge visual tokens per image
    LLM_LAYER = "llm_layer"  # at decoder layer K in prefill: drop visual tokens from then on (KV cache included)
    KV_CACHE = "kv_cache"  # after prefill / during decoding: evict cached visual keys and values
    PROJECTOR = "projector"  # replace the projector by a learned compressor that emits m tokens per image

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


# ---------------------------------------------------------------------------------------------------------------
# What a PRE_LLM stage sees: one image's projected tokens with their layout and the vision tower's scores.

TOKEN_PATCH, TOKEN_NEWLINE, TOKEN_CLS = 0, 1, 2

# RoPE position policies: "original" keeps each kept token's position in the unpruned prompt; "contiguous" renumbers
# the shortened sequence without gaps (0..T'-1) wherever tokens are dropped, before the decoder or inside it.
POSITIONS = ("original", "contiguous")


def check_positions(name: str, value: str) -> None:
    """Raise ValueError unless ``value`` is a RoPE position policy (``POSITIONS``); ``name`` is the method's."""
    if value not in POSITIONS:
        raise ValueError(f"{name}: rope_positions must be one of {POSITIONS}; got {value!r}")


@dataclass
class Partition:
    """A rectangular grid of an image's tokens: the whole image (LLaVA-1.5), or AnyRes' base image / crop grid."""

    name: str
    tokens: torch.Tensor  # (h*w,) token indices (into the image's N tokens) in raster order
    grid: tuple[int, int]  # (h, w)


@dataclass
class ImageLayout:
    """Where each of an image's N visual tokens comes from.

    kind: (N,) TOKEN_PATCH / TOKEN_NEWLINE / TOKEN_CLS.  crop: (N,) index of the vision-tower input (0 = the only
    image for LLaVA-1.5; 0 = base image, 1.. = crops for LLaVA-NeXT) or -1.  vit_index: (N,) index of the token in
    that crop's ViT sequence (CLS = 0, patch p = p + 1) or -1 for newline tokens.  partitions: the grids.
    crop_grid: (N,) for AnyRes grid tokens the (row, col) of the crop tile, else (-1, -1) — (N, 2).
    tiles: AnyRes tile grid (rows, cols) of the crops (crop index = 1 + row*cols + col), None without crops.
    """

    kind: torch.Tensor
    crop: torch.Tensor
    vit_index: torch.Tensor
    partitions: list[Partition]
    n_crops: int
    crop_grid: torch.Tensor | None = None
    tiles: tuple[int, int] | None = None

    @property
    def n(self) -> int:
        return int(self.kind.shape[0])

    def partition_counts(self, keep: torch.Tensor | None = None) -> dict[str, int]:
        """Tokens per source among ``keep`` (all when None): "image" (LLaVA-1.5) or "base" and "crop1".. (AnyRes),
        plus "newline" and "cls" where present."""
        idx = torch.arange(self.n) if keep is None else keep.cpu()
        kind, crop = self.kind[idx], self.crop[idx]
        out: dict[str, int] = {}
        patch = kind == TOKEN_PATCH
        if self.crop_grid is None:
            out["image"] = int(patch.sum())
        else:
            for c in range(self.n_crops):
                out["base" if c == 0 else f"crop{c}"] = int((patch & (crop == c)).sum())
        for name, k in (("newline", TOKEN_NEWLINE), ("cls", TOKEN_CLS)):
            if bool((self.kind == k).any()):
                out[name] = int((kind == k).sum())
        return out

    def subset(self, keep: torch.Tensor) -> "ImageLayout":
        """Layout of the kept tokens (keep: (K,) ascending). Grids of partitions become token lists of kept members."""
        remap = torch.full((self.n,), -1, dtype=torch.long)
        remap[keep.cpu()] = torch.arange(keep.numel())
        parts = []
        for p in self.partitions:
            t = remap[p.tokens.cpu()]
            parts.append(Partition(p.name, t[t >= 0], p.grid if bool((t >= 0).all()) else (-1, -1)))
        return ImageLayout(
            kind=self.kind[keep.cpu()],
            crop=self.crop[keep.cpu()],
            vit_index=self.vit_index[keep.cpu()],
            partitions=parts,
            n_crops=self.n_crops,
            crop_grid=None if self.crop_grid is None else self.crop_grid[keep.cpu()],
            tiles=self.tiles,
        )


@dataclass
class ImageTokens:
    """One image's visual tokens as they enter the decoder.

    features: (N, D) projected features (the decoder's input embeddings for this image).
    layout: where each token comes from.  ``cls_logits(layer)`` gives the vision tower's CLS attention logits.
    """

    features: torch.Tensor
    layout: ImageLayout
    sample: int  # batch row the image belongs to
    index: int  # image index over the whole batch
    _vision: Callable[[int], torch.Tensor] | None = None  # layer -> (n_crops, H, S_l) CLS logits of this image's crops
    n_vision_layers: int = 0  # layers of the vision tower (0: unknown; negative layer indices are then passed as given)
    feature_layer: int | None = None  # 0-based ViT layer whose output the host feeds the projector
    # layer -> None, or (assign (n_crops, S) slot in that layer's sequence of each original ViT token, valid
    # (n_crops, S_l) real slots) when a VISION merge shortened the sequence before that layer
    _vision_merge: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None] | None = None
    merge_score: torch.Tensor | None = None  # (N,) after a VISION merge: window similarity of merged tokens, else NaN

    def _vision_raw(self, layer: int):
        if self.n_vision_layers:
            layer = layer % self.n_vision_layers  # 0-based, whatever the sign
        raw = self._vision(layer)  # (n_crops, H, S_l)
        merge = self._vision_merge(layer) if self._vision_merge is not None else None
        return raw, merge

    @staticmethod
    def _expand(x: torch.Tensor, merge) -> torch.Tensor:
        """(n_crops, H, S_l) in a layer's (merged) sequence -> (n_crops, H, S) per original ViT token."""
        if merge is None:
            return x
        assign = merge[0].to(x.device)
        return torch.gather(x, 2, assign[:, None, :].expand(-1, x.shape[1], -1))

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    def vision_layer(self, layer: int | None) -> int:
        """A ViT layer as a method names it -> 0-based: None is the host's feature layer, negative counts from the
        end."""
        if layer is None:
            if self.feature_layer is None:
                raise RuntimeError("the adapter gave this image no feature_layer; name the ViT layer explicitly")
            return self.feature_layer
        return layer % self.n_vision_layers if self.n_vision_layers else layer

    def cls_logits(self, layer: int) -> torch.Tensor:
        """Pre-softmax CLS->token attention logits of ViT layer ``layer`` (0-based, negative counts from the end),
        gathered per visual token: (H, N) float32; NaN for tokens without a ViT source (newline tokens)."""
        if self._vision is None:
            raise RuntimeError(
                "no vision-tower attention was captured for this image; the method must list the ViT layers it needs "
                "in vision_layers()"
            )
        raw, merge = self._vision_raw(layer)
        raw = self._expand(raw, merge)  # (n_crops, H, S): a merged token's logit for each of its members
        lay = self.layout
        ok = lay.vit_index >= 0
        out = torch.full((raw.shape[1], lay.n), float("nan"), dtype=torch.float32)  # (H, N)
        out[:, ok] = raw[lay.crop[ok], :, lay.vit_index[ok]].T.float().cpu()
        return out

    def cls_attention(self, layer: int, reduce: str = "mean") -> torch.Tensor:
        """Softmax CLS attention (softmax over each crop's ViT sequence), reduced over heads: (N,)."""
        if self._vision is None:
            return self.cls_logits(layer)  # raises the missing-capture error
        raw, merge = self._vision_raw(layer)
        raw = raw.float()
        if merge is not None:  # softmax over the layer's own (merged, padded) sequence, then back to members
            raw = raw.masked_fill(~merge[1].to(raw.device)[:, None, :], float("-inf"))
        probs = self._expand(torch.softmax(raw, dim=-1), merge)  # (n_crops, H, S)
        lay = self.layout
        ok = lay.vit_index >= 0
        per_head = torch.full((probs.shape[1], lay.n), float("nan"), dtype=torch.float32)  # (H, N)
        per_head[:, ok] = probs[lay.crop[ok], :, lay.vit_index[ok]].T.cpu()
        if reduce == "mean":
            return per_head.mean(0)
        if reduce == "sum":
            return per_head.sum(0)
        raise ValueError(f"reduce must be 'mean' or 'sum'; got {reduce!r}")

    def subset(self, keep: torch.Tensor, features: torch.Tensor | None = None) -> "ImageTokens":
        return dataclasses.replace(
            self,
            features=self.features[keep.to(self.features.device)] if features is None else features,
            layout=self.layout.subset(keep),
            merge_score=None if self.merge_score is None else self.merge_score[keep.cpu()],
        )


@dataclass
class ImageSelection:
    """A PRE_LLM result for one image: kept token indices (K,) ascending, and optionally new features (K, D)
    that replace the kept tokens' features (merging methods). ``positions`` names the RoPE policy."""

    keep: torch.Tensor
    features: torch.Tensor | None = None
    merged_from: torch.Tensor | None = None  # (N,) index of the kept slot each input token was merged into, or -1
    protect: torch.Tensor | None = None  # (P,) indices into ``keep`` that later stages must not drop (a key set)
    budget: int | None = None  # the visual tokens the image's budget allows ("up to N"), reported by vlprune.stats
    flops: float = 0.0  # FLOPs (2 x MACs) of the selection's own matrix work, added to the cost model's scoring

    def __post_init__(self):
        self.keep = torch.as_tensor(self.keep, dtype=torch.long).reshape(-1)
        if self.keep.numel() and bool((self.keep[1:] <= self.keep[:-1]).any()):
            raise ValueError("ImageSelection.keep must be strictly increasing token indices")
        if self.features is not None and self.features.shape[0] != self.keep.numel():
            raise ValueError(
                f"ImageSelection.features must have one row per kept token: features {tuple(self.features.shape)}, "
                f"keep {self.keep.numel()}"
            )


# How a budget meets an image's non-patch tokens (LLaVA-NeXT's newline tokens, a CLS token). "count": kept, and
# counted in the budget; "keep": kept on top of the budget; "drop": removed.
NEWLINES = ("count", "keep", "drop")


def check_newlines(name: str, value: str) -> None:
    """Raise ValueError unless ``value`` is one of ``NEWLINES``; ``name`` is the method's."""
    if value not in NEWLINES:
        raise ValueError(f"{name}: newlines must be one of {NEWLINES}; got {value!r}")


def split_budget(layout: ImageLayout, total: int, newlines: str) -> tuple[torch.Tensor, int]:
    """Share an image's budget of ``total`` visual tokens between its non-patch tokens and its patches.

    Returns (fixed, k): the CLS and newline tokens kept, (F,) ascending, and k, the number of patches to choose
    (at most the image's patch count). ``newlines="count"``: they are kept and count against the budget
    (k = total - F); where that would leave no patch, the newline tokens are dropped and the budget, less any CLS
    token, goes to patches. "keep": kept on top of the budget (k = total). "drop": removed (k = total).
    """
    cls = (layout.kind == TOKEN_CLS).nonzero().squeeze(1)
    nl = (layout.kind == TOKEN_NEWLINE).nonzero().squeeze(1)
    n_patch = int((layout.kind == TOKEN_PATCH).sum())
    if newlines == "drop" or (newlines == "count" and total - cls.numel() - nl.numel() < 1):
        fixed = cls
    else:
        fixed = torch.cat([cls, nl]).sort().values
    k = total - fixed.numel() if newlines == "count" else total
    return fixed, max(0, min(int(k), n_patch))


def patch_selection(layout: ImageLayout, fixed: torch.Tensor, picks: list[torch.Tensor], budget: int | None = None,
                    **kw) -> ImageSelection | None:
    """The ImageSelection of ``fixed`` plus the ``picks`` (token indices), or None when that is every token."""
    keep = torch.cat([fixed.cpu()] + [p.cpu() for p in picks]).sort().values
    if keep.numel() == layout.n and kw.get("features") is None:
        return None
    return ImageSelection(keep=keep, budget=budget, **kw)


# ---------------------------------------------------------------------------------------------------------------
# What an LLM_LAYER stage sees.


@dataclass
class LayerContext:
    """The prefill sequence as it enters decoder layer ``layer``.

    hidden: (B, T, D); visual: (B, T) bool, visual tokens still present; valid: (B, T) bool, not padding;
    last: (B,) index of each sample's last valid token.  ``attention_rows(layer, rows)`` returns softmax attention
    probabilities (B, H, R, T) of the chosen query rows of an earlier layer of this prefill, computed from that
    layer's own q/k (captured by hooks, SDPA untouched) for those rows only.  ``entering_rows(rows)`` gives the
    same for the layer about to run, from its input (its input norm, q/k projections and RoPE), before it runs.
    ``observed[(layer, module)]``: the (B, T) values the method's ``observe`` returned for earlier layers, kept
    aligned with the current sequence.  ``visual_at_start``: (B,) visual tokens each sample had at decoder layer 0.
    ``report(key, value)`` puts a value into ``vlprune.stats(model)["reports"]``.
    """

    layer: int
    n_layers: int
    hidden: torch.Tensor
    visual: torch.Tensor
    valid: torch.Tensor
    last: torch.Tensor
    attention_rows: Callable[[int, torch.Tensor], torch.Tensor]
    entering_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    observed: dict = field(default_factory=dict)
    protected: torch.Tensor | None = None  # (B, T) bool: tokens an earlier stage protected (ImageSelection.protect)
    visual_at_start: torch.Tensor | None = None
    report: Callable[[str, object], None] | None = None

    def text_after_image(self) -> torch.Tensor:
        """(B, T) bool: the prompt's non-visual tokens after each sample's first visual token (the instruction:
        question and answer prefix; the system prompt before the image is not part of it), padding excluded."""
        b, t = self.visual.shape
        idx = torch.arange(t, device=self.visual.device)
        first = torch.where(self.visual.any(1), self.visual.float().argmax(1), torch.full((b,), t, device=idx.device))
        return self.valid & ~self.visual & (idx[None] > first[:, None])

    def text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``text_after_image`` as query rows for ``attention_rows`` / ``entering_rows``: ``padded_rows`` of it."""
        return padded_rows(self.text_after_image())


def padded_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> rows (B, R) the True indices of each sample, padded by repeating its last one (0 where it has
    none), and real (B, R) bool, False on the padding. R = max(1, most True in a sample)."""
    b = mask.shape[0]
    r = max(1, int(mask.sum(1).max())) if b else 1
    rows = torch.zeros(b, r, dtype=torch.long, device=mask.device)
    real = torch.zeros(b, r, dtype=torch.bool, device=mask.device)
    for i in range(b):
        idx = mask[i].nonzero().squeeze(1)
        if idx.numel():
            rows[i, : idx.numel()] = idx
            rows[i, idx.numel():] = idx[-1]
            real[i, : idx.numel()] = True
    return rows, real


@dataclass
class CacheContext:
    """The KV cache right after prefill. For each decoder layer l: ``visual[l]`` (B, L_l) bool marks cached
    visual tokens, ``valid[l]`` (B, L_l) padding, ``original[l]`` (B, L_l) their positions in the prompt."""

    n_layers: int
    visual: list[torch.Tensor]
    valid: list[torch.Tensor]
    original: list[torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Method:
    """Base class of every method: a dataclass of the paper's hyperparameters.

    Subclasses set ``name`` and ``stages`` and override the hooks of the stages they use:
    VISION: ``vision_layers``; PRE_LLM: ``select``; LLM_LAYER: ``prune_layers``, ``score_layers``, ``prune``;
    KV_CACHE: ``evict``; PROJECTOR: ``build_projector`` (with ``select`` to keep the m emitted tokens).
    ``positions`` is the method's RoPE policy (``POSITIONS``; a method's ``rope_positions`` field where it has one):
    "original" keeps each kept token's position in the unpruned prompt; "contiguous" renumbers the shortened sequence
    without gaps (0..T'-1) after every drop, before the decoder (as LLaVA-codebase pre-LLM methods do) and at each
    of the method's pruning layers inside it (as the official TransPrune and MustDrop codes do), decode steps
    continuing each layer's numbering.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[Stage, ...]] = ()
    paper: ClassVar[str] = ""

    # -- VISION
    def vision_layers(self, n_vision_layers: int, feature_layer: int) -> list[int]:
        """0-based ViT layers whose CLS attention rows this method needs (``feature_layer`` = the host's)."""
        return []

    def merge_layer(self, n_vision_layers: int) -> int | None:
        """0-based ViT layer after which this method merges tokens (``merge``), or None."""
        return None

    def merge(self, x: torch.Tensor, grid: tuple[int, int]):
        """One crop's ViT sequence after ``merge_layer``: x (S, D), CLS first then the (h, w) patch grid.
        Return a ``vlprune.ops.MergePlan`` (later ViT layers run on the shorter sequence; the decoder receives one
        token per merged group, in its representative's place), or None to leave it."""
        return None

    def merges(self, n_visual: int) -> bool:
        """Whether ``merge`` runs on the crops of an image of ``n_visual`` decoder tokens; False where the method's
        budget covers the image (a budget at or above an image's tokens prunes nothing)."""
        return True

    # -- PRE_LLM
    def select(self, image: ImageTokens) -> ImageSelection | None:
        """Kept tokens of one image, or None to keep all."""
        return None

    @property
    def positions(self) -> str:
        return getattr(self, "rope_positions", "contiguous")

    # -- LLM_LAYER
    def prune_layers(self, n_layers: int) -> list[int]:
        """0-based decoder layers at whose input this method drops visual tokens in prefill."""
        return []

    def score_layers(self, n_layers: int) -> list[int]:
        """0-based decoder layers whose attention q/k this method reads (captured during prefill)."""
        return []

    def prune(self, ctx: LayerContext) -> list[torch.Tensor | None] | None:
        """Per sample: indices (into ctx's sequence) of the visual tokens to keep, or None to keep all."""
        return None

    def observe_layers(self, n_layers: int) -> list[int]:
        """0-based decoder layers whose attention and MLP inputs and outputs this method reads in prefill."""
        return []

    def observe(self, layer: int, module: str, x_in: torch.Tensor, x_out: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor | None:
        """Prefill, for each layer in ``observe_layers`` and module "attn" / "mlp": x_in (B, T, D) the module's
        input (after the pre-norm), x_out (B, T, D) its output (before the residual add), valid (B, T).
        Return a per-token (B, T) tensor to keep (it comes back in ``LayerContext.observed``), or None."""
        return None

    # -- KV_CACHE
    def evict(self, ctx: CacheContext) -> dict[int, list[torch.Tensor]] | None:
        """After prefill: {layer: per-sample indices into that layer's cache to keep}, or None."""
        return None

    # -- PROJECTOR
    def build_projector(self, model: "nn.Module", original: "nn.Module") -> "nn.Module | None":
        """A module to use in place of the host's projector while the method is applied, or None."""
        return None

    # -- checks against the host
    def check(self, info: "HostInfo") -> None:
        """Raise ValueError when the method cannot run on this host (e.g. a layer index out of range)."""

    @property
    def label(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr)
        return f"{self.name}({fields})"


@dataclass
class HostInfo:
    """Facts about the host model that methods check against."""

    n_layers: int  # decoder layers
    n_vision_layers: int
    vision_feature_layer: int  # 0-based ViT layer whose output the host uses
    n_heads: int
    n_kv_heads: int
    hidden_size: int
    anyres: bool
    # whether the vision tower has a CLS token; without one, "CLS attention" is the mean attention each patch
    # receives (see ``vlprune.engine.vision.VisionRuntime``)
    cls_token: bool = True
    host: str = ""  # the host's class name, for messages of methods that refuse it


@dataclass
class BudgetMixin:
    """Budget fields shared by methods that keep a number of visual tokens."""

    keep: int | None = None
    keep_ratio: float | None = None
    budget: Budget | None = field(default=None, repr=False)

    def _init_budget(self, default: Budget | None = None) -> None:
        b = as_budget(self.keep, self.keep_ratio, self.budget) or default
        if b is None:
            raise ValueError(f"{self.name} needs a budget: keep=<tokens> or keep_ratio=<share in (0, 1]>")
        self.budget = b
        self.keep, self.keep_ratio = b.keep, b.keep_ratio


class Compose(Method):
    """Several methods applied together, each at its own stages (e.g. pooling before the decoder and FastV in it).

    PRE_LLM selections chain in order (the second sees what the first kept); LLM_LAYER prunes happen at each
    method's layers; KV_CACHE evictions apply in order.
    """

    name = "compose"

    def __init__(self, methods):
        methods = list(methods)
        if not methods:
            raise ValueError("Compose needs at least one method")
        flat = []
        for m in methods:
            flat.extend(m.methods if isinstance(m, Compose) else [m])
        for m in flat:
            if not isinstance(m, Method):
                raise ValueError(f"Compose takes Method instances; got {type(m).__name__}: {m!r}")
        if sum(1 for m in flat if Stage.PROJECTOR in m.stages) > 1:
            raise ValueError("at most one PROJECTOR method can be composed (there is one projector)")
        self.methods = flat

    @property
    def stages(self):  # type: ignore[override]
        return tuple(dict.fromkeys(s for m in self.methods for s in m.stages))

    @property
    def positions(self) -> str:
        pre = [m.positions for m in self.methods if Stage.PRE_LLM in m.stages or Stage.PROJECTOR in m.stages]
        return pre[0] if pre else "original"

    @property
    def label(self) -> str:
        return " + ".join(m.label for m in self.methods)

    def __repr__(self) -> str:
        return f"Compose({self.methods!r})"

    def vision_layers(self, n_vision_layers, feature_layer):
        return sorted({i for m in self.methods for i in m.vision_layers(n_vision_layers, feature_layer)})

    def merge_layer(self, n_vision_layers):
        mergers = [(m, m.merge_layer(n_vision_layers)) for m in self.methods]
        mergers = [(m, l) for m, l in mergers if l is not None]
        if len(mergers) > 1:
            raise ValueError(f"at most one ViT merge can be composed; got {[m.name for m, _ in mergers]}")
        self._merger = mergers[0][0] if mergers else None
        return mergers[0][1] if mergers else None

    def merge(self, x, grid):
        merger = getattr(self, "_merger", None)
        return None if merger is None else merger.merge(x, grid)

    def merges(self, n_visual):
        merger = getattr(self, "_merger", None)
        return True if merger is None else merger.merges(n_visual)

    def check(self, info):
        for m in self.methods:
            m.check(info)

    def prune_layers(self, n_layers):
        return sorted({i for m in self.methods for i in m.prune_layers(n_layers)})

    def score_layers(self, n_layers):
        return sorted({i for m in self.methods for i in m.score_layers(n_layers)})

    def observe_layers(self, n_layers):
        return sorted({i for m in self.methods for i in m.observe_layers(n_layers)})

    def build_projector(self, model, original):
        for m in self.methods:
            p = m.build_projector(model, original)
            if p is not None:
                return p
        return None
