"""The proxy LVLM v2 recipe: a tower that sees first, then a deep narrow decoder trained on cached tokens.

    python -m evals.proxy.recipe tower --out runs/v2            # stage 0: the vision tower alone, on crops
    python -m evals.proxy.recipe decoder --out runs/v2          # stages 1-3: projector + decoder, tower frozen
    python -m evals.proxy.recipe next --out runs/v2             # stage B: the AnyRes (LLaVA-NeXT) proxy

Stage 0 (``tower``) trains the CLIP tower of a fresh LLaVA-1.5 proxy alone (``pretrain.train_vision``: crops of
6x6 and 12x12 patches and whole scenes in turn, sin-cos positions, mimetic attention init, a CNN teacher) and
writes ``tower.pt`` (the tower's state dict and the run's log) into ``--out``.

The decoder stages are in :mod:`evals.proxy.decoder`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from . import model as pm
from .decoder import STAGES

__all__ = ["train_tower", "load_tower_file", "main"]


def train_tower(out: Path, steps: int, teacher_steps: int, batch_size: int, lr: float, sides, seed: int,
                device: torch.device, log, start=None) -> dict:
    """Stage 0 of the v2 recipe into ``out/tower.pt``; returns the saved record. ``start``: a ``tower.pt`` to
    continue from (a new learning-rate schedule of ``steps`` steps; the record keeps the earlier run's)."""
    from .pretrain import mimetic_init, train_teacher, train_vision
    from .train import AuxHeads, sincos_positions

    model = pm.build_model("llava", seed=seed)
    proc = pm.build_processor("llava")
    heads = AuxHeads(model.config.vision_config.hidden_size)
    before = None
    if start is not None:
        blob = _read_tower(start)
        _load_tower(model, blob)
        before = blob["record"]
        if "heads" in blob:
            heads.load_state_dict(blob["heads"])
    else:
        sincos_positions(model)
        mimetic_init(model.model.vision_tower, seed=seed)
    t0 = time.time()
    teacher = train_teacher(teacher_steps, batch_size, seed, device, sides[0], log=log) if teacher_steps else None
    hist = train_vision(model, proc, heads, steps, batch_size, lr, seed, device, log,
                        eval_every=max(25, steps // 6 // 25 * 25), sides=sides, teacher=teacher)
    rec = dict(seconds=round(time.time() - t0, 1), steps=steps, teacher_steps=teacher_steps, batch_size=batch_size,
               lr=lr, sides=list(sides), seed=seed, device=str(device), history=hist)
    if before is not None:
        rec = dict(rec, seconds=round(rec["seconds"] + before.get("seconds", 0), 1),
                   steps=steps + before.get("steps", 0), continued_from=before)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float() for k, v in model.model.vision_tower.state_dict().items()}
    hstate = {k: v.detach().cpu().float() for k, v in heads.state_dict().items()}
    torch.save(dict(tower=state, heads=hstate, record=rec), out / "tower.pt")
    return rec


def _read_tower(path) -> dict:
    """The contents of a ``tower.pt`` (or of the one in the folder ``path``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tower.pt"
    if not path.exists():
        raise FileNotFoundError(f"no stage-0 tower at {path}; write one with `python -m evals.proxy.recipe tower "
                                f"--out {path.parent}`")
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_tower(model, blob: dict) -> None:
    tower = model.model.vision_tower
    dtype = next(tower.parameters()).dtype
    tower.load_state_dict({k: v.to(dtype) for k, v in blob["tower"].items()}, strict=True)


def load_tower_file(model, path) -> dict:
    """Load the tower of a ``tower.pt`` written by :func:`train_tower` into ``model``; returns its record."""
    blob = _read_tower(path)
    _load_tower(model, blob)
    return blob["record"]


def _device(name: str) -> torch.device:
    from vlprune.cliargs import device_name

    name = device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv=None) -> int:
    from vlprune.cliargs import Parser, existing_file, nonneg_float, nonneg_int, positive_float, positive_int

    from .train import _sides, add_precision_args

    ap = Parser(prog="python -m evals.proxy.recipe", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="stage", required=True, parser_class=Parser)
    t = sub.add_parser("tower", help="stage 0: the vision tower alone on crops, into OUT/tower.pt")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=positive_int, default=1800)
    t.add_argument("--teacher-steps", type=nonneg_int, default=300)
    t.add_argument("--batch-size", type=positive_int, default=96, help="crops of the first side per step")
    t.add_argument("--lr", type=positive_float, default=2e-3)
    t.add_argument("--crop", type=_sides, default=[6, 12, 24])
    t.add_argument("--from", dest="start", default=None, metavar="TOWER_PT", type=existing_file,
                   help="continue from a stage-0 tower.pt (a new schedule of --steps steps)")
    d = sub.add_parser("decoder", help="stages 1-3: projector + decoder on cached tokens of OUT/tower.pt, into "
                       "OUT/llava-proxy")
    d.add_argument("--out", required=True)
    d.add_argument("--tower", default=None, type=existing_file, help="tower.pt of stage 0 (default OUT/tower.pt)")
    d.add_argument("--stages", type=_stages, default=list(STAGES),
                   help="tokens:steps:batch per stage, comma-separated (default "
                   + ",".join(f"{s.tokens}:{s.steps}:{s.batch_size}" for s in STAGES) + ")")
    d.add_argument("--cache", type=positive_int, default=12000, help="training scenes whose tower tokens are cached")
    d.add_argument("--turns", type=positive_int, default=8, help="questions per scene per sequence")
    d.add_argument("--lr", type=positive_float, default=1e-3)
    d.add_argument("--warmup", type=nonneg_int, default=100)
    d.add_argument("--existence-steps", type=nonneg_int, default=300, help="first steps ask existence questions only")
    d.add_argument("--ground-weight", type=nonneg_float, default=0.5,
                   help="weight of the grounding loss on one decoder head (0: none)")
    d.add_argument("--align-weight", type=nonneg_float, default=1.0,
                   help="weight of the alignment loss of image tokens to the words naming their block (0: none)")
    d.add_argument("--val-n", type=nonneg_int, default=360, help="validation samples scored during training")
    d.add_argument("--eval-every", type=nonneg_int, default=250)
    d.add_argument("--checkpoint-minutes", type=positive_float, default=15.0)
    d.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    d.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (checkpointed)")
    add_precision_args(d)
    n = sub.add_parser("next", help="stage B: the AnyRes (LLaVA-NeXT) proxy from OUT/llava-proxy, into "
                       "OUT/llava-next-proxy")
    n.add_argument("--out", required=True)
    n.add_argument("--steps", type=positive_int, default=300)
    n.add_argument("--batch-size", type=positive_int, default=2, help="high-resolution scenes per step")
    n.add_argument("--turns", type=positive_int, default=8)
    n.add_argument("--lr", type=positive_float, default=3e-4)
    n.add_argument("--val-n", type=nonneg_int, default=120, help="high-resolution validation samples at the end")
    add_precision_args(n)
    for p in (t, d, n):
        p.add_argument("--seed", type=nonneg_int, default=0)
        p.add_argument("--device", type=_device, default="auto")
        p.add_argument("--threads", type=nonneg_int, default=0, help="torch threads on a CPU (0: all cores)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    # what a stage reads must be there before anything is written
    if args.stage == "decoder":
        tower = Path(args.tower) if args.tower else out / "tower.pt"
        if not tower.is_file():
            sub.choices["decoder"].error(f"no stage-0 tower at {tower}; write one with `python -m evals.proxy.recipe "
                                         f"tower --out {out}` or give --tower PATH")
        if args.resume and not (out / "checkpoint.pt").is_file():
            sub.choices["decoder"].error(f"--resume: no checkpoint at {out / 'checkpoint.pt'}; drop --resume to "
                                         f"start afresh")
    if args.stage == "next" and not (out / "llava-proxy" / "config.json").is_file():
        sub.choices["next"].error(f"no LLaVA-1.5 proxy at {out / 'llava-proxy'}; train it first with "
                                  f"`python -m evals.proxy.recipe decoder --out {out}`")
    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / f"{args.stage}.log", "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    args.command = "python -m evals.proxy.recipe " + " ".join(argv if argv is not None else sys.argv[1:])
    log(json.dumps(dict(command=args.command, device=str(args.device), torch=torch.__version__,
                        python=platform.python_version(), threads=torch.get_num_threads())))
    if args.stage == "tower":
        rec = train_tower(out, args.steps, args.teacher_steps, args.batch_size, args.lr, args.crop, args.seed,
                          args.device, log, start=args.start)
        log(json.dumps(dict(stage="tower", seconds=rec["seconds"])))
    elif args.stage == "decoder":
        train_decoder_stage(args, out, log)
    else:
        train_next(args, out, log)
    return 0


def train_next(args, out: Path, log) -> None:
    """The ``next`` command: every weight of ``OUT/llava-proxy`` copied into LLaVA-NeXT (``image_newline`` drawn
    fresh); projector, decoder and ``image_newline`` fine-tuned on multi-turn conversations about 672x336 /
    336x672 scenes (``train.train_stage``), the tower frozen; saved to ``OUT/llava-next-proxy``."""
    from . import load
    from .evaluate import evaluate
    from .train import train_stage, use_bf16

    bf16 = use_bf16(args.precision, args.device)
    base, proc = load("llava", folder=out / "llava-proxy")
    nxt = pm.next_from_llava(base, seed=args.seed)
    nproc = pm.build_processor("next", proc.tokenizer)

    def val(m):
        r = evaluate(m, nproc, "validation", n=args.val_n, geometry="next", batch_size=8)
        return {k: r[k] for k in ("overall", "families")}

    t0 = time.time()
    hist = train_stage(nxt, nproc, "next", args.steps, args.batch_size, args.lr, args.seed + 1, args.device, bf16,
                       0, args.turns, log, freeze_vision=True, eval_every=args.steps,
                       eval_fn=val if args.val_n else None)
    rec = dict(command=args.command, device=str(args.device),
               gpu=torch.cuda.get_device_name(0) if args.device.type == "cuda" else None,
               threads=torch.get_num_threads(), torch=torch.__version__, bf16=bf16, steps=args.steps,
               batch_size=args.batch_size, turns=args.turns, lr=args.lr, seconds=round(time.time() - t0, 1),
               history=hist)
    nxt.to("cpu").float().eval()
    pm.save(nxt.to(torch.bfloat16), nproc, out / "llava-next-proxy", extra=rec)
    log(json.dumps(dict(stage="next", saved=str(out / "llava-next-proxy"), seconds=rec["seconds"])))


def _stages(text: str) -> list:
    """``--stages``: comma-separated ``tokens:steps:batch`` triples, tokens one of 64, 144, 576."""
    from .decoder import Stage

    try:
        stages = [Stage(*(int(v) for v in part.split(":"))) for part in text.split(",")]
    except (TypeError, ValueError):
        stages = []
    if not stages or not all(s.tokens in (64, 144, 576) and s.steps > 0 and s.batch_size > 0 for s in stages):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of tokens:steps:batch with tokens "
                                         "in 64, 144, 576 and positive steps and batch (e.g. 64:2200:32,576:250:8)")
    return stages


def train_decoder_stage(args, out: Path, log) -> None:
    """The ``decoder`` command: cache tokens, train, save ``OUT/llava-proxy`` and its ``training.json``."""
    from .decoder import TokenCache, tower_tokens, train_decoder
    from .evaluate import samples as bench_samples
    from .train import use_bf16

    bf16 = use_bf16(args.precision, args.device)
    tok = pm.build_tokenizer()
    proc = pm.build_processor("llava", tok)
    model = pm.build_model("llava", seed=args.seed)
    tower_rec = load_tower_file(model, args.tower or out / "tower.pt")
    model.to(args.device)
    path = out / f"tokens-{args.cache}-seed{args.seed}.pt"
    if path.exists():
        cache = TokenCache.load(path)
    else:
        cache = TokenCache.build(model, args.cache, args.seed, log)
        cache.save(path)
    val = None
    if args.val_n:
        vs = bench_samples("validation", args.val_n)
        val = (vs, tower_tokens(model, [s.scene for s in vs]))
    t0 = time.time()
    hist = train_decoder(model, tok, cache, args.stages, out, seed=args.seed, lr=args.lr, warmup=args.warmup,
                         turns=args.turns, existence_steps=args.existence_steps, device=args.device, val=val,
                         eval_every=args.eval_every, checkpoint_minutes=args.checkpoint_minutes,
                         resume=args.resume, log=log, max_steps=args.max_steps, bf16=bf16,
                         ground_weight=args.ground_weight, align_weight=args.align_weight)
    total = sum(s.steps for s in args.stages)
    done = hist[-1]["step"] if hist else 0
    rec = dict(command=args.command, device=str(args.device),
               gpu=torch.cuda.get_device_name(0) if args.device.type == "cuda" else None,
               threads=torch.get_num_threads(), torch=torch.__version__, bf16=bf16, seconds=round(time.time() - t0, 1),
               stages=[dataclasses.asdict(s) for s in args.stages], steps_done=done,
               steps_total=total, cache=args.cache, turns=args.turns, lr=args.lr, existence_steps=args.existence_steps,
               ground_weight=args.ground_weight, align_weight=args.align_weight,
               tower=tower_rec, history=hist)
    if done >= total:                   # the last stage's end already scored the validation set at 576 tokens
        model.to("cpu").float().eval()
        pm.save(model.to(torch.bfloat16), proc, out / "llava-proxy", extra=rec)
        log(json.dumps(dict(stage="decoder", saved=str(out / "llava-proxy"), seconds=rec["seconds"])))


if __name__ == "__main__":
    sys.exit(main())
