"""Per-model state: the one attribute vlprune puts on a model, and the bookkeeping of kept tokens.

Legend: B batch, T sequence, N visual tokens, D hidden, K kept.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

ATTR = "_vlprune"


def gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather along ``dim`` with a per-sample index (B, K); x may have batch 1 (broadcast) and is expanded."""
    b, k = idx.shape
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    shape = [b] + [1] * (x.dim() - 1)
    shape[dim] = k
    view = idx.clamp(min=0).reshape(shape)
    expand = list(x.shape)
    expand[dim] = k
    return torch.gather(x, dim, view.expand(expand))


@dataclass
class Selection:
    """Kept indices per sample, applied once to every sequence-aligned tensor.

    idx: (B, K) indices into the current sequence (-1 marks a padding slot that the gather introduced, when samples
    keep different counts); valid: (B, K) False for padding (the input's own and the new slots).
    """

    idx: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_lists(cls, keep: list[torch.Tensor], valid_in: torch.Tensor, left: bool) -> "Selection":
        """Build from per-sample ascending index lists; shorter rows are padded on the left (or right)."""
        b = len(keep)
        k = max(int(t.numel()) for t in keep)
        dev = valid_in.device
        idx = torch.full((b, k), -1, dtype=torch.long, device=dev)
        for i, t in enumerate(keep):
            n = t.numel()
            if left:
                idx[i, k - n :] = t.to(dev)
            else:
                idx[i, :n] = t.to(dev)
        valid = (idx >= 0) & gather_rows(valid_in, idx)
        return cls(idx, valid)

    @property
    def padded(self) -> bool:
        return bool((self.idx < 0).any())

    def apply(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return gather_rows(x, self.idx, dim)

    def apply_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Slice a 4-D attention mask (B|1, 1, T, T) on rows and columns; padding slots see only themselves."""
        if mask is None:
            return None
        m = gather_rows(mask, self.idx, 2)
        m = gather_rows(m, self.idx, 3)
        return _fix_padding(m, self.valid)


def _fix_padding(m: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mask columns of invalid slots; give every fully masked row its diagonal so softmax stays finite."""
    b, _, q, kv = m.shape
    if valid.all():
        return m
    eye = torch.eye(q, kv, dtype=torch.bool, device=m.device)[None, None]
    if m.dtype == torch.bool:
        m = m & valid[:, None, None, :]
        dead = ~m.any(-1, keepdim=True)
        return m | (dead & eye)
    neg = torch.finfo(m.dtype).min
    m = m.masked_fill(~valid[:, None, None, :], neg)
    dead = (m <= neg / 2).all(-1, keepdim=True)
    return torch.where(dead & eye, torch.zeros((), dtype=m.dtype, device=m.device), m)


def causal_mask(valid_kv: torch.Tensor, q: int, dtype: torch.dtype, q_offset: int | None = None) -> torch.Tensor:
    """A (B, 1, q, kv) mask for q new rows at the end of kv keys: causal in sequence order, padding masked.

    Boolean (True = attend) for ``dtype=torch.bool``; otherwise additive (0 / dtype min).
    """
    b, kv = valid_kv.shape
    off = kv - q if q_offset is None else q_offset
    rows = torch.arange(q, device=valid_kv.device)[:, None] + off
    cols = torch.arange(kv, device=valid_kv.device)[None, :]
    m = (cols <= rows)[None, None] & valid_kv[:, None, None, :]
    eye = torch.zeros(q, kv, dtype=torch.bool, device=valid_kv.device)
    eye[torch.arange(q), torch.arange(q) + off] = True
    m = m | ((~m.any(-1, keepdim=True)) & eye[None, None])
    return to_mask_dtype(m, dtype)


def to_mask_dtype(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return m
    out = torch.zeros(m.shape, dtype=dtype, device=m.device)
    return out.masked_fill(~m, torch.finfo(dtype).min)


@dataclass
class SeqState:
    """The prefill sequence as the decoder sees it now, in terms of the prompt as given (the original frame)."""

    original: torch.Tensor  # (B, T) position of each slot in the prompt (-1 = padding slot added by vlprune)
    valid: torch.Tensor  # (B, T) bool
    visual: torch.Tensor  # (B, T) bool
    position_embeddings: Any = None  # (cos, sin) to substitute from the first changed layer on
    position_ids: Any = None
    attention_mask: Any = None
    substitute: bool = False
    per_layer: list = field(default_factory=list)  # per decoder layer: (original, valid, visual) it saw
    captures: dict = field(default_factory=dict)  # layer -> {"q":..., "k":..., "cos":..., "sin":..., "valid":...}
    observed: dict = field(default_factory=dict)  # (part, layer, module) -> (B, T) values a method's observe kept
    protected: Any = None  # (B, T) bool: tokens a PRE_LLM stage protected from later drops, or None
    shift: Any = None  # (B,) tokens renumbered away inside the decoder so far ("contiguous" prunes), or None
    shifts: list = field(default_factory=list)  # per decoder layer: ``shift`` as that layer saw it

    def advance(self, sel: Selection) -> None:
        self.original = torch.where(sel.idx >= 0, sel.apply(self.original), torch.full_like(sel.idx, -1))
        self.visual = sel.apply(self.visual) & sel.valid
        self.valid = sel.valid
        for key, value in self.observed.items():
            self.observed[key] = sel.apply(value)
        if self.protected is not None:
            self.protected = sel.apply(self.protected) & sel.valid


@dataclass
class CacheRecord:
    """What a pruned prefill left in a KV cache, so that decoding and later turns stay consistent.

    prefix[l] = (original (B, P_l), valid (B, P_l), visual (B, P_l)) for the prompt entries of layer l's cache;
    entries appended after the prompt (decoded tokens, later turns) are never pruned and follow in order.
    """

    cache: weakref.ref
    prompt_len: int  # length of the prompt in the original frame
    covered: int  # original-frame length the cache covers now (prompt + every token fed since)
    prefix: list
    delta: torch.Tensor  # (B,) positions subtracted per sample under the "contiguous" RoPE policy (tokens dropped)
    layer0_pruned: bool
    positions: str
    # per decoder layer: (B,) positions its prefill renumbered away inside the decoder, subtracted from the positions
    # of every later call at that layer (on top of ``delta``), or None where that layer kept the decoder input's
    layer_delta: list = field(default_factory=list)

    def columns(self, layer: int, am2d: torch.Tensor | None, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(original (B, L_l + q), key validity (B, L_l + q)) of layer l's keys in the coming call."""
        orig, valid, _ = self.prefix[layer]
        b = orig.shape[0]
        tail = torch.arange(self.prompt_len, self.covered + q, device=orig.device)[None].expand(b, -1)
        cols = torch.cat([orig, tail], 1)
        ok = torch.cat([valid, torch.ones_like(tail, dtype=torch.bool)], 1)
        if am2d is not None:
            if am2d.shape[1] != self.covered + q:
                raise ValueError(
                    f"attention_mask covers {am2d.shape[1]} tokens but the pruned cache covers {self.covered} "
                    f"plus {q} new tokens; pass the mask of the whole conversation so far"
                )
            ok = ok & gather_rows(am2d.bool(), cols)
        return cols, ok


@dataclass
class Run:
    """What the last call ran: filled by hooks, read by ``vlprune.stats``."""

    vision: list = field(default_factory=list)  # cost.VisionCall
    projector_rows: int = 0
    projector_extra_flops: float = 0.0  # projectors that are not LLaVA's MLP report their own FLOPs
    llm: list = field(default_factory=list)  # cost.LLMCall
    scoring_flops: float = 0.0
    images: list = field(default_factory=list)  # per image: dict(sample, n, kept, merged_from)
    visual_per_layer: list | None = None  # (n_layers, B) visual tokens per sample entering each layer in prefill
    tokens_per_layer: list | None = None  # (n_layers, B) valid tokens per sample in prefill
    kept_positions: list | None = None  # per sample: prompt positions of the visual tokens that reached the last layer
    visual_positions: dict | None = None  # layer -> per sample prompt positions of its visual tokens (where they change)
    evicted: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    reports: dict = field(default_factory=dict)  # what methods reported through LayerContext.report
    method_seconds: float = 0.0  # wall time in the method's own work: ViT score capture, select, prune, evict


class PruneState:
    """Everything vlprune keeps on a model, under the single attribute ``model._vlprune``."""

    def __init__(self, method, adapter):
        self.method = method
        self.adapter = adapter
        self.handles: list = []
        self.restore: list = []  # callables that undo non-hook changes (e.g. a swapped projector)
        self.run = Run()
        self.pending: dict | None = None  # image info captured at the multimodal model's input
        self.image_call: dict | None = None  # image_sizes / count seen by the host's get_image_features
        self.vision_logits: dict = {}  # vit layer -> (n_crops_total, H, S_l)
        self.vit_merge: dict | None = None  # a VISION merge of the current vision call (see the adapter)
        self._vision_q: dict = {}
        self.seq: SeqState | None = None
        self.records: list[CacheRecord] = []
        self.call: dict | None = None  # the decoder call in flight

    def new_run(self) -> None:
        self.run = Run()

    def record_for(self, cache) -> CacheRecord | None:
        if cache is None:
            return None
        self.records = [r for r in self.records if r.cache() is not None]
        for r in self.records:
            if r.cache() is cache:
                return r
        return None
