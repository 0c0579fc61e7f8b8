from .base import Adapter, find_adapter, register_adapter

__all__ = ["Adapter", "find_adapter", "register_adapter"]
