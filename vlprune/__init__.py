"""vlprune: visual-token compression for vision-language models, attached with hooks and removable.

    import vlprune
    vlprune.apply(model, "fastv", k=2, keep=64)   # in place; a second apply replaces the first
    out = model.generate(**inputs)                 # the host's own call, unchanged
    vlprune.stats(model); vlprune.remove(model)    # what ran and its cost; exact restore

The names below are loaded on first use, so that ``import vlprune`` (and the ``vlprune`` command's ``--help``)
does not import torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "apply": "api", "remove": "api", "pruned": "api", "stats": "api", "is_applied": "api",
    "Budget": "budget",
    "Compose": "methods.base", "ImageSelection": "methods.base", "Method": "methods.base", "Stage": "methods.base",
    "get_method": "registry", "list_methods": "registry", "register_method": "registry",
    "PruneState": "state", "Selection": "state",
}

__all__ = [
    "apply", "remove", "pruned", "stats", "is_applied", "list_methods", "get_method", "register_method",
    "Budget", "Stage", "Method", "Compose", "ImageSelection", "Selection", "PruneState", "__version__",
]


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'vlprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
