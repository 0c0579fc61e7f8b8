"""Measure the shipped proxy models and write their model cards: ``python -m evals.proxy.report``.

Figures (all with greedy decoding, every visual token unless said otherwise):

- LLaVA-1.5 geometry: the test split (``--n`` samples, a sixth per family), the same samples with a random 64 of
  576 visual tokens kept before the decoder, and ``--n`` fresh samples from seeds no split uses (900,000,000 on).
- LLaVA-NeXT geometry: ``--n-next`` high-resolution test scenes (672x336 / 336x672).

Writes ``report.json`` and ``README.md`` (the model card) into each model folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import load
from .evaluate import evaluate
from .scenes import FAMILIES

FRESH_START = 900_000_000
# What the shipped weights do not reach; kept with the card so that nobody reads the figures above as more.
LIMITS = {
    "llava": (
        "This model is under-trained. The recipe's CPU budget (about 70 minutes on 2 cores, 2400 steps of 6 scenes) "
        "ends while accuracy is still rising; the targets set for the proxy (90% on existence, 80% overall) are "
        "not reached. Reading the sign is at chance level (the digit is 2-4 patches wide and the decoder has not "
        "learnt to read it yet); spatial relations are near chance. Existence, attribute, counting and fine detail "
        "are learnt in part, and keeping a random 64 of 576 visual tokens costs 12 points overall and 22 on fine "
        "detail, so the benchmark does respond to visual detail. Treat method comparisons on it as indicative only."
    ),
    "next": (
        "Stage B ran 200 steps of 2 scenes (about 7 minutes on the CPU) from an under-trained LLaVA-1.5 proxy; the "
        "AnyRes model is near chance on most families and well below the 75% set as its target. Use it to "
        "exercise AnyRes code paths and costs, not to rank methods."
    ),
}


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "records"}


def _table(rows: dict[str, dict]) -> str:
    head = "| | overall | " + " | ".join(FAMILIES) + " |\n|---|---|" + "---|" * len(FAMILIES) + "\n"
    body = ""
    for name, r in rows.items():
        fam = r["families"]
        body += f"| {name} | {r['overall']:.1f} | " + " | ".join(
            f"{fam[f]:.1f}" if fam.get(f) is not None else "-" for f in FAMILIES) + " |\n"
    return head + body


def card(geometry: str, training: dict, report: dict) -> str:
    from . import model as pm

    hist = training.get("history", [])
    seconds = training.get("seconds")
    mins = f"{seconds / 60:.1f} min" if seconds else "n/a"
    dev = training.get("gpu") or f"CPU ({training.get('threads')} threads)"
    vis, txt = pm.VISION, pm.TEXT
    if geometry == "llava":
        rows = {"test, all 576 tokens": report["test"], "test, random 64 of 576 kept": report["random64"],
                "fresh seeds, all tokens": report["fresh"]}
        what = ("transformers `LlavaForConditionalGeneration` (LLaVA-1.5 geometry: 336 px, patch 14, 576 visual "
                "tokens per image)")
    else:
        rows = {"high-resolution test, all tokens": report["test"]}
        what = ("transformers `LlavaNextForConditionalGeneration` (AnyRes over pinpoints "
                f"{pm.PINPOINTS}; base view plus crops, unpadded, newline tokens)")
    loss_end = hist[-1] if hist else {}
    return f"""# vlprune proxy LVLM ({geometry})

**What it is.** A small vision-language model trained from scratch by `python -m evals.proxy.train` on the
procedural visual QA benchmark in `evals/proxy/scenes.py`, stored in the classes real users run: {what}.
It exists so that visual-token compression can be measured at all on machines where no real LVLM can be had.

**What it is not.** Not a pretrained LVLM, not CLIP, not LLaVA: it knows nothing beyond coloured shapes, signs
with numbers and the benchmark's closed vocabulary. Every figure obtained with it is a *proxy figure*; it says how
a method treats visual detail that a question depends on, not how a real model scores on a real benchmark.

## Architecture
- Vision: `CLIPVisionModel` with a CLS token, {vis['image_size']} px, patch {vis['patch_size']}, hidden
  {vis['hidden_size']}, {vis['num_hidden_layers']} layers, {vis['num_attention_heads']} heads, MLP
  {vis['intermediate_size']}; features from layer -2 without CLS (LLaVA's "default").
- Projector: LLaVA's two-layer GELU MLP ({vis['hidden_size']} -> {txt['hidden_size']} -> {txt['hidden_size']}).
- Decoder: Llama, hidden {txt['hidden_size']}, {txt['num_hidden_layers']} layers, {txt['num_attention_heads']}
  query heads and {txt['num_key_value_heads']} KV heads (GQA), SwiGLU MLP {txt['intermediate_size']}, RoPE.
- Tokenizer: word-level over the benchmark vocabulary ({report.get('vocab_size')} tokens), chat template
  `USER: <image>\\n{{question}} ASSISTANT: {{answer}}</s>`. Weights stored in bfloat16 (safetensors); the figures
  below were measured on the stored weights loaded in float32.

## Data
Scenes of 2-7 shapes (circle, square, triangle, diamond, cross; six colours; large, medium and small, the small
ones 16-24 px) on plain, gradient, striped or noisy grey backgrounds, and in half of them a sign with one digit
drawn in a 5x7 bitmap font (the sign under 2% of the image). Six question families, answered by one word: existence (POPE-style positives
and random, popular and adversarial negatives), attribute, counting, spatial relations, reading the sign, and
fine detail (the one small object, under 0.6% of the image). Training draws scenes from seeds below 10^8,
validation from 10^8, test from 2x10^8; "fresh" seeds start at 9x10^8.

## Recipe
`{training.get('command')}` (seed {training.get('args', {}).get('seed')}), on {dev}, torch
{training.get('torch')}, transformers {training.get('transformers')}. Stage {training.get('stage')} took {mins}.
Stage A trains every weight jointly from random initialisation on multi-turn conversations (up to 16 questions
per scene, answers supervised), with auxiliary vision losses standing in for CLIP pre-training: per-patch class
of the feature layer's tokens, and object-kind presence and object count from the final CLS token (these heads
are discarded). A grounding loss trains one decoder attention head (layer 4 of 8, head 0), from the position
that predicts each answer, to attend to the patches of the objects the question is about; methods that score
visual tokens by decoder attention may therefore find a cleaner signal in this model than in a real LVLM. Stage B copies the towers into LLaVA-NeXT and fine-tunes projector, decoder and `image_newline`
on high-resolution scenes with the vision tower frozen. Last logged losses: {json.dumps({k: v for k, v in loss_end.items() if k in ('lm', 'patch', 'present', 'count')})}.

## Accuracy (%)
{_table(rows)}
Sample counts: {json.dumps(report['test']['counts'])} per family.

## Limitations
{LIMITS.get(geometry, '')}
"""


def main(argv=None) -> int:
    from . import model as pm
    from .train import DEFAULT_OUT

    ap = argparse.ArgumentParser(prog="python -m evals.proxy.report", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(DEFAULT_OUT))
    ap.add_argument("--n", type=int, default=1800)
    ap.add_argument("--n-next", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    root = Path(args.weights)
    for geometry, folder in (("llava", "llava-proxy"), ("next", "llava-next-proxy")):
        path = root / folder
        if not (path / "config.json").exists():
            print(f"skip {path}: no model there", file=sys.stderr)
            continue
        model, proc = load(geometry, device=str(device), folder=path)
        t0 = time.time()
        rep = {"vocab_size": len(proc.tokenizer)}
        if geometry == "llava":
            rep["test"] = evaluate(model, proc, "test", args.n, batch_size=args.batch_size, progress=True)
            rep["random64"] = evaluate(model, proc, "test", args.n, batch_size=args.batch_size, drop_visual=64,
                                       progress=True)
            rep["fresh"] = evaluate(model, proc, seeds=range(FRESH_START, FRESH_START + args.n),
                                    batch_size=args.batch_size, progress=True)
        else:
            rep["test"] = evaluate(model, proc, "test", args.n_next, geometry="next",
                                   batch_size=max(1, args.batch_size // 4), progress=True)
        rep["seconds"] = round(time.time() - t0, 1)
        rep["device"] = str(device)
        full = {k: (_strip(v) if isinstance(v, dict) else v) for k, v in rep.items()}
        (path / "report.json").write_text(json.dumps(full, indent=1))
        with open(path / "records.jsonl", "w") as f:
            for k, v in rep.items():
                if isinstance(v, dict) and "records" in v:
                    for r in v["records"]:
                        f.write(json.dumps(dict(run=k, **r)) + "\n")
        training = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
        (path / "README.md").write_text(card(geometry, training, full))
        print(geometry, json.dumps({k: (v["overall"], v["families"]) for k, v in full.items()
                                    if isinstance(v, dict) and "overall" in v}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
