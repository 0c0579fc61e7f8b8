"""Seams of transformers' LlavaForConditionalGeneration (LLaVA-1.5) and LlavaNextForConditionalGeneration (AnyRes).

This file describes the host; the runtime (every hook and what it does) is ``vlprune.engine``. What the host says:
- decoder ``model.model.language_model`` and its ``layers``; rotary embedding ``language_model.rotary_emb`` (1-D
  positions); the cache arrives as ``cache`` / ``past_key_values``;
- vision tower ``model.model.vision_tower`` (``encoder.layers``), feature layer and select strategy from the config;
- projector ``model.model.multi_modal_projector`` (swapped for a PROJECTOR method);
- image tokens: ``input_ids == config.image_token_id`` at ``model.model``'s input (the engine's ``_mm_pre``), image
  sizes and count where the host's own ``get_image_features`` receives them (wrapped on the instance);
- layouts: LLaVA-1.5 one s x s grid per image (the CLS first with strategy "full"); LLaVA-NeXT the base view then
  the AnyRes crops as one unpadded grid with a newline per row, using transformers' own
  ``get_anyres_image_grid_shape`` / ``image_size_to_num_patches`` / ``unpad_image``.

Legend: B batch, T sequence, N visual tokens, D hidden, H heads, K kept.
"""
from __future__ import annotations

import functools

import torch

from ..engine import Engine, anyres_layout, single_view_layouts, vision_layers_of
from ..methods.base import ImageLayout
from .base import register_adapter


@register_adapter
class HFLlavaAdapter(Engine):
    """transformers ``LlavaForConditionalGeneration`` and ``LlavaNextForConditionalGeneration``."""

    supported = "transformers LlavaForConditionalGeneration, LlavaNextForConditionalGeneration"

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

        return isinstance(model, (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration))

    def __init__(self, model):
        from transformers import LlavaNextForConditionalGeneration

        self.model = model
        self.base = model.model
        self.config = model.config
        self.anyres = isinstance(model, LlavaNextForConditionalGeneration)
        self.text = self.base.language_model
        self.layers = self.text.layers
        self.vision = self.base.vision_tower
        self.vision_layers = vision_layers_of(self.vision)
        self.tcfg = self.config.text_config
        self.vcfg = self.config.vision_config
        fl = self.config.vision_feature_layer
        fl = fl[-1] if isinstance(fl, (list, tuple)) else fl
        self.strategy = self.config.vision_feature_select_strategy
        self.init_geometry(fl)
        self.cost_config = self.config  # what vlprune.cost reads (a full LlavaConfig / LlavaNextConfig)

    # ------------------------------------------------------------------------------------------------ host seams
    def get_projector(self):
        return self.base.multi_modal_projector

    def set_projector(self, module) -> None:
        self.base.multi_modal_projector = module

    def _anyres_tiles(self, image_size) -> tuple[int, tuple[int, int] | None]:
        """(number of crops incl. the base view, (rows, cols) of the high-resolution grid or None)."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        pinpoints = self.config.image_grid_pinpoints
        n_crops = image_size_to_num_patches(image_size, pinpoints, self.vcfg.image_size)
        if n_crops == 1:
            return 1, None
        nph, npw = get_anyres_image_grid_shape(image_size, pinpoints, self.vcfg.image_size)
        return n_crops, (int(nph), int(npw))

    def _unpad(self, grid: torch.Tensor, image_size) -> torch.Tensor:
        """The host's own unpadding of a (C, H, W) feature grid for an image of ``image_size``."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        return unpad_image(grid, torch.tensor(image_size))

    def attach_inputs(self, state) -> None:
        """Hooks that note, per call, where the image tokens are and which images were encoded."""
        h = state.handles
        # image sizes: generate encodes images before the forward and drops image_sizes from it, so they are noted
        # where the host's own get_image_features receives them (an instance attribute, deleted by remove)
        original_gif = self.base.get_image_features

        @functools.wraps(original_gif)
        def get_image_features(*args, **kwargs):
            pv = kwargs.get("pixel_values", args[0] if args else None)
            sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
            state.image_call = {"image_sizes": sizes, "n_images": None if pv is None else int(pv.shape[0])}
            return original_gif(*args, **kwargs)

        self.base.get_image_features = get_image_features
        state.restore.append(lambda: delattr(self.base, "get_image_features"))
        h.append(self.base.register_forward_pre_hook(self._mm_pre(state, self.config.image_token_id), with_kwargs=True))

    def layouts(self, n_images: int, image_sizes, crops=None) -> list[ImageLayout]:
        """Where each visual token of each image comes from, in the order the host packs them (``crops`` unused: the
        views per image are read off the sizes)."""
        if not self.anyres:
            return single_view_layouts(n_images, self.side, self.strategy == "full", self.get_projector())
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT inputs need image_sizes (the processor returns them); got None")
        return [self._anyres_layout(sz) for sz in torch.as_tensor(image_sizes).tolist()]

    def _anyres_layout(self, image_size) -> ImageLayout:
        if self.strategy != "default":
            raise ValueError(
                f"vlprune supports LLaVA-NeXT with vision_feature_select_strategy='default'; got {self.strategy!r}"
            )
        n_crops, tiles = self._anyres_tiles(image_size)
        return anyres_layout(self.side, n_crops, tiles, lambda grid: self._unpad(grid, image_size))
