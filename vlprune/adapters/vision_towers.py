"""Seams of bare vision towers: timm's ``VisionTransformer`` and open_clip's ``VisionTransformer``.

A vision tower has two of vlprune's stages: VISION (CLS->patch attention rows of chosen ViT layers, token merging
between ViT layers) and PRE_LLM, which here is applied to the tower's output tokens: ``select`` runs per image on
the patch tokens the tower emits, and the tower then emits the prefix tokens (CLS, registers) followed by the kept
patch tokens in ascending original order (or the method's replacement features), (B, prefix + K, D).
Decoder stages (LLM_LAYER, KV_CACHE, PROJECTOR) have no seam on a tower; ``attach`` refuses methods that use them.

Everything is torch hooks on the tower's own modules; nothing is patched, no attribute is added, and
``vlprune.remove`` takes every hook off again. Neither timm nor open_clip is imported here: the adapters recognise a
tower only when its library is already in ``sys.modules`` and otherwise read the modules by duck typing (written
against timm 1.0.31 and open_clip_torch 3.3.0).

Hook points:
- start (timm ``patch_embed``, open_clip ``conv1``): a pre-hook that opens a new run for stats (a timm forward hook
  on ``patch_embed`` also notes the patch grid of dynamic-size inputs);
- each ViT block: a pre-hook that counts tokens; after a VISION merge, the first later block receives the shorter
  sequence (per-image MergePlans, padded to a common length with a key mask) and the later blocks the mask;
- ViT layers a method scores with: timm, a forward hook on ``attn.qkv`` (the CLS row's logits from the tower's own
  q/k; ``q_norm``/``k_norm`` applied when present); open_clip, a pre-hook on ``attn`` that projects the CLS query
  and the keys from ``in_proj_weight`` (the fused projection runs inside the attention kernel, so k is recomputed);
- output (timm: forward hook on ``model.norm``; open_clip: on ``ln_post`` where it norms the whole sequence, else on
  ``model.transformer``): PRE_LLM selection per image.

Batches whose images keep different counts (only a VISION merge makes them differ; every budgeted method keeps the
same K per image) are right-padded with zero rows; ``vlprune.stats(tower)["reports"]["tower_output"]`` then holds
the (B, prefix + K_max) validity mask and the token count of each image. Consumers that pool over tokens (timm's
``global_pool="avg"``) must use that mask.

Legend: B batch, S ViT sequence (prefix + N), N patch tokens, D hidden, H heads, K kept, P prefix tokens.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from .. import cost
from ..methods.base import (
    TOKEN_PATCH,
    Compose,
    HostInfo,
    ImageLayout,
    ImageTokens,
    Partition,
    Stage,
)
from ..ops import MergePlan, cls_logits_from_qk, merge_batch
from .base import register_adapter, run_selections

DECODER_STAGES = (Stage.LLM_LAYER, Stage.KV_CACHE, Stage.PROJECTOR)
_PROBE_DEPTH = 32  # a nominal decoder depth, only to ask a method whether it would act inside a decoder
_SWITCH_HINT = ("or switch those stages off where the method offers it (e.g. todre stage2=False; mustdrop "
                "prefill=False, decode=False)")


def _parts(method) -> list:
    return list(method.methods) if isinstance(method, Compose) else [method]


def decoder_stages_used(part) -> list[Stage]:
    """The decoder stages a (flat) method would act in. LLM_LAYER counts only when the method names decoder layers
    (a method such as ToDRE declares it but may have that stage switched off)."""
    used = []
    for st in part.stages:
        if st == Stage.LLM_LAYER:
            try:
                layers = (list(part.prune_layers(_PROBE_DEPTH)) + list(part.score_layers(_PROBE_DEPTH))
                          + list(part.observe_layers(_PROBE_DEPTH)))
            except Exception:  # noqa: BLE001 - a method that cannot even answer is treated as using the stage
                layers = [None]
            if layers:
                used.append(st)
        elif st in DECODER_STAGES:
            used.append(st)
    return used


class _TowerAdapter:
    """Plumbing shared by the two towers. Subclasses describe where the tower's modules are."""

    supported = ""
    host = ""
    module = ""  # where the library defines its VisionTransformer; matched only once the library is imported

    @classmethod
    def matches(cls, model) -> bool:
        mod = sys.modules.get(cls.module)
        return mod is not None and isinstance(model, mod.VisionTransformer)

    # -------------------------------------------------------------------------------------------- tower facts
    def __init__(self, model):
        self.model = model
        self.blocks = self._blocks()
        self.prefix = self._prefix()  # P: CLS (and register / distillation) tokens before the patches
        self.has_cls = self._has_cls()  # the CLS token is sequence index 0
        self.grid_default = self._grid()
        self.nv = len(self.blocks)
        self.feature_layer = self.nv - 1  # the tower's output is the last block's (then its final norm)
        self.heads = self._heads()
        self.width = self._width()
        self.info = HostInfo(n_layers=0, n_vision_layers=self.nv, vision_feature_layer=self.feature_layer,
                             n_heads=self.heads, n_kv_heads=self.heads, hidden_size=self.width, anyres=False)

    def _blocks(self):  # pragma: no cover - abstract
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- layouts
    def layouts(self, n_images: int, image_sizes=None, grid=None) -> list[ImageLayout]:
        """One square-or-rectangular patch grid per image: the N = h*w patch tokens (prefix tokens are not part of
        the layout; they are always emitted). vit_index = P + p (the token's place in the ViT sequence)."""
        h, w = grid or self.grid_default
        n = h * w
        kind = torch.full((n,), TOKEN_PATCH)
        lay = ImageLayout(kind=kind, crop=torch.zeros_like(kind), vit_index=torch.arange(n) + self.prefix,
                          partitions=[Partition("image", torch.arange(n), (h, w))], n_crops=1)
        return [lay] * n_images

    # -------------------------------------------------------------------------------------------- attach
    def attach(self, state) -> None:
        method = state.method
        parts = _parts(method)
        label = getattr(method, "name", "") or type(method).__name__
        if label == "compose":
            label = " + ".join(p.name for p in parts)
        for p in parts:
            used = decoder_stages_used(p)
            if used:
                stages = ", ".join(s.value for s in used)
                via = "" if p.name == label else f" (its part {p.name!r})"
                raise ValueError(
                    f"{label}: stage {stages}{via} needs the language-model side of a VLM (projector, decoder layers, "
                    f"KV cache), which a bare vision tower ({self.host} {type(self.model).__name__}) does not have; on "
                    f"a tower only the vision and pre_llm stages run. Fix: apply {label!r} to a LLaVA host (transformers LlavaForConditionalGeneration / "
                    f"LlavaNextForConditionalGeneration), use a vision/pre-LLM method (e.g. random, pool, cls_attn, "
                    f"hired, globalcom2), {_SWITCH_HINT}"
                )
        # checks of the parts, with the tower's facts (a composite's own check may ask for a decoder depth)
        for p in parts:
            p.check(self.info)
        nv = self.nv
        self.vit_layers = sorted({(l + nv) % nv for l in method.vision_layers(nv, self.feature_layer)})
        self.merge_at = method.merge_layer(nv)
        self.pre_parts = [p for p in parts if Stage.PRE_LLM in p.stages]
        if (self.vit_layers or self.merge_at is not None) and not self.has_cls:
            raise ValueError(
                f"{label}: its vision stage reads the CLS token (attention rows or merging with CLS first), but this "
                f"{type(self.model).__name__} has no class token; use a select-only method such as 'random' or 'pool'"
            )
        for l in self.vit_layers:
            self._check_attention(l, label)
        if self.merge_at is not None and not 0 <= self.merge_at < nv - 1:
            raise ValueError(f"{label}: ViT merge after layer {self.merge_at} is outside 0..{nv - 2} for this "
                             f"{nv}-layer vision tower")

        h = state.handles
        h.extend(self._start_hooks(state))
        if self.merge_at is not None:
            # registered before the token-count hooks, so that those see the merged length
            for i in range(self.merge_at + 1, nv):
                h.append(self.blocks[i].register_forward_pre_hook(self._merge_pre(state, i), with_kwargs=True))
        for blk in self.blocks:
            h.append(blk.register_forward_pre_hook(self._count_pre(state)))
        for l in self.vit_layers:
            h.append(self._capture_hook(state, l))
        h.append(self._output_module().register_forward_hook(self._output_hook(state)))

    # -------------------------------------------------------------------------------------------- per call
    def _new_call(self, state, batch: int) -> None:
        state.new_run()
        state.vision_logits = {}
        state.vit_merge = None
        state.pending = {"grid": self.grid_default}
        state.run.vision.append(cost.VisionCall(batch=batch, tokens_per_layer=[]))

    def _grid_of(self, state):
        pend = state.pending or {}
        return pend.get("grid", self.grid_default)

    def _count_pre(self, state):
        def hook(mod, args):
            if state.run.vision and args:
                state.run.vision[-1].tokens_per_layer.append(int(args[0].shape[self._seq_dim()]))

        return hook

    def _seq_dim(self) -> int:
        return 1

    def _merge_pre(self, state, i):
        """ViT block i > merge layer: the first one shortens each image's sequence by the method's MergePlan (padded
        to a common length with a key mask); later ones receive that mask."""
        first = i == self.merge_at + 1
        sd = self._seq_dim()

        def hook(mod, args, kwargs):
            if not first:
                vm = state.vit_merge
                if vm is None or vm["mask"] is None:
                    return None
                return self._with_mask(mod, args, kwargs, vm["mask"])
            x = args[0]
            xb = x if sd == 1 else x.transpose(0, 1)  # (B, S, D)
            t0 = time.perf_counter()
            grid = self._grid_of(state)
            plans = [self._plan(state.method, xb[b], grid) for b in range(xb.shape[0])]
            if all(p is None or p.n_new == xb.shape[1] for p in plans):
                state.run.method_seconds += time.perf_counter() - t0
                return None
            s = xb.shape[1]
            out, valid, plans = merge_batch(xb, plans)
            n_new = out.shape[1]
            mask = None if bool(valid.all()) else self._key_mask(valid, xb.dtype)
            state.vit_merge = {"plans": plans, "assign": torch.stack([p.assign for p in plans]).to(x.device),
                               "valid": valid, "mask": mask, "length": s, "merged_length": n_new}
            state.run.method_seconds += time.perf_counter() - t0
            new_x = out if sd == 1 else out.transpose(0, 1)
            if mask is None:
                return (new_x,) + tuple(args[1:]), kwargs
            return self._with_mask(mod, (new_x,) + tuple(args[1:]), kwargs, mask)

        return hook

    def _plan(self, method, x: torch.Tensor, grid) -> MergePlan | None:
        """The method's MergePlan for one image's sequence x (S, D). Methods see CLS first then the patch grid; other
        prefix tokens (registers) are taken out and put back as slots of their own right after CLS."""
        p = self.prefix
        if not method.merges(x.shape[0] - p):  # a budget that covers the image's tokens: no merge
            return None
        if p == 1:
            return method.merge(x, grid)
        sub = torch.cat([x[:1], x[p:]], 0)
        plan = method.merge(sub, grid)
        if plan is None:
            return None
        extra = torch.arange(1, p)
        return MergePlan(assign=torch.cat([plan.assign[:1], extra, plan.assign[1:] + (p - 1)]),
                         rep=torch.cat([plan.rep[:1], extra, plan.rep[1:] + (p - 1)]),
                         score=torch.cat([plan.score[:1], torch.full((p - 1,), float("nan")), plan.score[1:]]))

    def _capture_logits(self, state, layer: int, logits: torch.Tensor, flops: float, t0: float) -> None:
        state.vision_logits[layer] = logits.detach()  # (B, H, S_l) float32
        state.run.scoring_flops += flops
        state.run.method_seconds += time.perf_counter() - t0

    # -------------------------------------------------------------------------------------------- output
    def _output_hook(self, state):
        def hook(mod, args, out):
            t0 = time.perf_counter()
            try:
                return self._select_output(state, out)
            finally:
                state.run.method_seconds += time.perf_counter() - t0

        return hook

    def _select_output(self, state, x: torch.Tensor):
        """x: (B, S_l, D) the tower's final token sequence (merged and padded after a VISION merge)."""
        if x.dim() != 3:
            raise ValueError(f"vlprune: expected the tower's tokens as (B, S, D); got shape {tuple(x.shape)}")
        p = self.prefix
        h, w = self._grid_of(state)
        n = h * w
        s = p + n
        vm = state.vit_merge
        b_all = x.shape[0]
        if vm is None and x.shape[1] != s:
            raise ValueError(
                f"vlprune: the tower emitted {x.shape[1]} tokens but its layout has {s} (prefix {p} + a {h}x{w} patch "
                f"grid); patch dropout in training mode or an input size that does not match the grid changes it"
            )
        layout = self.layouts(1, grid=(h, w))[0]
        state.run.images = []
        rows, changed = [], vm is not None
        for b in range(b_all):
            full = x[b] if vm is None else x[b, vm["assign"][b].to(x.device)]  # (S, D): merged token in members' places
            img = self._image_tokens(state, full[p:], layout, b)
            sel_keep = torch.arange(n)
            merged = None
            cur = img
            if vm is not None:
                sel_keep, merged = self._dedup(vm["plans"][b], n)
                cur = img.subset(sel_keep)
            info = {}
            sel_keep, feats, merged, prot = run_selections(self.pre_parts, cur, sel_keep, n, merged, info)
            state.run.scoring_flops += info.get("flops", 0.0)
            changed |= sel_keep.numel() < n or feats is not None
            patch_rows = full[p + sel_keep.to(x.device)] if feats is None else feats.to(device=x.device, dtype=x.dtype)
            rows.append(torch.cat([full[:p], patch_rows], 0))  # (P + K, D)
            state.run.images.append(
                {"sample": b, "visual_tokens": n, "kept": int(sel_keep.numel()), "kept_indices": sel_keep,
                 "merged_into": merged, "protected": prot,
                 "partitions": layout.partition_counts(),
                 "kept_per_partition": None if merged is not None else layout.partition_counts(sel_keep),
                 "output_tokens": p + int(sel_keep.numel())}
            )
        if not changed:
            return None
        lengths = [r.shape[0] for r in rows]
        longest = max(lengths)
        out = x.new_zeros(b_all, longest, x.shape[2])
        mask = torch.zeros(b_all, longest, dtype=torch.bool, device=x.device)
        for b, r in enumerate(rows):
            out[b, : r.shape[0]] = r
            mask[b, : r.shape[0]] = True
        state.run.reports["tower_output"] = {"tokens": lengths, "mask": mask, "padded": len(set(lengths)) > 1}
        if len(set(lengths)) > 1:
            state.run.notes.append(
                f"images kept different token counts {lengths}; the output is right-padded with zero rows to "
                f"{longest} (mask in stats['reports']['tower_output']['mask'])"
            )
        return out

    def _image_tokens(self, state, feats: torch.Tensor, layout: ImageLayout, b: int) -> ImageTokens:
        nv = self.nv

        def vision(layer, b=b):
            l0 = (layer + nv) % nv
            if l0 not in state.vision_logits:
                raise RuntimeError(
                    f"ViT layer {layer} attention was not captured; captured: {sorted(state.vision_logits)}. "
                    f"List it in the method's vision_layers()."
                )
            return state.vision_logits[l0][b: b + 1]  # (1, H, S_l)

        def vision_merge(layer, b=b):
            vm = state.vit_merge
            l0 = (layer + nv) % nv
            if vm is None or l0 <= self.merge_at:
                return None
            return vm["assign"][b: b + 1], vm["valid"][b: b + 1]

        merge_score = None
        vm = state.vit_merge
        if vm is not None:
            plan = vm["plans"][b]
            slot = plan.assign.cpu()[layout.vit_index]
            merge_score = plan.score.cpu()[slot].float()
        return ImageTokens(features=feats, layout=layout, sample=b, index=b, n_vision_layers=nv,
                           feature_layer=self.feature_layer, _vision=vision if state.vision_logits else None,
                           _vision_merge=vision_merge, merge_score=merge_score)

    def _dedup(self, plan: MergePlan, n: int):
        """One patch token per merged group, its representative (the group's last member in raster order, the
        plan's ``rep``). Returns (kept patch indices (K,) ascending, merged_into (N,) patch index of each token's
        representative or -1 for tokens that represent themselves)."""
        p = self.prefix
        assign = plan.assign.cpu()
        rep = plan.rep.cpu()
        reps = rep[rep >= p] - p  # (K,) ascending: slots follow their representatives' raster order
        rep_of = rep[assign[p: p + n]] - p  # (N,) each patch's representative
        merged_into = torch.where(rep_of == torch.arange(n), torch.full_like(rep_of, -1), rep_of)
        return reps.sort().values, merged_into

    # -------------------------------------------------------------------------------------------- host specifics
    def _start_hooks(self, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def _output_module(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_attention(self, layer: int, label: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _capture_hook(self, state, layer: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _key_mask(self, valid: torch.Tensor, dtype) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _with_mask(self, mod, args, kwargs, mask):  # pragma: no cover - abstract
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------------ timm


@register_adapter
class TimmViTAdapter(_TowerAdapter):
    """timm ``timm.models.vision_transformer.VisionTransformer`` (and subclasses): ``blocks`` of ``Block`` whose
    ``attn`` has a fused ``qkv`` Linear, ``num_heads``, ``head_dim``, ``scale``, optional ``q_norm``/``k_norm``."""

    supported = "timm VisionTransformer"
    host = "timm"

    module = "timm.models.vision_transformer"

    def _blocks(self):
        return list(self.model.blocks)

    def _prefix(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    def _has_cls(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    def _grid(self):
        g = self.model.patch_embed.grid_size
        return int(g[0]), int(g[1])

    def _heads(self) -> int:
        return int(getattr(self.blocks[0].attn, "num_heads", 0) or 0)

    def _width(self) -> int:
        return int(getattr(self.model, "embed_dim", 0) or getattr(self.model, "num_features", 0))

    def _start_hooks(self, state):
        pe = self.model.patch_embed

        def pre(mod, args):
            x = args[0] if args else None
            self._new_call(state, int(x.shape[0]) if torch.is_tensor(x) else 0)

        def post(mod, args, out):
            if torch.is_tensor(out) and out.dim() == 4:  # dynamic image size: (B, h, w, D)
                state.pending["grid"] = (int(out.shape[1]), int(out.shape[2]))

        return [pe.register_forward_pre_hook(pre), pe.register_forward_hook(post)]

    def _output_module(self):
        return self.model.norm  # forward_features' last step (an Identity when the model norms after pooling)

    def _check_attention(self, layer: int, label: str) -> None:
        attn = getattr(self.blocks[layer], "attn", None)
        qkv = getattr(attn, "qkv", None)
        if not isinstance(qkv, torch.nn.Linear) or not getattr(attn, "num_heads", None):
            raise ValueError(
                f"{label}: ViT layer {layer} ({type(self.blocks[layer]).__name__}) has no attention with a fused qkv "
                f"Linear and num_heads; vlprune reads CLS attention from timm's Block/Attention only"
            )

    def _capture_hook(self, state, layer: int):
        attn = self.blocks[layer].attn
        heads = int(attn.num_heads)
        a = getattr(attn, "attn_dim", None) or attn.qkv.out_features // 3
        hd = getattr(attn, "head_dim", None) or a // heads
        scale = getattr(attn, "scale", None) or hd**-0.5
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        q_norm = None if q_norm is None or isinstance(q_norm, torch.nn.Identity) else q_norm
        k_norm = None if k_norm is None or isinstance(k_norm, torch.nn.Identity) else k_norm

        def hook(mod, args, out):
            t0 = time.perf_counter()
            b, s, _ = out.shape
            q = out[:, :1, :a]  # (B, 1, H*hd): the CLS row only
            k = out[:, :, a: 2 * a]  # (B, S, H*hd)
            if q_norm is not None:  # per-head norms over head_dim, as the attention applies them
                q = q_norm(q.reshape(b, 1, heads, hd)).reshape(b, 1, a)
            if k_norm is not None:
                k = k_norm(k.reshape(b, s, heads, hd)).reshape(b, s, a)
            logits = cls_logits_from_qk(q, k, heads, scale)  # (B, H, S)
            self._capture_logits(state, layer, logits, 2.0 * b * s * a, t0)

        return attn.qkv.register_forward_hook(hook)

    def _key_mask(self, valid, dtype):
        b, s = valid.shape  # additive (B, 1, S, S): SDPA and timm's eager path both add it
        mask = torch.zeros(b, 1, s, s, dtype=dtype, device=valid.device)
        return mask.masked_fill(~valid[:, None, None, :], torch.finfo(dtype).min)

    def _with_mask(self, mod, args, kwargs, mask):
        if len(args) > 1:
            raise ValueError("vlprune: a timm block called with a positional attn_mask cannot take the merge mask")
        kwargs = dict(kwargs)
        if kwargs.get("attn_mask") is not None:
            raise ValueError("vlprune: the tower was called with its own attn_mask; a ViT merge cannot combine with it")
        kwargs["attn_mask"] = mask
        return tuple(args), kwargs


# ------------------------------------------------------------------------------------------------------------ open_clip


@register_adapter
class OpenClipViTAdapter(_TowerAdapter):
    """open_clip ``open_clip.transformer.VisionTransformer``: ``transformer.resblocks`` whose ``attn`` is a
    ``torch.nn.MultiheadAttention`` (``in_proj_weight``/``in_proj_bias``) or open_clip's own ``Attention``
    (qk-norm and scaled-cosine variants included). Output tokens reach the caller with ``output_tokens=True``
    (``pooled, tokens = tower(x)``); the pooled CLS feature is unchanged by a PRE_LLM selection."""

    supported = "open_clip VisionTransformer"
    host = "open_clip"

    module = "open_clip.transformer"

    def _blocks(self):
        return list(self.model.transformer.resblocks)

    def _prefix(self) -> int:
        return 1

    def _has_cls(self) -> bool:
        return getattr(self.model, "class_embedding", None) is not None

    def _grid(self):
        g = self.model.grid_size
        return int(g[0]), int(g[1])

    def _heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)

    def _width(self) -> int:
        return int(self.model.transformer.width)

    def _seq_dim(self) -> int:
        return 1 if getattr(self.model.transformer, "batch_first", True) else 0

    def _start_hooks(self, state):
        def pre(mod, args):
            x = args[0] if args else None
            self._new_call(state, int(x.shape[0]) if torch.is_tensor(x) else 0)

        return [self.model.conv1.register_forward_pre_hook(pre)]

    def _output_module(self):
        """``ln_post`` where it norms the whole sequence (the default, and the attention-pooler variant that norms
        first), so that replacement features (pooling, merging) are averages of the emitted, normed tokens as on
        timm; otherwise (``final_ln_after_pool``, or CoCa's pooler that norms its queries) the transformer stack's
        output, batch first whatever the blocks use."""
        m = self.model
        attn_pool = getattr(m, "attn_pool", None)
        full_seq_norm = (attn_pool is None and not getattr(m, "final_ln_after_pool", False)) or (
            attn_pool is not None and getattr(m, "attn_pool_contrastive", None) is not None)
        return m.ln_post if full_seq_norm else m.transformer

    def _check_attention(self, layer: int, label: str) -> None:
        attn = self.blocks[layer].attn
        if getattr(attn, "in_proj_weight", None) is None or not getattr(attn, "num_heads", None):
            raise ValueError(
                f"{label}: ViT layer {layer} attention ({type(attn).__name__}) has no fused in_proj_weight; vlprune "
                f"reads CLS attention from nn.MultiheadAttention or open_clip's Attention only"
            )

    def _capture_hook(self, state, layer: int):
        attn = self.blocks[layer].attn
        heads = int(attn.num_heads)
        mha = isinstance(attn, torch.nn.MultiheadAttention)
        batch_first = bool(getattr(attn, "batch_first", True)) if mha else True

        def hook(mod, args, kwargs):
            t0 = time.perf_counter()
            x = args[0] if args else kwargs.get("query", kwargs.get("x"))
            if not batch_first:
                x = x.transpose(0, 1)  # (B, S, D)
            w, bias = mod.in_proj_weight, mod.in_proj_bias
            a = w.shape[0] // 3
            hd = a // heads
            wq, wk = w[:a], w[a: 2 * a]
            bq = None if bias is None else bias[:a]
            bk = None if bias is None else bias[a: 2 * a]
            q = F.linear(x[:, :1], wq, bq)  # (B, 1, H*hd): the CLS row only
            k = F.linear(x, wk, bk)  # (B, S, H*hd): recomputed, the fused projection is inside the kernel
            b, s, d = x.shape
            logit_scale = None if mha else getattr(mod, "logit_scale", None)
            if logit_scale is not None:
                # scaled cosine attention: unit q and k per head, a learned scale per head. Untested: open_clip
                # 3.3.0's own scaled-cosine forward fails (torch.bmm on 4-D q/k), so no tower of that kind runs
                q = F.normalize(q.reshape(b, 1, heads, hd), dim=-1).reshape(b, 1, a)
                k = F.normalize(k.reshape(b, s, heads, hd), dim=-1).reshape(b, s, a)
                logits = cls_logits_from_qk(q, k, heads, 1.0)
                scale = torch.clamp(logit_scale, max=mod.logit_scale_max).exp().reshape(1, heads, 1)
                logits = logits * scale.float()
            else:
                if not mha:
                    ln_q, ln_k = getattr(mod, "ln_q", None), getattr(mod, "ln_k", None)
                    if ln_q is not None and not isinstance(ln_q, torch.nn.Identity):
                        q = ln_q(q.reshape(b, 1, heads, hd)).reshape(b, 1, a)
                    if ln_k is not None and not isinstance(ln_k, torch.nn.Identity):
                        k = ln_k(k.reshape(b, s, heads, hd)).reshape(b, s, a)
                scale = getattr(mod, "scale", None) if not mha else None
                logits = cls_logits_from_qk(q, k, heads, scale or hd**-0.5)  # (B, H, S)
            self._capture_logits(state, layer, logits, 2.0 * b * (s * d * a + d * a + s * a), t0)
            return None

        return attn.register_forward_pre_hook(hook, with_kwargs=True)

    def _key_mask(self, valid, dtype):
        # additive (B*H, S, S): nn.MultiheadAttention's per-head 3-D mask; open_clip's Attention reshapes it
        b, s = valid.shape
        heads = self.heads
        mask = torch.zeros(b, 1, s, s, dtype=dtype, device=valid.device)
        mask = mask.masked_fill(~valid[:, None, None, :], torch.finfo(dtype).min)
        return mask.expand(b, heads, s, s).reshape(b * heads, s, s)

    def _with_mask(self, mod, args, kwargs, mask):
        if len(args) > 1:
            raise ValueError("vlprune: open_clip blocks called with positional arguments (gradient checkpointing) "
                             "cannot take the merge mask; turn grad checkpointing off while a merge is applied")
        kwargs = dict(kwargs)
        if kwargs.get("attn_mask") is not None:
            raise ValueError("vlprune: the tower was called with its own attn_mask; a ViT merge cannot combine with it")
        kwargs["attn_mask"] = mask
        return tuple(args), kwargs
