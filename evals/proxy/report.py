"""Measure the shipped proxy models and write their model cards: ``python -m evals.proxy.report``.

Figures (all with greedy decoding, every visual token unless said otherwise):

- LLaVA-1.5 geometry: the test split (``--n`` samples, a sixth per family), the same samples with a random 64 of
  576 visual tokens kept before the decoder, and ``--n`` fresh samples from seeds no split uses (900,000,000 on).
- LLaVA-NeXT geometry: ``--n-next`` high-resolution test scenes (672x336 / 336x672).
- The blind baseline (``scenes.blind_baseline``: the commonest training answer per question, no image) and chance
  on the same test samples; every accuracy with its 95% Wilson interval.

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
# What the project wants from its test bed (issue "proxy v2"); the card says which the measured model meets.
TARGETS = dict(overall=80.0, existence=90.0, above_blind=25.0, next_overall=75.0, random64_drop=10.0)


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "records"}


def _ci(r: dict, family: str | None = None) -> str:
    """'61.5 ±3.2': the accuracy and the half width of its 95% Wilson interval (from the records' counts)."""
    from ..stats import wilson

    acc = r["overall"] if family is None else r["families"].get(family)
    n = r["n"] if family is None else r.get("counts", {}).get(family)
    if acc is None:
        return "-"
    if not n:
        return f"{acc:.1f}"
    lo, hi = wilson(int(round(acc * n / 100)), int(n))
    return f"{acc:.1f} ±{(hi - lo) / 2:.1f}"


def _table(rows: dict[str, dict], blind: dict | None = None) -> str:
    head = "| | overall | " + " | ".join(FAMILIES) + " |\n|---|---|" + "---|" * len(FAMILIES) + "\n"
    body = ""
    for name, r in rows.items():
        body += f"| {name} | {_ci(r)} | " + " | ".join(_ci(r, f) for f in FAMILIES) + " |\n"
    if blind:
        fam = blind["families"]
        body += (f"| blind: question only (commonest training answer per question) | {blind['overall']:.1f} | "
                 + " | ".join(f"{fam.get(f, float('nan')):.1f}" for f in FAMILIES) + " |\n")
        body += ("| chance (uniform over the question's answers) | - | "
                 + " | ".join(f"{blind['chance'].get(f, float('nan')):.1f}" for f in FAMILIES) + " |\n")
    return head + body + "\n±: half width of the 95% Wilson interval.\n"


def _curve(history: list[dict]) -> str:
    """The training curve: answer-word loss and validation accuracy per family against step."""
    rows = [h for h in history if "validation" in h]
    if not rows:
        return "(no validation during training)\n"
    head = ("| step | image tokens | answer-word loss | validation overall | " + " | ".join(FAMILIES) + " |\n"
            + "|---|---|---|---|" + "---|" * len(FAMILIES) + "\n")
    body = ""
    for h in rows:
        v = h["validation"]
        body += (f"| {h['step']} | {h.get('tokens', '-')} | {h.get('answer', float('nan')):.3f} | {v['overall']:.1f} | "
                 + " | ".join(f"{v['families'].get(f, float('nan')):.1f}" for f in FAMILIES) + " |\n")
    return head + body


def _recipe(training: dict) -> str:
    """The stages the recorded v2 training ran, in words."""
    tw = training.get("tower") or {}
    stages = training.get("stages") or []
    sides = " / ".join(f"{s}x{s}" for s in tw.get("sides", []))
    text = (f"Stage 0 trains the vision tower alone (`python -m evals.proxy.recipe tower`: {tw.get('steps')} steps "
            f"of {tw.get('batch_size')} crops of {sides} patches in turn, 24x24 being the whole scene, after a "
            f"{tw.get('teacher_steps')}-step CNN teacher; {tw.get('seconds', 0) / 60:.1f} min on {tw.get('device')}), "
            "from a 2-D sin-cos position init and a mimetic attention init, on per-patch classes of the feature "
            "layer's tokens (background, 30 object kinds, 10 digits, sign plate), the object kinds present from the "
            "final CLS token, and regression onto the teacher's features (heads discarded). ")
    parts = ", then ".join(f"{s['steps']} steps at {s['tokens']} image tokens ({s['batch_size']} scenes per step)"
                           for s in stages)
    text += (f"The decoder stages (`python -m evals.proxy.recipe decoder`) keep the tower frozen and train the "
             f"projector and decoder on its cached tokens of {training.get('cache')} training scenes, the 24x24 "
             f"tokens average-pooled to the stage's count: {parts}. Each sequence holds one scene and "
             f"{training.get('turns')} questions about it (the first of a family taken in turn, answer drawn first; "
             f"the others asked about the scene), the first {training.get('existence_steps')} steps existence only; "
             "the loss is the mean over families of the answer-word loss plus 0.1 times the `</s>` loss; AdamW, "
             f"peak learning rate {training.get('lr')}, warmup, no decay on embeddings, norms and biases, a cosine "
             f"decay over the last stage; a grounding loss (weight {training.get('ground_weight', 0)}) on one head "
             "(layer 4, head 0) from each answer's position to the image tokens of the objects asked about, and an "
             f"alignment loss (weight {training.get('align_weight', 0)}) that makes each image token read, against "
             "the word embeddings, as the words naming what covers it. Methods that score tokens by decoder "
             "attention may find a cleaner signal in this model than in a real LVLM. "
             f"The decoder stages' {training.get('steps_total')} steps ran on {training.get('gpu') or 'the CPU'} "
             f"({training.get('threads')} threads, {'bf16 autocast' if training.get('bf16') else 'float32'}); the "
             f"last command, `{training.get('command')}`, ran {training.get('seconds', 0) / 60:.1f} min"
             + (" (resumed from a checkpoint; the curve below holds every step)" if "--resume" in
                str(training.get("command")) else "") + ". ")
    return text


def _targets(report: dict) -> str:
    """Which of the project's targets the measured model meets, from the figures above."""
    t, b = report.get("fresh") or report["test"], report.get("blind")
    lines = [f"- overall at least {TARGETS['overall']:.0f}% on fresh seeds: {t['overall']:.1f} "
             f"({'met' if t['overall'] >= TARGETS['overall'] else 'not met'})",
             f"- existence at least {TARGETS['existence']:.0f}%: {t['families'].get('existence', 0):.1f} "
             f"({'met' if t['families'].get('existence', 0) >= TARGETS['existence'] else 'not met'})"]
    if b:                                       # the blind score was measured on the test samples
        for f in FAMILIES:
            gap = report["test"]["families"].get(f, 0) - b["families"].get(f, 0)
            lines.append(f"- {f} at least {TARGETS['above_blind']:.0f} points above blind: {gap:+.1f} "
                         f"({'met' if gap >= TARGETS['above_blind'] else 'not met'})")
    if report.get("random64"):
        drop = report["test"]["overall"] - report["random64"]["overall"]
        lines.append(f"- a random 64 of 576 tokens loses at least {TARGETS['random64_drop']:.0f} points: "
                     f"{drop:.1f} ({'met' if drop >= TARGETS['random64_drop'] else 'not met'})")
    if report.get("fresh"):
        gap = abs(report["fresh"]["overall"] - report["test"]["overall"])
        lines.append(f"- fresh seeds within 3 points of the test split: {gap:.1f} ({'met' if gap <= 3 else 'not met'})")
    pr = report.get("probe") or {}
    for key, name in (("shape_balanced", "shape"), ("digit_balanced", "digit")):
        if pr.get(key) is not None:
            lines.append(f"- the tower's per-patch linear probe reads {name} at 90% or more (balanced): "
                         f"{100 * pr[key]:.1f} ({'met' if pr[key] >= 0.9 else 'not met'})")
    return "\n".join(lines) + "\n"


def _probe_section(report: dict) -> str:
    pr = report.get("probe")
    if not pr:
        return ""
    keys = [k for k in ("background", "colour", "colour_balanced", "shape", "shape_balanced", "shape_small",
                        "shape_large", "digit", "digit_balanced", "sign") if k in pr]
    return ("\n## What the visual tokens carry\n"
            "A linear probe per patch on the frozen tower's feature layer (`python -m evals.proxy.probe`, fitted on "
            f"{pr['train_scenes']} train scenes, scored on {pr['eval_scenes']} validation scenes), accuracy (%):\n\n"
            "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n| "
            + " | ".join(f"{100 * pr[k]:.1f}" if pr.get(k) is not None else "-" for k in keys) + " |\n\n"
            "`_balanced` is the mean recall over the classes (chance: 1/6 colour, 1/5 shape, 1/10 digit); "
            "`shape_small` / `shape_large` split shape between small objects (14-20 px) and the others. A question "
            "family cannot score above what its tokens carry: shape questions need `shape`, the text family "
            "`digit`.\n")


def card(geometry: str, training: dict, report: dict) -> str:
    from . import model as pm

    vis, txt = pm.VISION, pm.TEXT
    if geometry == "llava":
        rows = {"test, all 576 tokens": report["test"], "test, a random 64 of 576 kept": report["random64"],
                "fresh seeds, all tokens": report["fresh"]}
        what = ("transformers `LlavaForConditionalGeneration` (LLaVA-1.5 geometry: 336 px, patch 14, 576 visual "
                "tokens per image)")
        recipe = _recipe(training)
        curve = "\n## Training curve (validation, cached tokens, single questions)\n" + _curve(
            training.get("history", []))
    else:
        rows = {"high-resolution test, all tokens": report["test"]}
        what = ("transformers `LlavaNextForConditionalGeneration` (AnyRes over pinpoints "
                f"{pm.PINPOINTS}; base view plus crops, unpadded, newline tokens)")
        recipe = (f"Copied from the LLaVA-1.5 proxy (every weight) and fine-tuned by `{training.get('command')}`: "
                  f"projector, decoder and `image_newline` on high-resolution scenes, the vision tower frozen, "
                  f"{training.get('steps')} steps of {training.get('batch_size')} scenes "
                  f"({training.get('seconds', 0) / 60:.1f} min on {training.get('gpu') or 'the CPU'}). ")
        curve = ""
    return f"""# vlprune proxy LVLM ({geometry})

**What it is.** A small vision-language model trained from scratch on the procedural visual QA benchmark in
`evals/proxy/scenes.py`, stored in the classes real users run: {what}. It exists so that visual-token compression
can be measured at all on machines where no real LVLM can be had.

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
  Depth rule: deep enough that every in-LLM method's pruning layers, scaled from the papers' 32-layer schedules,
  land on distinct layers (TransPrune [4, 5, 6], MustDrop [2, 4, 6, 8] at 16 layers), narrow so steps stay cheap.
- Tokenizer: word-level over the benchmark vocabulary ({report.get('vocab_size')} tokens), chat template
  `USER: <image>\\n{{question}} ASSISTANT: {{answer}}</s>`. Weights stored in bfloat16 (safetensors); the figures
  below were measured on the stored weights loaded in float32.

## Data
Scenes of 8-16 shapes (circle, square, triangle, diamond, cross; six colours; large 36-44 px, medium 24-30 px,
small 14-20 px; kinds, sizes and places uniform) on plain, gradient, striped or noisy grey backgrounds, and in
half of them a sign with one digit in a 5x7 bitmap font. Six question families, a sixth of every split each,
answered by one word: existence (POPE-style: yes for half the questions about every kind; negatives random or
adversarial, the colour and the shape present on other objects), attribute, counting (0-5 of a colour or shape,
8-16 in all), spatial relations, reading the sign, and fine detail (the one small object of a colour or shape).
Every answer is drawn before its scene is built, uniformly over the family's answers, so the question alone
says nothing: the blind row below measures that. Training draws scenes from seeds below 10^8, validation from
10^8, test from 2x10^8; "fresh" seeds start at 9x10^8.

## Recipe
{recipe}

## Accuracy (%)
{_table(rows, report.get('blind'))}
Sample counts: {json.dumps(report['test']['counts'])} per family.

## Targets
{_targets(report) if geometry == 'llava' else
 f"- at least {TARGETS['next_overall']:.0f}% on high-resolution scenes: {report['test']['overall']:.1f} "
 f"({'met' if report['test']['overall'] >= TARGETS['next_overall'] else 'not met'})"}
{curve}{_probe_section(report)}"""


def main(argv=None) -> int:
    from . import model as pm
    from .train import DEFAULT_OUT

    from vlprune.cliargs import Parser, device_name, nonneg_int, positive_float, positive_int

    ap = Parser(prog="python -m evals.proxy.report", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(DEFAULT_OUT))
    ap.add_argument("--n", type=nonneg_int, default=1200)
    ap.add_argument("--n-next", type=nonneg_int, default=600)
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--probe", type=nonneg_int, default=256, help="train scenes for the vision probe (0: no probe)")
    ap.add_argument("--probe-only", action="store_true",
                    help="keep each folder's report.json, (re)measure only the vision probe and rewrite the cards")
    ap.add_argument("--only", choices=["llava", "next"], default=None, help="measure one geometry's model only")
    ap.add_argument("--device", default="auto", type=device_name)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    root = Path(args.weights)
    wanted = [f for g, f in (("llava", "llava-proxy"), ("next", "llava-next-proxy")) if args.only in (None, g)]
    if not any((root / f / "config.json").is_file() for f in wanted):
        ap.error(f"--weights {args.weights!r} holds no proxy model ({' or '.join(wanted)} with a config.json); give "
                 f"the folder the training wrote, e.g. --weights {DEFAULT_OUT}")
    if args.probe_only:
        missing = [str(root / f / "report.json") for f in wanted
                   if (root / f / "config.json").is_file() and not (root / f / "report.json").is_file()]
        if missing:
            ap.error(f"--probe-only needs {', '.join(missing)}; run the full report first (without --probe-only)")
    for geometry, folder in (("llava", "llava-proxy"), ("next", "llava-next-proxy")):
        path = root / folder
        if args.only not in (None, geometry):
            continue
        if not (path / "config.json").exists():
            print(f"skip {path}: no model there", file=sys.stderr)
            continue
        training = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
        if args.probe_only:
            if not (path / "report.json").exists():
                raise SystemExit(f"--probe-only needs {path / 'report.json'}; run the full report first")
            full = json.loads((path / "report.json").read_text())
            if geometry == "llava" and args.probe:
                from .probe import probe

                full["probe"] = probe(*load(geometry, device=str(device), folder=path), n_train=args.probe)
                (path / "report.json").write_text(json.dumps(full, indent=1))
            (path / "README.md").write_text(card(geometry, training, full))
            print(geometry, json.dumps(full.get("probe")), flush=True)
            continue
        model, proc = load(geometry, device=str(device), folder=path)
        t0 = time.time()
        rep = {"vocab_size": len(proc.tokenizer)}
        if geometry == "llava":
            rep["test"] = evaluate(model, proc, "test", args.n, batch_size=args.batch_size, progress=True,
                                   blind=True)
            rep["blind"] = rep["test"].pop("blind")
            rep["random64"] = evaluate(model, proc, "test", args.n, batch_size=args.batch_size, drop_visual=64,
                                       progress=True)
            rep["fresh"] = evaluate(model, proc, seeds=range(FRESH_START, FRESH_START + args.n),
                                    batch_size=args.batch_size, progress=True)
            if args.probe:
                from .probe import probe

                rep["probe"] = probe(model, proc, n_train=args.probe)
        else:
            rep["test"] = evaluate(model, proc, "test", args.n_next, geometry="next",
                                   batch_size=max(1, args.batch_size // 4), progress=True, blind=True)
            rep["blind"] = rep["test"].pop("blind")
        rep["seconds"] = round(time.time() - t0, 1)
        rep["device"] = str(device)
        full = {k: (_strip(v) if isinstance(v, dict) else v) for k, v in rep.items()}
        (path / "report.json").write_text(json.dumps(full, indent=1))
        with open(path / "records.jsonl", "w") as f:
            for k, v in rep.items():
                if isinstance(v, dict) and "records" in v:
                    for r in v["records"]:
                        f.write(json.dumps(dict(run=k, **r)) + "\n")
        (path / "README.md").write_text(card(geometry, training, full))
        print(geometry, json.dumps({k: (v["overall"], v["families"]) for k, v in full.items()
                                    if isinstance(v, dict) and "overall" in v}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
