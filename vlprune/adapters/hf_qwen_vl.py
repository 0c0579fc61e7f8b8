"""Seams of transformers' Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration and
Qwen3VLForConditionalGeneration.

This file describes the host; the runtime is ``vlprune.engine`` (with ``engine.packed`` for the vision tower). What
the host says:
- decoder ``model.model.language_model`` and its ``layers`` (Qwen2 layers, GQA); their ``position_embeddings`` arrive
  with M-RoPE already folded in (B, T, head_dim), so a pruned layer slices them like 1-D ones. Position ids are
  multi-axis (``multi_axis``): the host's ``get_rope_index`` gives (3, B, T) in a plain forward, ``generate`` (4, B, T)
  with the 1-D text position first; kept tokens keep theirs, decoding continues from ``model.model.rope_deltas``
  (see ``vlprune.engine.positions`` for what "contiguous" means here);
- vision tower ``model.model.visual`` (``blocks[i].attn.qkv``, 2-D rotary ``apply_rotary_pos_emb_vision``), every
  image packed into one sequence; Qwen2.5-VL's windowed blocks get their windows as ``cu_seqlens`` and the merger's
  input comes in window order (transformers' ``get_vision_window_index``); no CLS token (the engine's received-
  attention rule, ``engine/packed.py``);
- projector: the tower's ``merger`` (2 x 2 patches -> one LLM token), counted as the projector; a PROJECTOR-stage
  method (MQT) is refused: its weights are trained for LLaVA's projector;
- image tokens ``input_ids == config.image_token_id``; each image's ``image_grid_thw`` row where the host's own
  ``get_image_features`` receives it (wrapped on the instance); one raster grid of (h/2) x (w/2) tokens per image.
  Several images per prompt and batches with padding work as for LLaVA. Video input is refused (``get_video_features``
  raises): video tokens are a different placeholder that vlprune does not prune;
- Qwen3-VL: the decoder's ``_deepstack_process`` (DeepStack features added at the image tokens after the first
  decoder layers) is wrapped on the instance so that its mask and rows follow the kept tokens; its attention's
  ``q_norm`` / ``k_norm`` are applied wherever the engine computes attention rows.

Legend: B batch, T sequence, N visual tokens, K kept.
"""
from __future__ import annotations

import functools
import sys

from ..engine import Engine, PackedVisionRuntime, token_grid_layout
from .base import register_adapter


HOSTS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")


@register_adapter
class HFQwenVLAdapter(PackedVisionRuntime, Engine):
    """transformers ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and
    ``Qwen3VLForConditionalGeneration``."""

    supported = ("transformers Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "
                 "Qwen3VLForConditionalGeneration")
    multi_axis = True
    fixed_projector = "has a patch merger inside its vision tower, which it cannot replace"

    @classmethod
    def matches(cls, model) -> bool:  # by class name: no import of the host's modules for other models
        return any(c.__name__ in HOSTS and c.__module__.startswith("transformers.") for c in type(model).__mro__)

    def __init__(self, model):
        self.model = model
        self.base = model.model
        self.config = model.config
        self.anyres = False
        self.text = self.base.language_model
        self.layers = self.text.layers
        self.vision = self.base.visual
        self.vision_layers = self.vision.blocks
        self.tcfg = self.config.text_config
        self.vcfg = self.config.vision_config
        m = self.vcfg.spatial_merge_size
        self.unit = m * m
        self.vit_heads = self.vcfg.num_heads
        self.vision_rope = getattr(sys.modules[type(self.vision_layers[0].attn).__module__], "apply_rotary_pos_emb_vision")
        self.windowed = hasattr(self.vision, "fullatt_block_indexes")
        self.init_geometry(-1)  # the merger reads the last block's output
        self.cost_config = self.config

    def token_order(self, grid_thw):
        """Qwen2.5-VL: the raster index of each merger-input token slot (window order); Qwen2-VL: None."""
        if not self.windowed:
            return None
        from transformers.vision_utils import get_vision_window_index

        v = self.vision
        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=v.spatial_merge_size,
                                           window_size=v.window_size, patch_size=v.patch_size)
        return index

    # ------------------------------------------------------------------------------------------------ host seams
    def get_projector(self):
        return self.vision.merger

    def set_projector(self, module) -> None:
        self.vision.merger = module

    def attach_inputs(self, state) -> None:
        original = self.base.get_image_features

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            grid = kwargs.get("image_grid_thw", args[1] if len(args) > 1 else None)
            state.image_call = {"image_sizes": grid, "n_images": None if grid is None else int(grid.shape[0])}
            return original(*args, **kwargs)

        if hasattr(self.text, "_deepstack_process"):  # Qwen3-VL: DeepStack rows follow the kept image tokens
            self.text._deepstack_process = self._deepstack(state, self.text._deepstack_process)
            state.restore.append(lambda: delattr(self.text, "_deepstack_process"))
        self.base.get_image_features = get_image_features
        state.restore.append(lambda: delattr(self.base, "get_image_features"))
        self.refuse_videos(state, self.base)
        state.handles.append(
            self.base.register_forward_pre_hook(self._mm_pre(state, self.config.image_token_id), with_kwargs=True))

    def layouts(self, n_images: int, image_sizes, crops=None) -> list:
        """One raster grid of (h/m) x (w/m) tokens per image, from its ``image_grid_thw`` row."""
        if image_sizes is None:
            raise ValueError(f"{type(self.model).__name__} inputs need image_grid_thw (the processor returns it)")
        m = self.vcfg.spatial_merge_size
        return [token_grid_layout(h // m, w // m, t) for t, h, w in image_sizes.tolist()]
