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

import time

import torch
import torch.nn.functional as F

from ..engine.tower import TowerEngine
from ..ops import cls_logits_from_qk
from .base import register_adapter


# ------------------------------------------------------------------------------------------------------------ timm


@register_adapter
class TimmViTAdapter(TowerEngine):
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
class OpenClipViTAdapter(TowerEngine):
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
