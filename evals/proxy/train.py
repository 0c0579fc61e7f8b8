"""Train the proxy LVLM from scratch: ``python -m evals.proxy.train --out evals/proxy/weights``.

Stage A (LLaVA-1.5 geometry, every weight trained jointly, from random initialisation):

- language-model loss on the answers of multi-turn conversations (``train_turns``: up to 16 questions per scene,
  every answer supervised, prompts masked);
- two auxiliary vision losses that stand in for the CLIP pre-training the proxy cannot have: a linear head on
  the feature layer's patch tokens predicts each patch's class (background, object kind, digit, sign plate), and
  heads on the final CLS token (``pooler_output``) predict which object kinds are present and how many objects
  there are. The heads are discarded after training; they make the CLS token's attention meaningful, as CLS-based
  pruning methods assume.

Stage 0 (optional, ``--vision-steps N``; not part of the shipped recipe): the vision tower alone on patch-aligned
crops of scenes (``pretrain``: sin-cos position init, mimetic attention init, optionally a CNN teacher with
``--teacher-steps``), before stage A; with ``--freeze-vision`` stage A then trains the projector and decoder only.
``--vision-from FOLDER`` starts stage A from the tower of a saved checkpoint instead (a stage-0 tower is kept, frozen,
in the llava-proxy/ folder of a ``--vision-steps N --freeze-vision`` run).
``python -m evals.proxy.probe`` measures what the tower's patch tokens carry afterwards, and
``python -m evals.proxy.oracle`` what the decoder recipe reaches from perfect patch features.
``--embed-std S`` redraws the decoder's token embeddings from N(0, S^2) before stage A; ``--projector-scale F``
multiplies the projector's output layer by F (``scale_projector``).

Stage B (LLaVA-NeXT geometry): the trained towers are copied into ``LlavaNextForConditionalGeneration`` and the
projector, decoder and ``image_newline`` are fine-tuned on 672x336 / 336x672 scenes with the vision tower frozen.

Everything is seeded (weights, data, order). The same command on the same device reproduces the weights; CPU and
CUDA kernels differ in rounding, so the two devices give close but not bit-identical weights.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlprune.precision import native_bf16

from . import model as pm
from .scenes import (COMBOS, N_PATCH_CLASSES, make_scene, patch_labels, ref_patches, render, scene_targets,
                     train_turns)

DEFAULT_OUT = Path(__file__).resolve().parent / "weights"


# ------------------------------------------------------------------------------------------------------- data
class Batches(torch.utils.data.IterableDataset):
    """Step ``i`` of a run is a pure function of (seed, i): scenes, turns and targets."""

    def __init__(self, processor, geometry: str, batch_size: int, steps: int, seed: int, turns: int,
                 first_step: int = 0):
        self.processor, self.geometry = processor, geometry
        self.batch_size, self.steps, self.seed, self.turns, self.first = batch_size, steps, seed, turns, first_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.first + wid, self.steps, nw):
            yield step, make_batch(self.processor, self.geometry, self.batch_size, self.seed, step, self.turns)


def answer_positions(tok, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)``: for every answer in a batch of chat-template sequences (B, T), its sequence and the
    position of the ':' after "ASSISTANT" that predicts it, in reading order."""
    a_id, c_id = tok.convert_tokens_to_ids("assistant"), tok.convert_tokens_to_ids(":")
    hit = (ids[:, :-2] == a_id) & (ids[:, 1:-1] == c_id)
    rows, cols = torch.nonzero(hit, as_tuple=True)
    return rows, cols + 1


def make_batch(processor, geometry: str, batch_size: int, seed: int, step: int, turns: int = 16) -> dict:
    tok = processor.tokenizer
    images, texts, patches, present, counts, ground = [], [], [], [], [], []
    for j in range(batch_size):
        sseed = (seed * 1_000_003 + step) * 64 + j          # train split: seeds below 10^8 never collide with
        sseed = sseed % 100_000_000                          # the validation / test ranges
        rng = np.random.default_rng([sseed, 3])
        scene = make_scene(sseed, geometry, need_sign=bool(rng.random() < 0.5),
                           need_small=bool(rng.random() < 0.5))
        qa = train_turns(scene, rng, turns)
        conv = "".join(f"{pm.prompt(q, image=i == 0)} {a}</s>" for i, (q, a, _, _) in enumerate(qa))
        images.append(render(scene))
        texts.append(conv)
        if geometry == "llava":
            patches.append(patch_labels(scene).reshape(-1))
            p, c = scene_targets(scene)
            present.append(p)
            counts.append(c)
            g = np.zeros((turns, 576), bool)
            for i, t in enumerate(qa):
                if t[3]:
                    g[i] = ref_patches(scene, t[3])
            ground.append(g)
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        b = processor(images=images, text=texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    ids = b["input_ids"]
    labels = torch.full_like(ids, -100)
    eos = tok.eos_token_id
    rows, cols = answer_positions(tok, ids)
    labels[rows, cols + 1] = ids[rows, cols + 1]                     # the answer word
    ok = cols + 2 < ids.shape[1]
    labels[rows[ok], cols[ok] + 2] = eos                             # and the end of the turn
    answer_at = torch.full((ids.shape[0], turns), -1, dtype=torch.long)
    for i in range(ids.shape[0]):
        at = cols[rows == i]
        answer_at[i, : len(at)] = at
    out = dict(b)
    out["labels"] = labels
    out["answer_at"] = answer_at
    if patches:
        out["patch_labels"] = torch.from_numpy(np.stack(patches))
        out["present"] = torch.from_numpy(np.stack(present))
        out["n_objects"] = torch.tensor(counts)
        out["ground"] = torch.from_numpy(np.stack(ground))
    return out


# ------------------------------------------------------------------------------------------------------ model
class AuxHeads(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        # the LayerNorm keeps the patch loss from rewarding ever larger feature norms in the ViT's residual
        # stream, which the projector would pass on to the decoder
        self.patch = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, N_PATCH_CLASSES))
        self.present = torch.nn.Linear(width, len(COMBOS))
        self.count = torch.nn.Linear(width, 16)


def _capture_vision(model):
    store = {}

    def hook(mod, args, kwargs, output):
        store["out"] = output
    h = model.model.vision_tower.register_forward_hook(hook, with_kwargs=True)
    return store, h


GROUND_LAYER, GROUND_HEAD = 3, 0


def _capture_qk(model, layer: int):
    store = {}
    attn = model.model.language_model.layers[layer].self_attn
    hs = [attn.q_proj.register_forward_hook(lambda m, a, o: store.__setitem__("q", o)),
          attn.k_proj.register_forward_hook(lambda m, a, o: store.__setitem__("k", o))]
    return store, hs


def grounding_loss(model, store, ids, mask, answer_at, ground) -> torch.Tensor:
    """-log of the attention mass that one head (GROUND_LAYER, GROUND_HEAD) puts, from the position that predicts
    each answer (``answer_at``, -1 padded per turn), on the patches of the objects the question is about (turns
    without such objects are skipped).
    The head's attention is recomputed from the captured q/k projections with RoPE, for those rows only."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    b_, t_ = ids.shape
    q = store["q"].view(b_, t_, -1, hd)[:, :, GROUND_HEAD]
    k = store["k"].view(b_, t_, -1, hd)[:, :, GROUND_HEAD // group]
    pos = torch.arange(t_, device=ids.device)[None].expand(b_, -1)
    cos, sin = model.model.language_model.rotary_emb(q, pos)
    q, k = apply_rotary_pos_emb(q[:, None], k[:, None], cos, sin)
    q, k = q[:, 0].float(), k[:, 0].float()
    losses = []
    img = ids == model.config.image_token_id
    for b in range(b_):
        first = int(torch.nonzero(img[b], as_tuple=True)[0][0])
        keep = (answer_at[b] >= 0) & ground[b].any(-1)
        if not keep.any():
            continue
        rows, g = answer_at[b][keep], ground[b][keep]
        logits = (q[b, rows] @ k[b].T) / math.sqrt(hd)               # (R, T)
        allowed = (torch.arange(t_, device=ids.device)[None] <= rows[:, None]) & mask[b].bool()[None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        target = torch.zeros_like(allowed)
        target[:, first:first + g.shape[1]] = g
        lse_all = torch.logsumexp(logits, -1)
        lse_t = torch.logsumexp(logits.masked_fill(~target, float("-inf")), -1)
        losses.append(lse_all - lse_t)
    if not losses:
        return ids.new_zeros((), dtype=torch.float32)
    return torch.cat(losses).mean()


def vision_losses(model, heads, vis, targets) -> tuple[torch.Tensor, dict]:
    """The auxiliary vision losses on the tower output ``vis`` (hidden states kept): patch classes of the feature
    layer, and object kinds present and object count from the final CLS token; their sum and logged values."""
    feat = vis.hidden_states[model.config.vision_feature_layer][:, 1:]
    lp = F.cross_entropy(heads.patch(feat).flatten(0, 1).float(), targets["patch_labels"].flatten())
    # LLaVA overwrites pooler_output with the projected features: pool the CLS token here
    cls = _post_ln(model)(vis.last_hidden_state[:, 0])
    lpres = F.binary_cross_entropy_with_logits(heads.present(cls).float(), targets["present"])
    lcnt = F.cross_entropy(heads.count(cls).float(), targets["n_objects"])
    parts = dict(patch=float(lp.detach()), present=float(lpres.detach()), count=float(lcnt.detach()))
    return lp + lpres + lcnt, parts


def _post_ln(model):
    return pm.vision_body(model.model.vision_tower).post_layernorm


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def use_bf16(precision: str, device: torch.device) -> bool:
    """``--precision``: "bf16" and "fp32" as asked, "auto" bf16 autocast where :func:`native_bf16` holds. Elsewhere
    bf16 autocast is emulated: on a 2-core AVX2 CPU one forward and backward pass of the proxy's vision tower over 16
    images took 40-48 s under bf16 autocast against 5-6 s in float32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision {precision!r} is not 'auto', 'bf16' or 'fp32'")
    return native_bf16(device) if precision == "auto" else precision == "bf16"


def _due(step: int, steps: int, every: int) -> bool:
    """Whether 0-based ``step`` ends a period of ``every`` steps (0: never) or the run."""
    return bool(every) and ((step + 1) % every == 0 or step + 1 == steps)


def _sides(text: str) -> list[int]:
    """``--crop``: comma-separated crop sides, each 1..24 patches."""
    try:
        sides = [int(x) for x in text.split(",")]
    except ValueError:
        sides = []
    if not sides or not all(1 <= s <= 24 for s in sides):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of crop sides in 1..24 patches "
                                         f"(for example 6,12,24)")
    return sides


def _std(text: str) -> float:
    """``--embed-std``: a standard deviation >= 0 (0: keep the config's init)."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"--embed-std {value} is negative; give a standard deviation > 0, or 0 for "
                                         "the config's init")
    return value


def _scale(text: str) -> float:
    """``--projector-scale``: a factor > 0 (1: keep the config's init)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--projector-scale {value} is not positive; give a factor > 0, or 1 for the "
                                         "config's init")
    return value


def add_decoder_init_args(ap: argparse.ArgumentParser) -> None:
    """``--embed-std S`` and ``--projector-scale F``: changes to the decoder side's init before stage A, applied by
    :func:`apply_decoder_init`."""
    ap.add_argument("--embed-std", type=_std, default=0.0,
                    help="redraw the decoder's token embeddings from N(0, std^2) before stage A (0: the config's "
                    "init, std 0.02)")
    ap.add_argument("--projector-scale", type=_scale, default=1.0,
                    help="multiply the projector's output layer by this factor before stage A, so that the image "
                    "tokens enter the decoder's residual stream F times larger (1: the config's init)")


def apply_decoder_init(model, args: argparse.Namespace) -> None:
    """What :func:`add_decoder_init_args` asked for: :func:`redraw_embeddings` and :func:`scale_projector`."""
    if args.embed_std:
        redraw_embeddings(model, args.embed_std)
    if args.projector_scale != 1:
        scale_projector(model, args.projector_scale)


def add_precision_args(ap: argparse.ArgumentParser) -> None:
    """``--precision auto|bf16|fp32`` and its older spelling ``--no-bf16`` (= fp32), both into ``precision``."""
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="bf16 autocast or float32 (auto: bf16 where the device computes it natively)")
    ap.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32", help="same as --precision fp32")


def train_stage(model, processor, geometry: str, steps: int, batch_size: int, lr: float, seed: int,
                device: torch.device, bf16: bool, workers: int, turns: int, log, aux_weight: float = 0.5,
                ground_weight: float = 0.5,
                freeze_vision: bool = False, eval_every: int = 0, eval_fn=None, heads=None,
                on_batch=None) -> list[dict]:
    """Train ``model`` for ``steps`` steps of :func:`make_batch` batches; ``on_batch(batch, aux)``, if given, sees
    each batch (model inputs, auxiliary targets) on the device just before the forward pass."""
    torch.manual_seed(seed)
    model.to(device).train()
    if heads is None and geometry == "llava":
        heads = AuxHeads(model.config.vision_config.hidden_size)
    heads = heads.to(device) if heads is not None else None
    if freeze_vision:
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + (list(heads.parameters()) if heads else [])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)
    store, handle = _capture_vision(model)
    qk, qk_handles = _capture_qk(model, GROUND_LAYER) if heads is not None else ({}, [])
    data = Batches(processor, geometry, batch_size, steps, seed, turns)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    history, t0, window = [], time.time(), []
    bar = None
    try:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc=f"train {geometry}", unit="step", file=sys.stderr, mininterval=10)
    except ImportError:
        pass
    try:
        for step, batch in loader:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
            batch = {k: v.to(device) for k, v in batch.items()}
            aux = {k: batch.pop(k) for k in ("patch_labels", "present", "n_objects", "ground", "answer_at")
                   if k in batch}
            if on_batch is not None:
                on_batch(batch, aux)
            with _autocast(device, bf16):
                out = model(**batch, use_cache=False)
                loss_lm = out.loss
                loss = loss_lm
                parts = {"lm": float(loss_lm.detach())}
                if heads is not None:
                    if not freeze_vision:           # a frozen tower gains nothing from its auxiliary losses
                        laux, aux_parts = vision_losses(model, heads, store["out"], aux)
                        loss = loss + aux_weight * laux
                        parts.update(aux_parts)
                    lg = grounding_loss(model, qk, batch["input_ids"], batch["attention_mask"], aux["answer_at"],
                                        aux["ground"])
                    loss = loss + ground_weight * lg
                    parts.update(ground=float(lg.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            window.append(parts)
            if bar is not None:
                bar.update(1)
            due = eval_fn is not None and _due(step, steps, eval_every)
            if _due(step, steps, 50) or due:
                mean = {k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]}
                rec = dict(step=step + 1, seconds=round(time.time() - t0, 1), lr=opt.param_groups[0]["lr"], **mean)
                window = []
                if due:
                    rec["validation"] = eval_fn(model)
                    model.train()
                history.append(rec)
                log(json.dumps(rec))
    finally:
        handle.remove()
        for h in qk_handles:
            h.remove()
        if bar is not None:
            bar.close()
    if freeze_vision:
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(True)
    return history


# ---------------------------------------------------------------------------------------------- vision stage
def sincos_grid(side: int, quarter: int) -> torch.Tensor:
    """(side^2, 4 quarter) float32 2-D sin-cos codes of a side x side grid, row-major: sin and cos of the row, then
    of the column, at ``quarter`` frequencies 100^(-i / quarter)."""
    omega = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    r, c = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    ar, ac = r.reshape(-1, 1) * omega, c.reshape(-1, 1) * omega
    return torch.cat([ar.sin(), ar.cos(), ac.sin(), ac.cos()], 1)


def sincos_positions(model) -> None:
    """Set the vision tower's learned position embeddings to a 2-D sin-cos grid (half the width for rows, half
    for columns; the CLS row zero). A starting point that already tells neighbouring patches apart: learned from
    random values, locality is what a small ViT trained on little data picks up last."""
    emb = pm.vision_body(model.model.vision_tower).embeddings
    w = emb.position_embedding.weight
    side = int(round(math.sqrt(w.shape[0] - 1)))
    if side * side != w.shape[0] - 1 or w.shape[1] % 4:
        raise ValueError(f"position table {tuple(w.shape)} is not a square grid plus CLS with a width divisible by 4")
    grid = sincos_grid(side, w.shape[1] // 4)
    with torch.no_grad():
        w[1:] = grid.to(w.dtype)
        w[0] = 0


def redraw_embeddings(model, std: float, seed: int = 2) -> None:
    """Redraw the decoder's input token embeddings from N(0, std^2) (a private RNG stream seeded by ``seed``)."""
    if not std > 0:
        raise ValueError(f"embedding std {std!r} must be positive (--embed-std 0 keeps the config's init)")
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.normal_(0, std, generator=torch.Generator().manual_seed(seed))


def scale_projector(model, factor: float) -> None:
    """Multiply the weight and bias of the projector's output layer by ``factor``: the image tokens start ``factor``
    times larger in the decoder's residual stream (from oracle features at the config's init they start at about
    5x the norm of a word embedding). A lever on how much of the image tokens' own content survives what the
    decoder's layers add to them; ``python -m evals.proxy.oracle`` reports that survival per layer
    (``class_separation``)."""
    if not factor > 0:
        raise ValueError(f"projector scale {factor!r} must be positive (--projector-scale 1 keeps the config's init)")
    last = model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        last.weight.mul_(factor)
        if last.bias is not None:
            last.bias.mul_(factor)


def load_tower(model, folder) -> None:
    """Copy the vision tower weights of the LLaVA checkpoint in ``folder`` into ``model`` (same tower config)."""
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"--vision-from {folder}: no model.safetensors there; give a folder written by "
                                "python -m evals.proxy.train (its llava-proxy/)")
    state = {}
    for k, v in load_file(str(path)).items():
        head, sep, rest = k.partition("vision_tower.")
        if sep and head in ("", "model."):
            state[rest] = v
    if not state:
        raise ValueError(f"--vision-from {folder}: its model.safetensors holds no vision_tower.* weights; give a "
                         "LLaVA proxy checkpoint")
    tower = model.model.vision_tower
    dtype = next(tower.parameters()).dtype
    tower.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)


# -------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    from vlprune.cliargs import Parser, device_name, existing_path, nonneg_int, positive_float, positive_int

    ap = Parser(prog="python -m evals.proxy.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder for llava-proxy/ and llava-next-proxy/")
    ap.add_argument("--steps", type=positive_int, default=2400, help="stage A optimizer steps")
    ap.add_argument("--batch-size", type=positive_int, default=6, help="scenes per step (each with up to --turns questions)")
    ap.add_argument("--turns", type=positive_int, default=16)
    ap.add_argument("--lr", type=positive_float, default=6e-4)
    ap.add_argument("--next-steps", type=nonneg_int, default=200, help="stage B (AnyRes) steps; 0 skips stage B")
    ap.add_argument("--next-batch-size", type=positive_int, default=2)
    ap.add_argument("--next-lr", type=positive_float, default=2e-4)
    ap.add_argument("--vision-steps", type=nonneg_int, default=0,
                    help="stage 0: vision tower alone on crops first (0: none, the shipped recipe)")
    ap.add_argument("--vision-batch-size", type=positive_int, default=96, help="stage 0 crops per step")
    ap.add_argument("--vision-lr", type=positive_float, default=2e-3)
    ap.add_argument("--crop", default=[6], type=_sides, help="stage 0 crop sides in patches, comma-separated, taken in turn "
                    "(24: whole scenes); --vision-batch-size counts crops of the first")
    ap.add_argument("--teacher-steps", type=nonneg_int, default=0,
                    help="stage 0 CNN teacher steps before the tower (0: no teacher, no distillation)")
    ap.add_argument("--vision-from", default=None, metavar="FOLDER", type=existing_path,
                    help="instead of stage 0, copy the vision tower of a saved LLaVA proxy (e.g. the llava-proxy/ "
                    "folder a --vision-steps run wrote)")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="stage A trains projector and decoder only (use after --vision-steps)")
    add_decoder_init_args(ap)
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--device", default="auto", type=device_name, help="auto | cpu | cuda[:N]")
    add_precision_args(ap)
    ap.add_argument("--workers", type=int, default=-1, choices=range(-1, 65), metavar="N", help="data workers (-1: 0 on CPU, 8 on CUDA)")
    ap.add_argument("--threads", type=nonneg_int, default=0, help="torch threads on CPU (0: all cores)")
    ap.add_argument("--eval-n", type=nonneg_int, default=120, help="validation samples at the end of each stage")
    ap.add_argument("--eval-every", type=nonneg_int, default=600)
    ap.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    if args.vision_from and args.vision_steps:
        ap.error(f"--vision-from {args.vision_from} and --vision-steps {args.vision_steps} both set the vision tower; "
                 "give one of them")

    from .evaluate import evaluate

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = use_bf16(args.precision, device)
    workers = args.workers if args.workers >= 0 else (8 if device.type == "cuda" else 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    meta = dict(command="python -m evals.proxy.train " + " ".join(argv if argv is not None else sys.argv[1:]),
                args=vars(args), device=str(device), torch=torch.__version__, python=platform.python_version(),
                gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                threads=torch.get_num_threads(), bf16=bf16)
    import transformers
    meta["transformers"] = transformers.__version__
    log(json.dumps(meta))
    tok = pm.build_tokenizer()
    proc = pm.build_processor("llava", tok)
    model = pm.build_model("llava", seed=args.seed)

    def val(m, geometry="llava", n=args.eval_n):
        r = evaluate(m, pm.build_processor(geometry, tok), "validation", n=n, geometry=geometry, batch_size=32)
        return {k: r[k] for k in ("overall", "families")}

    t0 = time.time()
    heads = AuxHeads(model.config.vision_config.hidden_size)
    hist_v = []
    if args.vision_steps:
        from .pretrain import mimetic_init, train_teacher, train_vision

        sincos_positions(model)
        mimetic_init(model.model.vision_tower, seed=args.seed)
        sides = args.crop
        teacher = (train_teacher(args.teacher_steps, args.vision_batch_size, args.seed, device, sides[0], log=log)
                   if args.teacher_steps else None)
        hist_v = train_vision(model, proc, heads, args.vision_steps, args.vision_batch_size, args.vision_lr,
                              args.seed, device, log, eval_every=max(25, args.vision_steps // 6 // 25 * 25),
                              sides=sides, teacher=teacher)
    elif args.vision_from:
        load_tower(model, args.vision_from)
        log(json.dumps({"vision_from": str(args.vision_from)}))
    apply_decoder_init(model, args)
    time_v = time.time() - t0
    hist_a = train_stage(model, proc, "llava", args.steps, args.batch_size, args.lr, args.seed, device,
                         bf16, workers, args.turns, log, eval_every=args.eval_every,
                         eval_fn=val if args.eval_n else None, heads=heads, freeze_vision=args.freeze_vision)
    time_a = time.time() - t0
    model.to("cpu").float().eval()
    dtype = getattr(torch, args.save_dtype)
    meta_a = dict(meta, stage="A", seconds=round(time_a, 1), history=hist_a,
                  vision_stage=dict(seconds=round(time_v, 1), history=hist_v) if hist_v else None)
    pm.save(model.to(dtype), proc, out / "llava-proxy", extra=meta_a)
    model.float()
    log(json.dumps({"stage": "A", "seconds": round(time_a, 1)}))
    if args.next_steps:
        nxt = pm.next_from_llava(model, seed=args.seed)
        nproc = pm.build_processor("next", tok)
        t1 = time.time()
        hist_b = train_stage(nxt, nproc, "next", args.next_steps, args.next_batch_size, args.next_lr,
                             args.seed + 1, device, bf16, workers, args.turns, log,
                             freeze_vision=True, eval_every=args.next_steps,
                             eval_fn=(lambda m: val(m, "next", max(60, args.eval_n // 2))) if args.eval_n else None)
        time_b = time.time() - t1
        nxt.to("cpu").float().eval()
        pm.save(nxt.to(dtype), nproc, out / "llava-next-proxy",
                extra=dict(meta, stage="B", seconds=round(time_b, 1), history=hist_b))
        log(json.dumps({"stage": "B", "seconds": round(time_b, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
