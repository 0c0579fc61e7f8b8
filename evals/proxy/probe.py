"""How much a vision tower's patch tokens know: a linear probe per patch.

``probe(model, processor)`` runs the tower of a LLaVA proxy over scenes of the train split, takes the patch
tokens of the layer LLaVA feeds the projector (``config.vision_feature_layer``, CLS dropped), fits a LayerNorm +
linear classifier to each patch's class (``scenes.patch_labels``: background, the 30 object kinds, the 10 digits,
the sign plate) on frozen features, and scores it on scenes of the validation split:

- ``background``: background patches called background;
- ``object``: object patches given their exact kind, and separately their ``colour`` and ``shape``;
- ``shape_outline`` / ``shape_inner``: ``shape`` on the object patches at its outline and on those inside it;
- ``digit``: patches of a sign's digit given the digit;
- ``sign``: patches of the sign plate called so;
- ``shape_balanced`` / ``colour_balanced`` / ``digit_balanced``: the same on object (digit) patches as the mean
  recall over the 5 shapes (6 colours, 10 digits), so that a probe answering the commonest class of a skewed
  validation set does not score above chance;
- ``shape_small`` / ``shape_small_balanced``: ``shape`` on the patches of small objects (at most 20 px, the ones
  the ``fine`` family asks about), and ``shape_large`` on those of medium and large objects (``patch_sizes``).

A decoder can only answer what the tokens it receives carry, so these figures bound what the proxy's
question families can reach: shape questions need ``shape``, the text family needs ``digit``.
``python -m evals.proxy.probe [--model llava|FOLDER|tower.pt]`` prints them as JSON: ``--model`` is the shipped
proxy, a saved LLaVA proxy folder, or a stage-0 ``tower.pt`` of ``evals.proxy.recipe`` (or a folder holding one
and no ``config.json``), loaded into a fresh LLaVA-1.5 proxy.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import COMBOS, N_PATCH_CLASSES, _draw, make_scene, patch_labels, render, split_seed

__all__ = ["probe", "probe_features", "tower_features", "scene_batch", "patch_targets", "patch_sizes",
           "balanced_accuracy", "load_model"]

_N_OBJ = len(COMBOS)


def scene_batch(split: str, start: int, n: int):
    """``n`` scenes of ``split`` (seeds ``start ..``), half with a sign and a third with a small object."""
    return [make_scene(split_seed(split, start + i), need_sign=i % 2 == 0, need_small=i % 3 == 0) for i in range(n)]


def patch_targets(scenes) -> torch.Tensor:
    """(n, patches) int64 patch classes of ``scenes`` (``scenes.patch_labels``, row-major)."""
    return torch.from_numpy(np.stack([patch_labels(s).reshape(-1) for s in scenes]))


def patch_sizes(scene, patch: int = 14) -> np.ndarray:
    """(rows, cols) int64 size map of the patch grid: 0 for a patch ``scenes.patch_labels`` gives no object kind,
    1 for one showing a small object, 2 for one showing a medium or large object. Where objects of the patch's
    kind and of both size groups share a patch, the group with more of its pixels there decides."""
    from PIL import Image, ImageDraw

    lab = patch_labels(scene, patch)
    w, h = scene.width, scene.height
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    for o in scene.objects:                      # drawn in the order patch_labels draws them: the same overlaps
        _draw(d, o, 1 + 2 * COMBOS.index((o.colour, o.shape)) + (o.size != "small"))
    rows, cols = lab.shape
    a = np.asarray(im, dtype=np.int64)[: rows * patch, : cols * patch]
    a = a.reshape(rows, patch, cols, patch).transpose(0, 2, 1, 3).reshape(rows * cols, patch * patch)
    n_codes = 1 + 2 * _N_OBJ
    counts = np.bincount((np.arange(rows * cols)[:, None] * n_codes + a).ravel(), minlength=rows * cols * n_codes)
    counts = counts.reshape(rows * cols, n_codes)
    flat = lab.reshape(-1)
    out = np.zeros(rows * cols, np.int64)
    obj = np.nonzero((flat >= 1) & (flat <= _N_OBJ))[0]
    small = counts[obj, 1 + 2 * (flat[obj] - 1)]
    large = counts[obj, 2 + 2 * (flat[obj] - 1)]
    out[obj] = np.where(small > large, 1, 2)
    return out.reshape(rows, cols)


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


def balanced_accuracy(mask: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, classes: Sequence[int]):
    """Mean recall over the ``classes`` that occur in ``target[mask]`` (each class's share of its masked samples
    that ``pred`` gets right), rounded to 4 places; None when ``mask`` selects nothing."""
    if not mask.any():
        return None
    p, t = pred[mask], target[mask]
    recalls = [float((p[t == c] == c).float().mean()) for c in classes if (t == c).any()]
    return round(sum(recalls) / len(recalls), 4) if recalls else None


def _scores(pred: torch.Tensor, lab: torch.Tensor, size: torch.Tensor | None = None) -> dict:
    """The probe's figures (module doc) from flat patch predictions ``pred`` and classes ``lab``; ``size`` (flat
    ``patch_sizes``) adds ``shape_small``, ``shape_small_balanced`` and ``shape_large`` (None without it)."""
    if size is not None and size.shape != lab.shape:
        raise ValueError(f"size map {tuple(size.shape)} does not match the patch classes {tuple(lab.shape)}; pass "
                         f"one patch_sizes entry per patch class (the same scenes, flattened the same way)")
    obj = (lab >= 1) & (lab <= _N_OBJ)
    dig = (lab > _N_OBJ) & (lab < N_PATCH_CLASSES - 1)
    sign = lab == N_PATCH_CLASSES - 1
    is_obj = (pred >= 1) & (pred <= _N_OBJ)
    edge = _edge(lab) if lab.numel() % 576 == 0 else torch.ones_like(obj)
    acc = lambda m, a, b: round(float((a[m] == b[m]).float().mean()), 4) if m.any() else None  # noqa: E731
    colour = lambda x: (x - 1) // 5  # noqa: E731   COMBOS is colour-major over 5 shapes
    shape = lambda x: (x - 1) % 5    # noqa: E731
    shape_pred, colour_pred = torch.where(is_obj, shape(pred), -1), torch.where(is_obj, colour(pred), -1)
    small = obj & (size == 1) if size is not None else None
    large = obj & (size == 2) if size is not None else None
    return {
        "background": acc(lab == 0, pred, lab),
        "object": acc(obj, pred, lab),
        "colour": acc(obj, colour_pred, colour(lab)),
        "shape": acc(obj, shape_pred, shape(lab)),
        "digit": acc(dig, pred, lab),
        "sign": acc(sign, pred, lab),
        # shape on an object's outline patches against its inner patches, which see no edge of their own
        "shape_outline": acc(obj & edge, shape_pred, shape(lab)),
        "shape_inner": acc(obj & ~edge, shape_pred, shape(lab)),
        "shape_balanced": balanced_accuracy(obj, shape_pred, shape(lab), range(5)),
        "colour_balanced": balanced_accuracy(obj, colour_pred, colour(lab), range(len(COMBOS) // 5)),
        "digit_balanced": balanced_accuracy(dig, pred, lab, range(_N_OBJ + 1, _N_OBJ + 11)),
        "shape_small": acc(small, shape_pred, shape(lab)) if small is not None else None,
        "shape_small_balanced": balanced_accuracy(small, shape_pred, shape(lab), range(5)) if small is not None
        else None,
        "shape_large": acc(large, shape_pred, shape(lab)) if large is not None else None,
        "patches": {"object": int(obj.sum()), "inner": int((obj & ~edge).sum()), "digit": int(dig.sum()),
                    "sign": int(sign.sum()), "background": int((lab == 0).sum()),
                    "small": int(small.sum()) if small is not None else None,
                    "large": int(large.sum()) if large is not None else None},
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
    sizes = torch.from_numpy(np.stack([patch_sizes(s).reshape(-1) for s in eval_scenes]))
    out = _scores(pred, yev.flatten(), sizes.flatten())
    out.update(train_scenes=len(train_scenes), eval_scenes=len(eval_scenes))
    return out


def probe(model, processor, n_train: int = 256, n_eval: int = 64, epochs: int = 8, seed: int = 0) -> dict:
    """The linear probe of ``model``'s vision tower on ``n_train`` train scenes, scored on ``n_eval`` validation
    scenes (see module docstring)."""
    fn = tower_features(model, processor)
    return probe_features(fn, scene_batch("train", 7_000_000, n_train), scene_batch("validation", 0, n_eval),
                          epochs=epochs, seed=seed)


_MODEL_FORMS = ("'llava' (the shipped proxy), a saved LLaVA proxy folder (with config.json), or a stage-0 "
                "tower.pt file of `python -m evals.proxy.recipe tower` (or a folder holding tower.pt)")


def load_model(spec: str):
    """``(model, processor)`` for ``--model``: 'llava', a saved LLaVA proxy folder, or a stage-0 ``tower.pt`` (a
    file, or a folder holding one and no ``config.json``) loaded into a fresh LLaVA-1.5 proxy."""
    from pathlib import Path

    from . import load

    if spec == "llava":
        return load()
    p = Path(spec)
    if p.is_dir() and (p / "config.json").exists():
        return load("llava", folder=p)
    tower = p / "tower.pt" if p.is_dir() else p
    if not tower.is_file():
        what = "a folder with neither config.json nor tower.pt" if p.is_dir() else "no such file or folder"
        raise FileNotFoundError(f"--model {spec!r}: {what}; pass {_MODEL_FORMS}")
    from .model import build_model, build_processor
    from .recipe import load_tower_file

    model = build_model("llava")
    try:
        load_tower_file(model, tower)
    except Exception as e:  # noqa: BLE001  not a torch file, or not a tower state dict of the LLaVA proxy
        raise ValueError(f"--model {spec!r}: {tower} is not a stage-0 tower file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass {_MODEL_FORMS}") from e
    return model.eval(), build_processor("llava")


def main(argv=None) -> int:
    from vlprune.cliargs import Parser, device_name, nonneg_int, positive_float, positive_int

    ap = Parser(prog="python -m evals.proxy.probe", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llava", help=f"{_MODEL_FORMS}")
    ap.add_argument("--train", type=positive_int, default=256, help="train-split scenes the probe is fitted on")
    ap.add_argument("--eval", type=positive_int, default=64, help="validation scenes it is scored on")
    ap.add_argument("--epochs", type=positive_int, default=8)
    args = ap.parse_args(argv)
    try:
        model, proc = load_model(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m evals.proxy.probe: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(probe(model, proc, args.train, args.eval, args.epochs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
