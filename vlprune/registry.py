"""The method registry: lower-case unique names, checked, with "did you mean" errors."""
from __future__ import annotations

import difflib
import re

_REGISTRY: dict[str, type] = {}
# the names vlprune.methods registers, known without importing them (and torch): command-line checks read this
BUILTIN_METHODS = ("cls_attn", "fastv", "globalcom2", "hired", "mqt", "mustdrop", "pool", "random", "todre",
                   "transprune")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_method(cls: type) -> type:
    """Class decorator: register a Method subclass under its ``name`` attribute."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"method name must be lower-case letters, digits and underscores, starting with a letter; "
            f"got {name!r} on {cls.__name__}"
        )
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}; pick another name")
    _REGISTRY[name] = cls
    return cls


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods)


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type:
    _load_builtin()
    if not isinstance(name, str):
        raise ValueError(f"method must be a name (str) or a Method instance; got {type(name).__name__}: {name!r}")
    key = name.strip().lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[key]


def hyperparameters(cls: type) -> list[str]:
    """The keyword arguments a registered method class takes (its dataclass fields), ``budget`` last."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls) if f.init]
    else:
        names = [p.name for p in inspect.signature(cls).parameters.values()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [n for n in names if n != "budget"] + (["budget"] if "budget" in names else [])


def check_hyperparameters(name: str, kwargs) -> type:
    """The class registered as ``name``; ``ValueError`` naming each unknown keyword, the closest allowed one and
    every allowed one (e.g. ``alpah`` -> ``alpha``)."""
    cls = get_method_class(name)
    allowed = hyperparameters(cls)
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, allowed, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{cls.name}: unknown hyperparameter {k!r}.{hint} Allowed: {', '.join(allowed)} "
                         f"(see `vlprune methods`).")
    return cls


def get_method(name: str, **kwargs):
    """Instantiate a registered method by name with its hyperparameters, e.g. ``get_method("fastv", k=2, keep=64)``.
    An unknown hyperparameter raises ``ValueError`` listing the allowed ones."""
    return check_hyperparameters(name, kwargs)(**kwargs)
