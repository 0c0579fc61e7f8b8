"""vlprune: visual-token compression for vision-language models, attached with hooks and removable.

    import vlprune
    vlprune.apply(model, "fastv", k=2, keep=64)   # in place; a second apply replaces the first
    out = model.generate(**inputs)                 # the host's own call, unchanged
    vlprune.stats(model); vlprune.remove(model)    # what ran and its cost; exact restore
"""
from .api import apply, is_applied, pruned, remove, stats
from .budget import Budget
from .methods.base import Compose, ImageSelection, Method, Stage
from .registry import get_method, list_methods, register_method
from .state import PruneState, Selection

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "pruned", "stats", "is_applied", "list_methods", "get_method", "register_method",
    "Budget", "Stage", "Method", "Compose", "ImageSelection", "Selection", "PruneState", "__version__",
]
