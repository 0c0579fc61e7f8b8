"""Procedural scenes and questions for the proxy visual QA benchmark.

Everything is a pure function of an integer seed: ``make_scene(seed)`` draws a scene description (background,
8-16 shapes, an optional sign with a rendered digit), ``render(scene)`` draws it, and ``make_sample(seed, family)``
draws a question of ``family`` and builds a scene that answers it. No files are read.

The benchmark is debiased so that a question alone says nothing about its answer:

- object kinds (6 colours x 5 shapes), sizes and positions are drawn uniformly, independent of each other;
- every answer is decided *before* the scene is built, uniformly over the family's answers: existence is yes for
  half the questions about every kind (negatives half random absent kinds, half adversarial ones whose colour and
  shape are both in the scene on other objects), counts are uniform over 0-5 (8-16 for "all objects"), colours
  and shapes are uniform, spatial relations are true half the time, digits are uniform;
- ``blind_baseline`` measures it: the commonest training answer per question text, scored on any split.

========== ============================================================== ===================
family     question                                                       answer
========== ============================================================== ===================
existence  "is there a red circle in the image ?" POPE-style: half        yes / no
           positives, negatives random or adversarial (the colour and
           the shape are present, on different objects)
attribute  colour or shape of an object named by its other attribute or   colour / shape word
           by its position (leftmost, rightmost, topmost, bottommost)
counting   objects of a shape, of a colour (0-5), or in all (8-16)        a number
spatial    "is the red circle left of the blue square ?" (also right,     yes / no
           above, below), both objects named uniquely, clear margins
text       "what number is on the sign ?" (one digit in a 5x7 font, the   a number 0-9
           sign under 2% of a 336 px image)
fine       colour or shape of the one *small* object (at most 20 px)      colour / shape word
           named by its other attribute
========== ============================================================== ===================

Geometries: ``"llava"`` renders 336x336 (LLaVA-1.5: patch 14, 576 visual tokens); ``"next"`` renders 672x336 or
336x672 with the same object sizes in pixels, for LLaVA-NeXT AnyRes (and twice the objects).

Splits draw seeds from disjoint ranges (``SPLITS``); ``split_seed(split, i)`` is the i-th seed of a split and any
other integer seed gives a fresh sample. A sample's scene always carries the sample's own seed (redraws change
an attempt counter, never the seed), so no scene of one split is drawn from another split's seeds.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

__all__ = [
    "SHAPES", "PLURALS", "COLOURS", "FAMILIES", "SPLITS", "GEOMETRIES", "N_PATCH_CLASSES",
    "Obj", "Sign", "Scene", "Sample",
    "split_seed", "split_of", "make_scene", "render", "patch_labels", "ref_patches", "scene_targets", "make_sample",
    "ask", "train_turns", "answer_space", "blind_baseline", "vocabulary", "normalize_answer",
]

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
COLOURS = {
    "red": (215, 35, 35), "green": (30, 160, 55), "blue": (35, 75, 225),
    "yellow": (245, 215, 30), "purple": (140, 50, 185), "orange": (250, 135, 20),
}
COLOUR_NAMES = tuple(COLOURS)
COMBOS = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES)          # 30 object kinds
FAMILIES = ("existence", "attribute", "counting", "spatial", "text", "fine")
SPLITS = {"train": 0, "validation": 100_000_000, "test": 200_000_000}
GEOMETRIES = ("llava", "next")
SIZES = {"large": (36, 44), "medium": (24, 30), "small": (14, 20)}
SIZE_P = (0.25, 0.35, 0.40)
N_OBJECTS = (8, 16)     # objects per 336x336 of canvas, inclusive
COUNT_MAX = 5           # counts of one colour or one shape are uniform over 0..COUNT_MAX
POSITIONS = ("leftmost", "rightmost", "topmost", "bottommost")
RELATIONS = ("left of", "right of", "above", "below")

# Patch classes for the dense auxiliary target: 0 background, 1..30 object kinds, 31..40 digits, 41 sign plate.
N_PATCH_CLASSES = 1 + len(COMBOS) + 10 + 1
_SIGN_CLASS = N_PATCH_CLASSES - 1

# 5x7 bitmap digits, one string per row, '#' = ink.
_FONT = {
    "0": [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
    "1": ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    "3": ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
    "4": ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    "6": ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
    "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    "8": [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    "9": [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
}


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str            # "large" | "medium" | "small"
    x: float             # centre, pixels
    y: float
    s: int               # side of the bounding box, pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.s / 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)


@dataclasses.dataclass(frozen=True)
class Sign:
    text: str
    x0: int
    y0: int
    scale: int           # pixels per font dot

    @property
    def box(self) -> tuple[int, int, int, int]:
        w = (len(self.text) * 6 + 1) * self.scale + 2 * self.scale
        h = 9 * self.scale
        return (self.x0, self.y0, self.x0 + w, self.y0 + h)


@dataclasses.dataclass(frozen=True)
class Scene:
    seed: int
    width: int
    height: int
    background: tuple[int, int, int]
    texture: str         # "plain" | "gradient" | "stripes" | "noise"
    objects: tuple[Obj, ...]
    sign: Sign | None

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum(1 for o in self.objects if (shape is None or o.shape == shape)
                   and (colour is None or o.colour == colour))

    def has(self, colour: str, shape: str) -> bool:
        return self.count(shape, colour) > 0


@dataclasses.dataclass(frozen=True)
class Sample:
    seed: int
    family: str
    category: str        # family, or "existence/<positive|random|adversarial>" and the like
    question: str
    answer: str
    scene: Scene
    refs: tuple = ()     # the objects (or the sign) the answer depends on; empty for absent objects


def split_seed(split: str, index: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {sorted(SPLITS)}; pass one of those names")
    if not 0 <= index < 100_000_000:
        raise ValueError(f"index {index} is outside 0..99999999; each split holds 10^8 seeds")
    return SPLITS[split] + int(index)


def _canvas(rng: np.random.Generator, geometry: str) -> tuple[int, int]:
    if geometry == "llava":
        return 336, 336
    if geometry == "next":
        return (672, 336) if rng.random() < 0.5 else (336, 672)
    raise ValueError(f"geometry {geometry!r} is not one of {GEOMETRIES}")


def _overlaps(box, boxes, margin=4) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in boxes:
        if x0 < a1 + margin and a0 < x1 + margin and y0 < b1 + margin and b0 < y1 + margin:
            return True
    return False


def split_of(seed: int) -> str | None:
    """The split whose seed range holds ``seed`` (None for a fresh seed outside every split)."""
    for name, base in SPLITS.items():
        if base <= int(seed) < base + 100_000_000:
            return name
    return None


def make_scene(seed: int, geometry: str = "llava", *, n_objects: int | None = None, min_objects: int | None = None,
               need_sign: bool | None = None, need_small: bool = False, exclude=(), attempt: int = 0) -> Scene:
    """The scene of ``seed``: ``n_objects`` (default uniform over ``N_OBJECTS``, scaled by canvas area; at least
    ``min_objects``) objects of uniformly drawn kinds, sizes (``SIZE_P``) and places, none of the kinds in
    ``exclude``; a sign with probability 1/2 unless ``need_sign`` says; the first object small if ``need_small``.
    Keyword constraints and ``attempt`` (a redraw counter) are part of the draw: the same arguments give the same
    scene, and the scene keeps ``seed``."""
    g = GEOMETRIES.index(geometry) if geometry in GEOMETRIES else 99
    rng = np.random.default_rng([int(seed), g, int(attempt)] if attempt else [int(seed), g])
    w, h = _canvas(rng, geometry)
    area = (w * h) / (336 * 336)
    lo, hi = (int(round(v * area)) for v in N_OBJECTS)
    n = int(rng.integers(lo, hi + 1)) if n_objects is None else int(n_objects)
    n = max(n, min_objects or 0)
    grey = int(rng.integers(95, 200))
    tint = rng.integers(-18, 19, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    texture = str(rng.choice(["plain", "gradient", "stripes", "noise"]))
    boxes: list[tuple] = []
    sign = None
    if need_sign is None:
        need_sign = rng.random() < 0.5
    if need_sign:
        scale = int(rng.integers(3, 5))
        text = str(int(rng.integers(0, 10)))
        sw, sh = (len(text) * 6 + 1) * scale + 2 * scale, 9 * scale
        sign = Sign(text, int(rng.integers(4, w - sw - 4)), int(rng.integers(4, h - sh - 4)), scale)
        boxes.append(sign.box)
    allowed = [c for c in COMBOS if c not in set(exclude)]
    if not allowed:
        raise ValueError(f"exclude={sorted(exclude)} leaves no object kind; exclude fewer than all {len(COMBOS)}")
    objects: list[Obj] = []
    sizes = list(SIZES)
    for i in range(n):
        size = "small" if need_small and i == 0 else str(rng.choice(sizes, p=SIZE_P))
        kind = allowed[int(rng.integers(len(allowed)))]
        for _ in range(60):
            s = int(rng.integers(*SIZES[size], endpoint=True))
            x = float(rng.uniform(s / 2 + 3, w - s / 2 - 3))
            y = float(rng.uniform(s / 2 + 3, h - s / 2 - 3))
            o = Obj(kind[1], kind[0], size, x, y, s)
            if not _overlaps(o.box, boxes):
                objects.append(o)
                boxes.append(o.box)
                break
    return Scene(int(seed), w, h, background, texture, tuple(objects), sign)


def _shape_points(o: Obj) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = o.box
    cx, cy, r = o.x, o.y, o.s / 2
    if o.shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if o.shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if o.shape == "cross":
        t = r / 3
        return [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x1, cy - t), (x1, cy + t), (cx + t, cy + t),
                (cx + t, y1), (cx - t, y1), (cx - t, cy + t), (x0, cy + t), (x0, cy - t), (cx - t, cy - t)]
    return None


def _draw(draw, o: Obj, fill) -> None:
    pts = _shape_points(o)
    if o.shape == "circle":
        draw.ellipse(o.box, fill=fill)
    elif o.shape == "square":
        draw.rectangle(o.box, fill=fill)
    else:
        draw.polygon(pts, fill=fill)


def _draw_sign(draw, sign: Sign, plate, ink) -> None:
    x0, y0, x1, y1 = sign.box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=plate)
    k = sign.scale
    for ci, ch in enumerate(sign.text):
        ox = x0 + k + ci * 6 * k + k
        oy = y0 + k
        for r, row in enumerate(_FONT[ch]):
            for c, dot in enumerate(row):
                if dot == "#":
                    draw.rectangle((ox + c * k, oy + r * k, ox + (c + 1) * k - 1, oy + (r + 1) * k - 1), fill=ink)


def render(scene: Scene):
    """The scene as an RGB PIL image (width x height)."""
    from PIL import Image, ImageDraw

    w, h = scene.width, scene.height
    rng = np.random.default_rng([scene.seed, 7])
    base = np.array(scene.background, np.float32)
    if scene.texture == "gradient":
        t = np.linspace(-1, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        ramp = (t[None, :] if len(t) == w else t[:, None]) * 28
        img = np.broadcast_to(base, (h, w, 3)) + np.broadcast_to(ramp[..., None], (h, w, 1))
    elif scene.texture == "stripes":
        period = int(rng.integers(10, 30))
        y, x = np.mgrid[0:h, 0:w]
        band = (((x + y) // period) % 2).astype(np.float32)[..., None] * 18 - 9
        img = base + band
    elif scene.texture == "noise":
        img = base + rng.normal(0, 10, size=(h, w, 3)).astype(np.float32)
    else:
        img = np.broadcast_to(base, (h, w, 3))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    if scene.sign is not None:
        _draw_sign(draw, scene.sign, (250, 250, 250), (10, 10, 10))
    for o in scene.objects:
        _draw(draw, o, COLOURS[o.colour])
    return im


def patch_labels(scene: Scene, patch: int = 14, size: tuple[int, int] | None = None) -> np.ndarray:
    """Dense class map of the patch grid (rows, cols): for each patch the class covering most of it, background
    counting a third. Classes: 0 background, 1 + index in COMBOS for objects, 31 + digit, 41 sign plate.
    ``size`` (width, height): the label map of the image resized to ``size`` (for resized views), each block's
    pixels counted at full resolution and the background weighed by its area in the view (a third of it), so
    that small objects are not lost to the background."""
    from PIL import Image, ImageDraw

    w, h = scene.width, scene.height
    lab = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(lab)
    if scene.sign is not None:
        x0, y0, x1, y1 = scene.sign.box
        d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=_SIGN_CLASS)
        k = scene.sign.scale
        for ci, ch in enumerate(scene.sign.text):
            ox = x0 + k + ci * 6 * k + k
            d.rectangle((ox, y0 + k, ox + 5 * k - 1, y0 + 8 * k - 1), fill=1 + len(COMBOS) + int(ch))
    for o in scene.objects:
        _draw(d, o, 1 + COMBOS.index((o.colour, o.shape)))
    a = np.asarray(lab, dtype=np.int64)
    if size is not None and tuple(size) != (w, h):
        # a resized view: count each full-resolution pixel in the block of the view it lands in (a nearest-
        # neighbour resize of the label map would drop small objects)
        rows, cols = size[1] // patch, size[0] // patch
        by = np.minimum((np.arange(h) * size[1] / h // patch).astype(np.int64), rows)      # rows: beyond the grid
        bx = np.minimum((np.arange(w) * size[0] / w // patch).astype(np.int64), cols)
        block = (by[:, None] * (cols + 1) + bx[None, :]).ravel()
        counts = np.bincount(block * N_PATCH_CLASSES + a.ravel(), minlength=(rows + 1) * (cols + 1) * N_PATCH_CLASSES)
        counts = counts.reshape(rows + 1, cols + 1, N_PATCH_CLASSES)[:rows, :cols].reshape(-1, N_PATCH_CLASSES)
        bg = 3.0 * max(1.0, (w * h) / (size[0] * size[1]))
    else:
        rows, cols = h // patch, w // patch
        a = a[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch).transpose(0, 2, 1, 3)
        a = a.reshape(-1, patch * patch)
        idx = np.arange(a.shape[0])[:, None] * N_PATCH_CLASSES + a
        counts = np.bincount(idx.ravel(), minlength=a.shape[0] * N_PATCH_CLASSES).reshape(-1, N_PATCH_CLASSES)
        bg = 3.0
    counts = counts.astype(np.float32)
    counts[:, 0] /= bg
    return counts.argmax(1).reshape(rows, cols)


def ref_patches(scene: Scene, refs, patch: int = 14, min_pixels: int = 20) -> np.ndarray:
    """Boolean (rows * cols,) mask of the patches that show any of ``refs`` (objects or the sign): patches with at
    least ``min_pixels`` of the referent, and always the patch holding its centre."""
    from PIL import Image, ImageDraw

    w, h = scene.width, scene.height
    rows, cols = h // patch, w // patch
    out = np.zeros(rows * cols, bool)
    for r in refs:
        im = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(im)
        if isinstance(r, Sign):
            x0, y0, x1, y1 = r.box
            d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=1)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        else:
            _draw(d, r, 1)
            cx, cy = r.x, r.y
        a = np.asarray(im, dtype=np.int32)[: rows * patch, : cols * patch]
        cover = a.reshape(rows, patch, cols, patch).sum((1, 3)).reshape(-1)
        out |= cover >= min_pixels
        out[min(int(cy) // patch, rows - 1) * cols + min(int(cx) // patch, cols - 1)] = True
    return out


def scene_targets(scene: Scene) -> tuple[np.ndarray, int]:
    """Global targets for the CLS token: a 30-vector of object-kind presence and the object count (0..15)."""
    present = np.zeros(len(COMBOS), np.float32)
    for o in scene.objects:
        present[COMBOS.index((o.colour, o.shape))] = 1
    return present, min(len(scene.objects), 15)


# ------------------------------------------------------------------------------------------------- questions
def _unique(objs, key):
    counts: dict = {}
    for o in objs:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return [o for o in objs if counts[key(o)] == 1]


def _kind(o: Obj, colour: str | None = None, shape: str | None = None) -> Obj:
    return dataclasses.replace(o, colour=colour or o.colour, shape=shape or o.shape)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _extreme(objs, pos: str, margin: float = 20.0):
    if len(objs) < 2:
        return None
    key = {"leftmost": lambda o: o.x, "rightmost": lambda o: -o.x,
           "topmost": lambda o: o.y, "bottommost": lambda o: -o.y}[pos]
    ranked = sorted(objs, key=key)
    if key(ranked[1]) - key(ranked[0]) < margin:
        return None
    return ranked[0]


def _relation(a: Obj, b: Obj, rel: str, margin: float = 16.0) -> bool | None:
    """Whether ``a`` is ``rel`` ``b`` (None when their centres are closer than ``margin`` on that axis)."""
    d = a.x - b.x if rel in ("left of", "right of") else a.y - b.y
    if abs(d) < margin:
        return None
    return {"left of": d < 0, "right of": d > 0, "above": d < 0, "below": d > 0}[rel]


# Planned questions: the answer is drawn first (uniformly over the family's answers), then a scene is built that
# has it. Each planner returns (scene, question, answer, category, refs) or None to redraw with the next attempt.
def _plan_existence(seed, rng, geometry, attempt):
    c, s = _pick(rng, COMBOS)
    kind = _pick(rng, ("positive", "positive", "random", "adversarial"))
    sc = make_scene(seed, geometry, exclude=((c, s),), attempt=attempt)
    objs = list(sc.objects)
    if len(objs) < 2:
        return None
    refs: tuple = ()
    if kind == "positive":
        i = int(rng.integers(len(objs)))
        objs[i] = _kind(objs[i], c, s)
        refs = (objs[i],)
    elif kind == "adversarial":                 # the colour and the shape are present, never on one object
        i, j = (int(v) for v in rng.choice(len(objs), 2, replace=False))
        objs[i] = _kind(objs[i], c, _pick(rng, [x for x in SHAPES if x != s]))
        objs[j] = _kind(objs[j], _pick(rng, [x for x in COLOUR_NAMES if x != c]), s)
    q = f"is there a {c} {s} in the image ?"
    return dataclasses.replace(sc, objects=tuple(objs)), q, "yes" if kind == "positive" else "no", \
        f"existence/{kind}", refs


def _plan_attribute(seed, rng, geometry, attempt):
    sub = _pick(rng, ("colour-of-shape", "shape-of-colour", "position"))
    c, s = _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)
    if sub == "position":
        pos = _pick(rng, POSITIONS)
        sc = make_scene(seed, geometry, min_objects=2, attempt=attempt)
        o = _extreme(list(sc.objects), pos)
        if o is None:
            return None
        new = _kind(o, colour=c)
        objs = tuple(new if x is o else x for x in sc.objects)
        return (dataclasses.replace(sc, objects=objs), f"what colour is the {pos} object ?", c, "attribute/position",
                (new,))
    by_shape = sub == "colour-of-shape"
    excl = [k for k in COMBOS if (k[1] == s if by_shape else k[0] == c)]
    sc = make_scene(seed, geometry, min_objects=2, exclude=excl, attempt=attempt)
    objs = list(sc.objects)
    if not objs:
        return None
    i = int(rng.integers(len(objs)))
    objs[i] = _kind(objs[i], c, s)
    q, a = (f"what colour is the {s} ?", c) if by_shape else (f"what shape is the {c} object ?", s)
    return dataclasses.replace(sc, objects=tuple(objs)), q, a, f"attribute/{sub}", (objs[i],)


def _plan_counting(seed, rng, geometry, attempt):
    r = rng.random()
    if r < 0.2:
        area = 2 if geometry == "next" else 1
        n = int(rng.integers(N_OBJECTS[0] * area, N_OBJECTS[1] * area + 1))
        sc = make_scene(seed, geometry, n_objects=n, attempt=attempt)
        if len(sc.objects) != n:
            return None
        return sc, "how many objects are there ?", str(n), "counting/all", sc.objects
    k = int(rng.integers(0, COUNT_MAX + 1))
    by_shape = r < 0.6
    attr = _pick(rng, SHAPES) if by_shape else _pick(rng, COLOUR_NAMES)
    excl = [x for x in COMBOS if x[1 if by_shape else 0] == attr]
    sc = make_scene(seed, geometry, min_objects=k, exclude=excl, attempt=attempt)
    objs = list(sc.objects)
    if len(objs) < k:
        return None
    idx = [int(v) for v in rng.choice(len(objs), k, replace=False)]
    for i in idx:
        objs[i] = _kind(objs[i], shape=attr) if by_shape else _kind(objs[i], colour=attr)
    q = f"how many {PLURALS[attr]} are there ?" if by_shape else f"how many {attr} objects are there ?"
    return (dataclasses.replace(sc, objects=tuple(objs)), q, str(k), "counting/" + ("shape" if by_shape else "colour"),
            tuple(objs[i] for i in idx))


def _plan_spatial(seed, rng, geometry, attempt):
    ka, kb = (COMBOS[int(v)] for v in rng.choice(len(COMBOS), 2, replace=False))
    rel, want = _pick(rng, RELATIONS), bool(rng.random() < 0.5)
    sc = make_scene(seed, geometry, min_objects=3, exclude=(ka, kb), attempt=attempt)
    objs = list(sc.objects)
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs))
             if i < j and _relation(objs[i], objs[j], rel) is not None]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    if _relation(objs[i], objs[j], rel) != want:
        i, j = j, i                             # the same two places, named the other way round
    objs[i], objs[j] = _kind(objs[i], *ka), _kind(objs[j], *kb)
    a, b = objs[i], objs[j]
    return (dataclasses.replace(sc, objects=tuple(objs)), f"is the {a.name} {rel} the {b.name} ?",
            "yes" if want else "no", "spatial/" + rel.split()[0], (a, b))


def _plan_text(seed, rng, geometry, attempt):
    sc = make_scene(seed, geometry, need_sign=True, attempt=attempt)
    return sc, "what number is on the sign ?", sc.sign.text, "text/number", (sc.sign,)


def _plan_fine(seed, rng, geometry, attempt):
    by_shape = rng.random() < 0.5               # "what colour is the small S ?" names the shape
    c, s = _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)
    sc = make_scene(seed, geometry, need_small=True, attempt=attempt)
    objs = list(sc.objects)
    small = [i for i, o in enumerate(objs) if o.size == "small"]
    if not small:
        return None
    t = _pick(rng, small)
    for i in small:                              # the other small objects do not share the naming attribute
        if i == t:
            objs[i] = _kind(objs[i], c, s)
        elif by_shape and objs[i].shape == s:
            objs[i] = _kind(objs[i], shape=_pick(rng, [x for x in SHAPES if x != s]))
        elif not by_shape and objs[i].colour == c:
            objs[i] = _kind(objs[i], colour=_pick(rng, [x for x in COLOUR_NAMES if x != c]))
    q, a = (f"what colour is the small {s} ?", c) if by_shape else (f"what shape is the small {c} object ?", s)
    return dataclasses.replace(sc, objects=tuple(objs)), q, a, "fine/" + ("colour" if by_shape else "shape"), \
        (objs[t],)


_PLAN = {"existence": _plan_existence, "attribute": _plan_attribute, "counting": _plan_counting,
         "spatial": _plan_spatial, "text": _plan_text, "fine": _plan_fine}


def make_sample(seed: int, family: str | None = None, geometry: str = "llava") -> Sample:
    """One question about one scene. ``family`` None picks ``FAMILIES[seed % 6]``, so consecutive seeds balance
    the families. The answer is drawn first and the scene built around it; a draw that cannot hold it is redrawn
    with the next ``attempt`` of the same seed."""
    family = FAMILIES[int(seed) % len(FAMILIES)] if family is None else family
    if family not in _PLAN:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    for attempt in range(100):
        rng = np.random.default_rng([int(seed), 11, attempt])
        q = _PLAN[family](int(seed), rng, geometry, attempt)
        if q is not None:
            sc, question, answer, category, refs = q
            return Sample(int(seed), family, category, question, answer, sc, tuple(refs))
    raise RuntimeError(f"no {family} question could be drawn for seed {seed}")


# Questions about a scene already drawn (the extra turns of multi-turn training): balanced where the scene allows.
def _q_existence(scene: Scene, rng):
    present = sorted({(o.colour, o.shape) for o in scene.objects})
    if rng.random() < 0.5 and present:
        c = _pick(rng, present)
        return (f"is there a {c[0]} {c[1]} in the image ?", "yes", "existence/positive",
                tuple(o for o in scene.objects if (o.colour, o.shape) == c))
    absent = [c for c in COMBOS if c not in present]
    adv = [a for a in absent if any(a[0] == p[0] for p in present) and any(a[1] == p[1] for p in present)]
    kind = "adversarial" if adv and rng.random() < 0.5 else "random"
    c = _pick(rng, adv if kind == "adversarial" else absent)
    return f"is there a {c[0]} {c[1]} in the image ?", "no", f"existence/{kind}", ()


def _q_attribute(scene: Scene, rng):
    opts = []
    for o in _unique(scene.objects, lambda o: o.shape):
        opts.append((f"what colour is the {o.shape} ?", o.colour, "attribute/colour-of-shape", (o,)))
    for o in _unique(scene.objects, lambda o: o.colour):
        opts.append((f"what shape is the {o.colour} object ?", o.shape, "attribute/shape-of-colour", (o,)))
    for pos in POSITIONS:
        o = _extreme(list(scene.objects), pos)
        if o is not None:
            opts.append((f"what colour is the {pos} object ?", o.colour, "attribute/position", (o,)))
    return _pick(rng, opts) if opts else None


def _q_counting(scene: Scene, rng):
    r = rng.random()
    if r < 0.4:
        s = _pick(rng, SHAPES)
        return (f"how many {PLURALS[s]} are there ?", str(scene.count(shape=s)), "counting/shape",
                tuple(o for o in scene.objects if o.shape == s))
    if r < 0.8:
        c = _pick(rng, COLOUR_NAMES)
        return (f"how many {c} objects are there ?", str(scene.count(colour=c)), "counting/colour",
                tuple(o for o in scene.objects if o.colour == c))
    return "how many objects are there ?", str(len(scene.objects)), "counting/all", scene.objects


def _q_spatial(scene: Scene, rng):
    named = _unique(scene.objects, lambda o: (o.colour, o.shape))
    want = bool(rng.random() < 0.5)
    pairs = [(a, b, rel) for a in named for b in named if a is not b for rel in RELATIONS
             if _relation(a, b, rel) is want]
    if not pairs:
        return None
    a, b, rel = _pick(rng, pairs)
    return (f"is the {a.name} {rel} the {b.name} ?", "yes" if want else "no", "spatial/" + rel.split()[0], (a, b))


def _q_text(scene: Scene, rng):
    if scene.sign is None:
        return None
    return "what number is on the sign ?", scene.sign.text, "text/number", (scene.sign,)


def _q_fine(scene: Scene, rng):
    small = [o for o in scene.objects if o.size == "small"]
    opts = []
    for o in _unique(small, lambda o: o.shape):
        opts.append((f"what colour is the small {o.shape} ?", o.colour, "fine/colour", (o,)))
    for o in _unique(small, lambda o: o.colour):
        opts.append((f"what shape is the small {o.colour} object ?", o.shape, "fine/shape", (o,)))
    return _pick(rng, opts) if opts else None


_ASK = {"existence": _q_existence, "attribute": _q_attribute, "counting": _q_counting,
        "spatial": _q_spatial, "text": _q_text, "fine": _q_fine}


def ask(scene: Scene, rng: np.random.Generator, family: str):
    """A question of ``family`` about ``scene`` as it is: ``(question, answer, category, refs)``, or None when the
    scene admits none. Existence is yes half the time; other answers follow the scene."""
    if family not in _ASK:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    return _ASK[family](scene, rng)


def train_turns(scene: Scene, rng: np.random.Generator, n_turns: int = 6, first: tuple | None = None,
                families: Sequence[str] = FAMILIES) -> list[tuple]:
    """Up to ``n_turns`` distinct (question, answer, category, refs) turns about one scene, for multi-turn
    training: ``first`` (a planned question, e.g. from ``make_sample``) at a random place, the others of
    ``families`` drawn uniformly."""
    out, seen = [], set()
    if first is not None:
        seen.add(first[0])
    for _ in range(4 * n_turns):
        if len(out) >= n_turns - (first is not None):
            break
        q = ask(scene, rng, _pick(rng, tuple(families)))
        if q is None or q[0] in seen:
            continue
        seen.add(q[0])
        out.append(q)
    if first is not None:
        out.insert(int(rng.integers(len(out) + 1)), first)
    return out


def answer_space(family: str) -> list[str]:
    """Every answer a test question of ``family`` can have (llava geometry)."""
    if family not in _PLAN:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    return {"existence": ["yes", "no"], "spatial": ["yes", "no"], "text": [str(i) for i in range(10)],
            "attribute": list(COLOUR_NAMES) + list(SHAPES), "fine": list(COLOUR_NAMES) + list(SHAPES),
            "counting": [str(i) for i in range(N_OBJECTS[1] + 1)]}[family]


def blind_baseline(samples: Sequence[Sample], n_train: int = 3000, geometry: str = "llava") -> dict:
    """The question-only baseline: for each question text, its commonest answer among ``n_train`` training-split
    samples (families balanced; the family's commonest answer for a text never seen), scored on ``samples``.
    Returns ``{"overall": %, "families": {family: %}, "correct": {family: k}, "counts": {family: n},
    "chance": {family: %}, "n_train": n}``, chance being the accuracy of a uniform guess over the answers the
    family's questions have."""
    from collections import defaultdict

    by_q, by_f = _blind_tables(n_train, geometry)
    hits: dict = defaultdict(list)
    for s in samples:
        table = by_q.get(s.question) or by_f.get(s.family)
        hits[s.family].append(table.most_common(1)[0][0] == s.answer if table else False)
    fam = {f: round(100.0 * float(np.mean(v)), 1) for f, v in hits.items()}
    allh = [h for v in hits.values() for h in v]
    chance = {}
    for f in hits:                               # the questions' answers are uniform over a per-question range
        per = [1.0 / _n_answers(s) for s in samples if s.family == f]
        chance[f] = round(100.0 * float(np.mean(per)), 1)
    return dict(overall=round(100.0 * float(np.mean(allh)), 1) if allh else None, families=fam,
                correct={f: int(sum(v)) for f, v in hits.items()}, counts={f: len(v) for f, v in hits.items()},
                chance=chance, n_train=n_train)


@functools.lru_cache(maxsize=4)
def _blind_tables(n_train: int, geometry: str) -> tuple[dict, dict]:
    """Answer counts per question text and per family over ``n_train`` training-split samples (built once)."""
    from collections import Counter, defaultdict

    by_q: dict = defaultdict(Counter)
    by_f: dict = defaultdict(Counter)
    for i in range(n_train):
        s = make_sample(split_seed("train", i), geometry=geometry)
        by_q[s.question][s.answer] += 1
        by_f[s.family][s.answer] += 1
    return by_q, by_f


def _n_answers(s: Sample) -> int:
    """How many answers the question of ``s`` draws from (its uniform range)."""
    if s.family in ("existence", "spatial"):
        return 2
    if s.family == "text":
        return 10
    if s.family == "counting":
        return N_OBJECTS[1] - N_OBJECTS[0] + 1 if s.category == "counting/all" else COUNT_MAX + 1
    return len(COLOUR_NAMES) if s.question.startswith("what colour") else len(SHAPES)


def vocabulary() -> list[str]:
    """Every word the benchmark's questions, answers and chat template use (lower case), sorted."""
    words = {"user", "assistant", ":", "?", "yes", "no", "is", "there", "a", "in", "the", "image", "what",
             "colour", "shape", "object", "objects", "how", "many", "are", "number", "on", "sign", "small",
             "left", "right", "of", "above", "below", *POSITIONS}
    words |= set(SHAPES) | set(PLURALS.values()) | set(COLOUR_NAMES) | {str(i) for i in range(100)}
    return sorted(words)


def normalize_answer(text: str) -> str:
    """Lower case, first word, punctuation stripped: how generated answers are compared with the key."""
    text = text.strip().lower()
    for ch in ".,!?:;\"'":
        text = text.replace(ch, " ")
    parts = text.split()
    return parts[0] if parts else ""
