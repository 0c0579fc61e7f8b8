"""Seams of transformers' LlavaOnevisionForConditionalGeneration (LLaVA-OneVision: SigLIP, AnyRes "anyres_max_N",
a Qwen2 decoder).

This file describes the host; the runtime (every hook and what it does) is ``vlprune.engine``. What the host says:
- decoder ``model.model.language_model`` (Qwen2) and its ``layers``; rotary embedding ``language_model.rotary_emb``
  (1-D positions); the cache arrives as ``cache`` / ``past_key_values``;
- vision tower ``model.model.vision_tower``, a SigLIP encoder (``encoder.layers``) with no CLS token: the engine's
  "CLS attention" is then the mean attention each patch receives (``cls_token = False``, ``ops.received_attention``) and
  every view's patch p has ViT index p; feature layer from the config, strategy "full" (all patches);
- projector ``model.model.multi_modal_projector``, LLaVA's 2-layer GELU MLP (swapped for a PROJECTOR method);
- image tokens: ``input_ids == config.image_token_id`` at ``model.model``'s input (the engine's ``_mm_pre``); image
  sizes, the images per prompt (``batch_num_images``) and the views per image where the host's own
  ``get_image_features`` receives them (wrapped on the instance, ``state.image_call``);
- layouts (``pack_image_features``): per image the base view (s x s patches, no newline), then the AnyRes crops as one
  (rows*s, cols*s) grid, unpadded to the image's aspect by the host's ``unpad_image``, bilinearly shrunk to
  (int(h // r), int(w // r)) when r = sqrt(h*w / (N * s*s)) > 1.1 (``vision_aspect_ratio`` "anyres_max_N", N = 9
  released), with ``image_newline`` after each row. An image of a prompt with several images
  (``batch_num_images`` > 1) is its base view plus one newline. Tiling and unpadding use transformers' own
  ``get_anyres_image_grid_shape`` / ``image_size_to_num_patches`` / ``unpad_image``.

Tokens of a shrunk grid: each one is a bilinear mix of up to 2 x 2 neighbouring patches. Its layout entry (crop,
ViT index, tile) is the source patch nearest its centre: bilinear interpolation (align_corners False) centres output
row i of a grid shrunk from h to h' rows on source row (i + 0.5) * h / h' - 0.5, and the nearest patch row is
``floor((i + 0.5) * h / h')`` (computed in integers; a tie, midway between two patch rows, goes to the lower one in
the image, as interpolate's "nearest-exact"); the same for columns. Its vision score and crop tile are that patch's.

Video (``pixel_values_videos``): refused while a method is applied. vlprune prunes image tokens; the host packs video
frames through the same tower with a different layout (2 x 2 pooled frames), so a video call raises a ValueError
that names the host and the fix (``vlprune.remove(model)`` for videos) instead of pruning them wrongly.

Legend: B batch, T sequence, N visual tokens, D hidden, s patches per side of one view.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch

from ..engine import Engine, anyres_layout, vision_layers_of
from ..methods.base import ImageLayout
from .base import register_adapter

HOST = "LlavaOnevisionForConditionalGeneration"


@register_adapter
class HFLlavaOnevisionAdapter(Engine):
    """transformers ``LlavaOnevisionForConditionalGeneration``."""

    supported = f"transformers {HOST}"
    cls_token = False  # SigLIP: no CLS token; view patch p is ViT index p

    @classmethod
    def matches(cls, model) -> bool:
        return any(c.__name__ == HOST and c.__module__.startswith("transformers.") for c in type(model).__mro__)

    def __init__(self, model):
        self.model = model
        self.base = model.model
        self.config = model.config
        self.anyres = True
        self.text = self.base.language_model
        self.layers = self.text.layers
        self.vision = self.base.vision_tower
        self.vision_layers = vision_layers_of(self.vision)
        self.tcfg = self.config.text_config
        self.vcfg = self.config.vision_config
        strategy = self.config.vision_feature_select_strategy
        if strategy != "full":
            raise ValueError(
                f"vlprune supports {HOST} with vision_feature_select_strategy='full' (SigLIP has no CLS token to "
                f"drop; the released models use 'full'); got {strategy!r}"
            )
        aspect = str(getattr(self.config, "vision_aspect_ratio", None) or "anyres_max_9")
        if not aspect.startswith("anyres_max_") or not aspect[len("anyres_max_"):].isdigit():
            raise ValueError(f"vlprune supports {HOST} with vision_aspect_ratio 'anyres_max_N'; got {aspect!r}")
        self.max_views = int(aspect[len("anyres_max_"):])
        fl = self.config.vision_feature_layer
        fl = fl[-1] if isinstance(fl, (list, tuple)) else fl
        self.init_geometry(fl)
        self.cost_config = self.config  # what vlprune.cost reads (vision_config, text_config, LLaVA's MLP projector)

    # ------------------------------------------------------------------------------------------------ host seams
    def get_projector(self):
        return self.base.multi_modal_projector

    def set_projector(self, module) -> None:
        self.base.multi_modal_projector = module

    def _n_views(self, image_size) -> int:
        """Views the host encodes for one image alone in its prompt: the base view plus the AnyRes crops."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        return int(image_size_to_num_patches(list(image_size), self.config.image_grid_pinpoints, self.vcfg.image_size))

    def _views_per_image(self, image_sizes, per_prompt) -> list[int] | None:
        """Views per image as ``get_image_features`` counts them: an image that shares its prompt with others
        (``batch_num_images`` > 1) is its base view only."""
        if image_sizes is None:
            return None
        sizes = torch.as_tensor(image_sizes).tolist()
        if per_prompt is None:
            patched = [True] * len(sizes)
        else:
            patched = [int(n) == 1 for n in torch.as_tensor(per_prompt).tolist() for _ in range(int(n))]
        return [self._n_views(sz) if p else 1 for sz, p in zip(sizes, patched)]

    def attach_inputs(self, state) -> None:
        """Hooks that note, per call, where the image tokens are and which images (with how many views) were encoded;
        a wrapper that refuses video inputs."""
        h = state.handles
        # generate encodes images before the forward and drops image_sizes / batch_num_images from it, so they are
        # noted where the host's own get_image_features receives them (instance attributes, deleted by remove)
        original_gif = self.base.get_image_features
        signature = inspect.signature(original_gif)

        @functools.wraps(original_gif)
        def get_image_features(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            sizes = bound.get("image_sizes")
            state.image_call = {"image_sizes": sizes, "n_images": None if sizes is None else len(sizes),
                                "crops": self._views_per_image(sizes, bound.get("batch_num_images"))}
            return original_gif(*args, **kwargs)

        self.base.get_image_features = get_image_features
        state.restore.append(lambda: delattr(self.base, "get_image_features"))
        self.refuse_videos(state, self.base)
        h.append(self.base.register_forward_pre_hook(self._mm_pre(state, self.config.image_token_id), with_kwargs=True))

    def layouts(self, n_images: int, image_sizes, crops=None) -> list[ImageLayout]:
        """Where each visual token of each image comes from, in the order the host packs them. ``crops``: views per
        image as noted by ``get_image_features`` (None: each image alone in its prompt)."""
        if image_sizes is None:
            raise ValueError(f"{HOST} inputs need image_sizes (the processor returns them); got None")
        sizes = torch.as_tensor(image_sizes).tolist()
        if crops is None:
            crops = [None] * len(sizes)
        if len(crops) != len(sizes):
            raise ValueError(f"{HOST}: {len(sizes)} image sizes but views noted for {len(crops)} images")
        return [self._layout(sz, views) for sz, views in zip(sizes, crops)]

    def _layout(self, image_size, views: int | None) -> ImageLayout:
        if views == 1:  # the base view and one newline
            return anyres_layout(self.side, 1, None, lambda grid: grid, offset=0)
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        n_crops = self._n_views(image_size)
        nph, npw = get_anyres_image_grid_shape(list(image_size), self.config.image_grid_pinpoints, self.vcfg.image_size)
        return anyres_layout(self.side, n_crops, (int(nph), int(npw)),
                             lambda grid: self._unpad_and_shrink(grid, image_size), offset=0)

    def _unpad_and_shrink(self, grid: torch.Tensor, image_size) -> torch.Tensor:
        """The host's unpadding of a (C, H, W) grid of crop-grid indices, then its "anyres_max_N" shrink with each
        output token at the source patch nearest its centre (see the module docstring)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

        grid = unpad_image(grid, torch.tensor(image_size))
        _, h, w = grid.shape
        ratio = math.sqrt(h * w / (self.max_views * self.side**2))
        if ratio > 1.1:  # the host's rule and output size (pack_image_features)
            h2, w2 = int(h // ratio), int(w // ratio)
            rows = ((2 * torch.arange(h2) + 1) * h) // (2 * h2)  # floor((i + 0.5) * h / h2), in integers
            cols = ((2 * torch.arange(w2) + 1) * w) // (2 * w2)
            grid = grid[:, rows][:, :, cols]
        return grid
