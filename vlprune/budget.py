"""Token budgets: what a method keeps, as a count or as a share of the visual tokens."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """How many visual tokens to keep: ``keep`` tokens, or ``keep_ratio`` of them.

    Exactly one of the two is given. ``resolve(n)`` turns the budget into a count for ``n`` visual tokens;
    a budget at or above ``n`` keeps everything (the identity).

    >>> Budget(keep=64).resolve(576), Budget(keep_ratio=0.25).resolve(576), Budget(keep=1000).resolve(576)
    (64, 144, 576)
    """

    keep: int | None = None
    keep_ratio: float | None = None

    def __post_init__(self):
        if (self.keep is None) == (self.keep_ratio is None):
            raise ValueError(
                f"Budget needs exactly one of keep= (a token count) or keep_ratio= (a share in (0, 1]); "
                f"got keep={self.keep!r}, keep_ratio={self.keep_ratio!r}. Example: Budget(keep=64) or Budget(keep_ratio=0.25)."
            )
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int):
                if isinstance(self.keep, float) and self.keep.is_integer() and self.keep >= 1:
                    object.__setattr__(self, "keep", int(self.keep))
                else:
                    raise ValueError(
                        f"keep must be a positive integer number of visual tokens; got {self.keep!r}. "
                        f"Use keep_ratio= for a share, e.g. keep_ratio=0.25."
                    )
            if self.keep < 1:
                raise ValueError(
                    f"keep must be >= 1 visual token; got keep={self.keep}. To keep no visual tokens, "
                    f"use a text-only prompt; to keep a share, use keep_ratio in (0, 1]."
                )
        else:
            r = self.keep_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0.0 < r <= 1.0:
                raise ValueError(
                    f"keep_ratio must be a number in (0, 1]; got keep_ratio={r!r}. "
                    f"Use keep= for an absolute count, e.g. keep=64."
                )
            object.__setattr__(self, "keep_ratio", float(r))

    def resolve(self, n: int) -> int:
        """Number of visual tokens to keep out of ``n`` (at least 1 when n > 0, at most n)."""
        if n < 0:
            raise ValueError(f"number of visual tokens must be >= 0; got {n}")
        if n == 0:
            return 0
        if self.keep is not None:
            return min(self.keep, n)
        return max(1, min(n, int(round(self.keep_ratio * n))))

    def covers(self, n: int) -> bool:
        """True when the budget keeps all ``n`` tokens."""
        return self.resolve(n) >= n

    def __str__(self) -> str:
        return f"keep={self.keep}" if self.keep is not None else f"keep_ratio={self.keep_ratio:g}"


def as_budget(keep: int | None = None, keep_ratio: float | None = None, budget: Budget | None = None) -> Budget | None:
    """Build a Budget from the keyword forms methods accept; None when nothing is given."""
    if budget is not None:
        if keep is not None or keep_ratio is not None:
            raise ValueError(
                f"give either budget={budget} or keep/keep_ratio, not both (got keep={keep!r}, keep_ratio={keep_ratio!r})"
            )
        if not isinstance(budget, Budget):
            raise ValueError(f"budget must be a vlprune.Budget; got {type(budget).__name__}: {budget!r}")
        return budget
    if keep is None and keep_ratio is None:
        return None
    return Budget(keep=keep, keep_ratio=keep_ratio)
