#!/usr/bin/env python
"""Prefill latency and FLOPs of every registered method against the unpruned model, side by side in one run.

The host is a random-weight model of "bench-S" size (spec/environment.md section 4), built from configs (no
download): bf16, Llama LM with hidden 1024, 24 layers, 16 heads (MHA), MLP 2752, vocabulary 32064; CLIP ViT-B/14
at 336 px (hidden 768, 12 layers, 12 heads, MLP 3072) with LLaVA's 2-layer GELU projector. ``--host llava``
(LLaVA-1.5): one synthetic 336x336 image, 576 visual tokens. ``--host next`` (LLaVA-NeXT, AnyRes pinpoints
336x672, 672x336, 672x672, LLaVA-NeXT's image_newline): one synthetic ``--image-size`` image (default 672x672: a
thumbnail and a 2x2 crop grid, 2928 visual tokens). The prompt has about 50 text tokens besides the image.

Prefill = ``model(**inputs, use_cache=True, logits_to_keep=1)``: vision tower, projector, the decoder over the
prompt (KV cache filled) and lm_head on the last token, i.e. what ``generate`` does before its first new token.
Each round times the unpruned model and every method once, in turn (interleaved, so that this machine's
slow phases hit all of them alike); after one warm-up round, the median of ``--repeats`` rounds is reported.
FLOPs come from ``vlprune.stats(model)["cost"]`` (the schedule the engine recorded); the unpruned model's cost is
read through a method that changes nothing (``vlprune.testing.identity_method``), while its time is measured with
no hooks attached.

    python benchmarks/bench_prefill.py --repeats 5
    python benchmarks/bench_prefill.py --keep 128 --dtype float32 --out /tmp/bench.json
    python benchmarks/bench_prefill.py --host next --keep-ratio 0.2 --methods hired globalcom2 random pool

"method s" is the method's own work (``vlprune.stats(model)["method_seconds"]``: ViT score capture, selection,
pruning decisions), reported beside the pruned prefill it is part of.

Writes JSON (``--out``, default benchmarks/results/prefill_bench.json) and a Markdown table next to it (.md).
Random weights: the numbers are about cost and latency only, never accuracy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import vlprune
from vlprune.cli import kept_tokens, method_kwargs
from vlprune.testing import identity_method, make_tokenizer, synthetic_image

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "prefill_bench.json"

BENCH_S = dict(
    text=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
              intermediate_size=2752, vocab_size=32064),
    vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                image_size=336, patch_size=14),
)
QUESTION = ("Describe the picture in detail. What is shown in this image? How many objects are there? "
            "Is there a cat, a dog or a tree? The color is blue, green or red.")


PINPOINTS = [[336, 672], [672, 336], [672, 672]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MODEL_NAMES = {
    "llava": "bench-S LLaVA-1.5 (random weights): LM 1024x24 h16 m2752 V32064 + CLIP ViT-B/14-336",
    "next": "bench-S LLaVA-NeXT (random weights, AnyRes 2x2 max): LM 1024x24 h16 m2752 V32064 + CLIP ViT-B/14-336",
}


def build_model(dtype: torch.dtype, seed: int = 0, host: str = "llava"):
    """bench-S LLaVA-1.5 or LLaVA-NeXT (random weights, sdpa) and its processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor

    tok = make_tokenizer()
    common = dict(
        vision_config=CLIPVisionConfig(**BENCH_S["vision"]),
        text_config=LlamaConfig(**BENCH_S["text"], bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if host == "next":
        from transformers import LlavaNextImageProcessor

        img_proc = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                           image_grid_pinpoints=PINPOINTS, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                           do_convert_rgb=True)
        processor = LlavaNextProcessor(image_processor=img_proc, tokenizer=tok, patch_size=14,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)
        cfg, cls = LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS), LlavaNextForConditionalGeneration
    elif host == "llava":
        img_proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
        processor = LlavaProcessor(image_processor=img_proc, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
        cfg, cls = LlavaConfig(**common), LlavaForConditionalGeneration
    else:
        raise ValueError(f"host must be 'llava' or 'next'; got {host!r}")
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dtype.is_floating_point and dtype != torch.float32:
            torch.set_default_dtype(dtype)  # initialise straight in the target dtype (half the peak memory)
        try:
            model = cls(cfg)
        finally:
            torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    model.set_attn_implementation("sdpa")
    return model, processor


def build_inputs(processor, dtype: torch.dtype, text_tokens: int, seed: int = 0, size=(336, 336)):
    """One synthetic image of ``size`` (width, height) and a prompt with about ``text_tokens`` other tokens."""
    tok = processor.tokenizer
    words = QUESTION.split()
    question, i = "", 0
    while True:
        prompt = f"USER: <image>\n{question} ASSISTANT:"
        n_text = len(tok(prompt.replace("<image>", ""))["input_ids"])
        if n_text >= text_tokens:
            break
        question = (question + " " + words[i % len(words)]).strip()
        i += 1
    inputs = processor(images=[synthetic_image(size, seed=seed)], text=[prompt], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return dict(inputs), prompt


def markdown_table(result: dict) -> str:
    lines = [
        "| method | kept tokens | prefill s (median) | prefill s (min) | speed-up vs unpruned | FLOPs ratio | TFLOPs | "
        "scoring overhead | method s (share of its prefill) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    decode = any(r.get("decode_s_per_token") is not None for r in result["rows"])
    if decode:
        lines[0] += " decode ms / token | KV cache MiB after decoding |"
        lines[1] += " ---: | ---: |"
    for r in result["rows"]:
        share = r["scoring_flops"] / r["total_flops"] if r["total_flops"] else 0.0
        scoring = "-" if not r["scoring_flops"] else f"{100 * share:.4f}% ({r['scoring_flops'] / 1e9:.4f} GFLOPs)"
        lines.append(
            f"| {r['method']} | {r['kept']} / {r['visual_in']} | {r['prefill_s']:.3f} | {r['prefill_s_min']:.3f} | "
            f"{r['speedup']:.2f}x | "
            f"{r['flops_ratio']:.3f} | {r['total_flops'] / 1e12:.3f} | {scoring} | "
            + ("-" if r["method_s"] is None else f"{r['method_s']:.4f} ({100 * r['method_share']:.2f}%)") + " |"
            + (f" {1000 * r['decode_s_per_token']:.1f} | {r['kv_bytes_after_decode'] / 2**20:.1f} |" if decode else "")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up; the median is reported")
    ap.add_argument("--host", default="llava", choices=["llava", "next"], help="LLaVA-1.5 or LLaVA-NeXT bench-S")
    ap.add_argument("--image-size", default="672x672", help="WxH of the image for --host next (default 672x672)")
    ap.add_argument("--keep", type=int, default=64, help="visual tokens to keep (default 64)")
    ap.add_argument("--keep-ratio", type=float, default=None,
                    help="share of visual tokens to keep instead of --keep (HiRED/GlobalCom2 budgets are ratios)")
    ap.add_argument("--k", type=int, default=2, help="FastV's pruning layer K (default 2)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--text-tokens", type=int, default=50, help="text tokens in the prompt besides the image")
    ap.add_argument("--methods", nargs="+", default=None, help="methods to run (default: all registered)")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                    help="a method hyperparameter, e.g. mustdrop.merging=false (repeatable)")
    ap.add_argument("--official-attention", nargs="*", default=[], metavar="METHOD",
                    help="also time these methods with eager (full-matrix) attention in every decoder layer from "
                         "their first scoring layer on, as the official MustDrop/SparseVLM code runs them")
    ap.add_argument("--decode-tokens", type=int, default=0,
                    help="also time generate with this many new tokens and report the per-token decode time")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON path (default {DEFAULT_OUT.relative_to(HERE.parent)})")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1; got {args.repeats}")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    names = args.methods or vlprune.list_methods()

    t0 = time.perf_counter()
    model, processor = build_model(dtype, args.seed, args.host)
    build_s = time.perf_counter() - t0
    try:
        size = (336, 336) if args.host == "llava" else tuple(int(v) for v in args.image_size.lower().split("x"))
        assert len(size) == 2 and min(size) > 0
    except (ValueError, AssertionError):
        ap.error(f"--image-size must be WIDTHxHEIGHT in pixels, e.g. 672x672; got {args.image_size!r}")
    inputs, prompt = build_inputs(processor, dtype, args.text_tokens, args.seed, size)
    n_tokens = int(inputs["input_ids"].shape[1])
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_params = sum(p.numel() for p in model.parameters())
    budget = f"keep_ratio={args.keep_ratio}" if args.keep_ratio is not None else f"keep={args.keep}"
    print(f"{MODEL_NAMES[args.host]} ({n_params / 1e6:.0f}M params, {args.dtype}, built in {build_s:.1f} s); prompt "
          f"{n_tokens} tokens = {n_image} image + {n_tokens - n_image} text; {budget}, fastv k={args.k}; "
          f"{args.threads} threads; 1 warm-up + {args.repeats} interleaved rounds", flush=True)

    params: dict[str, dict] = {}
    for item in args.param:
        lhs, _, value = item.partition("=")
        if "." not in lhs or not _:
            ap.error(f"--param {item!r} must look like METHOD.NAME=VALUE, e.g. mustdrop.merging=false")
        try:
            val = json.loads(value)
        except json.JSONDecodeError:
            val = value
        params.setdefault(lhs.split(".", 1)[0], {})[lhs.split(".", 1)[1]] = val

    def kwargs_of(n):
        kw = method_kwargs(n, args.keep, args.k)
        if args.keep_ratio is not None:
            kw.pop("keep")
            kw["keep_ratio"] = args.keep_ratio
        kw.update(params.get(n, {}))
        return kw

    configs = [("unpruned", None, None)] + [
        (n + (f" k={args.k}" if n == "fastv" else ""), vlprune.get_method(n, **kwargs_of(n)), None) for n in names
    ]
    n_layers = model.config.text_config.num_hidden_layers
    for n in args.official_attention:
        m = vlprune.get_method(n, **kwargs_of(n))
        first = min(m.score_layers(n_layers) or [0])
        configs.append((f"{n} (eager attention from layer {first})", m, first))
    layers = model.model.language_model.layers
    tcfg = model.config.text_config

    def eager_from(first):
        """Pre-hooks: decoder layers >= first attend with the eager kernel (full probability matrices) and an
        explicit causal mask; earlier layers keep SDPA."""
        def pre(mod, args_, kwargs, i):
            tcfg._attn_implementation = "eager" if i >= first else "sdpa"
            q = args_[0].shape[1]
            if i >= first and kwargs.get("attention_mask") is None and q > 1:
                kwargs["attention_mask"] = torch.triu(torch.full((q, q), torch.finfo(args_[0].dtype).min,
                                                                 dtype=args_[0].dtype), 1)[None, None]
            return args_, kwargs
        return [l.register_forward_pre_hook(lambda mod, a, k, i=i: pre(mod, a, k, i), with_kwargs=True)
                for i, l in enumerate(layers)]

    def prefill():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    def generate():
        return model.generate(**inputs, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                              do_sample=False)

    times: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    gen_times: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    method_s: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    info: dict[str, dict] = {}
    with torch.inference_mode():
        for rnd in range(args.repeats + 1):  # round 0 is the warm-up
            for label, method, eager in configs:
                if method is not None:
                    vlprune.apply(model, method)
                handles = eager_from(eager) if eager is not None else []
                try:
                    t = time.perf_counter()
                    prefill()
                    dt = time.perf_counter() - t
                    if method is not None:  # the prefill's stats, before any decoding
                        s = vlprune.stats(model)
                        if rnd == 0:
                            info[label] = {"stats": s, "method": method}
                        else:
                            method_s[label].append(s["method_seconds"])
                    if args.decode_tokens:
                        t = time.perf_counter()
                        generate()
                        if rnd > 0:
                            gen_times[label].append(time.perf_counter() - t)
                        if rnd == 0 and method is not None:
                            info[label]["kv_bytes"] = vlprune.stats(model)["cost"].kv_bytes
                finally:
                    for h in handles:
                        h.remove()
                    tcfg._attn_implementation = "sdpa"
                    vlprune.remove(model)
                if rnd > 0:
                    times[label].append(dt)
            if rnd > 0:
                print(f"  round {rnd}: " + ", ".join(f"{lab} {times[lab][-1]:.3f}s" for lab, _, _ in configs),
                      flush=True)
            else:
                print("  warm-up done", flush=True)
        # the unpruned model's schedule and cost, through a method that changes nothing
        vlprune.apply(model, identity_method())
        prefill()
        info["unpruned"] = {"stats": vlprune.stats(model), "method": None}
        if args.decode_tokens:
            generate()
            info["unpruned"]["kv_bytes"] = vlprune.stats(model)["cost"].kv_bytes
        vlprune.remove(model)

    base_t = statistics.median(times["unpruned"])
    base_flops = info["unpruned"]["stats"]["cost"].total
    rows = []
    for label, method, _ in configs:
        s = info[label]["stats"]
        c = s["cost"]
        n_in = sum(int(i["visual_tokens"]) for i in s["images"] if i["sample"] == 0)
        med = statistics.median(times[label])
        rows.append({
            "method": label,
            "label": s["method"],
            "visual_in": n_in,
            "kept": n_in if method is None else kept_tokens(s, method),
            "equivalent_tokens": float(s["equivalent_tokens"][0]) if s["equivalent_tokens"] else None,
            "prefill_s": med,
            "prefill_s_min": min(times[label]),
            "prefill_s_all": times[label],
            "speedup": base_t / med,
            "total_flops": c.total,
            "flops_ratio": c.total / base_flops,
            "scoring_flops": c.scoring,
            "scoring_share": c.scoring / c.total if c.total else 0.0,
            "decode_s_per_token": ((statistics.median(gen_times[label]) - med) / args.decode_tokens
                                   if args.decode_tokens else None),
            "kv_bytes_after_decode": info[label].get("kv_bytes"),
            "method_s": None if method is None else statistics.median(method_s[label]),
            "method_share": None if method is None else statistics.median(method_s[label]) / med,
            "cost": c.as_dict(),
        })
    result = {
        "benchmark": "prefill",
        "model": MODEL_NAMES[args.host],
        "host": args.host,
        "image_size": list(size),
        "keep_ratio": args.keep_ratio,
        "dtype": args.dtype,
        "params": n_params,
        "prompt_tokens": n_tokens,
        "image_tokens": n_image,
        "keep": args.keep,
        "fastv_k": args.k,
        "repeats": args.repeats,
        "threads": args.threads,
        "call": "model(**inputs, use_cache=True, logits_to_keep=1)",
        "versions": {"vlprune": vlprune.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or platform.platform()})",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "rows": rows,
    }
    table = markdown_table(result)
    print()
    print(table)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    md = out.with_suffix(".md")
    md.write_text(
        f"Prefill, {result['model']}, {args.dtype}, {n_tokens} prompt tokens ({n_image} image), {budget}, "
        f"median of {args.repeats} interleaved rounds, {args.threads} threads, torch {torch.__version__}, "
        f"{result['date']}. FLOPs from vlprune.stats (FLOPs = 2 x MACs, whole prefill incl. vision tower).\n\n"
        + table + "\n"
    )
    print(f"\nwrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
