"""Stage 0 of the proxy recipe: the vision tower alone, on crops, as the stand-in for CLIP pre-training.

A ViT trained from scratch on whole 336 px scenes learns colour within a hundred steps but, on a 2-core CPU
budget, never learns shape or digits: both need context from neighbouring patches, and the joint stage sees too
few images for that. Stage 0 makes each image cheaper and each step more informative:

- **Crops.** ``crop_batch`` cuts patch-aligned windows of ``side`` x ``side`` patches (default 6: 36 tokens
  against 576) around the scene's sign and objects, so that nearly every crop holds a whole object or the whole
  sign. ``crop_tokens`` runs the tower on them with the position embeddings of the patches' places in the full
  336 px grid, so the tower meets the same positions it sees on whole scenes later.
- **Mimetic attention init** (``mimetic_init``, after Trockman & Kolter, "Mimetic Initialization of
  Self-Attention Layers", 2023): per head, ``W_q^T W_k`` starts near a multiple of the identity and
  ``W_v^T W_o^T`` near a negative multiple of it, the structure the attention of pre-trained ViTs shows; with
  sin-cos positions, tokens then attend to their neighbours from the first step.
- **A CNN teacher** (``PatchCNN``, optional, ``teacher_steps``): a small convolutional net over the same patch
  grid learns the patch classes several times faster than the ViT; the tower then also regresses the teacher's
  normalised features (feature distillation), a dense target richer than class labels.

Losses on the tower: cross-entropy of each patch's class (``scenes.patch_labels``: background, object kind,
digit, sign plate) from the feature layer LLaVA reads (``vision_feature_layer``), background weighted 0.2;
object kinds present in the crop from the final CLS token (so CLS-based pruning methods find a meaningful CLS
attention); and, with a teacher, the feature regression.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .model import vision_body
from .scenes import COMBOS, N_PATCH_CLASSES, make_scene, patch_labels, render

__all__ = ["crop_scene", "crop_batch", "crop_tokens", "mimetic_init", "PatchCNN", "train_teacher", "train_vision"]

GRID, PATCH = 24, 14


def _normalise(img, mean, std) -> np.ndarray:
    return ((np.asarray(img, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)


def _window(lo_px: float, hi_px: float, side: int, rng) -> int:
    """First patch index of a ``side``-patch window that holds [lo_px, hi_px) when one can, drawn at random among
    those; a box wider than the window gets a window inside it."""
    lo = max(0, int(math.ceil(hi_px / PATCH)) - side)
    hi = min(GRID - side, int(lo_px // PATCH))
    if hi < lo:
        lo, hi = hi, lo
    return int(np.clip(rng.integers(lo, hi + 1), 0, GRID - side))


def crop_scene(scene, rng: np.random.Generator, side: int = 6, per_scene: int = 4, mean=None, std=None) -> list:
    """Up to ``per_scene`` crops of ``scene`` (its sign first, then its objects), each a patch-aligned window of
    ``side`` x ``side`` patches drawn at random among those that hold the item whole (one crop, the whole scene,
    when ``side`` is 24): a list of
    ``(pixels (3, 14 side, 14 side), labels (side^2,), positions (side^2,))``, pixels normalised with
    ``mean``/``std`` (CLIP's by default), positions row-major indices into the 24 x 24 grid."""
    from .model import CLIP_MEAN, CLIP_STD

    if not 1 <= side <= GRID:
        raise ValueError(f"side {side} is outside 1..{GRID}; crops are square windows of the 24 x 24 patch grid")
    if (scene.width, scene.height) != (GRID * PATCH, GRID * PATCH):
        raise ValueError(f"scene is {scene.width}x{scene.height}; crops are cut from 336x336 (LLaVA-1.5) scenes")
    mean = np.asarray(CLIP_MEAN if mean is None else mean, np.float32)
    std = np.asarray(CLIP_STD if std is None else std, np.float32)
    img, lab = _normalise(render(scene), mean, std), patch_labels(scene)
    items = ([scene.sign] if scene.sign is not None else []) + list(scene.objects)
    out = []
    for item in items[:per_scene if side < GRID else 1]:
        x0, y0, x1, y1 = item.box
        r0, c0 = _window(y0, y1, side, rng), _window(x0, x1, side, rng)
        out.append((img[:, r0 * PATCH:(r0 + side) * PATCH, c0 * PATCH:(c0 + side) * PATCH],
                    lab[r0:r0 + side, c0:c0 + side].reshape(-1),
                    (np.arange(r0, r0 + side)[:, None] * GRID + np.arange(c0, c0 + side)[None]).reshape(-1)))
    return out


def crop_batch(batch_size: int, seed: int, step: int, side: int = 6, per_scene: int = 4) -> dict:
    """``batch_size`` crops (``crop_scene``) of train-split scenes, a pure function of (seed, step).

    Returns ``pixel_values`` (n, 3, 14 side, 14 side), ``patch_labels`` (n, side^2), ``positions`` (n, side^2)
    and ``present`` (n, 30): the object kinds with a patch in the crop."""
    rng = np.random.default_rng([int(seed), int(step), 17])
    crops: list = []
    while len(crops) < batch_size:
        sseed = int(rng.integers(0, 100_000_000))                  # the train split's seed range
        scene = make_scene(sseed, "llava", need_sign=bool(rng.random() < 0.5), need_small=bool(rng.random() < 0.5))
        crops += crop_scene(scene, rng, side, per_scene)
    px, labels, positions = (np.stack(a) for a in zip(*crops[:batch_size]))
    present = (labels[:, :, None] == np.arange(1, len(COMBOS) + 1)[None, None]).any(1).astype(np.float32)
    return dict(pixel_values=torch.from_numpy(px), patch_labels=torch.from_numpy(labels),
                positions=torch.from_numpy(positions), present=torch.from_numpy(present))


def crop_tokens(tower, pixel_values: torch.Tensor, positions: torch.Tensor, layers: int | None = None) -> list:
    """Hidden states of a ``CLIPVisionModel`` run on crops: ``[embeddings, layer 1, ..., layer layers]`` (CLS
    first in each), the patch tokens carrying the position embeddings of ``positions`` (indices into the full
    grid). Equal to the tower's own forward when the crop is the whole image and ``positions`` is 0..575."""
    vm = vision_body(tower)
    emb = vm.embeddings
    table = emb.position_embedding.weight
    if positions.shape[-1] != pixel_values.shape[-1] // PATCH * (pixel_values.shape[-2] // PATCH):
        raise ValueError(f"positions {tuple(positions.shape)} do not match the crops' patch grid "
                         f"{tuple(pixel_values.shape[-2:])} / {PATCH}")
    patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
    cls = (emb.class_embedding + table[0]).expand(patches.shape[0], 1, -1)
    x = vm.pre_layrnorm(torch.cat([cls, patches + table[1 + positions]], 1))
    out = [x]
    n = len(vm.encoder.layers) if layers is None else layers
    for layer in vm.encoder.layers[:n]:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
        out.append(x)
    return out


def mimetic_init(tower, seed: int = 0, qk: float = 0.7, vo: float = 0.4, noise: float = 0.7) -> None:
    """Set each attention layer of a CLIP tower so that, per head, ``W_q^T W_k ~ qk I + noise Z`` and, per
    layer, ``W_v^T W_o^T ~ vo Z - vo I`` (``Z`` Gaussian with variance 1/width), by rank-limited SVD factors.
    Biases are left as they are."""
    g = torch.Generator().manual_seed(seed)
    for layer in vision_body(tower).encoder.layers:
        at = layer.self_attn
        d = at.q_proj.weight.shape[1]
        heads = at.num_heads
        hd = at.q_proj.weight.shape[0] // heads
        eye = torch.eye(d)
        with torch.no_grad():
            for h in range(heads):
                m = qk * eye + noise * torch.randn(d, d, generator=g) / math.sqrt(d)
                u, s, vt = torch.linalg.svd(m)
                rows = slice(h * hd, (h + 1) * hd)
                at.q_proj.weight[rows] = (u[:, :hd] * s[:hd].sqrt()).T.to(at.q_proj.weight.dtype)
                at.k_proj.weight[rows] = (s[:hd].sqrt()[:, None] * vt[:hd]).to(at.k_proj.weight.dtype)
            m = vo * torch.randn(d, d, generator=g) / math.sqrt(d) - vo * eye
            u, s, vt = torch.linalg.svd(m)
            at.v_proj.weight[:] = (u * s.sqrt()).T.to(at.v_proj.weight.dtype)
            at.out_proj.weight[:] = (vt.T * s.sqrt()).to(at.out_proj.weight.dtype)


class PatchCNN(torch.nn.Module):
    """Teacher: the ViT's patch embedding (conv 14/14) followed by ``depth`` GELU + 3x3 convolutions over the
    patch grid, one residual around them; (n, 3, H, W) -> (n, patches, width)."""

    def __init__(self, width: int = 192, depth: int = 4):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, width, PATCH, PATCH)
        self.body = torch.nn.Sequential(*[m for _ in range(depth)
                                          for m in (torch.nn.GELU(), torch.nn.Conv2d(width, width, 3, padding=1))])
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, N_PATCH_CLASSES))

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        x = self.embed(px)
        return (x + self.body(x)).flatten(2).transpose(1, 2)


def _class_weight(device) -> torch.Tensor:
    w = torch.ones(N_PATCH_CLASSES, device=device)
    w[0] = 0.2
    return w


def train_teacher(steps: int, batch_size: int, seed: int, device: torch.device, side: int = 6, lr: float = 2e-3,
                  log=None) -> PatchCNN:
    """Fit a :class:`PatchCNN` to the patch classes of ``steps`` crop batches (drawn apart from the tower's)."""
    from .train import _due, lr_at

    torch.manual_seed(seed)
    net = PatchCNN().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    weight = _class_weight(device)
    window = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        b = crop_batch(batch_size, seed + 1_000_003, step, side)
        logits = net.head(net(b["pixel_values"].to(device)))
        loss = F.cross_entropy(logits.flatten(0, 1), b["patch_labels"].to(device).flatten(), weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if log is not None and _due(step, steps, 50):
            log(json.dumps(dict(stage="teacher", step=step + 1, patch=round(float(np.mean(window)), 4))))
            window = []
    net.eval().requires_grad_(False)
    return net


def train_vision(model, processor, heads, steps: int, batch_size: int, lr: float, seed: int, device: torch.device,
                 log, eval_every: int = 0, sides=(6,), teacher: PatchCNN | None = None,
                 distill_weight: float = 1.0) -> list[dict]:
    """Stage 0 on crops (see module docstring) for a LLaVA proxy ``model``; ``heads`` are the auxiliary heads of
    ``train.AuxHeads`` (patch classes, kinds present). Every ``eval_every`` steps the patch head is scored on the
    tokens of 32 whole validation scenes (``probe._scores``): the figures the stage is for.

    ``sides``: crop sides in patches, taken in turn step by step; a step of side ``s`` holds
    ``batch_size * sides[0]^2 // s^2`` crops (at least one), about the same number of tokens. Crops alone leave the
    tower attending over 36 tokens; whole scenes (side 24) in the cycle teach it the 576-token context it meets in
    LLaVA."""
    from .probe import _scores, patch_targets, scene_batch, tower_features
    from .train import _due, lr_at

    torch.manual_seed(seed)
    model.to(device).train()
    heads.to(device).train()
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    feat_layer = model.config.vision_feature_layer
    n_layers = len(vision_body(tower).encoder.layers)
    proj = torch.nn.Linear(width, width).to(device) if teacher is not None else None
    params = list(tower.parameters()) + list(heads.parameters()) + (list(proj.parameters()) if proj else [])
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    weight = _class_weight(device)
    post_ln = vision_body(tower).post_layernorm
    val_scenes = scene_batch("validation", 0, 32)
    val_lab = patch_targets(val_scenes).flatten()
    val_features = tower_features(model, processor, batch_size=32)
    sides = [sides] if isinstance(sides, int) else list(sides)
    history, window, t0 = [], [], time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        side = sides[step % len(sides)]
        n = max(1, batch_size * sides[0] ** 2 // side ** 2)
        b = {k: v.to(device) for k, v in crop_batch(n, seed, step, side).items()}
        hs = crop_tokens(tower, b["pixel_values"], b["positions"], n_layers)
        feat = hs[feat_layer][:, 1:]
        lp = F.cross_entropy(heads.patch(feat).flatten(0, 1).float(), b["patch_labels"].flatten(), weight=weight)
        lpres = F.binary_cross_entropy_with_logits(heads.present(post_ln(hs[-1][:, 0])).float(), b["present"])
        loss = lp + lpres
        parts = dict(patch=float(lp.detach()), present=float(lpres.detach()))
        if teacher is not None:
            with torch.no_grad():
                target = F.layer_norm(teacher(b["pixel_values"]), (width,))
            ld = F.mse_loss(proj(feat).float(), target.float())
            loss = loss + distill_weight * ld
            parts["distill"] = float(ld.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append(parts)
        due = _due(step, steps, eval_every)
        if _due(step, steps, 25) or due:
            rec = dict(stage="vision", step=step + 1, seconds=round(time.time() - t0, 1), lr=opt.param_groups[0]["lr"],
                       **{k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]})
            window = []
            if due:
                model.eval()
                with torch.no_grad():
                    pred = heads.patch(val_features(val_scenes).to(device)).argmax(-1).flatten().cpu()
                rec["patches"] = {k: v for k, v in _scores(pred, val_lab).items() if k != "patches"}
                model.train()
            history.append(rec)
            log(json.dumps(rec))
    return history
