"""The runtime of bare vision towers (timm / open_clip ViTs): VISION and PRE_LLM applied to the tower's own output.
The hosts themselves are described in ``vlprune/adapters/vision_towers.py`` (see its docstring for the hook points).

Legend: B batch, S ViT sequence (prefix + N), N patch tokens, D hidden, H heads, K kept, P prefix tokens.
"""
from __future__ import annotations

import sys
import time

import torch

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
from .selection import run_selections

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


class TowerEngine:
    """The runtime of a bare ViT host (VISION and PRE_LLM on the tower's output). Subclasses describe where the tower's
    modules are: ``_blocks``, ``_prefix``, ``_has_cls``, ``_grid``, ``_heads``, ``_width``, ``_start_hooks``,
    ``_output_module``, ``_check_attention``, ``_capture_hook``, ``_key_mask``, ``_with_mask``."""

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
