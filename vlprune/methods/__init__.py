"""Built-in methods; importing this module registers them."""
from .base import Compose, ImageSelection, ImageTokens, LayerContext, Method, Stage
from .baselines import ClsAttention, FastV, RandomPrune, SpatialPool

__all__ = ["Compose", "ImageSelection", "ImageTokens", "LayerContext", "Method", "Stage",
           "ClsAttention", "FastV", "RandomPrune", "SpatialPool"]
