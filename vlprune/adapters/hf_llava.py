"""Seams of transformers' LlavaForConditionalGeneration (LLaVA-1.5) and LlavaNextForConditionalGeneration (AnyRes).

Everything here is torch hooks on the host's own modules (transformers 5.x): the attention kernel is never
switched, no class is patched, and ``remove`` takes every hook off again.

Hook points (see the class docstring of each hook):
- vision tower: a pre-hook per encoder layer (tokens per layer) and forward hooks on q_proj / k_proj of the ViT
  layers a method asks for (the CLS row's attention logits, computed for that row only);
- multimodal model (``model.model``): a pre-hook that notes where the image tokens are in this call;
- projector: a forward hook that counts rows (and, for PROJECTOR methods, the swapped-in module);
- decoder (``language_model``): a pre-hook that applies PRE_LLM selections to ``inputs_embeds`` in prefill and
  builds per-layer masks and positions for calls that continue a pruned cache; a forward hook that closes the
  prefill (cache bookkeeping, KV_CACHE evictions);
- each decoder layer: a pre-hook that prunes at the layers a method names and hands later layers the sliced
  mask, RoPE cos/sin and position ids; q_proj / k_proj hooks on the layers a method scores with.

Legend: B batch, T sequence, N visual tokens, D hidden, H heads, K kept.
"""
from __future__ import annotations

import functools
import sys
import time
import types
import warnings
import weakref

import torch

from .. import cost
from ..methods.base import (
    TOKEN_CLS,
    TOKEN_NEWLINE,
    TOKEN_PATCH,
    CacheContext,
    Compose,
    HostInfo,
    ImageLayout,
    ImageTokens,
    LayerContext,
    Partition,
    Stage,
    check_positions,
)
from ..ops import attention_rows as _attention_rows
from ..ops import cls_logits_from_qk, merge_batch, repeat_kv
from ..state import CacheRecord, Selection, SeqState, causal_mask, gather_rows, to_mask_dtype
from .base import register_adapter, run_selections


def _parts(method) -> list:
    return list(method.methods) if isinstance(method, Compose) else [method]


def _vision_layers_of(tower):
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        obj = tower
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
            return obj
        except AttributeError:
            continue
    raise TypeError(
        f"vision tower {type(tower).__name__} has no encoder.layers; vlprune's VISION seams support CLIP/SigLIP-style "
        f"towers from transformers"
    )


@register_adapter
class HFLlavaAdapter:
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
        self.vision_layers = _vision_layers_of(self.vision)
        self.tcfg = self.config.text_config
        self.vcfg = self.config.vision_config
        fl = self.config.vision_feature_layer
        fl = fl[-1] if isinstance(fl, (list, tuple)) else fl
        self.strategy = self.config.vision_feature_select_strategy
        self._init_geometry(fl)
        self.cost_config = self.config  # what vlprune.cost reads (a full LlavaConfig / LlavaNextConfig)

    def _init_geometry(self, feature_layer: int) -> None:
        """feature_layer, side, the decoder's RoPE function and HostInfo, from the towers set by __init__ and the
        host's (negative or 1-based) feature layer."""
        nv = len(self.vision_layers)
        self.feature_layer = nv + feature_layer if feature_layer < 0 else feature_layer - 1  # 0-based ViT layer used
        self.side = self.vcfg.image_size // self.vcfg.patch_size
        attn0 = self.layers[0].self_attn
        self._rope = getattr(sys.modules[type(attn0).__module__], "apply_rotary_pos_emb", None)
        self.info = HostInfo(
            n_layers=len(self.layers),
            n_vision_layers=nv,
            vision_feature_layer=self.feature_layer,
            n_heads=self.tcfg.num_attention_heads,
            n_kv_heads=getattr(self.tcfg, "num_key_value_heads", None) or self.tcfg.num_attention_heads,
            hidden_size=self.tcfg.hidden_size,
            anyres=self.anyres,
        )

    # ------------------------------------------------------------------------------------------------ host specifics
    # A subclass for another host (adapters/llava_repo.py) overrides these five and __init__; the rest is shared.
    def _get_projector(self):
        return self.base.multi_modal_projector

    def _set_projector(self, module) -> None:
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

    def _attach_inputs(self, state) -> None:
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
        h.append(self.base.register_forward_pre_hook(self._mm_pre(state), with_kwargs=True))

    # ------------------------------------------------------------------------------------------------ layouts
    def layouts(self, n_images: int, image_sizes, crops=None) -> list[ImageLayout]:
        """Where each visual token of each image comes from, in the order the host packs them.

        ``crops``: views per image where the host was handed them (the LLaVA codebase); else read off the sizes."""
        n_proj = getattr(self._get_projector(), "n_visual_tokens", None)
        if not self.anyres and n_proj is not None and n_proj != self.side * self.side:
            # a learned projector (MQT) emits its own number of tokens, with no patch grid behind them
            kind = torch.full((n_proj,), TOKEN_PATCH)
            g = int(round(n_proj ** 0.5))
            grid = (g, g) if g * g == n_proj else (-1, -1)  # MQT's queries sit on a square grid of positions
            lay = ImageLayout(kind=kind, crop=torch.zeros_like(kind), vit_index=torch.full((n_proj,), -1),
                              partitions=[Partition("queries", torch.arange(n_proj), grid)], n_crops=1)
            return [lay] * n_images
        if not self.anyres:
            s = self.side
            if self.strategy == "full":
                kind = torch.cat([torch.tensor([TOKEN_CLS]), torch.full((s * s,), TOKEN_PATCH)])
                vit = torch.arange(s * s + 1)
                grid_tokens = torch.arange(1, s * s + 1)
            else:
                kind = torch.full((s * s,), TOKEN_PATCH)
                vit = torch.arange(1, s * s + 1)
                grid_tokens = torch.arange(s * s)
            lay = ImageLayout(kind=kind, crop=torch.zeros_like(kind), vit_index=vit,
                              partitions=[Partition("image", grid_tokens, (s, s))], n_crops=1)
            return [lay] * n_images
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT inputs need image_sizes (the processor returns them); got None")
        return [self._anyres_layout(sz) for sz in torch.as_tensor(image_sizes).tolist()]

    def _anyres_layout(self, image_size) -> ImageLayout:
        if self.strategy != "default":
            raise ValueError(
                f"vlprune supports LLaVA-NeXT with vision_feature_select_strategy='default'; got {self.strategy!r}"
            )
        s = self.side
        n_crops, tiles = self._anyres_tiles(image_size)
        base_vit = torch.arange(1, s * s + 1)
        kinds, crops, vits, grids = [torch.full((s * s,), TOKEN_PATCH)], [torch.zeros(s * s, dtype=torch.long)], [base_vit], []
        parts = [Partition("base", torch.arange(s * s), (s, s))]
        if n_crops > 1:
            nph, npw = tiles
            r = torch.arange(nph * s)[:, None].expand(nph * s, npw * s)
            c = torch.arange(npw * s)[None, :].expand(nph * s, npw * s)
            crop = 1 + (r // s) * npw + (c // s)
            vit = 1 + (r % s) * s + (c % s)
            idx = torch.stack([crop, vit, r // s, c // s]).float()  # (4, H, W), unpadded exactly as the host does
            idx = self._unpad(idx, image_size).long()
            hh, ww = idx.shape[1:]
            full = torch.full((4, hh, ww + 1), -1, dtype=torch.long)
            full[:, :, :ww] = idx
            kind = torch.full((hh, ww + 1), TOKEN_PATCH)
            kind[:, ww] = TOKEN_NEWLINE
            kinds.append(kind.reshape(-1))
            crops.append(full[0].reshape(-1))
            vits.append(full[1].reshape(-1))
            cg = full[2:].reshape(2, -1).T
            grids.append(cg)
            pos = torch.arange(hh * (ww + 1)).reshape(hh, ww + 1)[:, :ww].reshape(-1) + s * s
            parts.append(Partition("grid", pos, (hh, ww)))
        else:  # a single view: the base image and one newline
            kinds.append(torch.tensor([TOKEN_NEWLINE]))
            crops.append(torch.tensor([-1]))
            vits.append(torch.tensor([-1]))
        kind = torch.cat(kinds)
        crop_grid = torch.full((kind.numel(), 2), -1, dtype=torch.long)
        if grids:
            crop_grid[s * s :] = grids[0]
        return ImageLayout(kind=kind, crop=torch.cat(crops), vit_index=torch.cat(vits), partitions=parts,
                           n_crops=n_crops, crop_grid=crop_grid, tiles=tiles)

    # ------------------------------------------------------------------------------------------------ attach
    def attach(self, state) -> None:
        method = state.method
        parts = _parts(method)
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

        h = state.handles
        # projector swap (PROJECTOR stage)
        proj = method.build_projector(self.model, self._get_projector())
        if proj is not None:
            original = self._get_projector()
            self._set_projector(proj)
            state.restore.append(lambda: self._set_projector(original))
        h.append(self._get_projector().register_forward_hook(self._projector_hook(state)))
        self._attach_inputs(state)
        # vision tower
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

    # ------------------------------------------------------------------------------------------------ vision
    def _vision_pre(self, state):
        def hook(mod, args):
            if state.run.llm:
                state.new_run()
            state.vision_logits = {}
            state._vision_q = {}
            state.vit_merge = None
            pv = args[0] if args else None
            batch = int(pv.shape[0]) if pv is not None else 0
            state.run.vision.append(cost.VisionCall(batch=batch, tokens_per_layer=[]))

        return hook

    def _vision_layer_pre(self, state):
        def hook(mod, args):
            if state.run.vision:
                state.run.vision[-1].tokens_per_layer.append(int(args[0].shape[1]))

        return hook

    def _vit_q(self, state, layer):
        def hook(mod, args, out):
            state._vision_q[layer] = out

        return hook

    def _vit_k(self, state, layer, attn):
        heads = getattr(attn, "num_heads", None) or self.vcfg.num_attention_heads
        scale = getattr(attn, "scale", None) or (attn.head_dim**-0.5)

        def hook(mod, args, out):
            q = state._vision_q.pop(layer, None)
            if q is None:
                return
            t0 = time.perf_counter()
            logits = cls_logits_from_qk(q, out, heads, scale)  # (Bv, H, S)
            state.vision_logits[layer] = logits.detach()
            state.run.method_seconds += time.perf_counter() - t0
            b, s, hd_all = out.shape
            state.run.scoring_flops += 2.0 * b * s * hd_all

        return hook

    def _vision_merge_pre(self, state, i):
        """ViT layer i > merge layer: the first one shortens each crop's sequence by the method's MergePlan (padding
        crops to a common length with a key mask); later ones receive that mask."""
        first = i == self.merge_at + 1

        def hook(mod, args):
            if not first:
                vm = state.vit_merge
                if vm is None or vm["mask"] is None:
                    return None
                return (args[0], vm["mask"]) + tuple(args[2:])
            x = args[0]  # (Bv, S, D)
            t0 = time.perf_counter()
            method = self.method_of(state)
            wanted = self._merge_wanted(state, method, x.shape[0])
            plans = [method.merge(x[c], (self.side, self.side)) if wanted[c] else None for c in range(x.shape[0])]
            if all(p is None or p.n_new == x.shape[1] for p in plans):
                state.run.method_seconds += time.perf_counter() - t0
                return None
            bv, s, _ = x.shape
            out, valid, plans = merge_batch(x, plans)
            n_new = out.shape[1]
            mask = None
            if not bool(valid.all()):
                mask = torch.zeros(bv, 1, n_new, n_new, dtype=x.dtype, device=x.device)
                mask = mask.masked_fill(~valid[:, None, None, :], torch.finfo(x.dtype).min)
            state.vit_merge = {"plans": plans, "assign": torch.stack([p.assign for p in plans]).to(x.device),
                               "valid": valid, "mask": mask, "length": s, "merged_length": n_new,
                               "duplicates": sum(s - p.n_new for p in plans)}
            state.run.method_seconds += time.perf_counter() - t0
            return (out, mask) + tuple(args[2:])

        return hook

    def _merge_wanted(self, state, method, n_crops: int) -> list[bool]:
        """Per crop of the vision batch: whether the method merges it (``Method.merges`` of the decoder tokens of
        the crop's image: a budget that covers the image leaves it unmerged)."""
        noted = state.image_call or {}
        sizes = noted.get("image_sizes")
        n_images = len(sizes) if self.anyres and sizes is not None else noted.get("n_images")
        if n_images is None or (self.anyres and sizes is None):
            return [True] * n_crops
        per_crop = [lay.n for lay in self.layouts(n_images, sizes, noted.get("crops")) for _ in range(lay.n_crops)]
        if len(per_crop) != n_crops:
            return [True] * n_crops
        return [method.merges(n) for n in per_crop]

    def _vision_unmerge(self, state):
        """The vision tower's output: merged hidden states go back to one row per original token (a merged token in
        each of its members' places), so that the host's own packing and placeholder count stay as they are; the
        decoder input then keeps one token per group (see ``_dedup``)."""

        def hook(mod, args, out):
            vm = state.vit_merge
            if vm is None:
                return None
            assign, n_new = vm["assign"], vm["merged_length"]

            def expand(t):
                if not torch.is_tensor(t) or t.dim() != 3 or t.shape[1] != n_new or t.shape[0] != assign.shape[0]:
                    return t
                return torch.gather(t, 1, assign[:, :, None].to(t.device).expand(-1, -1, t.shape[2]))

            if getattr(out, "hidden_states", None) is not None:
                out.hidden_states = tuple(expand(t) for t in out.hidden_states)
            if getattr(out, "last_hidden_state", None) is not None:
                out.last_hidden_state = expand(out.last_hidden_state)
            return out

        return hook

    def method_of(self, state):
        return state.method

    def _dedup(self, img, vm, crop_offset):
        """One token per merged group: the group's last member present in the layout (raster order) represents it.
        Returns (kept image-token indices (K,) ascending, merged_into (N,) image index of each token's representative
        or -1 for tokens that represent themselves)."""
        lay = img.layout
        assign = vm["assign"].cpu()
        ok = lay.vit_index >= 0
        group = torch.full((lay.n,), -1, dtype=torch.long)
        crops = lay.crop[ok] + crop_offset
        group[ok] = crops * (vm["length"] + 1) + assign[crops, lay.vit_index[ok]]
        keep = torch.ones(lay.n, dtype=torch.bool)
        merged_into = torch.full((lay.n,), -1, dtype=torch.long)
        order = torch.argsort(group, stable=True)
        g_sorted = group[order]
        for a, b in _runs(g_sorted):
            if g_sorted[a] < 0 or b - a == 1:
                continue
            members = order[a:b]
            rep = members[torch.argmax(lay.vit_index[members])]
            keep[members] = False
            keep[rep] = True
            merged_into[members[members != rep]] = rep
        return keep.nonzero().squeeze(1), merged_into

    def _projector_hook(self, state):
        def hook(mod, args, out):
            x = args[0]
            rows = int(x.numel() // x.shape[-1])  # every row, merged duplicates included: the projector runs on all
            if hasattr(mod, "mqt"):  # a query transformer: its own cost, not the MLP's
                state.run.projector_extra_flops += mod.mqt.flops(x.shape[0], x.shape[1], mod.m)
                return
            state.run.projector_rows += rows

        return hook

    # ------------------------------------------------------------------------------------------------ multimodal input
    def _mm_pre(self, state):
        image_id = self.config.image_token_id

        def hook(mod, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            has_images = kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs") is not None
            state.pending = None
            if not has_images:
                return None
            if ids is not None:
                mask = ids == image_id
            else:
                emb = kwargs.get("inputs_embeds")
                tok = mod.get_input_embeddings()(torch.tensor(image_id, device=emb.device))
                mask = (emb == tok).all(-1)
            if bool(mask.any()):
                # image sizes and count are read at the decoder's input, after the host encoded the images
                state.pending = {"image_mask": mask, "image_sizes": kwargs.get("image_sizes")}
            return None

        return hook

    # ------------------------------------------------------------------------------------------------ decoder input
    def _text_pre(self, state):
        def hook(mod, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            if emb is None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                emb_len, bsz = ids.shape[1], ids.shape[0]
            else:
                bsz, emb_len = emb.shape[:2]
            cache = _cache_of(kwargs)
            pending, state.pending = state.pending, None
            call = {"mode": "pass", "q": [0] * len(self.layers), "kv": [0] * len(self.layers), "batch": bsz}
            state.call = call
            rec = state.record_for(cache)
            past = 0 if cache is None else _real_len(cache, 0)
            if rec is not None:
                if pending is not None:
                    warnings.warn(
                        "vlprune: this call adds images to a conversation whose cache was pruned; the new images pass "
                        "unpruned (pruning applies to the prompt that starts a cache)",
                        stacklevel=2,
                    )
                if emb_len > 1:  # a new turn on the pruned cache is a new call for stats
                    state.new_run()
                return self._continue(state, rec, call, kwargs, emb_len)
            if past == 0 and state.run.llm:  # a fresh prompt starts a new call for stats
                vis = state.run.vision[-1:] if pending is not None else []
                state.new_run()
                state.run.vision = vis
            if past > 0 or pending is None:
                if pending is not None:
                    warnings.warn(
                        "vlprune: images in a call that continues an unpruned cache pass unpruned",
                        stacklevel=2,
                    )
                    state.run.notes.append("images continued an unpruned cache: not pruned")
                return None
            return self._prefill(state, call, kwargs, pending, emb, cache)

        return hook

    def _prefill(self, state, call, kwargs, pending, emb, cache):
        img_mask = pending["image_mask"].to(emb.device)  # (B, T)
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise ValueError(
                f"vlprune needs a 2-D attention_mask (B, T) in prefill; got shape {tuple(am.shape)}. "
                f"Pass the processor's attention_mask unchanged."
            )
        b, t, _ = emb.shape
        valid = am.bool() if am is not None else torch.ones(b, t, dtype=torch.bool, device=emb.device)
        left = am is None or bool(am[:, -1].all())
        call.update(mode="prefill", left=left, prompt_len=t, cache=None if cache is None else weakref.ref(cache))
        state.run.images = []

        t_sel = time.perf_counter()
        images = self._split_images(state, pending, emb, img_mask)
        changed = False
        keep_lists = []
        new_feats = {}  # (sample, prompt position) -> feature row
        for b_i in range(b):
            keep_lists.append([(~img_mask[b_i]).nonzero().squeeze(1)])
        protected = []  # (sample, prompt position) of protected tokens
        for img, span, crop_offset in images:
            sel_keep = torch.arange(img.n)
            merged = None
            cur = img
            if state.vit_merge is not None:
                sel_keep, merged = self._dedup(img, state.vit_merge, crop_offset)
                cur = img.subset(sel_keep)
            info = {}
            sel_keep, feats, merged, prot = run_selections(self.pre_parts, cur, sel_keep, img.n, merged, info)
            state.run.scoring_flops += info.get("flops", 0.0)
            dropped = sel_keep.numel() < img.n or feats is not None
            changed |= dropped
            pos = span[sel_keep.to(span.device)]
            protected.extend((img.sample, int(span[i])) for i in prot.tolist())
            keep_lists[img.sample].append(pos)
            if feats is not None:
                for j, ppos in enumerate(pos.tolist()):
                    new_feats[(img.sample, ppos)] = feats[j]
            state.run.images.append(
                {"sample": img.sample, "visual_tokens": img.n, "kept": int(sel_keep.numel()), "kept_indices": sel_keep,
                 "merged_into": merged, "partitions": img.layout.partition_counts(), "budget": info.get("budget"),
                 "kept_per_partition": None if merged is not None else img.layout.partition_counts(sel_keep)}
            )
        state.run.method_seconds += time.perf_counter() - t_sel
        seq = SeqState(
            original=torch.arange(t, device=emb.device)[None].expand(b, t).clone(),
            valid=valid,
            visual=img_mask.clone(),
        )
        if protected:
            seq.protected = torch.zeros(b, t, dtype=torch.bool, device=emb.device)
            for s_i, ppos in protected:
                seq.protected[s_i, ppos] = True
        state.seq = seq
        call["changed_pre"] = changed
        if not changed:
            return None
        keeps = [torch.cat(k).sort().values for k in keep_lists]
        sel = Selection.from_lists(keeps, valid, left=left)
        new_emb = sel.apply(emb)
        if new_feats:
            for (s_i, ppos), f in new_feats.items():
                col = int((sel.idx[s_i] == ppos).nonzero()[0, 0])
                new_emb[s_i, col] = f.to(new_emb.dtype)
        seq.advance(sel)
        kwargs["inputs_embeds"] = new_emb
        kwargs.pop("input_ids", None)
        kwargs["attention_mask"] = sel.valid.long()  # explicit: positions may have gaps (no packed-sequence guess)
        pos = kwargs.get("position_ids")  # generate passes padding-aware positions; a plain forward passes none
        if pos is None:
            pos = torch.arange(t, device=emb.device)[None]
        pos = pos.expand(b, -1)
        kept_pos = sel.apply(pos)
        if self.positions == "contiguous":
            # renumber without gaps: each kept token moves down by the prompt tokens dropped before it
            kept_pos = kept_pos - _dropped_before(sel, valid)
            call["delta"] = valid.sum(1) - sel.valid.sum(1)  # (B,)
        kwargs["position_ids"] = torch.where(sel.idx >= 0, kept_pos, torch.zeros_like(kept_pos))
        return (), kwargs

    def _split_images(self, state, pending, emb, img_mask):
        """Cut the image tokens of the prompt into per-image spans with their layouts and vision scores."""
        b = emb.shape[0]
        total = int(img_mask.sum())
        noted = state.image_call or {}
        sizes = pending.get("image_sizes")
        sizes = noted.get("image_sizes") if sizes is None else sizes
        n_images = noted.get("n_images")
        if self.anyres:
            n_images = len(sizes) if sizes is not None else n_images
        elif n_images is None:
            n_images = total // self.layouts(1, None)[0].n
        layouts = self.layouts(n_images, sizes, noted.get("crops"))
        if sum(l.n for l in layouts) != total:
            raise ValueError(
                f"image tokens and image features do not line up: tokens: {total}, features: "
                f"{sum(l.n for l in layouts)} ({[l.n for l in layouts]} per image)"
            )
        crop_offsets, off = [], 0
        for lay in layouts:
            crop_offsets.append(off)
            off += lay.n_crops
        out, img_i = [], 0
        for s in range(b):
            positions = img_mask[s].nonzero().squeeze(1)
            used = 0
            while used < positions.numel():
                lay = layouts[img_i]
                span = positions[used : used + lay.n]
                used += lay.n
                co, nc = crop_offsets[img_i], lay.n_crops

                def vision(layer, co=co, nc=nc):
                    l0 = (layer + self.info.n_vision_layers) % self.info.n_vision_layers
                    if l0 not in state.vision_logits:
                        raise RuntimeError(
                            f"ViT layer {layer} attention was not captured; captured: {sorted(state.vision_logits)}. "
                            f"List it in the method's vision_layers()."
                        )
                    return state.vision_logits[l0][co : co + nc]

                def vision_merge(layer, co=co, nc=nc):
                    vm = state.vit_merge
                    l0 = (layer + self.info.n_vision_layers) % self.info.n_vision_layers
                    if vm is None or l0 <= self.merge_at:
                        return None
                    return vm["assign"][co: co + nc], vm["valid"][co: co + nc]

                merge_score = None
                vm = state.vit_merge
                if vm is not None:
                    ok = lay.vit_index >= 0
                    crops = lay.crop[ok] + co
                    slot = vm["assign"].cpu()[crops, lay.vit_index[ok]]
                    scores = torch.stack([torch.nn.functional.pad(p.score, (0, vm["merged_length"] - p.n_new),
                                                                  value=float("nan")) for p in vm["plans"]])
                    merge_score = torch.full((lay.n,), float("nan"))
                    merge_score[ok] = scores[crops, slot]
                out.append((ImageTokens(features=emb[s, span], layout=lay, sample=s, index=img_i,
                                        n_vision_layers=self.info.n_vision_layers, feature_layer=self.feature_layer,
                                        _vision=vision if state.vision_logits else None,
                                        _vision_merge=vision_merge, merge_score=merge_score), span, co))
                img_i += 1
        return out

    def _continue(self, state, rec, call, kwargs, q):
        """A call on a pruned cache (decode step or a later turn): per-layer masks and positions."""
        call.update(mode="continue", record=rec, positions={})
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise ValueError(f"vlprune needs a 2-D attention_mask when continuing a pruned cache; got {tuple(am.shape)}")
        dtype = torch.bool if self.tcfg._attn_implementation != "eager" else self._dtype()
        masks, by_prefix = [], {}
        for l in range(len(self.layers)):
            key = id(rec.prefix[l][0])
            if key not in by_prefix:
                cols, ok = rec.columns(l, am, q)
                if q == 1 and bool(ok.all()) and dtype == torch.bool:
                    by_prefix[key] = None
                else:
                    rows = torch.arange(rec.covered, rec.covered + q, device=cols.device)
                    m = (cols[:, None, None, :] <= rows[None, None, :, None]) & ok[:, None, None, :]
                    eye_col = cols.shape[1] - q + torch.arange(q, device=cols.device)
                    m[:, 0, torch.arange(q), eye_col] = True
                    by_prefix[key] = to_mask_dtype(m, dtype)
            masks.append(by_prefix[key])
        call["masks"] = masks
        kwargs["attention_mask"] = masks[0]
        if rec.layer0_pruned:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.arange(rec.covered, rec.covered + q, device=rec.prefix[0][0].device)[None]
            if rec.positions == "contiguous":
                pos = pos - rec.delta.to(pos.device)[:, None]
            kwargs["position_ids"] = pos
        return (), kwargs

    def _dtype(self):
        return next(self.text.parameters()).dtype

    # ------------------------------------------------------------------------------------------------ decoder layers
    def _layer_pre(self, state, i):
        n_layers = len(self.layers)

        def hook(mod, args, kwargs):
            call = state.call
            if call is None or call["mode"] == "pass":
                if call is not None:
                    self._note_lengths(call, i, args[0].shape[1], kwargs)
                return None
            hs = args[0]
            if call["mode"] == "continue":
                kwargs["attention_mask"] = call["masks"][i]
                shift = call["record"].layer_delta[i] if call["record"].layer_delta else None
                if shift is not None:  # this layer's prefill was renumbered: continue its numbering
                    key = id(shift)
                    if key not in call["positions"]:
                        pos = kwargs["position_ids"] - shift.to(hs.device)[:, None]
                        call["positions"][key] = (pos, self._rotary(hs, pos))
                    kwargs["position_ids"], kwargs["position_embeddings"] = call["positions"][key]
                self._note_lengths(call, i, hs.shape[1], kwargs)
                return None
            seq = state.seq
            for p in self.prune_at.get(i, []):
                pi = self.part_index[id(p)]
                pe = seq.position_embeddings if seq.substitute else kwargs["position_embeddings"]
                ctx = LayerContext(layer=i, n_layers=n_layers, hidden=hs, visual=seq.visual, valid=seq.valid,
                                   last=_last_valid(seq.valid), attention_rows=self._rows_fn(state, hs.shape[1]),
                                   entering_rows=self._entering_fn(state, i, hs, pe, seq.valid),
                                   observed={k[1:]: v for k, v in seq.observed.items() if k[0] == pi},
                                   visual_at_start=seq.per_layer[0][2].sum(1) if seq.per_layer else seq.visual.sum(1),
                                   protected=seq.protected,
                                   report=lambda key, value: state.run.reports.__setitem__(key, value))
                t0 = time.perf_counter()
                keep = p.prune(ctx)
                state.run.method_seconds += time.perf_counter() - t0
                if keep is None:
                    continue
                lists, dropped = [], False
                for b_i, kv in enumerate(keep):
                    vis = seq.visual[b_i].nonzero().squeeze(1)
                    if kv is None:
                        kv = vis
                    kv = torch.as_tensor(kv, dtype=torch.long, device=hs.device).reshape(-1)
                    if kv.numel() and not bool(seq.visual[b_i, kv].all()):
                        raise ValueError(f"{p.name}.prune returned indices that are not visual tokens at layer {i}")
                    dropped |= kv.numel() < vis.numel()
                    lists.append(torch.cat([(~seq.visual[b_i]).nonzero().squeeze(1), kv]).unique().sort().values)
                if not dropped:
                    continue
                sel = Selection.from_lists(lists, seq.valid, left=call["left"])
                pos = kwargs.get("position_ids") if not seq.substitute else seq.position_ids
                if p.positions == "contiguous":
                    # renumber without gaps: each kept token moves down by the tokens dropped before it here, and
                    # later calls on the cache continue this layer's numbering (CacheRecord.layer_delta)
                    if pos is None:
                        pos = torch.arange(hs.shape[1], device=hs.device)[None]
                    pos = torch.where(sel.idx >= 0, sel.apply(pos) - _dropped_before(sel, seq.valid),
                                      torch.zeros_like(sel.idx))
                    shift = (seq.valid.sum(1) - sel.valid.sum(1)).to(hs.device)
                    seq.shift = shift if seq.shift is None else seq.shift + shift
                    hs = sel.apply(hs)
                    seq.position_embeddings = self._rotary(hs, pos)
                    seq.position_ids = pos
                else:
                    hs = sel.apply(hs)
                    cos, sin = kwargs["position_embeddings"] if not seq.substitute else seq.position_embeddings
                    seq.position_embeddings = (sel.apply(cos), sel.apply(sin))
                    seq.position_ids = None if pos is None else sel.apply(pos)
                mask = kwargs.get("attention_mask") if not seq.substitute else seq.attention_mask
                if mask is None and sel.padded:
                    seq.attention_mask = causal_mask(sel.valid, hs.shape[1], torch.bool)
                else:
                    seq.attention_mask = sel.apply_mask(mask)
                seq.advance(sel)
                seq.substitute = True
            if seq.substitute:
                kwargs["position_embeddings"] = seq.position_embeddings
                kwargs["position_ids"] = seq.position_ids
                kwargs["attention_mask"] = seq.attention_mask
            seq.per_layer.append((seq.original, seq.valid, seq.visual))
            seq.shifts.append(seq.shift)
            if i in self.score_at:
                cos, sin = kwargs["position_embeddings"]
                seq.captures[i] = {"cos": cos, "sin": sin, "valid": seq.valid}
            self._note_lengths(call, i, hs.shape[1], kwargs)
            return (hs,) + tuple(args[1:]), kwargs

        return hook

    def _rotary(self, hs, position_ids):
        """The decoder's own (cos, sin) for ``position_ids`` (B|1, T)."""
        return self.text.rotary_emb(hs, position_ids=position_ids)

    def _note_lengths(self, call, i, q, kwargs):
        cache = _cache_of(kwargs)
        call["q"][i] = int(q)
        call["kv"][i] = int(q) + (0 if cache is None else _real_len(cache, i))

    def _llm_capture(self, state, layer, which):
        def hook(mod, args, out):
            call = state.call
            if call is not None and call["mode"] == "prefill" and layer in state.seq.captures:
                state.seq.captures[layer][which] = out

        return hook

    def _observe(self, state, layer, module):
        def hook(mod, args, kwargs, out):
            call = state.call
            if call is None or call["mode"] != "prefill":
                return None
            x_in = kwargs.get("hidden_states", args[0] if args else None)
            x_out = out[0] if isinstance(out, tuple) else out
            t0 = time.perf_counter()
            seq = state.seq
            for pi, p in self.observe_at[layer]:
                v = p.observe(layer, module, x_in, x_out, seq.valid)
                if v is not None:
                    seq.observed[(pi, layer, module)] = v
            b, t, d = x_in.shape
            state.run.scoring_flops += 8.0 * b * t * d * len(self.observe_at[layer])  # norms and dot products
            state.run.method_seconds += time.perf_counter() - t0
            return None

        return hook

    def _entering_fn(self, state, i, hs, position_embeddings, valid):
        """Attention rows of decoder layer i computed from its input ``hs`` (before it runs)."""

        def entering_rows(rows: torch.Tensor) -> torch.Tensor:
            layer = self.layers[i]
            attn = layer.self_attn
            hd = attn.head_dim
            x = layer.input_layernorm(hs)  # (B, T, D)
            b, t, d = x.shape
            rows = rows.to(x.device)
            r = rows.shape[1]
            q = attn.q_proj(gather_rows(x, rows)).view(b, r, -1, hd).transpose(1, 2)  # (B, H, R, hd)
            k = attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2)  # (B, Hkv, T, hd)
            cos, sin = position_embeddings
            if cos.shape[0] != b:
                cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
            q, _ = self._rope(q, q, gather_rows(cos, rows), gather_rows(sin, rows))
            k, _ = self._rope(k, k, cos, sin)
            k = repeat_kv(k, attn.num_key_value_groups)
            probs = _attention_rows(q, k, rows, attn.scaling, key_valid=valid, causal=True)
            h_q = q.shape[1]
            state.run.scoring_flops += 2.0 * b * (r * d * h_q * hd + t * d * k.shape[1] // attn.num_key_value_groups * hd
                                                 + h_q * r * t * hd)
            return probs

        return entering_rows

    def _rows_fn(self, state, t_now):
        def rows_fn(layer: int, rows: torch.Tensor) -> torch.Tensor:
            cap = state.seq.captures.get(layer)
            if cap is None or "k" not in cap:
                raise RuntimeError(
                    f"decoder layer {layer} attention was not captured; list it in the method's score_layers() "
                    f"(captured: {sorted(state.seq.captures)})"
                )
            attn = self.layers[layer].self_attn
            hd = attn.head_dim
            b, t, _ = cap["k"].shape
            q = cap["q"].view(b, t, -1, hd).transpose(1, 2)  # (B, H, T, hd)
            k = cap["k"].view(b, t, -1, hd).transpose(1, 2)  # (B, Hkv, T, hd)
            cos, sin = cap["cos"], cap["sin"]
            if cos.shape[0] != b:
                cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
            rows = rows.to(q.device)
            qr = gather_rows(q.transpose(1, 2), rows).transpose(1, 2)  # (B, H, R, hd)
            qr, _ = self._rope(qr, qr, gather_rows(cos, rows), gather_rows(sin, rows))
            k, _ = self._rope(k, k, cos, sin)
            k = repeat_kv(k, attn.num_key_value_groups)
            # rows index the captured layer's sequence; causal order and padding as that layer saw them
            probs = _attention_rows(qr, k, rows, attn.scaling, key_valid=cap["valid"], causal=True)
            state.run.scoring_flops += 2.0 * b * qr.shape[1] * rows.shape[1] * t * hd
            return probs

        return rows_fn

    # ------------------------------------------------------------------------------------------------ after the decoder
    def _text_post(self, state):
        def hook(mod, args, kwargs, out):
            call, state.call = state.call, None
            if call is None:
                return None
            state.run.llm.append(cost.LLMCall(batch=call["batch"], q_per_layer=list(call["q"]),
                                              kv_per_layer=list(call["kv"]), lm_head_rows=0))
            if call["mode"] == "continue":
                call["record"].covered += call["q"][0]
                return None
            if call["mode"] != "prefill":
                return None
            seq = state.seq
            run = state.run
            run.visual_per_layer = [v.sum(1).tolist() for (_, _, v) in seq.per_layer]
            run.tokens_per_layer = [v.sum(1).tolist() for (_, v, _) in seq.per_layer]
            last_o, _, last_v = seq.per_layer[-1]
            run.kept_positions = [last_o[b_i][last_v[b_i]].cpu() for b_i in range(last_o.shape[0])]
            run.visual_positions = {}
            for li, (o, _, v) in enumerate(seq.per_layer):
                if li == 0 or o.shape != seq.per_layer[li - 1][0].shape or not torch.equal(v, seq.per_layer[li - 1][2]):
                    run.visual_positions[li] = [o[b_i][v[b_i]].cpu() for b_i in range(o.shape[0])]
            seq.captures.clear()
            cache = _cache_of(out) if hasattr(out, "get") else None
            if cache is None or not (call["changed_pre"] or seq.substitute or self.kv_parts):
                return None
            prefix = list(seq.per_layer)
            delta = call.get("delta", torch.zeros(call["batch"], dtype=torch.long))
            rec = CacheRecord(cache=weakref.ref(cache), prompt_len=call["prompt_len"], covered=call["prompt_len"],
                              prefix=prefix, delta=delta,
                              layer0_pruned=call["changed_pre"], positions=self.positions,
                              layer_delta=list(seq.shifts))
            self._evict(state, rec, cache)
            if rec.layer0_pruned:
                _report_original_length(cache, rec)
            state.records.append(rec)
            return None

        return hook

    def _evict(self, state, rec, cache):
        for p in self.kv_parts:
            ctx = CacheContext(n_layers=len(self.layers), visual=[x[2] for x in rec.prefix],
                               valid=[x[1] for x in rec.prefix], original=[x[0] for x in rec.prefix])
            t0 = time.perf_counter()
            plan = p.evict(ctx)
            state.run.method_seconds += time.perf_counter() - t0
            if not plan:
                continue
            for l, keep in plan.items():
                orig, valid, visual = rec.prefix[l]
                lists = []
                for b_i, kv in enumerate(keep):
                    kv = torch.as_tensor(kv, dtype=torch.long, device=orig.device).reshape(-1)
                    lists.append(kv.unique().sort().values)
                sel = Selection.from_lists(lists, valid, left=True)
                layer = cache.layers[l]
                layer.keys = sel.apply(layer.keys, dim=2)
                layer.values = sel.apply(layer.values, dim=2)
                new_orig = torch.where(sel.idx >= 0, sel.apply(orig), torch.full_like(sel.idx, -1))
                rec.prefix[l] = (new_orig, sel.valid, sel.apply(visual) & sel.valid)
                state.run.evicted[l] = [int(v.sum()) - int(n.sum()) for v, n in zip(valid, sel.valid)]
                if l == 0:
                    rec.layer0_pruned = True

    def _lm_head_hook(self, state):
        def hook(mod, args, out):
            if state.run.llm:
                state.run.llm[-1].lm_head_rows = int(args[0].shape[1])

        return hook


def _runs(sorted_vals: torch.Tensor):
    """(start, end) of each run of equal values in a sorted 1-D tensor."""
    n = sorted_vals.numel()
    if n == 0:
        return []
    change = torch.nonzero(sorted_vals[1:] != sorted_vals[:-1]).squeeze(1) + 1
    bounds = [0] + change.tolist() + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def _cache_of(mapping):
    """The cache from call kwargs or a model output (``cache`` in transformers >= 5.2, ``past_key_values`` before)."""
    cache = mapping.get("cache")
    return mapping.get("past_key_values") if cache is None and "past_key_values" in mapping else cache


def _dropped_before(sel: Selection, valid: torch.Tensor) -> torch.Tensor:
    """(B, K): for each slot of ``sel``, the valid tokens of the (B, T) sequence that ``sel`` drops before it."""
    b, t = valid.shape
    kept = torch.zeros(b, t + 1, dtype=torch.bool, device=valid.device)
    slot = sel.idx >= 0
    kept.scatter_(1, torch.where(slot, sel.idx, t), slot)  # padding slots (-1) write to a spare column t
    before = torch.cumsum((valid & ~kept[:, :t]).long(), 1)
    return sel.apply(before)


def _last_valid(valid: torch.Tensor) -> torch.Tensor:
    t = valid.shape[1]
    ar = torch.arange(t, device=valid.device)[None].expand_as(valid)
    return torch.where(valid, ar, -1).max(1).values


def _real_len(cache, layer: int) -> int:
    """Entries the layer's cache holds now (what the next step attends to besides itself). A sliding-window layer
    reports its cumulative length in get_seq_length, which an eviction does not change, so its tensor is read."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer >= len(layers):
        return 0
    keys = getattr(layers[layer], "keys", None)
    if torch.is_tensor(keys) and keys.dim() >= 3:
        return int(keys.shape[-2])
    return layers[layer].get_seq_length()


def _report_original_length(cache, rec: CacheRecord) -> None:
    """Make ``cache.get_seq_length()`` report the prompt-frame length the cache covers.

    ``generate`` reads it to decide which tokens of a later turn are new; after pruning before the decoder the
    tensors hold fewer entries than the conversation has tokens. Only this cache object is changed.
    """
    real = type(cache).get_seq_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        r = rec
        if layer_idx == 0 and r.cache() is self:
            return r.covered
        return real(self, layer_idx)

    cache.get_seq_length = types.MethodType(get_seq_length, cache)
