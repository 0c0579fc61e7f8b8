"""Seams of the original LLaVA codebase (haotian-liu/LLaVA, PyPI ``llava-torch``): ``LlavaLlamaForCausalLM`` and
``LlavaMistralForCausalLM``.

The LLaVA-1.5 layout (``mm_patch_merge_type="flat"``) and the LLaVA-1.6 AnyRes layout
(``image_aspect_ratio="anyres"``, ``mm_patch_merge_type="spatial_unpad"``) are supported. The decoder is
transformers' own ``LlamaModel`` / ``MistralModel`` (``model.get_model()``), so every decoder-side hook is the one
the transformers host uses; what differs is where images enter:

- vision tower: ``model.get_vision_tower().vision_tower`` is a transformers ``CLIPVisionModel``; the ViT hooks are
  the same. ``mm_vision_select_layer`` / ``mm_vision_select_feature`` ("patch" drops the CLS) give the feature layer.
- projector: ``model.get_model().mm_projector`` (``linear`` or ``mlpNx_gelu``), swapped for a PROJECTOR method.
- image positions: the codebase splices image features into ``inputs_embeds`` in
  ``prepare_inputs_labels_for_multimodal`` (called by ``forward`` and by ``generate``) and re-pads the batch.
  vlprune wraps that method on the instance (``remove`` deletes the wrapper) and lets the host's own code say where
  the features went: it is called with probe labels, and the rows the host marks ``IGNORE_INDEX`` inside the
  attention mask are the image rows. The caller gets exactly what the unwrapped method returns (labels mapped
  back, ``attention_mask=None`` where it passed None).

Runs on transformers >=5.0,<5.24. The codebase itself runs on 4.36-4.37 (where vlprune's hooks do not apply), fails
in ``generate`` on 4.45-4.57 (``cache_position``) and again from 5.24 on (generate passes ``cache=``, which the
codebase's ``forward`` does not take); vlprune refuses those versions with an error that says so.

AnyRes image sizes are the codebase's ``(width, height)`` (PIL ``image.size``), and the grid shape and unpadding are
the codebase's own functions (``llava.mm_utils.get_anyres_image_grid_shape``, ``llava.model.llava_arch.unpad_image``),
which differ from transformers' ports in order and rounding.
"""
from __future__ import annotations

import functools
import sys
import types

import torch

from ..engine import Engine, anyres_layout, base_newline_layout, single_view_layouts, vision_layers_of
from .base import register_adapter

IGNORE_INDEX = -100  # llava.constants.IGNORE_INDEX
IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX
_PROBE = -201  # a label value the host never produces: marks the caller's own IGNORE_INDEX labels in a probe
_FIRST_UNSUPPORTED = (5, 24)  # generate passes cache= to forward, which the codebase's forward refuses


def _llava_meta_class():
    mod = sys.modules.get("llava.model.llava_arch")
    return None if mod is None else getattr(mod, "LlavaMetaForCausalLM", None)


def _check_transformers() -> None:
    import transformers

    v = transformers.__version__
    major, minor = (int(x) for x in v.split(".")[:2])
    if major < 5 or (major, minor) >= _FIRST_UNSUPPORTED:
        raise RuntimeError(
            f"vlprune on the LLaVA codebase (llava-torch) needs transformers >=5.0,<5.24; found transformers {v}. "
            f"Below 5.0 vlprune's decoder hooks do not apply (and the codebase's generate fails on 4.45-4.57: "
            f"cache_position); from 5.24 on, generate passes `cache=` to the codebase's forward, which has no such "
            f"argument. Fix: pip install 'transformers>=5,<5.24', then llava-torch with --no-deps "
            f"(README, 'LLaVA codebase')."
        )


def _per_image_crops(images) -> list[int]:
    """Views per image as the codebase reads ``images``: a (B, C, H, W) tensor, a (B, V, C, H, W) tensor or a list of
    (C, H, W) / (V, C, H, W) tensors."""
    if isinstance(images, (list, tuple)):
        return [1 if x.ndim == 3 else int(x.shape[0]) for x in images]
    if images.ndim == 5:
        return [int(images.shape[1])] * int(images.shape[0])
    if images.ndim == 4:
        return [1] * int(images.shape[0])
    raise ValueError(f"images must be (B, C, H, W), (B, V, C, H, W) or a list of tensors; got shape {tuple(images.shape)}")


@register_adapter
class LlavaRepoAdapter(Engine):
    """The LLaVA codebase's ``LlavaLlamaForCausalLM`` (and its Mistral variant, same seams)."""

    supported = "LLaVA codebase (llava-torch) LlavaLlamaForCausalLM / LlavaMistralForCausalLM, LLaVA-1.5 and 1.6 AnyRes"

    @classmethod
    def matches(cls, model) -> bool:
        meta = _llava_meta_class()  # no import of llava here: a model of that class means it is imported
        return meta is not None and isinstance(model, meta)

    def __init__(self, model):
        _check_transformers()
        self.model = model
        self.base = model.get_model()  # LlavaLlamaModel: a LlamaModel with vision_tower and mm_projector
        self.config = model.config
        self.text = self.base
        self.layers = self.base.layers
        tower = model.get_vision_tower()
        if tower is None or not getattr(tower, "is_loaded", False):
            raise ValueError(
                "vlprune: this LLaVA-codebase model has no loaded vision tower; call "
                "model.get_model().vision_tower.load_model() (load_pretrained_model does it) before vlprune.apply"
            )
        self.tower = tower
        self.vision = tower.vision_tower  # transformers CLIPVisionModel
        self.vision_layers = vision_layers_of(self.vision)
        self.tcfg = self.config
        self.vcfg = tower.config
        aspect = getattr(self.config, "image_aspect_ratio", "square")
        merge = getattr(self.config, "mm_patch_merge_type", "flat")
        if merge not in ("flat", "spatial_unpad"):
            raise ValueError(
                f"vlprune supports mm_patch_merge_type 'flat' (LLaVA-1.5) and 'spatial_unpad' (LLaVA-1.6); got {merge!r}"
            )
        self.anyres = aspect == "anyres" and merge == "spatial_unpad"
        self.unpad = merge == "spatial_unpad"
        feature = getattr(self.config, "mm_vision_select_feature", "patch")
        if feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be 'patch' or 'cls_patch'; got {feature!r}")
        self.strategy = "default" if feature == "patch" else "full"
        fl = int(getattr(self.config, "mm_vision_select_layer", -2))
        self.init_geometry(fl)
        self.cost_config = types.SimpleNamespace(
            text_config=self.config, vision_config=self.vcfg, vision_feature_layer=fl,
            projector_linears=self._projector_linears(self.base.mm_projector),
        )

    @staticmethod
    def _projector_linears(projector) -> list[tuple[int, int]] | None:
        linears = [(m.in_features, m.out_features) for m in projector.modules() if isinstance(m, torch.nn.Linear)]
        return linears or None

    # ------------------------------------------------------------------------------------------------ host specifics
    def get_projector(self):
        return self.base.mm_projector

    def set_projector(self, module) -> None:
        self.base.mm_projector = module
        lin = self._projector_linears(module)
        self.cost_config.projector_linears = lin

    def _anyres_tiles(self, image_size):
        from llava.mm_utils import get_anyres_image_grid_shape

        npw, nph = get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints, self.vcfg.image_size)
        return int(nph) * int(npw) + 1, (int(nph), int(npw))

    def _unpad(self, grid, image_size):
        from llava.model.llava_arch import unpad_image

        return unpad_image(grid, image_size)

    def layouts(self, n_images, image_sizes, crops=None):
        if crops is None:
            crops = [1] * n_images
        if all(c == 1 for c in crops) and not self.unpad:
            return single_view_layouts(n_images, self.side, self.strategy == "full", self.get_projector())  # LLaVA-1.5
        out = []
        for i, c in enumerate(crops):
            if c == 1:
                if getattr(self.get_projector(), "n_visual_tokens", None) not in (None, self.side * self.side):
                    raise ValueError("a learned projector (PROJECTOR stage) is supported on LLaVA-1.5 layouts only")
                lay = self._single_view_layout()
            elif not self.anyres:
                raise ValueError(
                    f"image {i} has {c} views but the model is not AnyRes (image_aspect_ratio="
                    f"{getattr(self.config, 'image_aspect_ratio', None)!r}, mm_patch_merge_type="
                    f"{getattr(self.config, 'mm_patch_merge_type', None)!r}); vlprune supports multi-view images "
                    f"with image_aspect_ratio='anyres' and mm_patch_merge_type='spatial_unpad'"
                )
            else:
                if image_sizes is None:
                    raise ValueError("LLaVA-1.6 AnyRes inputs need image_sizes (pass image_sizes=[img.size, ...])")
                lay = self._anyres_layout(tuple(int(v) for v in image_sizes[i]))
                if lay.n_crops != c:
                    raise ValueError(
                        f"image {i}: {c} views were passed but its size {tuple(image_sizes[i])} and the model's "
                        f"image_grid_pinpoints give {lay.n_crops}; pass the views process_images made for this image"
                    )
            out.append(lay)
        return out

    def _single_view_layout(self):
        """One view with ``spatial_unpad``: the base grid and one newline (LLaVA-1.6 with a single view)."""
        if self.strategy != "default":
            raise ValueError(f"spatial_unpad needs mm_vision_select_feature='patch'; got {self.strategy!r}")
        return base_newline_layout(self.side)

    def _anyres_layout(self, image_size):
        if self.strategy != "default":
            raise ValueError(
                f"vlprune supports LLaVA-NeXT with vision_feature_select_strategy='default'; got {self.strategy!r}"
            )
        n_crops, tiles = self._anyres_tiles(image_size)
        return anyres_layout(self.side, n_crops, tiles, lambda grid: self._unpad(grid, image_size))

    def attach_inputs(self, state) -> None:
        original = self.model.prepare_inputs_labels_for_multimodal
        model = self.model

        @functools.wraps(original)
        def prepare_inputs_labels_for_multimodal(input_ids, position_ids, attention_mask, past_key_values, labels,
                                                 images, image_sizes=None):
            state.pending = None
            if images is None or input_ids is None or input_ids.shape[1] == 1 or model.get_vision_tower() is None:
                return original(input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
            am = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            crops = _per_image_crops(images)
            used = _images_spliced(input_ids, am, len(crops))
            sizes = None if image_sizes is None else [image_sizes[i] for i in used]
            state.image_call = {"image_sizes": sizes, "n_images": len(used), "crops": [crops[i] for i in used]}
            probe = torch.zeros_like(input_ids) if labels is None else labels.masked_fill(labels == IGNORE_INDEX, _PROBE)
            probe_am = attention_mask if attention_mask is not None else am
            ids, pos, new_am, pkv, embeds, new_labels = original(input_ids, position_ids, probe_am, past_key_values,
                                                                 probe, images, image_sizes)
            image_mask = (new_labels == IGNORE_INDEX) & new_am.bool()
            if bool(image_mask.any()):
                state.pending = {"image_mask": image_mask, "image_sizes": sizes}
            out_labels = None if labels is None else new_labels.masked_fill(new_labels == _PROBE, IGNORE_INDEX)
            return ids, pos, (None if attention_mask is None else new_am), pkv, embeds, out_labels

        model.prepare_inputs_labels_for_multimodal = prepare_inputs_labels_for_multimodal
        state.restore.append(lambda: delattr(model, "prepare_inputs_labels_for_multimodal"))


def _images_spliced(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_images: int) -> list[int]:
    """Indices of the images the codebase splices into the prompt, in order: it walks the samples and takes one image
    per ``IMAGE_TOKEN_INDEX``, and one (spliced as nothing) for a sample without any."""
    used, cur = [], 0
    for ids, am in zip(input_ids, attention_mask):
        k = int((ids[am] == IMAGE_TOKEN_INDEX).sum())
        if k == 0:
            cur += 1
            continue
        used.extend(range(cur, cur + k))
        cur += k
    if cur > n_images:
        raise ValueError(f"the prompts hold {cur} image placeholders (IMAGE_TOKEN_INDEX) but {n_images} images were "
                         f"passed; pass one image per placeholder")
    return used
