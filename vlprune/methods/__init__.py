"""Built-in methods; importing this module registers them."""
from .base import Compose, ImageSelection, ImageTokens, LayerContext, Method, Stage
from .baselines import ClsAttention, FastV, RandomPrune, SpatialPool
from .globalcom2 import GlobalCom2
from .hired import HiRED
from .mqt import MQT, MQTProjector
from .mustdrop import MustDrop, MustDropFilter, MustDropVision, OutputAwareCache
from .todre import ToDRE
from .transprune import TransPrune

__all__ = ["Compose", "ImageSelection", "ImageTokens", "LayerContext", "Method", "Stage",
           "ClsAttention", "FastV", "GlobalCom2", "HiRED", "MQT", "MQTProjector", "MustDrop", "MustDropFilter", "MustDropVision", "OutputAwareCache", "RandomPrune", "SpatialPool", "ToDRE", "TransPrune"]
