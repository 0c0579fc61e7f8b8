"""The Adapter protocol: how vlprune finds the seams of a host model."""
from __future__ import annotations

from typing import Protocol


class Adapter(Protocol):
    """A host's seams. ``matches`` recognises the model; ``attach`` installs hooks into a PruneState."""

    @classmethod
    def matches(cls, model) -> bool: ...

    def attach(self, state) -> None: ...


_ADAPTERS: list[type] = []


def register_adapter(cls: type) -> type:
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def find_adapter(model):
    from . import hf_llava, llava_repo, vision_towers  # noqa: F401  (the built-in adapters; none imports its host)

    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    supported = ", ".join(getattr(c, "supported", c.__name__) for c in _ADAPTERS)
    raise TypeError(
        f"vlprune does not support model class {type(model).__name__!r}. Supported: {supported}. "
        f"Load the model with one of these (e.g. LlavaForConditionalGeneration.from_pretrained(...))."
    )


def run_selections(parts, cur, keep, n: int, merged=None, info: dict | None = None):
    """Apply the PRE_LLM ``select`` of each part in turn to one image's tokens, composing the results.

    cur: the ImageTokens the first part sees; keep: (K0,) their indices in the image of n tokens (all of them, or
    one representative per ViT-merged group); merged: (n,) representative of each merged token or None.
    Returns (keep (K,) image indices kept, features (K, D) or None when the host's own rows stay, merged (n,) or
    None, protected image indices (kept ones only)). ``info``, where given, receives "flops" (the selections' own
    matrix work, ``ImageSelection.flops``, summed) and "budget" (the last ``ImageSelection.budget`` given).
    """
    import torch

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
