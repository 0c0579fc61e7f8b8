"""Train an MQT (Matryoshka Query Transformer) projector for the proxy LVLM:
``python -m evals.proxy.train_mqt`` writes ``evals/proxy/weights/llava-mqt-proxy``.

Starting from the shipped LLaVA-1.5-geometry proxy (its vision tower stays frozen throughout):

- stage 1 trains the MQT projector alone with m = M (256) visual tokens, the decoder frozen;
- stage 2 trains the projector and the decoder, drawing m for every step uniformly from {2, 4, ..., M} (the first
  m queries feed the decoder), as MQT-LLaVA's second stage does.

The loss is the language-model loss on the answers of multi-turn conversations on proxy scenes (the data of
``evals.proxy.train``). The saved folder is a LLaVA-1.5 checkpoint (the decoder fine-tuned in stage 2, the base
proxy's MLP projector kept but unused) plus ``mqt_projector.safetensors`` / ``.json``; ``evals.proxy.load("mqt")``
puts them together (``vlprune.methods.mqt.attach_mqt``). Seeded: the same command on the same device gives the
same weights.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import model as pm
from .train import _autocast, add_precision_args, lr_at, make_batch, use_bf16

DEFAULT_OUT = Path(__file__).resolve().parent / "weights" / "llava-mqt-proxy"


def shrink_image_run(batch: dict, image_token_id: int, m: int) -> dict:
    """Keep the first m of each sample's image placeholder tokens (every row has one image of equal length)."""
    ids = batch["input_ids"]
    img = ids == image_token_id
    rank = torch.cumsum(img.long(), 1)
    keep = ~img | (rank <= m)
    n = int(keep[0].sum())
    if not bool((keep.sum(1) == n).all()):
        raise ValueError("every sample must hold one image")
    out = dict(batch)
    for k in ("input_ids", "attention_mask", "labels"):
        out[k] = batch[k][keep].reshape(ids.shape[0], n)
    return out


def train(model, mqt_host, processor, steps: int, batch_size: int, lr: float, seed: int, turns: int, stage: int,
          max_m: int, log, device, bf16: bool) -> list[dict]:
    from vlprune.methods.mqt import check_m

    torch.manual_seed(seed)
    rnd = random.Random(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(mqt_host.mqt.parameters())
    if stage == 2:
        trainable += list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    trainable = [p for p in trainable if p is not mqt_host.mqt.pos_embed]  # the sin-cos grid stays fixed
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.to(device).train()
    history, window, t0 = [], [], time.time()
    image_id = model.config.image_token_id
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        m = max_m if stage == 1 else rnd.choice(range(2, max_m + 1, 2))
        mqt_host.m = check_m(m, mqt_host.mqt.n_queries)
        mqt_host.n_out = m
        batch = make_batch(processor, "llava", batch_size, seed + 7919 * stage, step, turns)
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "pixel_values")}
        batch = shrink_image_run(batch, image_id, m)
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device, bf16):
            loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        window.append(float(loss))
        if (step + 1) % 25 == 0 or step + 1 == steps:
            rec = dict(stage=stage, step=step + 1, seconds=round(time.time() - t0, 1), lr=opt.param_groups[0]["lr"],
                       lm=round(float(np.mean(window)), 4), m=m)
            window = []
            history.append(rec)
            log(json.dumps(rec))
    return history


def main(argv=None) -> int:
    from vlprune.cliargs import Parser, device_name, nonneg_int, positive_float, positive_int

    ap = Parser(prog="python -m evals.proxy.train_mqt", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--steps1", type=positive_int, default=300, help="stage 1 steps (projector only, m = M)")
    ap.add_argument("--steps2", type=nonneg_int, default=900, help="stage 2 steps (projector + decoder, m from {2..M})")
    ap.add_argument("--batch-size", type=positive_int, default=6)
    ap.add_argument("--turns", type=positive_int, default=16)
    ap.add_argument("--lr1", type=positive_float, default=1e-3)
    ap.add_argument("--lr2", type=positive_float, default=2e-4)
    ap.add_argument("--queries", type=positive_int, default=256, help="M, the number of queries (a square)")
    ap.add_argument("--heads", type=positive_int, default=3, help="attention heads (head width 64 on the proxy's 192)")
    ap.add_argument("--keys", default="position", choices=["position", "features"],
                    help="MQT key mode: 'position' (the released code) or 'features' (image features + position)")
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--device", default="auto", type=device_name)
    ap.add_argument("--threads", type=nonneg_int, default=0)
    add_precision_args(ap)
    args = ap.parse_args(argv)
    side = int(round(args.queries ** 0.5))
    if side * side != args.queries:
        ap.error(f"--queries {args.queries} is not a square (the queries form a grid); give e.g. "
                 f"{max(1, side) ** 2} or {(side + 1) ** 2}")
    width = pm.VISION["hidden_size"]
    if width % args.heads:
        ap.error(f"--heads {args.heads} does not divide the proxy's vision width {width}; give one of "
                 f"{', '.join(str(h) for h in range(1, 13) if width % h == 0)}")

    from vlprune.methods.mqt import MQTHost, MQTProjector, save_mqt

    from . import load

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = use_bf16(args.precision, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    import transformers

    meta = dict(command="python -m evals.proxy.train_mqt " + " ".join(argv if argv is not None else sys.argv[1:]),
                args=vars(args), device=str(device), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), threads=torch.get_num_threads(), bf16=bf16)
    log(json.dumps(meta))
    model, processor = load("llava")
    model.float()
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    torch.manual_seed(args.seed)
    mqt = MQTProjector(vcfg.hidden_size, tcfg.hidden_size, n_queries=args.queries, n_heads=args.heads, keys=args.keys)
    mlp = model.model.multi_modal_projector
    host = MQTHost(mqt, args.queries)
    model.model.multi_modal_projector = host
    t0 = time.time()
    hist = train(model, host, processor, args.steps1, args.batch_size, args.lr1, args.seed, args.turns, 1,
                 args.queries, log, device, bf16)
    hist += train(model, host, processor, args.steps2, args.batch_size, args.lr2, args.seed + 1, args.turns, 2,
                  args.queries, log, device, bf16)
    seconds = round(time.time() - t0, 1)
    model.to("cpu").eval()
    model.model.multi_modal_projector = mlp  # the checkpoint keeps the stock projector slot; MQT goes beside it
    pm.save(model.to(torch.bfloat16), processor, out, extra=dict(meta, seconds=seconds, history=hist, mqt=mqt.config))
    save_mqt(mqt.float(), out)
    log(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
