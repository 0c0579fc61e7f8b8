"""Command-line argument checks shared by every command of the project (``vlprune``, the harness, the proxy's
training and report commands, the benchmarks and the demo app).

Nothing here imports torch or transformers: ``--help``, ``--version`` and argument errors answer at once.
A refused argument exits with code 2 and prints one line on stderr that names the value, what is allowed and the
fix, followed by a pointer to ``--help``; never a traceback or argparse's full usage block.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Callable, Sequence

__all__ = ["Parser", "fail", "positive_int", "nonneg_int", "int_range", "positive_float", "nonneg_float", "device_name", "unit_share",
           "existing_path", "existing_file", "choice_list", "method_name", "method_list", "known_methods", "did_you_mean"]


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line plus a pointer to ``--help`` (exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def fail(prog: str, message: str, code: int = 2):
    """Print ``prog: error: message`` on stderr and exit with ``code`` (2: a refused argument)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def did_you_mean(value: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return v


def nonneg_int(text: str) -> int:
    """A whole number >= 0."""
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 0")
    return v


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """A whole number in [lo, hi]."""

    def check(text: str) -> int:
        v = _int(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} must be a whole number from {lo} to {hi}")
        return v

    check.__name__ = f"int in [{lo}, {hi}]"
    return check


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
    return v


def nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of at least 0")
    return v


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; refused at once when CUDA is asked for and absent (this imports
    torch, so it runs after ``--help`` has been answered)."""
    name = str(text).strip().lower()
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; give auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here; give cpu (or auto)")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA devices; "
                                             f"give cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return name


def unit_share(text: str) -> float:
    """A share in (0, 1]."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a share in (0, 1], e.g. 0.2") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a share in (0, 1], e.g. 0.2")
    return v


def existing_path(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist; give the path of an existing file or folder")
    return text


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        what = "is a folder" if os.path.isdir(text) else "does not exist"
        raise argparse.ArgumentTypeError(f"{text!r} {what}; give the path of an existing file")
    return text


def choice_list(allowed: Sequence[str], what: str = "value") -> Callable[[str], list[str]]:
    """A comma-separated list whose items are each one of ``allowed``."""

    def check(text: str) -> list[str]:
        items = [p.strip() for p in str(text).split(",") if p.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {what} list; give one or more of {', '.join(allowed)}")
        for it in items:
            if it not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {what} {it!r}{did_you_mean(it, allowed)}; "
                                                 f"choose from {', '.join(allowed)}")
        return items

    return check


def known_methods() -> tuple[str, ...]:
    """The built-in method names, without importing the methods (and so torch)."""
    from .registry import BUILTIN_METHODS

    return BUILTIN_METHODS


def method_name(text: str) -> str:
    """One built-in method name (case-insensitive)."""
    allowed = known_methods()
    name = str(text).strip().lower()
    if name not in allowed:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}{did_you_mean(name, allowed)}; "
                                         f"choose from {', '.join(allowed)}")
    return name


def method_list(text: str) -> list[str]:
    """A comma- or space-separated list of built-in method names; variants ``NAME[key=value;...]`` allowed."""
    allowed = known_methods()
    items = [p.strip() for p in str(text).replace(" ", ",").split(",") if p.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"empty method list; give one or more of {', '.join(allowed)}")
    for it in items:
        name = it.split("[", 1)[0].strip().lower()
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"unknown method {name!r}{did_you_mean(name, allowed)}; "
                                             f"choose from {', '.join(allowed)}")
    return items
