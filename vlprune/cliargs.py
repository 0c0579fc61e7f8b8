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

__all__ = ["Parser", "positive_int", "nonneg_int", "positive_float", "nonneg_float", "device_name", "existing_path",
           "existing_file", "method_name", "method_list", "known_methods", "did_you_mean"]


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line plus a pointer to ``--help`` (exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


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


def _float(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return v


def positive_float(text: str) -> float:
    v = _float(text)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
    return v


def nonneg_float(text: str) -> float:
    v = _float(text)
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


def existing_path(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist; give the path of an existing file or folder")
    return text


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        what = "is a folder" if os.path.isdir(text) else "does not exist"
        raise argparse.ArgumentTypeError(f"{text!r} {what}; give the path of an existing file")
    return text


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
