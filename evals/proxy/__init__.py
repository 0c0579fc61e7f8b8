"""The proxy LVLM and its procedural visual QA benchmark.

    from evals.proxy import load
    model, processor = load()                  # LlavaForConditionalGeneration, 576 visual tokens per image
    model, processor = load("next")            # LlavaNextForConditionalGeneration (AnyRes)
    model, processor = load("mqt")             # LLaVA-1.5 with an MQT projector: vlprune.apply(model, "mqt", keep=m)

The weights ship with the project (``evals/proxy/weights``); nothing is downloaded. Figures obtained with them are
proxy figures (see the model cards in the weight folders). This package does not depend on the pruning engine.
"""
from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
PATHS = {"llava": WEIGHTS / "llava-proxy", "next": WEIGHTS / "llava-next-proxy", "mqt": WEIGHTS / "llava-mqt-proxy"}

__all__ = ["WEIGHTS", "PATHS", "load", "path"]


def path(geometry: str = "llava") -> Path:
    """Folder of the shipped proxy model of ``geometry`` ("llava" or "next")."""
    if geometry not in PATHS:
        raise ValueError(f"geometry {geometry!r} is not one of {sorted(PATHS)}; use 'llava' (LLaVA-1.5), 'next' "
                         f"(LLaVA-NeXT) or 'mqt' (LLaVA-1.5 with an MQT projector)")
    p = PATHS[geometry]
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"no proxy weights at {p}; train them with `python -m evals.proxy.train`")
    return p


def load(geometry: str = "llava", dtype=None, device: str = "cpu", attn: str = "sdpa", folder=None):
    """``(model, processor)`` of the shipped proxy (or of the proxy saved in ``folder``), in eval mode. ``dtype``
    defaults to float32 (the weights are stored in bfloat16)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaNextForConditionalGeneration if geometry == "next" else LlavaForConditionalGeneration
    p = path(geometry) if folder is None else Path(folder)
    model = cls.from_pretrained(p, dtype=dtype or torch.float32, attn_implementation=attn).to(device).eval()
    processor = AutoProcessor.from_pretrained(p)
    if geometry == "mqt":
        from vlprune.methods.mqt import attach_mqt, load_mqt

        attach_mqt(model, processor, load_mqt(p))
    return model, processor
