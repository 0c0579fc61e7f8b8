"""vlprune's host-independent runtime (see ``core.py``): adapters describe a host, the engine does the rest."""
from .core import Engine
from .layouts import anyres_layout, base_newline_layout, grid_layout, queries_layout, single_view_layouts
from .packed import PackedVisionRuntime, token_grid_layout
from .selection import run_selections
from .vision import vision_layers_of

__all__ = ["Engine", "PackedVisionRuntime", "token_grid_layout", "anyres_layout", "base_newline_layout", "grid_layout", "queries_layout", "run_selections",
           "single_view_layouts", "vision_layers_of"]
