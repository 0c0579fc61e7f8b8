"""The Adapter protocol: how vlprune finds the seams of a host model."""
from __future__ import annotations

from typing import Protocol


class Adapter(Protocol):
    """A host's seams. ``matches`` recognises the model; ``attach`` installs hooks into a PruneState."""

    @classmethod
    def matches(cls, model) -> bool: ...

    def attach(self, state) -> None: ...


_ADAPTERS: list[type] = []


def register_adapter(cls: type) -> type:
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def find_adapter(model):
    from . import hf_llava, hf_onevision, hf_qwen_vl, llava_repo, vision_towers  # noqa: F401  (the built-in adapters)

    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    supported = ", ".join(getattr(c, "supported", c.__name__) for c in _ADAPTERS)
    raise TypeError(
        f"vlprune does not support model class {type(model).__name__!r}. Supported: {supported}. "
        f"Load the model with one of these (e.g. LlavaForConditionalGeneration.from_pretrained(...))."
    )
