"""The Engine: vlprune's host-independent runtime, written once. An adapter subclasses it and describes one host.

The engine installs torch hooks on the modules the host description names (transformers 5.x semantics: decoder
layers receive ``hidden_states`` positionally and ``attention_mask``, ``position_ids``, ``position_embeddings``
(cos, sin) and the cache by keyword); it never switches the attention kernel and never patches a class. What it does:

- vision (``vision.py``): tokens per ViT layer, CLS-attention rows of chosen ViT layers, ViT token merging;
- decoder input (``prefill.py``): the image-token mask of the call, PRE_LLM selection per image and the splice and
  compaction of ``inputs_embeds`` (per-sample keep indices, padded to a batch), positions of kept tokens, masks and
  positions for calls that continue a pruned cache;
- decoder layers (``layers.py``): LLM_LAYER pruning of hidden states, mask, position ids and RoPE cos/sin; q/k
  capture for attention rows of the rows a method asks for; observed module outputs;
- after the decoder (``cache.py``): stats and cost records, the cache record, KV_CACHE eviction.

What a host description (an ``Engine`` subclass) must set in ``__init__`` and then call ``init_geometry``:

=================  ==================================================================================================
``model``          the user's model (``model.lm_head`` is hooked for the cost record)
``text``           the decoder module (its forward takes ``inputs_embeds``, ``attention_mask``, ``position_ids``, the
                   cache); ``layers`` its decoder layers (each with ``self_attn.q_proj/k_proj``,
                   ``input_layernorm``, ``mlp``)
``vision``         the vision tower module; ``vision_layers`` its encoder layers (``self_attn.q_proj/k_proj``)
``tcfg``/``vcfg``  text and vision configs; ``anyres``: whether images have a host-dependent number of tokens
``cost_config``    what ``vlprune.cost`` reads
=================  ==================================================================================================

and define:

- ``matches(model)`` (classmethod) and ``supported`` (a label), for ``find_adapter``;
- ``get_projector()`` / ``set_projector(module)``: the module that maps ViT features to the decoder (PROJECTOR stage);
- ``attach_inputs(state)``: hooks that set ``state.pending = {"image_mask": (B, T) bool, "image_sizes": ...}`` before
  the decoder's prefill call and ``state.image_call = {"image_sizes", "n_images"[, "crops"]}`` when images are
  encoded (the engine's ``_mm_pre(state, image_token_id)`` does the first for hosts that mark image tokens by id);
- ``layouts(n_images, image_sizes, crops=None)``: one :class:`~vlprune.methods.base.ImageLayout` per image, in the
  order the host packs image tokens (builders for common layouts in ``layouts.py``).

Optional overrides: ``rotary(hs, position_ids)`` (default ``text.rotary_emb``), ``apply_rope`` (default the
attention module's ``apply_rotary_pos_emb``, set by ``init_geometry``); class attributes ``cls_token`` (False for
a tower without one), ``multi_axis`` (M-RoPE positions), ``fixed_projector`` (why PROJECTOR methods are refused).

Legend: B batch, T sequence, N visual tokens, D hidden, H heads, K kept.
"""
from __future__ import annotations

import functools
import sys

from ..methods.base import Compose, HostInfo, Stage, check_positions
from .cache import CacheRuntime
from .layers import LayerRuntime
from .prefill import PrefillRuntime
from .vision import VisionRuntime


def _parts(method) -> list:
    return list(method.methods) if isinstance(method, Compose) else [method]


class Engine(VisionRuntime, PrefillRuntime, LayerRuntime, CacheRuntime):
    """The runtime shared by every decoder host; subclasses describe one host (see the module docstring)."""

    supported = "(abstract engine)"
    multi_axis = False  # M-RoPE: position ids (3|4, B, T) from the host's rope index (see engine/positions.py)
    fixed_projector = None  # why the host's projector cannot be replaced (PROJECTOR methods are then refused), or None

    # ------------------------------------------------------------------------------------------------ host seams
    def get_projector(self):  # pragma: no cover - host description
        raise NotImplementedError

    def set_projector(self, module) -> None:  # pragma: no cover - host description
        raise NotImplementedError

    def attach_inputs(self, state) -> None:  # pragma: no cover - host description
        raise NotImplementedError

    def layouts(self, n_images: int, image_sizes, crops=None) -> list:  # pragma: no cover - host description
        raise NotImplementedError

    def refuse_videos(self, state, owner) -> None:
        """Make ``owner.get_video_features`` (an instance attribute, removed by ``remove``) raise while a method is
        applied: vlprune prunes image tokens, and a host's video tokens are a placeholder of their own with their own
        packing, which it would otherwise prune as images or mis-count."""
        host = type(self.model).__name__
        original = owner.get_video_features

        @functools.wraps(original)
        def get_video_features(*args, **kwargs):
            raise ValueError(
                f"vlprune prunes image tokens; video inputs (pixel_values_videos) of {host} are not supported while a "
                f"method is applied. Run videos on the unpatched model: vlprune.remove(model), or "
                f"`with vlprune.pruned(model, ...)` around image calls only")

        owner.get_video_features = get_video_features
        state.restore.append(lambda: delattr(owner, "get_video_features"))

    def rotary(self, hs, position_ids):
        """The decoder's own (cos, sin) for ``position_ids`` (B|1, T)."""
        return self.text.rotary_emb(hs, position_ids=position_ids)

    def init_geometry(self, feature_layer: int) -> None:
        """feature_layer, side, the decoder's RoPE function and HostInfo, from the towers set by __init__ and the
        host's (negative or 1-based) feature layer."""
        nv = len(self.vision_layers)
        self.feature_layer = nv + feature_layer if feature_layer < 0 else feature_layer - 1  # 0-based ViT layer used
        image_size = getattr(self.vcfg, "image_size", None)  # None: a tower of any resolution (packed grids)
        self.side = None if image_size is None else image_size // self.vcfg.patch_size
        attn0 = self.layers[0].self_attn
        self.apply_rope = getattr(sys.modules[type(attn0).__module__], "apply_rotary_pos_emb", None)
        self.info = HostInfo(
            n_layers=len(self.layers),
            n_vision_layers=nv,
            vision_feature_layer=self.feature_layer,
            n_heads=self.tcfg.num_attention_heads,
            n_kv_heads=getattr(self.tcfg, "num_key_value_heads", None) or self.tcfg.num_attention_heads,
            hidden_size=self.tcfg.hidden_size,
            anyres=self.anyres,
            cls_token=self.cls_token,
            host=type(self.model).__name__,
        )

    # ------------------------------------------------------------------------------------------------ attach
    def attach(self, state) -> None:
        method = state.method
        parts = _parts(method)
        if self.fixed_projector is not None:
            for p in parts:
                if Stage.PROJECTOR in p.stages:
                    raise ValueError(
                        f"{p.name}: replaces LLaVA's projector with a trained query transformer; "
                        f"{type(self.model).__name__} {self.fixed_projector}. Use a method without a PROJECTOR stage")
        method.check(self.info)
        n = self.info.n_layers
        self.vit_layers = sorted(
            {(l + self.info.n_vision_layers) % self.info.n_vision_layers
             for l in method.vision_layers(self.info.n_vision_layers, self.feature_layer)}
        )
        self.prune_at = {}
        for p in parts:
            for l in p.prune_layers(n):
                if not 1 <= l < n:
                    raise ValueError(
                        f"{p.name}: pruning layer {l} is outside 1..{n - 1} for this {n}-layer decoder "
                        f"(layer 0 cannot be pruned inside the decoder; prune before it with a PRE_LLM method)"
                    )
                self.prune_at.setdefault(l, []).append(p)
        self.score_at = sorted({l for p in parts for l in p.score_layers(n)})
        for l in self.score_at:
            if not 0 <= l < n:
                raise ValueError(f"score layer {l} is outside 0..{n - 1} for this {n}-layer decoder")
        self.observe_at = {}
        for pi, p in enumerate(parts):
            for l in p.observe_layers(n):
                if not 0 <= l < n:
                    raise ValueError(f"{p.name}: observed layer {l} is outside 0..{n - 1} for this {n}-layer decoder")
                self.observe_at.setdefault(l, []).append((pi, p))
        self.part_index = {id(p): pi for pi, p in enumerate(parts)}
        self.pre_parts = [p for p in parts if Stage.PRE_LLM in p.stages or Stage.PROJECTOR in p.stages]
        self.kv_parts = [p for p in parts if Stage.KV_CACHE in p.stages]
        self.positions = method.positions
        for p in parts:
            check_positions(p.name, p.positions)
        self.renumbered = [p.name for p in parts if p.positions == "contiguous"]
        if self.multi_axis:  # positions are the host's own (t, h, w): see vlprune.engine.positions
            self.positions = "original"

        h = state.handles
        # projector swap (PROJECTOR stage)
        proj = method.build_projector(self.model, self.get_projector())
        if proj is not None:
            original = self.get_projector()
            self.set_projector(proj)
            state.restore.append(lambda: self.set_projector(original))
        h.append(self.get_projector().register_forward_hook(self._projector_hook(state)))
        self.attach_inputs(state)
        self.attach_vision(state)
        # decoder, layers, lm_head
        h.append(self.text.register_forward_pre_hook(self._text_pre(state), with_kwargs=True))
        h.append(self.text.register_forward_hook(self._text_post(state), with_kwargs=True))
        for i, layer in enumerate(self.layers):
            h.append(layer.register_forward_pre_hook(self._layer_pre(state, i), with_kwargs=True))
        for l in self.score_at:
            attn = self.layers[l].self_attn
            h.append(attn.q_proj.register_forward_hook(self._llm_capture(state, l, "q")))
            h.append(attn.k_proj.register_forward_hook(self._llm_capture(state, l, "k")))
        for l in self.observe_at:
            layer = self.layers[l]
            h.append(layer.self_attn.register_forward_hook(self._observe(state, l, "attn"), with_kwargs=True))
            h.append(layer.mlp.register_forward_hook(self._observe(state, l, "mlp"), with_kwargs=True))
        h.append(self.model.lm_head.register_forward_hook(self._lm_head_hook(state)))

    def attach_vision(self, state) -> None:
        """Hooks on a CLIP/SigLIP-style tower (``vision_layers`` of batched crops): token counts, CLS-attention (or,
        without CLS, received-attention) capture, ViT merging. A tower that packs images differently overrides it
        (``vlprune.engine.packed``)."""
        h = state.handles
        method = state.method
        h.append(self.vision.register_forward_pre_hook(self._vision_pre(state)))
        nv = self.info.n_vision_layers
        self.merge_at = method.merge_layer(nv)
        if self.merge_at is not None:
            if not 0 <= self.merge_at < nv - 1:
                raise ValueError(f"{method.name}: ViT merge after layer {self.merge_at} is outside 0..{nv - 2} for this "
                                 f"{nv}-layer vision tower")
            # registered before the token-count hooks, so that those see the merged length
            for i in range(self.merge_at + 1, nv):
                h.append(self.vision_layers[i].register_forward_pre_hook(self._vision_merge_pre(state, i)))
            h.append(self.vision.register_forward_hook(self._vision_unmerge(state)))
        for i, layer in enumerate(self.vision_layers):
            h.append(layer.register_forward_pre_hook(self._vision_layer_pre(state)))
        for l in self.vit_layers:
            attn = self.vision_layers[l].self_attn
            h.append(attn.q_proj.register_forward_hook(self._vit_q(state, l)))
            h.append(attn.k_proj.register_forward_hook(self._vit_k(state, l, attn)))
