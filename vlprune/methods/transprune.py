"""TransPrune (arXiv 2507.20630): progressive pruning inside the decoder by token transitions and instruction
attention."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import topk_sorted
from ..registry import register_method
from .base import BudgetMixin, HostInfo, LayerContext, Method, Stage, check_positions


def token_transition(x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor | None = None,
                     abs_cos: bool = False) -> torch.Tensor:
    """Token Transition Variation of one module, per token: ``softmax_tokens(1 - cos) * m``.

    x_in: (B, T, D) the module's input after the pre-norm; x_out: (B, T, D) its output before the residual add.
    m = |x_out| / |x_in| (magnitude), cos = cos(x_out, x_in) (direction); ``abs_cos`` uses 1 - |cos| (the paper's
    Eq. 2) instead of 1 - cos (the released code). The softmax runs over each sample's valid tokens (the released
    code runs it over the whole tensor, batch included, which makes scores depend on the batch).
    Returns (B, T) float32, 0 on padding.
    """
    xi, xo = x_in.float(), x_out.float()
    m = xo.norm(dim=-1) / xi.norm(dim=-1).clamp_min(1e-12)
    d = F.cosine_similarity(xo, xi, dim=-1, eps=1e-12)
    z = 1.0 - (d.abs() if abs_cos else d)
    if valid is not None:
        z = z.masked_fill(~valid, float("-inf"))
    return torch.softmax(z, dim=1).nan_to_num(0.0) * m


def _scale_1based(layers, ref_depth: int, depth: int) -> list[int]:
    """1-based layers of a ref_depth-layer decoder -> the proportional 1-based layers of a depth-layer decoder."""
    return [min(depth - 1, max(1, int(math.floor(l * depth / ref_depth + 0.5)))) for l in layers]


@register_method
@dataclass
class TransPrune(BudgetMixin, Method):
    """TransPrune: Token Transition Pruning (Li et al., CVPR 2026, arXiv 2507.20630).

    Progressive pruning of visual tokens inside the decoder, in prefill:

    * TTV (Token Transition Variation): for each layer in the accumulation set and each of its two modules
      (attention, MLP), ``softmax_tokens(1 - cos(out, in)) * |out| / |in|`` per token (``token_transition``),
      summed over both modules and accumulated over the accumulation layers up to the pruning layer.
    * IGA (Instruction-Guided Attention): the attention that the instruction tokens (every prompt token after the
      first visual token that is not visual) pay to each visual token, computed with the *next* layer's input
      norm, q/k projections and RoPE on the pruning layer's output, averaged over heads and instruction tokens.
    * score = alpha * TTV / sum(TTV) + (1 - alpha) * IGA / sum(IGA) over the sample's current visual tokens
      (alpha = 0.5, the released code's plain sum of the two normalised vectors); the top ``floor(N * ratio)``
      are kept in their original order, N = the sample's visual tokens at the decoder's input.

    Defaults are the released scripts' (TransPrune-High): accumulation over 1-based layers 7-12, pruning after
    layers 7, 9 and 12 down to 0.875, 0.625 and 0.125 of the visual tokens, for a ``ref_depth`` = 32-layer
    decoder. Other depths scale the layers proportionally (1-based l -> round(l * L / 32)); two pruning layers
    that land on the same layer merge into one keeping the later ratio. Options: ``abs_cos=True`` is the paper's
    1 - |cos|; ``use_iga=False`` is the TTV-only variant the paper ablates. ``keep`` / ``keep_ratio`` set the
    final stage's budget (earlier stages keep max(their ratio, the final budget)).

    RoPE positions: ``rope_positions="contiguous"`` (default, the released code's behaviour) renumbers the shortened
    sequence 0..T'-1 after every prune, so the next stage's IGA and every later layer see the compacted distances,
    and decode steps subtract the tokens dropped before each layer (the code's ``pos - (n_cur - n_keep)``);
    ``"original"`` keeps every kept token's position in the unpruned prompt.

    Differences from the released code, by design: the TTV softmax is per sample (the code's runs over the whole
    batch); the layers keep SDPA (the code does too: IGA and TTV are computed from hooked inputs and outputs).

    Shapes: TTV (B, T) per module and layer; IGA rows (B, H, R, T) -> (B, T); kept per sample (K,).
    """

    name = "transprune"
    stages = (Stage.LLM_LAYER,)
    paper = "arXiv 2507.20630"
    prune_at: tuple = (7, 9, 12)
    accumulate: tuple = (7, 8, 9, 10, 11, 12)
    ratios: tuple = (0.875, 0.625, 0.125)
    ref_depth: int = 32
    alpha: float = 0.5
    abs_cos: bool = False
    use_iga: bool = True
    rope_positions: str = "contiguous"

    def __post_init__(self):
        if self.keep is not None or self.keep_ratio is not None or self.budget is not None:
            self._init_budget()
        self.prune_at, self.accumulate, self.ratios = tuple(self.prune_at), tuple(self.accumulate), tuple(self.ratios)
        for field_name in ("prune_at", "accumulate"):
            v = getattr(self, field_name)
            if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ValueError(f"transprune: {field_name} must be 1-based decoder layer numbers (>= 1); got {v!r}")
        if list(self.prune_at) != sorted(set(self.prune_at)):
            raise ValueError(f"transprune: prune_at must be strictly increasing; got {self.prune_at!r}")
        if len(self.ratios) != len(self.prune_at):
            raise ValueError(f"transprune: ratios needs one share per pruning layer ({len(self.prune_at)}); "
                             f"got {self.ratios!r}")
        if any(not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r <= 1 for r in self.ratios) or \
                list(self.ratios) != sorted(self.ratios, reverse=True):
            raise ValueError(f"transprune: ratios must be non-increasing shares in (0, 1]; got {self.ratios!r}")
        if isinstance(self.ref_depth, bool) or not isinstance(self.ref_depth, int) or self.ref_depth < 2:
            raise ValueError(f"transprune: ref_depth must be the depth the layers refer to (32); got {self.ref_depth!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"transprune: alpha must be in [0, 1]; got {self.alpha!r}")
        check_positions(self.name, self.rope_positions)

    def check(self, info: HostInfo) -> None:
        if info.n_layers < 3:
            raise ValueError(f"transprune needs a decoder of at least 3 layers; this one has {info.n_layers}")

    # -- layers (0-based): pruning at the input of layer q = after 1-based layer q
    def _plan(self, n_layers: int) -> dict[int, float]:
        plan: dict[int, float] = {}
        for q, r in zip(_scale_1based(self.prune_at, self.ref_depth, n_layers), self.ratios):
            plan[q] = r  # a later ratio wins a shared layer
        return plan

    def prune_layers(self, n_layers: int) -> list[int]:
        return sorted(self._plan(n_layers))

    def observe_layers(self, n_layers: int) -> list[int]:
        return sorted({q - 1 for q in _scale_1based(self.accumulate, self.ref_depth, n_layers)})

    def observe(self, layer, module, x_in, x_out, valid):
        return token_transition(x_in, x_out, valid, self.abs_cos)

    def _counts(self, n0: int, ratio: float) -> int:
        n = int(math.floor(n0 * ratio + 1e-9))
        if self.budget is not None:
            final = self.budget.resolve(n0)
            n = max(n, final) if ratio > min(self.ratios) else final
        return min(n0, max(0, n))

    def prune(self, ctx: LayerContext):
        ratio = self._plan(ctx.n_layers)[ctx.layer]
        ttv = None
        for (layer, _module), v in ctx.observed.items():
            if layer < ctx.layer:
                ttv = v.float() if ttv is None else ttv + v.float()
        b, t = ctx.visual.shape
        iga = None
        if self.use_iga:
            rows, real = ctx.text_rows()  # the instruction tokens (B, R)
            w = real.float() / real.sum(1, keepdim=True).clamp_min(1)
            probs = ctx.entering_rows(rows).mean(1)  # (B, R, T) heads averaged
            iga = (probs * w[:, :, None]).sum(1)  # (B, T) instruction tokens averaged
        out = []
        for i in range(b):
            vis = ctx.visual[i].nonzero().squeeze(1)
            n_keep = self._counts(int(ctx.visual_at_start[i]), ratio)
            if n_keep >= vis.numel():
                out.append(None)
                continue
            score = torch.zeros(vis.numel())
            if ttv is not None:
                tv = ttv[i, vis].cpu()
                score = score + (self.alpha if iga is not None else 1.0) * tv / (tv.sum() + 1e-8)
            if iga is not None:
                av = iga[i, vis].cpu()
                score = score + (1.0 - self.alpha if ttv is not None else 1.0) * av / (av.sum() + 1e-8)
            out.append(vis[topk_sorted(score, n_keep).to(vis.device)])
        return out
