"""Intervals and paired tests for accuracies measured on a few hundred samples.

Every accuracy the harness publishes carries a 95% interval, and a difference between two methods is called a
difference only when it is beyond the noise of the samples both were scored on:

- ``wilson(k, n)``: the Wilson score interval of an accuracy of ``k`` correct out of ``n`` (in %).
- ``paired_difference(a, b)``: accuracy of ``a`` minus accuracy of ``b`` on the same samples (percentage points)
  with its 95% interval (the Wald interval of a difference of paired proportions, Agresti, *Categorical Data
  Analysis*, 10.1.1) and the exact McNemar p-value from the discordant samples.
- ``mcnemar_exact(b, c)``: the exact two-sided McNemar test: with ``b`` samples only the first method gets right
  and ``c`` only the second, twice the binomial(b + c, 1/2) tail below min(b, c), at most 1.
- ``verdict(diff, p)``: "better", "worse", or "no difference" when ``p >= ALPHA``.

Pure functions of counts and lists of booleans; no numpy, no torch.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["Z95", "ALPHA", "wilson", "mcnemar_exact", "paired_difference", "verdict", "fmt_interval", "fmt_accuracy",
           "fmt_difference", "fmt_versus"]

Z95 = 1.959963984540054        # the 97.5% quantile of the standard normal: two-sided 95%
ALPHA = 0.05                   # a paired test's p below this is a difference; at or above, "no difference"


def _count(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer count; got {v!r}")
    return v


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval, in %, of ``k`` successes in ``n`` trials (95% with the default ``z``).

    centre = (p + z^2 / 2n) / (1 + z^2 / n), half width = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2),
    with p = k / n. Unlike p +- z sqrt(p (1 - p) / n) it stays inside [0, 100] and is not empty at 0 or n."""
    _count("k", k)
    _count("n", n)
    if n == 0:
        raise ValueError("n is 0: an accuracy needs at least one sample; evaluate on --n 1 or more")
    if k > n:
        raise ValueError(f"k = {k} correct is more than the n = {n} samples; k must be in 0..{n}")
    p = k / n
    d = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z / d * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return 100.0 * lo, 100.0 * hi


def mcnemar_exact(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value for ``b`` and ``c`` discordant samples (those only the first, and only
    the second, of two methods answers correctly): min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c)).
    1.0 when there are no discordant samples."""
    _count("b", b)
    _count("c", c)
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** m)


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> dict:
    """Accuracy of ``a`` minus accuracy of ``b``, both lists of per-sample correctness on the same samples in the
    same order. Returns ``diff`` (percentage points), ``ci`` ([low, high], 95% with the default ``z``), ``p`` (exact
    McNemar), ``a_only`` / ``b_only`` (discordant counts), ``n`` and ``verdict`` ("better", "worse", "no
    difference": ``a`` against ``b``).

    The interval is diff +- z * sqrt((a_only + b_only) - (a_only - b_only)^2 / n) / n, the Wald interval of a
    difference of paired proportions."""
    if len(a) != len(b):
        raise ValueError(f"the two methods were scored on different numbers of samples: {len(a)} and {len(b)}; "
                         f"pair them on the same samples")
    n = len(a)
    if n == 0:
        raise ValueError("no samples to compare: a paired difference needs at least one sample scored by both")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    d = (a_only - b_only) / n
    se = math.sqrt(max(0.0, (a_only + b_only) - (a_only - b_only) ** 2 / n)) / n
    p = mcnemar_exact(a_only, b_only)
    return dict(diff=100.0 * d, ci=[100.0 * (d - z * se), 100.0 * (d + z * se)], p=p, a_only=a_only,
                b_only=b_only, n=n, verdict=verdict(d, p))


def verdict(diff: float, p: float, alpha: float = ALPHA) -> str:
    """"better" / "worse" by the sign of ``diff`` when ``p < alpha``; otherwise "no difference"."""
    if p >= alpha or diff == 0:
        return "no difference"
    return "better" if diff > 0 else "worse"


def fmt_interval(ci, signed: bool = False) -> str:
    """'[54.6, 68.0]' (or '[-8.1, +1.1]' with ``signed``); 'n/a' for None."""
    if not ci:
        return "n/a"
    f = "+.1f" if signed else ".1f"
    return f"[{ci[0]:{f}}, {ci[1]:{f}}]"


def fmt_accuracy(acc, ci) -> str:
    """'61.5 [54.6, 68.0]'; 'n/a' when the accuracy is unknown."""
    if acc is None:
        return "n/a"
    return f"{acc:.1f} {fmt_interval(ci)}" if ci else f"{acc:.1f}"


def fmt_difference(d: dict | None) -> str:
    """A paired difference for a table: '-12.0 [-17.1, -6.9]' beyond the noise, 'no difference: -1.5 [-4.0,
    +1.0]' inside it (p of the McNemar test at or above ``ALPHA``); '-' for None."""
    if not d:
        return "-"
    text = f"{d['diff']:+.1f} {fmt_interval(d['ci'], signed=True)}"
    return text if d.get("verdict", verdict(d["diff"], d["p"])) != "no difference" else f"no difference: {text}"


def fmt_versus(d: dict | None) -> str:
    """A method against a reference at the same budget: 'better: +8.0 [+2.1, +13.9], p=0.004' or 'worse: ...'
    beyond the noise, 'no difference (p=0.41)' inside it (not ranked); '-' for None."""
    if not d:
        return "-"
    v = d.get("verdict", verdict(d["diff"], d["p"]))
    if v == "no difference":
        return f"no difference (p={d['p']:.2g})"
    return f"{v}: {d['diff']:+.1f} {fmt_interval(d['ci'], signed=True)}, p={d['p']:.2g}"
