"""Accuracy of a (proxy) LLaVA model on the proxy benchmark, per family and per category.

``evaluate(model, processor, split="test", n=600)`` asks the i-th question of the split for i in
``range(start, start + n)`` with every visual token, greedy, and scores the first generated word exactly against
the key. It is deterministic: the same model and arguments give the same answers.

``drop_visual`` (an int) keeps that many visual tokens per image, drawn uniformly at random (seeded per sample),
by gathering ``inputs_embeds`` before the decoder; it needs nothing from the pruning engine and exists so that
the benchmark's sensitivity to visual detail can be checked on its own.

Every accuracy comes with its 95% Wilson interval (``overall_ci``, ``families_ci``); ``blind=True`` adds the
blind (question-only) baseline on the same samples (``scenes.blind_baseline``), which a table of these accuracies
shows beside them.
"""
from __future__ import annotations

import collections
from typing import Iterable, Sequence

import torch

from ..stats import wilson
from .model import prompt
from .scenes import FAMILIES, Sample, blind_baseline, make_sample, normalize_answer, render, split_seed

__all__ = ["samples", "evaluate", "summarize", "answer"]


def samples(split: str = "test", n: int = 600, start: int = 0, geometry: str = "llava",
            seeds: Iterable[int] | None = None) -> list[Sample]:
    """The benchmark samples: ``n`` consecutive seeds of ``split`` from ``start``, or the given ``seeds``."""
    if seeds is None:
        seeds = [split_seed(split, i) for i in range(start, start + n)]
    return [make_sample(s, geometry=geometry) for s in seeds]


def _inputs(processor, batch: Sequence[Sample]):
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        return processor(images=[render(s.scene) for s in batch], text=[prompt(s.question) for s in batch],
                         return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side


def _random_keep_embeds(model, inputs, keep: int, seeds: Sequence[int]):
    """inputs_embeds and attention mask with only ``keep`` random visual tokens per sample (left padded)."""
    lm = model.get_input_embeddings()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = lm(ids)
    kw = {k: inputs[k] for k in ("image_sizes",) if k in inputs}
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], **kw)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
    img = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(img[..., None], feats.to(embeds.dtype))
    rows = []
    for b in range(ids.shape[0]):
        pos = torch.nonzero(img[b], as_tuple=True)[0]
        g = torch.Generator().manual_seed(int(seeds[b]))
        chosen = pos[torch.randperm(len(pos), generator=g)[:keep]].sort().values
        text = torch.nonzero(mask[b].bool() & ~img[b], as_tuple=True)[0]
        rows.append(torch.cat([text, chosen]).sort().values)
    width = max(len(r) for r in rows)
    out = embeds.new_zeros(len(rows), width, embeds.shape[-1])
    am = mask.new_zeros(len(rows), width)
    for b, r in enumerate(rows):
        out[b, width - len(r):] = embeds[b, r]
        am[b, width - len(r):] = 1
    return out, am


@torch.inference_mode()
def answer(model, processor, batch: Sequence[Sample], drop_visual: int | None = None,
           max_new_tokens: int = 2) -> list[str]:
    """The model's normalised answers to a batch of samples (greedy)."""
    inputs = _inputs(processor, batch)
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    tok = processor.tokenizer
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if drop_visual is None:
        out = model.generate(**inputs, **gen)
        new = out[:, inputs["input_ids"].shape[1]:]
    else:
        embeds, am = _random_keep_embeds(model, inputs, drop_visual, [s.seed for s in batch])
        new = model.generate(inputs_embeds=embeds, attention_mask=am, **gen)
    return [normalize_answer(t) for t in tok.batch_decode(new, skip_special_tokens=True)]


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy overall, per family and per category from records with ``family``, ``category``, ``correct``;
    ``overall_ci`` and ``families_ci``: their 95% Wilson intervals ([low, high] in %, None without samples)."""
    fam, cat = collections.defaultdict(list), collections.defaultdict(list)
    for r in records:
        fam[r["family"]].append(r["correct"])
        cat[r["category"]].append(r["correct"])
    acc = lambda xs: round(100.0 * sum(xs) / len(xs), 2) if xs else None  # noqa: E731
    ci = lambda xs: [round(v, 2) for v in wilson(sum(map(bool, xs)), len(xs))] if xs else None  # noqa: E731
    every = [r["correct"] for r in records]
    return {
        "n": len(records),
        "overall": acc(every),
        "overall_ci": ci(every),
        "families": {f: acc(fam[f]) for f in FAMILIES if f in fam},
        "families_ci": {f: ci(fam[f]) for f in FAMILIES if f in fam},
        "categories": {c: acc(v) for c, v in sorted(cat.items())},
        "counts": {f: len(fam[f]) for f in FAMILIES if f in fam},
    }


def evaluate(model, processor, split: str = "test", n: int = 600, start: int = 0, geometry: str = "llava",
             batch_size: int = 16, drop_visual: int | None = None, seeds: Iterable[int] | None = None,
             progress: bool = False, blind: bool = False) -> dict:
    """Accuracy per family on ``n`` samples of ``split`` (see module docstring). Returns the summary plus
    ``records`` (seed, family, category, question, answer, prediction, correct) for every sample, and with
    ``blind`` the question-only baseline on the same samples (``blind``: ``scenes.blind_baseline``'s dict)."""
    was_training = model.training
    model.eval()
    data = samples(split, n, start, geometry, seeds)
    records = []
    it = range(0, len(data), batch_size)
    if progress:
        try:
            from tqdm import tqdm
            it = tqdm(it, desc=f"eval {split}", unit="batch")
        except ImportError:
            pass
    for i in it:
        batch = data[i:i + batch_size]
        preds = answer(model, processor, batch, drop_visual=drop_visual)
        for s, p in zip(batch, preds):
            records.append(dict(seed=s.seed, family=s.family, category=s.category, question=s.question,
                                answer=s.answer, prediction=p, correct=p == s.answer))
    model.train(was_training)
    out = summarize(records)
    if blind:
        out["blind"] = blind_baseline(data, geometry=geometry)
    out["records"] = records
    return out
