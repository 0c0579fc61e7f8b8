"""Procedural scenes and questions for the proxy visual QA benchmark.

Everything is a pure function of an integer seed: ``make_scene(seed)`` draws a scene description (background,
shapes, an optional sign with a rendered number), ``render(scene)`` draws it, and ``make_sample(seed, family)``
draws a scene that admits a question of ``family`` and asks it. No files are read.

Families (each a sixth of every evaluation split):

========== ============================================================== ===================
family     question                                                       answer
========== ============================================================== ===================
existence  "is there a red circle in the image ?" POPE-style: half        yes / no
           positives, negatives sampled at random, from the most popular
           objects, or adversarially (sharing colour or shape with an
           object that is present)
attribute  colour or shape of an object named by its other attribute or   colour / shape word
           by its position (leftmost, rightmost, topmost, bottommost)
counting   objects of a shape, of a colour, or in all                    a number 0-9
spatial    "is the red circle left of the blue square ?" (also right,     yes / no
           above, below), both objects named uniquely, clear margins
text       "what number is on the sign ?" (one digit in a 5x7 font, the   a number 0-9
           sign under 2% of a 336 px image)
fine       colour or shape of the one *small* object (at most 24 px,      colour / shape word
           under 0.6% of a 336 px image) named by its other attribute
========== ============================================================== ===================

Geometries: ``"llava"`` renders 336x336 (LLaVA-1.5: patch 14, 576 visual tokens); ``"next"`` renders 672x336 or
336x672 with the same object sizes in pixels, for LLaVA-NeXT AnyRes.

Splits draw seeds from disjoint ranges (``SPLITS``); ``split_seed(split, i)`` is the i-th seed of a split and any
other integer seed gives a fresh sample.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

__all__ = [
    "SHAPES", "PLURALS", "COLOURS", "FAMILIES", "SPLITS", "GEOMETRIES", "N_PATCH_CLASSES",
    "Obj", "Sign", "Scene", "Sample",
    "split_seed", "make_scene", "render", "patch_labels", "ref_patches", "scene_targets", "make_sample", "train_turns",
    "vocabulary", "normalize_answer",
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
# Object kinds are not equally common, so that POPE's "popular" negatives mean something: a fixed Zipf-like
# prior over a fixed permutation of the 30 kinds.
_PERM = np.random.default_rng(12345).permutation(len(COMBOS))
PRIOR = np.empty(len(COMBOS))
PRIOR[_PERM] = 1.0 / np.arange(1, len(COMBOS) + 1) ** 0.7
PRIOR /= PRIOR.sum()
POPULAR = tuple(COMBOS[i] for i in _PERM[:6])

FAMILIES = ("existence", "attribute", "counting", "spatial", "text", "fine")
SPLITS = {"train": 0, "validation": 100_000_000, "test": 200_000_000}
GEOMETRIES = ("llava", "next")
SIZES = {"large": (56, 76), "medium": (36, 48), "small": (16, 24)}
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
    category: str        # family, or "existence/<positive|random|popular|adversarial>" and the like
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


def make_scene(seed: int, geometry: str = "llava", *, min_objects: int | None = None,
               need_sign: bool | None = None, need_small: bool = False) -> Scene:
    """The scene of ``seed``. Keyword constraints are part of the draw (the same arguments give the same scene)."""
    rng = np.random.default_rng([int(seed), GEOMETRIES.index(geometry) if geometry in GEOMETRIES else 99])
    w, h = _canvas(rng, geometry)
    area = (w * h) / (336 * 336)
    lo = int(round(2 * area)) if min_objects is None else min_objects
    n = int(rng.integers(max(lo, 1), int(round(7 * area)) + 1))
    grey = int(rng.integers(95, 200))
    tint = rng.integers(-18, 19, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    texture = str(rng.choice(["plain", "gradient", "stripes", "noise"]))
    boxes: list[tuple] = []
    sign = None
    if need_sign is None:
        need_sign = rng.random() < 0.5
    if need_sign:
        for _ in range(50):
            scale = int(rng.integers(4, 6))
            text = str(int(rng.integers(0, 10)))
            sw, sh = (len(text) * 6 + 1) * scale + 2 * scale, 9 * scale
            cand = Sign(text, int(rng.integers(4, w - sw - 4)), int(rng.integers(4, h - sh - 4)), scale)
            sign = cand
            boxes.append(cand.box)
            break
    objects: list[Obj] = []
    sizes = ["large", "medium", "small"]
    for i in range(n):
        if need_small and i == 0:
            size = "small"
        else:
            size = str(rng.choice(sizes, p=[0.3, 0.4, 0.3]))
        kind = COMBOS[int(rng.choice(len(COMBOS), p=PRIOR))]
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
    ``size`` (width, height) renders the label map at another resolution first (for resized views)."""
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
    if size is not None and size != (w, h):
        lab = lab.resize(size, Image.NEAREST)
        w, h = size
    a = np.asarray(lab, dtype=np.int64)
    rows, cols = h // patch, w // patch
    a = a[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch).transpose(0, 2, 1, 3).reshape(-1, patch * patch)
    idx = np.arange(a.shape[0])[:, None] * N_PATCH_CLASSES + a
    counts = np.bincount(idx.ravel(), minlength=a.shape[0] * N_PATCH_CLASSES).reshape(-1, N_PATCH_CLASSES)
    counts = counts.astype(np.float32)
    counts[:, 0] /= 3.0
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


def _q_existence(scene: Scene, rng, kind: str | None = None):
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [c for c in COMBOS if c not in present]
    kind = kind or str(rng.choice(["positive", "positive", "positive", "random", "popular", "adversarial"]))
    if kind == "positive":
        if not present:
            return None
        c = sorted(present)[int(rng.integers(len(present)))]
        ans = "yes"
        refs = tuple(o for o in scene.objects if (o.colour, o.shape) == c)
    elif kind == "random":
        c = absent[int(rng.integers(len(absent)))]
        ans = "no"
    elif kind == "popular":
        cands = [p for p in POPULAR if p not in present]
        if not cands:
            return None
        c = cands[int(rng.integers(len(cands)))]
        ans = "no"
    else:
        cands = [a for a in absent if any(a[0] == p[0] or a[1] == p[1] for p in present)]
        if not cands:
            return None
        c = cands[int(rng.integers(len(cands)))]
        ans = "no"
    return f"is there a {c[0]} {c[1]} in the image ?", ans, f"existence/{kind}", refs if ans == "yes" else ()


def _extreme(objs, pos: str, margin: float = 20.0):
    if len(objs) < 2:
        return None
    key = {"leftmost": lambda o: o.x, "rightmost": lambda o: -o.x,
           "topmost": lambda o: o.y, "bottommost": lambda o: -o.y}[pos]
    ranked = sorted(objs, key=key)
    if key(ranked[1]) - key(ranked[0]) < margin:
        return None
    return ranked[0]


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
    if not opts:
        return None
    return opts[int(rng.integers(len(opts)))]


def _q_counting(scene: Scene, rng):
    r = rng.random()
    if r < 0.4:
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        return (f"how many {PLURALS[s]} are there ?", str(scene.count(shape=s)), "counting/shape",
                tuple(o for o in scene.objects if o.shape == s))
    if r < 0.8:
        c = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        return (f"how many {c} objects are there ?", str(scene.count(colour=c)), "counting/colour",
                tuple(o for o in scene.objects if o.colour == c))
    return "how many objects are there ?", str(len(scene.objects)), "counting/all", scene.objects


def _q_spatial(scene: Scene, rng, margin: float = 16.0):
    named = _unique(scene.objects, lambda o: (o.colour, o.shape))
    pairs = []
    for a in named:
        for b in named:
            if a is b:
                continue
            for rel in RELATIONS:
                if rel in ("left of", "right of"):
                    d = a.x - b.x
                else:
                    d = a.y - b.y
                if abs(d) < margin:
                    continue
                truth = {"left of": d < 0, "right of": d > 0, "above": d < 0, "below": d > 0}[rel]
                pairs.append((a, b, rel, truth))
    if not pairs:
        return None
    want = bool(rng.random() < 0.5)
    pool = [p for p in pairs if p[3] == want] or pairs
    a, b, rel, truth = pool[int(rng.integers(len(pool)))]
    return (f"is the {a.name} {rel} the {b.name} ?", "yes" if truth else "no", "spatial/" + rel.split()[0],
            (a, b))


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
    if not opts:
        return None
    return opts[int(rng.integers(len(opts)))]


_ASK = {"existence": _q_existence, "attribute": _q_attribute, "counting": _q_counting,
        "spatial": _q_spatial, "text": _q_text, "fine": _q_fine}
_NEEDS = {"text": dict(need_sign=True), "fine": dict(need_small=True), "spatial": dict(min_objects=3),
          "attribute": dict(min_objects=2)}


def make_sample(seed: int, family: str | None = None, geometry: str = "llava") -> Sample:
    """One question about one scene. ``family`` None picks ``FAMILIES[seed % 6]``, so consecutive seeds balance
    the families. The scene is redrawn (with a derived seed) until the family's question can be asked."""
    family = FAMILIES[int(seed) % len(FAMILIES)] if family is None else family
    if family not in _ASK:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    for attempt in range(100):
        scene = make_scene(int(seed) * 131 + attempt if attempt else int(seed), geometry, **_NEEDS.get(family, {}))
        rng = np.random.default_rng([int(seed), 11, attempt])
        q = _ASK[family](scene, rng)
        if q is not None:
            return Sample(int(seed), family, q[2], q[0], q[1], scene, tuple(q[3]))
    raise RuntimeError(f"no {family} question could be drawn for seed {seed}")


def train_turns(scene: Scene, rng: np.random.Generator, n_turns: int = 6) -> list[tuple]:
    """Several distinct (question, answer, category, refs) turns about one scene, for multi-turn training."""
    out, seen = [], set()
    fams = list(FAMILIES)
    for _ in range(4 * n_turns):
        if len(out) >= n_turns:
            break
        fam = fams[int(rng.integers(len(fams)))]
        q = _ASK[fam](scene, rng)
        if q is None or q[0] in seen:
            continue
        seen.add(q[0])
        out.append(q)
    return out


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
