"""The proxy benchmark's generator: deterministic, answers right by construction, families balanced, splits apart."""
from __future__ import annotations

import numpy as np
import pytest

from evals.proxy import scenes as S
from evals.proxy.scenes import (COLOURS, FAMILIES, make_sample, make_scene, patch_labels, ref_patches, render,
                                split_seed)


def test_deterministic_by_seed():
    for seed in (0, 7, 123456, split_seed("test", 5)):
        a, b = make_sample(seed), make_sample(seed)
        assert a == b
        assert np.array_equal(np.asarray(render(a.scene)), np.asarray(render(b.scene)))
    assert make_scene(1) != make_scene(2)
    assert not np.array_equal(np.asarray(render(make_scene(1))), np.asarray(render(make_scene(2))))


def test_splits_are_disjoint_and_checked():
    tr, va, te = (split_seed(s, 0) for s in ("train", "validation", "test"))
    assert tr < va < te and split_seed("train", 99_999_999) < va and split_seed("validation", 99_999_999) < te
    with pytest.raises(ValueError, match="split 'dev' is not one of"):
        split_seed("dev", 0)
    with pytest.raises(ValueError, match="outside"):
        split_seed("test", -1)
    with pytest.raises(ValueError, match="family 'colour' is not one of"):
        make_sample(0, family="colour")


def test_families_balanced_on_the_test_split():
    fams = [make_sample(split_seed("test", i)).family for i in range(120)]
    assert {f: fams.count(f) for f in FAMILIES} == {f: 20 for f in FAMILIES}


def test_geometries():
    assert (render(make_scene(3)).size) == (336, 336)
    sizes = {render(make_scene(s, "next")).size for s in range(12)}
    assert sizes == {(672, 336), (336, 672)}
    with pytest.raises(ValueError, match="geometry 'huge'"):
        make_scene(0, "huge")


# ------------------------------------------------------------------ answers against an independent reading
def _pixel(img, x, y):
    return tuple(int(v) for v in np.asarray(img)[int(y), int(x)])


def _independent_answer(sample):
    """Recompute the answer from the scene description with code separate from the generator's."""
    sc, q = sample.scene, sample.question.replace(" ?", "").split()
    objs = sc.objects
    if sample.family == "existence":                         # is there a C S in the image
        c, s = q[3], q[4]
        return "yes" if any(o.colour == c and o.shape == s for o in objs) else "no"
    if sample.family == "counting":
        if q[2] == "objects":                                # how many objects are there
            return str(len(objs))
        if q[3] == "objects":                                # how many C objects are there
            return str(sum(o.colour == q[2] for o in objs))
        shape = {v: k for k, v in S.PLURALS.items()}[q[2]]   # how many Ss are there
        return str(sum(o.shape == shape for o in objs))
    if sample.family == "text":
        return sc.sign.text
    if sample.family == "spatial":                           # is the C1 S1 REL the C2 S2
        rel = q[4] + " of" if q[4] in ("left", "right") else q[4]
        a = [o for o in objs if o.colour == q[2] and o.shape == q[3]]
        b = [o for o in objs if o.colour == q[-2] and o.shape == q[-1]]
        assert len(a) == 1 and len(b) == 1
        a, b = a[0], b[0]
        truth = {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[rel]
        return "yes" if truth else "no"
    small = sample.family == "fine"
    pool = [o for o in objs if o.size == "small"] if small else list(objs)
    words = q[4:] if not small else q[5:]
    if q[1] == "colour" and words[0] in ("leftmost", "rightmost", "topmost", "bottommost"):
        key = {"leftmost": lambda o: o.x, "rightmost": lambda o: -o.x, "topmost": lambda o: o.y,
               "bottommost": lambda o: -o.y}[words[0]]
        return min(pool, key=key).colour
    if q[1] == "colour":                                     # what colour is the [small] S
        hits = [o for o in pool if o.shape == words[0]]
        assert len(hits) == 1
        return hits[0].colour
    hits = [o for o in pool if o.colour == words[0]]         # what shape is the [small] C object
    assert len(hits) == 1
    return hits[0].shape


def test_answers_match_an_independent_reading_of_the_scene():
    for i in range(300):
        s = make_sample(split_seed("test", i))
        assert _independent_answer(s) == s.answer, (s.seed, s.question, s.answer)


def test_rendering_matches_the_description():
    """Every object's colour is at its centre (or on a cross/triangle's body), and the sign's digit is drawn."""
    for seed in range(40):
        sc = make_scene(seed, need_sign=True)
        img = render(sc)
        for o in sc.objects:
            y = o.y + (o.s / 4 if o.shape == "triangle" else 0)
            assert _pixel(img, o.x, y) == COLOURS[o.colour], (seed, o)
        x0, y0, x1, y1 = sc.sign.box
        plate = np.asarray(img)[y0:y1, x0:x1]
        ink = (plate.sum(-1) < 100).sum()
        glyph = sum(row.count("#") for row in S._FONT[sc.sign.text]) * sc.sign.scale ** 2
        assert ink == glyph


def test_fine_and_text_regions_are_under_two_percent():
    for i in range(60):
        s = make_sample(split_seed("test", i), family="text")
        x0, y0, x1, y1 = s.scene.sign.box
        assert (x1 - x0) * (y1 - y0) < 0.02 * 336 * 336
        f = make_sample(split_seed("test", i), family="fine")
        assert f.family == "fine" and all(o.size == "small" and o.s ** 2 < 0.02 * 336 * 336 for o in f.refs)


def test_patch_targets():
    s = make_sample(split_seed("test", 4), family="text")      # the sign's patches
    lab = patch_labels(s.scene)
    assert lab.shape == (24, 24)
    digit = 1 + len(S.COMBOS) + int(s.scene.sign.text)
    assert (lab == digit).any()
    g = ref_patches(s.scene, s.refs).reshape(24, 24)
    x0, y0, x1, y1 = s.scene.sign.box
    assert g[(y0 + y1) // 2 // 14, (x0 + x1) // 2 // 14]
    assert g.sum() <= ((x1 - x0) // 14 + 2) * ((y1 - y0) // 14 + 2)
