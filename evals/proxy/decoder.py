"""Stages 1-3 of the proxy v2 recipe: the projector and decoder, on cached tokens of a frozen stage-0 tower.

The decoder has to pass a plateau: the position that predicts an answer must gather its question's words and
match them against the image tokens, and neither part gets a useful gradient before the other partly works.
What passes it is optimizer steps on cheap sequences and many answers per image, so:

- the tower is frozen (stage 0, :mod:`evals.proxy.recipe`) and its feature-layer tokens for a pool of training
  scenes are computed once (``TokenCache``); a step costs only the projector and decoder;
- every sequence holds one scene and ``turns`` questions about it (the first a planned, answer-first question of
  a family chosen in turn, so every family gets its share; the others asked about the scene as it is), each
  answer with its loss; the loss is the mean over families of each family's mean answer loss, plus a small
  weight on ``</s>``;
- a curriculum over the image tokens: the 24x24 tokens average-pooled to 8x8 = 64, then 12x12 = 144, then all
  576 (``STAGES``); counting and spatial questions need the last (an object spanning blocks is counted twice at
  64, and 42 px blocks are coarser than the spatial questions' 16 px margin);
- families staged in: the first ``existence_steps`` steps ask existence questions only (the lookup itself);
- with ``ground_weight``, a grounding loss trains one attention head (``GROUND_LAYER``, ``GROUND_HEAD``) to look,
  from each answer's predicting position, at the image tokens of the objects the question is about: a direct
  gradient for the "match" half of the lookup. Methods that score visual tokens by decoder attention may find a
  cleaner signal in a model trained so than in a real LVLM;
- with ``align_weight``, an alignment loss (LLaVA's projector-alignment stage in miniature) trains each
  projected image token to read, against the decoder's word embeddings, as the colour and shape words (or the
  digit) of what covers its block, so that matching a question's words to image tokens is a near-copy;
- AdamW with warmup, no weight decay on embeddings, norms and biases, a cosine decay over the last stage.

Step ``i`` of a run is a pure function of (seed, i), and ``checkpoint.pt`` (written every ``checkpoint_minutes``
and at each stage's end) holds the weights, the optimizer and the step: ``--resume`` continues a killed run and
gives the same next-step loss as the run that was not killed.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import model as pm
from .scenes import (COMBOS, FAMILIES, N_PATCH_CLASSES, make_sample, patch_labels, ref_patches, split_seed,
                     train_turns)
from .train import answer_positions

__all__ = ["Stage", "STAGES", "TokenCache", "tower_tokens", "grid_side", "pool_tokens", "conversation_batch",
           "train_decoder", "fast_eval"]

GRID = 24


@dataclass(frozen=True)
class Stage:
    tokens: int          # image tokens the decoder sees: 64, 144 or 576
    steps: int
    batch_size: int      # scenes per step


STAGES = (Stage(64, 2200, 32), Stage(144, 300, 16), Stage(576, 250, 8))


# ------------------------------------------------------------------------------------------------------ tokens
@torch.inference_mode()
def tower_tokens(model, scenes, batch_size: int = 32) -> torch.Tensor:
    """(n, 576, width) float16 feature-layer tokens (CLS dropped) of the model's vision tower on ``scenes``."""
    from .pretrain import _normalise, crop_tokens
    from .scenes import render

    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    n_layers = len(pm.vision_body(tower).encoder.layers)
    upto = layer % (n_layers + 1)
    mean, std = np.asarray(pm.CLIP_MEAN, np.float32), np.asarray(pm.CLIP_STD, np.float32)
    device = next(tower.parameters()).device
    pos = torch.arange(GRID * GRID, device=device)
    out = []
    for i in range(0, len(scenes), batch_size):
        px = torch.from_numpy(np.stack([_normalise(render(s), mean, std) for s in scenes[i:i + batch_size]]))
        hs = crop_tokens(tower, px.to(device), pos.expand(px.shape[0], -1), upto)
        out.append(hs[upto][:, 1:].to(torch.float16).cpu())
    return torch.cat(out)


def grid_side(tokens: int) -> int:
    """The side of the square block grid of ``tokens`` image tokens (8, 12 or 24); a count that is not a square
    whose side divides 24 is refused."""
    side = int(round(math.sqrt(tokens)))
    if side * side != tokens or GRID % side:
        raise ValueError(f"tokens {tokens} is not a square whose side divides {GRID} (64, 144 or 576)")
    return side


def pool_tokens(feats: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, 576, D) tokens average-pooled on the 24x24 grid to ``tokens`` (a square: 64, 144, 576)."""
    side = grid_side(tokens)
    if side == GRID:
        return feats
    b, _, d = feats.shape
    g = feats.transpose(1, 2).reshape(b, d, GRID, GRID)
    return F.avg_pool2d(g, GRID // side).flatten(2).transpose(1, 2)


class TokenCache:
    """A pool of training scenes, each with its planned first question, and the tower's tokens for them."""

    def __init__(self, samples, feats: torch.Tensor):
        if len(samples) != feats.shape[0]:
            raise ValueError(f"samples: {len(samples)}, token rows: {feats.shape[0]}; they must match")
        self.samples, self.feats = list(samples), feats

    @classmethod
    def build(cls, model, n: int, seed: int, log=None, batch_size: int = 32) -> "TokenCache":
        """``n`` planned training samples (families in turn, seeds ``seed * 10^6 + i`` of the train split) and the
        tokens of their scenes."""
        samples = [make_sample(split_seed("train", seed * 1_000_000 + i), FAMILIES[i % len(FAMILIES)])
                   for i in range(n)]
        t0, parts = time.time(), []
        for i in range(0, n, 512):
            parts.append(tower_tokens(model, [s.scene for s in samples[i:i + 512]], batch_size))
            if log is not None:
                log(json.dumps(dict(stage="cache", scenes=min(n, i + 512), seconds=round(time.time() - t0, 1))))
        return cls(samples, torch.cat(parts))

    def save(self, path: Path) -> None:
        torch.save(dict(seeds=[s.seed for s in self.samples], families=[s.family for s in self.samples],
                        feats=self.feats), path)

    @classmethod
    def load(cls, path: Path) -> "TokenCache":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        samples = [make_sample(s, f) for s, f in zip(blob["seeds"], blob["families"])]
        return cls(samples, blob["feats"])


# ------------------------------------------------------------------------------------------------------- batch
def conversation_batch(tok, samples, turns: int, rng: np.random.Generator, tokens: int,
                       families=FAMILIES, targets: bool = True) -> dict:
    """Right-padded multi-turn sequences, one per sample: ``<s> USER: <image> x tokens q1 ASSISTANT: a1 </s> USER:
    q2 ...`` (the chat template's text, each image token repeated ``tokens`` times). With ``families`` other than
    all, only questions of those families are asked (the planned one replaced by one asked about the scene).

    Returns ``input_ids`` (B, T), ``rows``/``at`` (A,) the sequence and position that predicts each answer word,
    ``target`` (A,) its token, ``family`` (A,) its index in FAMILIES; with ``targets``, also the targets of the
    auxiliary losses: ``ground`` (A, tokens) the image tokens that show the objects (or the sign) the answer
    depends on (none for absent objects) and ``words`` (``block_words``)."""
    texts, fams, ground = [], [], []
    side = grid_side(tokens)
    k = GRID // side
    for s in samples:
        first = (s.question, s.answer, s.category, s.refs) if s.family in families else None
        qa = train_turns(s.scene, rng, turns, first=first, families=families)
        texts.append("".join(f"{pm.prompt(q, image=i == 0)} {a}</s>" for i, (q, a, _, _) in enumerate(qa)))
        fams.append([FAMILIES.index(c.split("/")[0]) for _, _, c, _ in qa])
        if targets:
            for _, _, _, refs in qa:
                g = ref_patches(s.scene, refs) if refs else np.zeros(GRID * GRID, bool)
                ground.append(g.reshape(side, k, side, k).any((1, 3)).reshape(-1))   # shown if any patch is
    enc = tok(texts)["input_ids"]
    img = tok.convert_tokens_to_ids("<image>")
    seqs = []
    for ids in enc:
        k = ids.index(img)
        seqs.append(ids[:k] + [img] * tokens + ids[k + 1:])
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    rows, at = answer_positions(tok, ids)
    family = torch.tensor([f for fs in fams for f in fs], dtype=torch.long)
    if family.numel() != rows.numel():
        raise RuntimeError(f"{rows.numel()} answers found in the sequences, {family.numel()} turns asked")
    out = dict(input_ids=ids, rows=rows, at=at, target=ids[rows, at + 1], family=family)
    if targets:
        out.update(ground=torch.from_numpy(np.stack(ground)), words=block_words(tok, samples, tokens))
    return out


def block_words(tok, samples, tokens: int) -> torch.Tensor:
    """(B, tokens, 2) token ids of the words that name what covers most of each image block: the colour and shape
    words of an object kind, the digit (twice) on a sign's digit, -100 (ignored) for background and sign plate."""
    table = np.full((N_PATCH_CLASSES, 2), -100, dtype=np.int64)
    for i, (c, s) in enumerate(COMBOS):
        table[1 + i] = tok.convert_tokens_to_ids([c, s])
    for d in range(10):
        table[1 + len(COMBOS) + d] = tok.convert_tokens_to_ids(str(d))
    side = grid_side(tokens)
    k = GRID // side
    out = []
    for s in samples:
        lab = patch_labels(s.scene).reshape(side, k, side, k).transpose(0, 2, 1, 3).reshape(side * side, k * k)
        counts = np.zeros((side * side, N_PATCH_CLASSES), np.int64)
        np.add.at(counts, (np.repeat(np.arange(side * side), k * k), lab.reshape(-1)), 1)
        counts[:, 0] = 0                                          # background names nothing
        counts[:, N_PATCH_CLASSES - 1] = 0                        # nor does the bare sign plate
        best = np.where(counts.max(1) > 0, counts.argmax(1), 0)
        out.append(table[best])
    return torch.from_numpy(np.stack(out))


def _forward(model, ids: torch.Tensor, feats: torch.Tensor, with_image: bool = False):
    """Decoder hidden states (B, T, D) with the image tokens' embeddings replaced by the projected ``feats``
    (and, with ``with_image``, those projected image tokens (B, N, D))."""
    lm = model.model.language_model
    emb = lm.embed_tokens(ids)
    img = ids == model.config.image_token_id
    proj = model.model.multi_modal_projector(feats.to(emb.dtype))
    emb = emb.masked_scatter(img[..., None], proj.reshape(-1, proj.shape[-1]).to(emb.dtype))
    h = lm(inputs_embeds=emb, use_cache=False).last_hidden_state
    return (h, proj) if with_image else h


GROUND_LAYER, GROUND_HEAD = 4, 0


def grounding_loss(model, q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor,
                   at: torch.Tensor, ground: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass that head ``GROUND_HEAD`` of layer ``GROUND_LAYER`` puts, from each answer's
    predicting position, on the image tokens of ``ground`` (answers without any are skipped). The head's scores
    are recomputed from its captured q/k projections (``q``, ``k``: (B, T, heads * head_dim)) with RoPE, for those
    rows only."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    keep = ground.any(-1)
    if not bool(keep.any()):
        return q.new_zeros((), dtype=torch.float32)
    cfg = model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    b_, t_ = ids.shape
    qh = q.view(b_, t_, -1, hd)[:, :, GROUND_HEAD]
    kh = k.view(b_, t_, -1, hd)[:, :, GROUND_HEAD // group]
    pos = torch.arange(t_, device=ids.device)[None].expand(b_, -1)
    cos, sin = model.model.language_model.rotary_emb(qh, pos)
    qh, kh = apply_rotary_pos_emb(qh[:, None], kh[:, None], cos, sin)
    qh, kh = qh[:, 0].float(), kh[:, 0].float()
    r, a, g = rows[keep], at[keep], ground[keep]
    logits = torch.einsum("rd,rtd->rt", qh[r, a], kh[r]) / math.sqrt(hd)            # (R, T)
    logits = logits.masked_fill(torch.arange(t_, device=ids.device)[None] > a[:, None], float("-inf"))
    first = int(torch.nonzero(ids[0] == model.config.image_token_id)[0, 0])         # same prefix in every row
    target = torch.zeros_like(logits, dtype=torch.bool)
    target[:, first:first + g.shape[1]] = g
    return (torch.logsumexp(logits, -1) - torch.logsumexp(logits.masked_fill(~target, float("-inf")), -1)).mean()


def alignment_loss(model, proj: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each projected image token (B, N, D), read against the decoder's input word embeddings
    (logits ``proj @ embed_tokens.T``), towards the words that name its block (``block_words``): LLaVA's
    alignment stage in miniature, so that an image token of a red circle lies near the words "red" and
    "circle" a question uses."""
    logits = (proj.float() @ model.model.language_model.embed_tokens.weight.float().T).flatten(0, 1)
    w = words.flatten(0, 1)
    if not bool((w >= 0).any()):
        return proj.new_zeros((), dtype=torch.float32)
    return 0.5 * (F.cross_entropy(logits, w[:, 0], ignore_index=-100) +
                  F.cross_entropy(logits, w[:, 1], ignore_index=-100))


def batch_loss(model, batch: dict, feats: torch.Tensor, eos_weight: float = 0.1,
               ground_weight: float = 0.0, align_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The mean over families of each family's mean answer-word loss, plus ``eos_weight`` times the ``</s>``
    loss and ``ground_weight`` times :func:`grounding_loss`; and the logged parts (``answer``: the plain mean
    answer-word loss; per family; ``ground``)."""
    device = feats.device
    store: dict = {}
    hooks = []
    if ground_weight:
        attn = model.model.language_model.layers[GROUND_LAYER].self_attn
        hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: store.__setitem__("q", o)),
                 attn.k_proj.register_forward_hook(lambda m, a, o: store.__setitem__("k", o))]
    try:
        h, proj = _forward(model, batch["input_ids"].to(device), feats, with_image=True)
    finally:
        for hk in hooks:
            hk.remove()
    rows, at = batch["rows"].to(device), batch["at"].to(device)
    logits = model.lm_head(h[rows, at]).float()
    ce = F.cross_entropy(logits, batch["target"].to(device), reduction="none")
    fam = batch["family"].to(device)
    per = {FAMILIES[f]: ce[fam == f].mean() for f in fam.unique().tolist()}
    eos = F.cross_entropy(model.lm_head(h[rows, at + 1]).float(),
                          torch.full_like(rows, model.config.text_config.eos_token_id))
    loss = torch.stack(list(per.values())).mean() + eos_weight * eos
    parts = dict(answer=float(ce.mean().detach()), eos=float(eos.detach()),
                 **{f"answer_{k}": float(v.detach()) for k, v in per.items()})
    if ground_weight:
        lg = grounding_loss(model, store["q"], store["k"], batch["input_ids"].to(device), rows, at,
                            batch["ground"].to(device))
        loss = loss + ground_weight * lg
        parts["ground"] = float(lg.detach())
    if align_weight:
        la = alignment_loss(model, proj, batch["words"].to(device))
        loss = loss + align_weight * la
        parts["align"] = float(la.detach())
    return loss, parts


# ------------------------------------------------------------------------------------------------------- eval
@torch.inference_mode()
def fast_eval(model, tok, samples, feats: torch.Tensor, tokens: int, batch_size: int = 64) -> dict:
    """Single-turn accuracy (the argmax answer word) of ``samples`` from their cached tokens pooled to ``tokens``:
    overall and per family, in percent."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = {f: [] for f in FAMILIES}
    rng = np.random.default_rng(0)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        b = conversation_batch(tok, chunk, 1, rng, tokens, targets=False)
        # one turn each: the planned question only
        f = pool_tokens(feats[i:i + batch_size].float(), tokens).to(device)
        h = _forward(model, b["input_ids"].to(device), f)
        pred = model.lm_head(h[b["rows"].to(device), b["at"].to(device)]).argmax(-1).cpu()
        for fam, ok in zip(b["family"].tolist(), (pred == b["target"]).tolist()):
            hits[FAMILIES[fam]].append(ok)
    model.train(was)
    allh = [h for v in hits.values() for h in v]
    return dict(overall=round(100.0 * float(np.mean(allh)), 1),
                families={f: round(100.0 * float(np.mean(v)), 1) for f, v in hits.items() if v})


# ------------------------------------------------------------------------------------------------------ train
def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "embed_tokens" in name or "norm" in name or name.endswith("lm_head.weight")
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_schedule(step: int, total: int, last_stage_start: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak``, constant, then a cosine to 0.1 ``peak`` over the last stage."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < last_stage_start:
        return peak
    t = (step - last_stage_start) / max(1, total - last_stage_start)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_decoder(model, tok, cache: TokenCache, stages, out: Path, *, seed: int = 0, lr: float = 1e-3,
                  warmup: int = 100, weight_decay: float = 0.05, turns: int = 8, existence_steps: int = 300,
                  device: torch.device = torch.device("cpu"), val: tuple | None = None, eval_every: int = 250,
                  checkpoint_minutes: float = 15.0, resume: bool = False, log=print, max_steps: int | None = None,
                  bf16: bool = False, ground_weight: float = 0.0, align_weight: float = 0.0) -> list[dict]:
    """Train the projector and decoder of ``model`` (its tower frozen) through ``stages`` on ``cache``.
    ``val`` = (samples, tokens (n, 576, D)) is scored by :func:`fast_eval` every ``eval_every`` steps and at
    each stage's end. ``max_steps`` stops early (for tests); the checkpoint is then written."""
    model.to(device).train()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-8)
    params = [p for g in opt.param_groups for p in g["params"]]
    total = sum(s.steps for s in stages)
    bounds = np.cumsum([0] + [s.steps for s in stages])
    ckpt = out / "checkpoint.pt"
    start, history = 0, []
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"--resume: no {ckpt}; start the run without --resume")
        blob = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["model"], strict=False)
        opt.load_state_dict(blob["optimizer"])
        start, history = blob["step"], blob["history"]
        log(json.dumps(dict(stage="resume", step=start)))

    def save(step):
        trainable = {k: v for k, v in model.state_dict().items() if "vision_tower" not in k}
        tmp = ckpt.with_suffix(".tmp")
        torch.save(dict(model=trainable, optimizer=opt.state_dict(), step=step, history=history), tmp)
        tmp.replace(ckpt)

    t_save, t0, window = time.time(), time.time(), []
    end = total if max_steps is None else min(total, max_steps)
    for step in range(start, end):
        k = int(np.searchsorted(bounds, step, side="right") - 1)
        stage = stages[k]
        for g in opt.param_groups:
            g["lr"] = lr_schedule(step, total, int(bounds[-2]), lr, warmup)
        rng = np.random.default_rng([seed, step, 5])
        idx = rng.choice(len(cache.samples), stage.batch_size, replace=False)
        fams = ("existence",) if step < existence_steps else FAMILIES
        batch = conversation_batch(tok, [cache.samples[i] for i in idx], turns, rng, stage.tokens, fams,
                                   targets=bool(ground_weight or align_weight))
        feats = pool_tokens(cache.feats[torch.from_numpy(idx)].float(), stage.tokens).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, parts = batch_loss(model, batch, feats, ground_weight=ground_weight, align_weight=align_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append(parts)
        stage_end = step + 1 == bounds[k + 1]
        due = (step + 1) % eval_every == 0 or stage_end or step + 1 == end
        if (step + 1) % 50 == 0 or due:
            keys = sorted({key for w in window for key in w})
            rec = dict(step=step + 1, tokens=stage.tokens, seconds=round(time.time() - t0, 1),
                       lr=round(opt.param_groups[0]["lr"], 6), loss=round(float(loss.detach()), 4),
                       **{key: round(float(np.mean([w[key] for w in window if key in w])), 4) for key in keys})
            window = []
            if due and val is not None:
                rec["validation"] = fast_eval(model, tok, val[0], val[1], stage.tokens)
                if stage.tokens != GRID * GRID and stage_end:
                    rec["validation_576"] = fast_eval(model, tok, val[0], val[1], GRID * GRID)
            history.append(rec)
            log(json.dumps(rec))
        if stage_end or step + 1 == end or time.time() - t_save > 60 * checkpoint_minutes:
            save(step + 1)
            t_save = time.time()
    return history
