"""How much a vision tower's patch tokens know: a linear probe per patch.

``probe(model, processor)`` runs the tower of a LLaVA proxy over scenes of the train split, takes the patch
tokens of the layer LLaVA feeds the projector (``config.vision_feature_layer``, CLS dropped), fits a LayerNorm +
linear classifier to each patch's class (``scenes.patch_labels``: background, the 30 object kinds, the 10 digits,
the sign plate) on frozen features, and scores it on scenes of the validation split:

- ``background``: background patches called background;
- ``object``: object patches given their exact kind, and separately their ``colour`` and ``shape``;
- ``shape_outline`` / ``shape_inner``: ``shape`` on the object patches at its outline and on those inside it;
- ``digit``: patches of a sign's digit given the digit;
- ``sign``: patches of the sign plate called so.

A decoder can only answer what the tokens it receives carry, so these figures bound what the proxy's
question families can reach: shape questions need ``shape``, the text family needs ``digit``.
``python -m evals.proxy.probe [--model llava|FOLDER]`` prints them as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import COMBOS, N_PATCH_CLASSES, make_scene, patch_labels, render, split_seed

__all__ = ["probe", "probe_features", "tower_features", "scene_batch", "patch_targets"]

_N_OBJ = len(COMBOS)


def scene_batch(split: str, start: int, n: int):
    """``n`` scenes of ``split`` (seeds ``start ..``), half with a sign and a third with a small object."""
    return [make_scene(split_seed(split, start + i), need_sign=i % 2 == 0, need_small=i % 3 == 0) for i in range(n)]


def patch_targets(scenes) -> torch.Tensor:
    """(n, patches) int64 patch classes of ``scenes`` (``scenes.patch_labels``, row-major)."""
    return torch.from_numpy(np.stack([patch_labels(s).reshape(-1) for s in scenes]))


def tower_features(model, processor, batch_size: int = 16) -> Callable:
    """``fn(scenes) -> (n, patches, width)`` float32 features of the layer the model's projector reads."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    ip = processor.image_processor
    device = next(model.parameters()).device

    @torch.inference_mode()
    def fn(scenes):
        out = []
        for i in range(0, len(scenes), batch_size):
            px = ip([render(s) for s in scenes[i:i + batch_size]], return_tensors="pt")["pixel_values"]
            hs = tower(px.to(device, next(tower.parameters()).dtype), output_hidden_states=True).hidden_states
            out.append(hs[layer][:, 1:].float().cpu())
        return torch.cat(out)
    return fn


def _edge(lab: torch.Tensor, side: int = 24) -> torch.Tensor:
    """(n * side * side,) bool: patches with a 4-neighbour of another class (the image border is no edge)."""
    g = lab.reshape(-1, side, side)
    pad = F.pad(g[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0]
    diff = torch.zeros_like(g, dtype=torch.bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        diff |= pad[:, dy:dy + side, dx:dx + side] != g
    return diff.reshape(-1)


def _scores(pred: torch.Tensor, lab: torch.Tensor) -> dict:
    obj = (lab >= 1) & (lab <= _N_OBJ)
    dig = (lab > _N_OBJ) & (lab < N_PATCH_CLASSES - 1)
    sign = lab == N_PATCH_CLASSES - 1
    is_obj = (pred >= 1) & (pred <= _N_OBJ)
    edge = _edge(lab) if lab.numel() % 576 == 0 else torch.ones_like(obj)
    acc = lambda m, a, b: round(float((a[m] == b[m]).float().mean()), 4) if m.any() else None  # noqa: E731
    colour = lambda x: (x - 1) // 5  # noqa: E731   COMBOS is colour-major over 5 shapes
    shape = lambda x: (x - 1) % 5    # noqa: E731
    return {
        "background": acc(lab == 0, pred, lab),
        "object": acc(obj, pred, lab),
        "colour": acc(obj, torch.where(is_obj, colour(pred), -1), colour(lab)),
        "shape": acc(obj, torch.where(is_obj, shape(pred), -1), shape(lab)),
        "digit": acc(dig, pred, lab),
        "sign": acc(sign, pred, lab),
        # shape on an object's outline patches against its inner patches, which see no edge of their own
        "shape_outline": acc(obj & edge, torch.where(is_obj, shape(pred), -1), shape(lab)),
        "shape_inner": acc(obj & ~edge, torch.where(is_obj, shape(pred), -1), shape(lab)),
        "patches": {"object": int(obj.sum()), "inner": int((obj & ~edge).sum()), "digit": int(dig.sum()),
                    "sign": int(sign.sum()), "background": int((lab == 0).sum())},
    }


def probe_features(features: Callable, train_scenes: Sequence, eval_scenes: Sequence, epochs: int = 8,
                   lr: float = 3e-3, seed: int = 0) -> dict:
    """Fit the probe on ``features(train_scenes)`` and score it on ``features(eval_scenes)`` (see module doc).
    ``colour`` and ``shape`` count an object patch the probe called background or a digit as wrong."""
    xtr, ytr = features(list(train_scenes)), patch_targets(train_scenes)
    xev, yev = features(list(eval_scenes)), patch_targets(eval_scenes)
    if xtr.shape[:2] != ytr.shape:
        raise ValueError(f"features {tuple(xtr.shape)} do not match the patch grid {tuple(ytr.shape)}; the probe "
                         f"needs one feature row per 14 px patch of a 336 px scene")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Sequential(torch.nn.LayerNorm(xtr.shape[-1]), torch.nn.Linear(xtr.shape[-1], N_PATCH_CLASSES))
    opt = torch.optim.Adam(head.parameters(), lr)
    x, y = xtr.flatten(0, 1), ytr.flatten()
    # class-balanced weights: background is most of every scene and would otherwise drown the rare classes
    freq = torch.bincount(y, minlength=N_PATCH_CLASSES).float()
    weight = torch.where(freq > 0, freq.sum() / (freq.clamp(min=1) * N_PATCH_CLASSES), torch.zeros_like(freq))
    weight = weight.clamp(max=50.0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 4096):
            j = order[i:i + 4096]
            loss = F.cross_entropy(head(x[j]), y[j], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = head(xev.flatten(0, 1)).argmax(-1)
    out = _scores(pred, yev.flatten())
    out.update(train_scenes=len(train_scenes), eval_scenes=len(eval_scenes))
    return out


def probe(model, processor, n_train: int = 256, n_eval: int = 64, epochs: int = 8, seed: int = 0) -> dict:
    """The linear probe of ``model``'s vision tower on ``n_train`` train scenes, scored on ``n_eval`` validation
    scenes (see module docstring)."""
    fn = tower_features(model, processor)
    return probe_features(fn, scene_batch("train", 7_000_000, n_train), scene_batch("validation", 0, n_eval),
                          epochs=epochs, seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.proxy.probe", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llava", help="'llava' (the shipped proxy) or a saved proxy folder")
    ap.add_argument("--train", type=int, default=256, help="train-split scenes the probe is fitted on")
    ap.add_argument("--eval", type=int, default=64, help="validation scenes it is scored on")
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args(argv)
    from . import load

    model, proc = load() if args.model == "llava" else load("llava", folder=args.model)
    print(json.dumps(probe(model, proc, args.train, args.eval, args.epochs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
