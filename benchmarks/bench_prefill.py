#!/usr/bin/env python
"""Prefill, time to first token, decode and memory of every registered method against the unpruned model.

The host is a random-weight LLaVA built from configs (no download). ``--size bench-S`` (default; spec
environment.md section 4): Llama LM with hidden 1024, 24 layers, 16 heads (MHA), MLP 2752, vocabulary 32064; CLIP
ViT-B/14 at 336 px (hidden 768, 12 layers) with LLaVA's 2-layer GELU projector. ``--size 7b``: LLaVA-1.5-7B's
shapes (Llama 4096 x 32, 32 heads, MLP 11008; CLIP ViT-L/14-336: 1024 x 24, 16 heads, MLP 4096), weights drawn
directly on ``--device``. ``--size tiny``: hidden 128 / 4 layers, for tests. ``--host llava`` (LLaVA-1.5): 336x336
images, 576 visual tokens each. ``--host next`` (LLaVA-NeXT, AnyRes pinpoints 336x672, 672x336, 672x672): images of
``--image-size`` (default 672x672: a thumbnail and a 2x2 crop grid, 2928 visual tokens with newline tokens).

``--host qwen2.5-vl``: transformers' ``Qwen2_5_VLForConditionalGeneration`` with random weights and the offline
processor of ``vlprune.hosts_tiny`` (byte-level BPE tokenizer of 320 tokens with Qwen's special tokens, the chat
template of ``host_prompt``; image processor with the released pixel bounds 56x56 .. 12845056 px). ``--size
bench-S``: Qwen2 decoder with hidden 1024, 24 layers, 16 heads with GQA (4 KV heads, head 64, M-RoPE sections
[8, 12, 12]), MLP 2816 (gated), vocabulary 320 (the offline tokenizer's); Qwen2.5-VL vision tower with patch 14,
merge 2, window 112 px, hidden 768, 12 blocks of 12 heads (full attention in blocks 2, 5, 8, 11, the others
windowed), gated SiLU MLP 2048, merger to 1024. ``--size 7b``: Qwen2.5-VL-7B's shapes (text 3584 x 28, 28 heads / 4
KV heads, MLP 18944, vocabulary 152064; vision 1280 x 32 blocks, 16 heads, full attention in 7, 15, 23, 31, MLP 3420,
merger to 3584). ``--size tiny``: ``vlprune.hosts_tiny.tiny_qwen2_5_vl`` (images within 56x56 .. 224x224 px). Images
of ``--image-size`` (default 896x896: a 32 x 32 grid of merged tokens, 1024 visual tokens per image; tiny: 224x224,
64 tokens); ``image_grid_thw`` and ``mm_token_type_ids`` come from the processor. MustDrop's ViT token merge is refused
by the packed tower, so mustdrop runs with ``merging=False`` on this host unless ``--param mustdrop.merging=...``
says otherwise (the label says so); mqt (no LLaVA projector to replace) is skipped with its reason.

``--batch N [N ...]``: N different synthetic images with questions of different lengths (about ``--text-tokens``
text tokens each, between 0.7x and 1.3x of it), left padded, one call per batch size. Every batch size, method and
budget is one configuration; each round times all configurations in turn (interleaved, so that a slow phase of a
shared machine hits all of them alike); the median over ``--repeats`` rounds after one warm-up round is reported.
Per configuration:

- prefill: ``model(**inputs, use_cache=True, logits_to_keep=1)`` (vision tower, projector, decoder, lm_head on the
  last token: what ``generate`` does before its first new token), in seconds and samples/s;
- with ``--decode-tokens M`` (default 8): one ``model.generate(max_new_tokens=M, min_new_tokens=M)``: time to
  first token (a streamer's first call after the prompt), samples/s of prefill + M tokens, decode tokens/s
  (B x (M-1) tokens over the time from the first to the last token) and KV-cache bytes per sample after M tokens
  (``vlprune.stats``);
- peak memory of that call: ``torch.cuda.max_memory_allocated`` above the memory allocated before it on CUDA; on the
  CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set before it;
- the FLOPs ratio from ``vlprune.stats(model)["cost"]`` (whole prefill, vision tower included; the unpruned model's
  cost is read through ``vlprune.testing.identity_method``, its time measured with no hooks attached), the
  FLOPs-ideal speed-up 1 / ratio, and the measured speed-up divided by it ("of ideal": 1.0 means the time fell
  exactly as the FLOPs did). Targets: 0.9 for methods acting before the decoder, 0.8 for methods acting inside it
  (FastV, TransPrune, MustDrop, ToDRE); a row below its target gets a profile line per stage (vision tower,
  projector, decoder, lm_head, the method's own work) against the unpruned model of the same batch size.

Before any time is reported, the warm-up round checks that every batched configuration gives the same greedy
answers (``max(M, 1)`` new tokens) as running each of its samples alone; a configuration that fails is reported
as failed, without times, and the run exits with 1. Answers that part at a near-tie pass and are counted as such:
at the first differing step both runs have the same prefix, and there the two candidate tokens are within twice
the numerical noise (the largest difference of the first step's logits between the batched and the lone run,
itself at most 0.1% of the logits' magnitude in float32 and 10% in bfloat16 / float16: a sample given another
sample's image, or padding that leaks, moves them by about their whole magnitude). On random weights the logits
are flat, so near-ties are common in bfloat16; the report counts them.

Methods that cannot run on the host (e.g. ``mqt`` without an MQT projector) are found on a tiny model of the same
host class before the benchmark model is built, and listed with their reason; the defaults run every other
registered method.

    python benchmarks/bench_prefill.py                                   # bench-S, batch 1, keep=64, every method
    python benchmarks/bench_prefill.py --batch 1 4 --repeats 5 --out /tmp/b.json
    python benchmarks/bench_prefill.py --host next --keep-ratio 0.2 --methods hired globalcom2 random pool
    python benchmarks/bench_prefill.py --host qwen2.5-vl --keep-ratio 0.25 0.1 --decode-tokens 4
    python benchmarks/bench_prefill.py --size 7b --device cuda --attn flash_attention_2 --keep 192 128 64 --batch 1 8

``--dtype auto`` (default) takes bfloat16 where the device computes it natively (a CUDA device that supports it, a
CPU with AVX-512 BF16 or AMX) and float32 elsewhere, and says which it chose and why. Every argument is checked
before a model is built: a bad value exits with code 2 and one line on stderr.

Writes JSON (``--out``, default benchmarks/results/prefill_bench.json) and a Markdown table next to it (.md).
Random weights: the numbers are about cost and latency only, never accuracy.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "prefill_bench.json"

SIZES = {
    "tiny": dict(
        text=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=344, vocab_size=512, initializer_range=0.3),
        vision=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                    image_size=336, patch_size=14),
    ),
    "bench-S": dict(
        text=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=2752, vocab_size=32064),
        vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    image_size=336, patch_size=14),
    ),
    "7b": dict(  # LLaVA-1.5-7B: Vicuna-7B (Llama-2 shapes) + CLIP ViT-L/14-336
        text=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=11008, vocab_size=32064),
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    image_size=336, patch_size=14),
    ),
}
SIZE_NAMES = {
    "tiny": "LM 128x4 h4 m344 V512 + CLIP 64x4",
    "bench-S": "LM 1024x24 h16 m2752 V32064 + CLIP ViT-B/14-336",
    "7b": "LM 4096x32 h32 m11008 V32064 + CLIP ViT-L/14-336 (LLaVA-1.5-7B shapes)",
}
QWEN = "qwen2.5-vl"
HOST_NAMES = {"llava": "LLaVA-1.5", "next": "LLaVA-NeXT (AnyRes 2x2 max)", QWEN: "Qwen2.5-VL"}
# Qwen2.5-VL shapes; "tiny" is vlprune.hosts_tiny.tiny_qwen2_5_vl. Vocabulary: the offline tokenizer's (320) unless
# given. Vision: patch 14, temporal patch 2, merge 2, window 112 px for every size.
QWEN_SIZES = {
    "tiny": dict(text=dict(num_hidden_layers=4)),
    "bench-S": dict(
        text=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816, mrope_section=[8, 12, 12]),
        vision=dict(depth=12, hidden_size=768, num_heads=12, intermediate_size=2048, out_hidden_size=1024,
                    fullatt_block_indexes=[2, 5, 8, 11]),
    ),
    "7b": dict(  # Qwen2.5-VL-7B-Instruct
        text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  intermediate_size=18944, vocab_size=152064, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    ),
}
QWEN_SIZE_NAMES = {
    "tiny": "LM 128x4 h4/kv2 m344 V320 + ViT 64x4 (tiny_qwen2_5_vl)",
    "bench-S": "LM 1024x24 h16/kv4 m2816 V320 + Qwen2.5-VL ViT 768x12 (full attention in 2, 5, 8, 11) m2048",
    "7b": "LM 3584x28 h28/kv4 m18944 V152064 + Qwen2.5-VL ViT 1280x32 m3420 (Qwen2.5-VL-7B shapes)",
}
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 12845056  # the released processor's bounds
QWEN_MERGE = 2
DEFAULT_IMAGE = {"llava": (336, 336), "next": (672, 672), QWEN: (896, 896)}
TINY_QWEN_IMAGE = (224, 224)  # the tiny processor's largest image: 8 x 8 = 64 merged tokens
# hyperparameters a host needs, unless --param sets them: name -> (values, why)
HOST_PARAMS = {QWEN: {"mustdrop": ({"merging": False}, "its default ViT token merge is refused by the packed "
                                                      "Qwen2.5-VL tower")}}
QUESTION = ("Describe the picture in detail. What is shown in this image? How many objects are there? "
            "Is there a cat, a dog or a tree? The color is blue, green or red.")
LENGTH_FACTORS = (1.0, 0.7, 1.3, 0.85, 1.15, 0.75, 1.25, 0.9)  # question lengths of samples 0, 1, 2, ...
PINPOINTS = [[336, 672], [672, 336], [672, 672]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
DTYPES = ("auto", "bfloat16", "float32", "float16")
ATTNS = ("sdpa", "flash_attention_2", "eager")
IN_LLM_TARGET, PRE_LLM_TARGET = 0.8, 0.9


def model_name(size: str, host: str) -> str:
    names = QWEN_SIZE_NAMES if host == QWEN else SIZE_NAMES
    return f"{size} {HOST_NAMES[host]} (random weights): {names[size]}"


def text_layers(size: str, host: str = "llava") -> int:
    """Decoder layers of the ``size`` model of ``host``."""
    return (QWEN_SIZES if host == QWEN else SIZES)[size]["text"]["num_hidden_layers"]


# ------------------------------------------------------------------------------------------- argument checks
class ArgError(Exception):
    """A bad command-line value: one line naming the value, what is allowed and the fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2, no usage block
        raise ArgError(f"{message}; run with --help for every option and its allowed values")


def resolve_dtype(name: str, device) -> tuple[str, str]:
    """``--dtype`` -> (dtype name, why), through vlprune.precision.auto_dtype: "auto" is bfloat16 where ``device``
    computes it natively (a CUDA device that supports it, a CPU with AVX-512 BF16 or AMX), else float32."""
    from vlprune.precision import auto_dtype, native_bf16

    dtype, why = auto_dtype(name, device)
    if name == "bfloat16" and not native_bf16(device):
        why += " (this device does not compute bfloat16 natively: it is emulated and slow)"
    return str(dtype).replace("torch.", ""), why


def check_device(value: str) -> str:
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise ArgError(f"--device {value!r} is not a device; allowed: cpu, cuda, cuda:N; e.g. --device cpu") from None
    if dev.type not in ("cpu", "cuda"):
        raise ArgError(f"--device {value!r}: allowed are cpu, cuda and cuda:N; e.g. --device cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgError(f"--device {value}: no CUDA device is available here (torch {torch.__version__}, "
                           f"torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgError(f"--device {value}: only {torch.cuda.device_count()} CUDA device(s) here; "
                           f"use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return value


def check_attn(attn: str, device: str, dtype: str) -> None:
    if attn != "flash_attention_2":
        return
    import importlib.util

    if not device.startswith("cuda"):
        raise ArgError(f"--attn flash_attention_2 needs a CUDA device; got --device {device}; "
                       f"use --attn sdpa on the CPU")
    if importlib.util.find_spec("flash_attn") is None:
        raise ArgError("--attn flash_attention_2: the flash_attn package is not installed here; install it "
                       "(pip install flash-attn) or use --attn sdpa")
    if dtype not in ("bfloat16", "float16"):
        raise ArgError(f"--attn flash_attention_2 runs in bfloat16 or float16 only; got --dtype {dtype}; "
                       f"use --dtype bfloat16")


def parse_params(items: list[str]) -> dict[str, dict]:
    params: dict[str, dict] = {}
    for item in items:
        lhs, eq, value = item.partition("=")
        if not eq or "." not in lhs or not lhs.split(".", 1)[1]:
            raise ArgError(f"--param {item!r} must look like METHOD.NAME=VALUE, e.g. --param mustdrop.merging=false")
        try:
            val = json.loads(value)
        except json.JSONDecodeError:
            val = value
        params.setdefault(lhs.split(".", 1)[0], {})[lhs.split(".", 1)[1]] = val
    return params


def budgets_of(args) -> list[dict]:
    if args.keep_ratio:
        return [{"keep_ratio": r} for r in args.keep_ratio]
    return [{"keep": k} for k in args.keep]


def budget_label(budget: dict) -> str:
    return f"keep={budget['keep']}" if "keep" in budget else f"keep_ratio={budget['keep_ratio']:g}"


def method_kwargs(name: str, budget: dict, k: int, params: dict) -> dict:
    kw = dict(budget)
    if name == "fastv":
        kw["k"] = k
    kw.update(params.get(name, {}))
    return kw


def build_methods(names, budgets, k, params, explicit: bool):
    """(name, budget) -> Method for every pair; a bad hyperparameter is an ArgError naming it."""
    import vlprune

    known = vlprune.list_methods()
    out = {}
    for n in names:
        if n not in known:
            import difflib

            near = difflib.get_close_matches(n, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ArgError(f"--methods {n!r} is not a registered method; {hint}allowed: {', '.join(known)}")
        for b in budgets:
            try:
                out[(n, budget_label(b))] = vlprune.get_method(n, **method_kwargs(n, b, k, params))
            except (TypeError, ValueError) as e:
                msg = " ".join(str(e).split())
                if explicit or params.get(n):
                    raise ArgError(f"method {n} with {method_kwargs(n, b, k, params)}: {msg}; change the value or "
                                   f"drop {n} from --methods") from None
                out[(n, budget_label(b))] = e  # cannot be built with this budget: skipped with its reason
    for n in params:
        if n not in names:
            raise ArgError(f"--param names method {n!r}, which is not among the methods run ({', '.join(names)}); "
                           f"add it to --methods or drop the --param")
    return out


def probe_methods(methods: dict, host: str) -> dict[str, str]:
    """Run every method once on a tiny model of the host's class (a few ms each): name -> why it cannot run. A
    method that cannot be built with the budget is also tried with its defaults, so that a host's refusal is named."""
    import vlprune
    from vlprune.testing import synthetic_image, tiny_inputs, tiny_llava, tiny_llava_next

    if host == QWEN:
        from vlprune.hosts_tiny import tiny_host_inputs, tiny_qwen2_5_vl

        model, proc = tiny_qwen2_5_vl(seed=0)
        inputs = tiny_host_inputs(proc, [synthetic_image((168, 112))])
    else:
        model, proc = (tiny_llava if host == "llava" else tiny_llava_next)(seed=0)
        size = (336, 336) if host == "llava" else (672, 672)
        inputs = tiny_inputs(proc, [synthetic_image(size)], ["USER: <image>\nWhat is shown? ASSISTANT:"])
    skipped: dict[str, str] = {}
    for (name, _), method in methods.items():
        if name in skipped:
            continue
        if isinstance(method, Exception):  # cannot be built with this budget: does the host refuse it anyway?
            why = " ".join(f"{type(method).__name__}: {method}".split())
            default = None
            for kw in ({}, {"keep": 16}):  # its defaults, or a token count where it needs one (the tiny image: 24)
                try:
                    default = vlprune.get_method(name, **kw)
                    break
                except Exception:  # noqa: BLE001 - nothing to try: the budget's reason stands
                    continue
            refusal = _refusal(model, default, inputs) if default is not None else None
            skipped[name] = f"{refusal}; and with this budget: {why}" if refusal else why
            continue
        refusal = _refusal(model, method, inputs)
        if refusal:
            skipped[name] = refusal
    return skipped


def _refusal(model, method, inputs) -> str | None:
    """Why ``method`` cannot run one prefill of ``inputs`` on ``model`` (one line), or None when it runs."""
    import torch

    import vlprune

    try:
        with vlprune.pruned(model, method), torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
    except Exception as e:  # noqa: BLE001 - the reason is reported, the method skipped
        return " ".join(f"{type(e).__name__}: {e}".split())
    return None


def host_param_notes(args, skipped: dict[str, str]) -> dict[str, str]:
    """method -> one line for each method run with values its host needs (``args.host_params``): which values,
    and why (the refusal of the method's defaults on a tiny model of the host's class)."""
    import vlprune

    notes = {}
    for name, (values, why) in getattr(args, "host_params", {}).items():
        if name in skipped:
            continue
        budget = args.budgets[0]
        plain = {k: v for k, v in args.params.get(name, {}).items() if k not in values}
        try:
            default = vlprune.get_method(name, **method_kwargs(name, budget, args.k, {name: plain}))
            refusal = probe_methods({(name, budget_label(budget)): default}, args.host).get(name)
        except (TypeError, ValueError) as e:
            refusal = " ".join(str(e).split())
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        notes[name] = (f"{name} runs with {label} on {HOST_NAMES[args.host]} (rows labelled {name}"
                       f"{host_param_label(name, args.host_params)}): {why}"
                       + (f" ({refusal})" if refusal else "") + f"; --param {name}.{next(iter(values))}=... overrides")
    return notes


def make_parser() -> argparse.ArgumentParser:
    ap = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="bench-S", choices=list(SIZES), help="model shapes (default bench-S)")
    ap.add_argument("--host", default="llava", choices=list(HOST_NAMES),
                    help="llava (LLaVA-1.5, default), next (LLaVA-NeXT) or qwen2.5-vl (Qwen2.5-VL)")
    ap.add_argument("--image-size", default=None,
                    help="WxH of the images for --host next (default 672x672) and qwen2.5-vl (default 896x896; "
                         "tiny 224x224); LLaVA-1.5 takes 336x336")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes, interleaved (default 1)")
    ap.add_argument("--keep", type=int, nargs="+", default=[64], help="visual tokens to keep (default 64)")
    ap.add_argument("--keep-ratio", type=float, nargs="+", default=None,
                    help="shares of visual tokens to keep, instead of --keep")
    ap.add_argument("--k", type=int, default=2, help="FastV's pruning layer K (default 2)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="auto (default): bfloat16 where the device computes it natively, else float32")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--attn", default="sdpa", choices=ATTNS, help="attention kernel of both towers (default sdpa)")
    ap.add_argument("--text-tokens", type=int, default=50, help="text tokens of sample 0 besides the image")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="methods to run (default: every registered method that can run on the host)")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                    help="a method hyperparameter, e.g. mustdrop.merging=false (repeatable)")
    ap.add_argument("--official-attention", nargs="*", default=[], metavar="METHOD",
                    help="also time these methods with eager (full-matrix) attention in every decoder layer from "
                         "their first scoring layer on, as the official MustDrop/SparseVLM code runs them")
    ap.add_argument("--decode-tokens", type=int, default=8,
                    help="new tokens M of the timed generate call (default 8; 0: prefill only)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up; the median is reported")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path (default benchmarks/results/prefill_bench.json)")
    return ap


def parse_args(argv=None):
    """Parse and check every argument (no model is built). Raises ArgError with a one-line message."""
    args = make_parser().parse_args(argv)
    positive = [("--repeats", [args.repeats]), ("--batch", args.batch), ("--keep", args.keep if not args.keep_ratio
                                                                          else [1]),
                ("--k", [args.k]), ("--threads", [args.threads]), ("--text-tokens", [args.text_tokens])]
    for flag, values in positive:
        for v in values:
            if v < 1:
                raise ArgError(f"{flag} {v}: must be a positive integer; e.g. {flag} {1 if flag != '--text-tokens' else 50}")
    if args.text_tokens < 8:
        raise ArgError(f"--text-tokens {args.text_tokens}: the prompt template alone has about 8 tokens; use 8 or more")
    if args.decode_tokens < 0:
        raise ArgError(f"--decode-tokens {args.decode_tokens}: must be 0 (prefill only) or a positive number of tokens")
    if len(set(args.batch)) != len(args.batch):
        raise ArgError(f"--batch {' '.join(map(str, args.batch))}: a batch size is repeated; give each once")
    if args.keep_ratio:
        for r in args.keep_ratio:
            if not 0 < r <= 1:
                raise ArgError(f"--keep-ratio {r}: must be in (0, 1]; e.g. --keep-ratio 0.25")
    n_layers = text_layers(args.size, args.host)
    if args.k >= n_layers:
        raise ArgError(f"--k {args.k}: FastV's layer must be below the {args.size} decoder's {n_layers} layers; "
                       f"e.g. --k 2")
    default_wh = TINY_QWEN_IMAGE if (args.host == QWEN and args.size == "tiny") else DEFAULT_IMAGE[args.host]
    example = "x".join(map(str, default_wh if args.host != "llava" else DEFAULT_IMAGE["next"]))
    try:
        size = default_wh if args.image_size is None else tuple(int(v) for v in args.image_size.lower().split("x"))
        assert len(size) == 2 and min(size) > 0
    except (ValueError, AssertionError):
        raise ArgError(f"--image-size {args.image_size!r} must be WIDTHxHEIGHT in pixels; "
                       f"e.g. --image-size {example}") from None
    if args.host == QWEN:
        factor = 14 * QWEN_MERGE
        if min(size) < factor or max(size) > 200 * min(size):
            raise ArgError(f"--image-size {args.image_size}: the Qwen2.5-VL processor needs both sides of at least "
                           f"{factor} px and an aspect ratio within 200; e.g. --image-size {example}")
    args.image_wh = (336, 336) if args.host == "llava" else size
    out = Path(args.out)
    if out.is_dir():
        raise ArgError(f"--out {args.out}: is a folder; give a file path, e.g. --out {out / 'bench.json'}")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK):
        raise ArgError(f"--out {args.out}: cannot write under {parent}; choose a writable path, e.g. --out /tmp/bench.json")
    check_device(args.device)
    args.dtype_name, args.dtype_why = resolve_dtype(args.dtype, args.device)
    check_attn(args.attn, args.device, args.dtype_name)
    args.params = parse_params(args.param)
    import vlprune

    args.explicit = args.methods is not None
    names = list(dict.fromkeys(args.methods or vlprune.list_methods()))
    args.host_params = {}  # method -> (values the host sets, why), where --param does not set them
    for n, (values, why) in HOST_PARAMS.get(args.host, {}).items():
        unset = {k: v for k, v in values.items() if k not in args.params.get(n, {})}
        if n in names and unset:
            args.params.setdefault(n, {}).update(unset)
            args.host_params[n] = (unset, why)
    for n in args.official_attention:
        if n not in names:
            raise ArgError(f"--official-attention {n}: not among the methods run ({', '.join(names)}); "
                           f"add it to --methods")
    args.budgets = budgets_of(args)
    args.method_objs = build_methods(names, args.budgets, args.k, args.params, args.explicit)
    args.names = names
    return args


# --------------------------------------------------------------------------------------------- model, inputs
def build_model(size: str = "bench-S", host: str = "llava", dtype="bfloat16", device="cpu", attn: str = "sdpa",
                seed: int = 0):
    """A random-weight LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL of ``size``, built directly on ``device`` in ``dtype``, and
    its processor."""
    import torch

    if host == QWEN:
        return build_qwen(size, dtype, device, attn, seed)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor

    from vlprune.testing import make_tokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    shapes = SIZES[size]
    tok = make_tokenizer()
    common = dict(
        vision_config=CLIPVisionConfig(**shapes["vision"]),
        text_config=LlamaConfig(**shapes["text"], bos_token_id=1, eos_token_id=2, pad_token_id=3),
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
        raise ValueError(f"host must be one of {', '.join(HOST_NAMES)}; got {host!r}")
    return _instantiate(cls, cfg, dtype, device, attn, seed), processor


def _instantiate(cls, cfg, dtype, device, attn: str, seed: int):
    import torch

    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # initialise straight in the target dtype (half the peak memory in bf16)
        try:
            with torch.device(device):  # and straight on the device (a 7B model is never built on the host)
                if torch.device(device).type == "cuda":
                    torch.cuda.manual_seed(seed)
                model = cls(cfg)
        finally:
            torch.set_default_dtype(previous)
    model = model.to(dtype=dtype).eval()
    model.set_attn_implementation(attn)
    return model


def build_qwen(size: str = "bench-S", dtype="bfloat16", device="cpu", attn: str = "sdpa", seed: int = 0):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` of ``size`` (``QWEN_SIZES``; tiny:
    ``vlprune.hosts_tiny.tiny_qwen2_5_vl``) and its processor (offline tokenizer, chat template, image processor
    within ``QWEN_MIN_PIXELS`` .. ``QWEN_MAX_PIXELS``; tiny: its own bounds)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    from vlprune.hosts_tiny import _qwen_ids, _qwen_processor, tiny_qwen2_5_vl

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if size == "tiny":
        model, processor = tiny_qwen2_5_vl(seed=seed, attn=attn)
        return model.to(device=device, dtype=dtype).eval(), processor
    shapes = QWEN_SIZES[size]
    tok, processor = _qwen_processor(Qwen2_5_VLProcessor, 14, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
    text = dict(shapes["text"])
    section = text.pop("mrope_section")
    text.setdefault("vocab_size", len(tok))
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False)
    vision = dict(shapes["vision"], patch_size=14, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2,
                  window_size=112)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    return _instantiate(Qwen2_5_VLForConditionalGeneration, cfg, dtype, device, attn, seed), processor


def _is_qwen(processor) -> bool:
    return type(processor).__name__.startswith("Qwen2_5_VL")


def _llava_prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def _prompt(tok, n_text: int, wrap=_llava_prompt, placeholder: str = "<image>") -> str:
    """A prompt ``wrap(question)`` with at least ``n_text`` tokens besides the image placeholder."""
    words = QUESTION.split()
    question, i = "", 0
    while True:
        prompt = wrap(question)
        if len(tok(prompt.replace(placeholder, ""))["input_ids"]) >= n_text:
            return prompt
        question = (question + " " + words[i % len(words)]).strip()
        i += 1


def sample_prompts(tok, n: int, text_tokens: int, wrap=_llava_prompt, placeholder: str = "<image>") -> list[str]:
    n_factors = len(LENGTH_FACTORS)
    return [_prompt(tok, max(8, round(text_tokens * LENGTH_FACTORS[i % n_factors]) + i // n_factors), wrap, placeholder)
            for i in range(n)]


def build_inputs(processor, n: int, text_tokens: int, image_size=(336, 336), seed: int = 0, dtype=None,
                 device="cpu") -> dict:
    """n different images (seeds seed..seed+n-1) and questions of different lengths, left padded. Qwen2.5-VL: the
    host's chat template (``vlprune.hosts_tiny.host_prompt``); the processor adds ``image_grid_thw`` and
    ``mm_token_type_ids``."""
    from vlprune.testing import synthetic_image, tiny_inputs

    images = [synthetic_image(tuple(image_size), seed=seed + i) for i in range(n)]
    if _is_qwen(processor):
        from vlprune.hosts_tiny import host_prompt, tiny_host_inputs

        prompts = sample_prompts(processor.tokenizer, n, text_tokens, lambda q: host_prompt(processor, q),
                                 "<|image_pad|>")
        inputs = dict(tiny_host_inputs(processor, images, prompts, padding_side="left"))
    else:
        prompts = sample_prompts(processor.tokenizer, n, text_tokens)
        inputs = dict(tiny_inputs(processor, images, prompts, padding_side="left"))
    return _to(inputs, dtype, device)


def _to(inputs: dict, dtype, device) -> dict:
    import torch

    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        out[k] = v
    return out


def single(inputs: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded batch, alone and without its padding. Packed pixel inputs (Qwen2.5-VL:
    ``pixel_values`` (sum t*h*w, C) with one ``image_grid_thw`` row per image, images in sample order): the rows of
    sample ``b``'s images, found from the image tokens per sample (``mm_token_type_ids == 1``, t*h*w / merge^2 per
    image)."""
    n_pad = int((inputs["attention_mask"][b] == 0).sum())
    seq = ("input_ids", "attention_mask", "mm_token_type_ids")
    if "image_grid_thw" not in inputs:
        return {k: (v[b:b + 1, n_pad:] if k in seq else v[b:b + 1]) for k, v in inputs.items()}
    grid = inputs["image_grid_thw"]
    rows = grid.prod(-1).tolist()
    per_sample = (inputs["mm_token_type_ids"] == 1).sum(1).tolist()
    first = img = 0  # image index and pixel row where sample b's images start
    for s in range(b):
        need = per_sample[s]
        while need > 0:
            need -= rows[img] // QWEN_MERGE ** 2
            first += rows[img]
            img += 1
    last, end, need = img, first, per_sample[b]
    while need > 0:
        need -= rows[last] // QWEN_MERGE ** 2
        end += rows[last]
        last += 1
    out = {}
    for k, v in inputs.items():
        if k in seq:
            out[k] = v[b:b + 1, n_pad:]
        elif k == "pixel_values":
            out[k] = v[first:end]
        elif k == "image_grid_thw":
            out[k] = v[img:last]
        else:
            out[k] = v[b:b + 1]
    return out


# ------------------------------------------------------------------------------------------------- measuring
class _TokenClock:
    """A generate streamer that records when each new token reaches the host (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.calls = 0

    def put(self, value):
        if self.calls:
            self.times.append(time.perf_counter())
        self.calls += 1

    def end(self):
        pass


class PeakMemory:
    """Peak memory of one call above the memory in use before it: CUDA max_memory_allocated, or on the CPU the
    resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs where Linux allows it)."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.resettable = True
            except OSError:
                self.resettable = False
            self.base = self._status("VmRSS")
            if not self.resettable:
                import resource

                self.base_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is None:
            self.peak = None
        elif self.resettable:
            self.peak = max(0, (self._status("VmHWM") or 0) - self.base)
        else:  # ru_maxrss only grows: the delta counts only what this call added above the earlier peak
            import resource

            self.peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base_hwm)
        return False


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Forward hooks that time the vision tower, projector, decoder and lm_head of one call (synchronised)."""

    def __init__(self, model, device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.handles = []
        inner = model.model
        self.nested = hasattr(inner, "visual")  # Qwen2.5-VL: the patch merger (projector) runs inside the tower
        if self.nested:
            parts = {"vision tower": inner.visual, "projector": inner.visual.merger,
                     "decoder": inner.language_model, "lm_head": model.lm_head}
        else:
            parts = {"vision tower": inner.vision_tower, "projector": inner.multi_modal_projector,
                     "decoder": inner.language_model, "lm_head": model.lm_head}
        for name, mod in parts.items():
            self.handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: self._start(name)))
            self.handles.append(mod.register_forward_hook(lambda m, a, o, name=name: self._stop(name)))
        self._t: dict[str, float] = {}

    def _start(self, name):
        _sync(self.device)
        self._t[name] = time.perf_counter()

    def _stop(self, name):
        _sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._t.pop(name)

    def remove(self):
        for h in self.handles:
            h.remove()
        if self.nested and "vision tower" in self.seconds:  # the tower's time without the merger inside it
            self.seconds["vision tower"] -= self.seconds.get("projector", 0.0)


@dataclasses.dataclass
class Config:
    label: str
    name: str | None  # registry name (None: unpruned)
    budget: str | None
    method: object
    batch: int
    eager_from: int | None = None

    @property
    def key(self) -> str:
        return f"b{self.batch} {self.label}"


def in_llm(method) -> bool:
    from vlprune.methods.base import Stage

    return method is not None and Stage.LLM_LAYER in getattr(method, "stages", ())


def _answers(model, inputs, n_new):
    """Greedy answers (B, n_new) and the logits of every step (B, n_new, V), on the CPU."""
    import torch

    out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    toks = out.sequences[:, inputs["input_ids"].shape[1]:].to("cpu", torch.long)
    return toks, torch.stack([lg.float().cpu() for lg in out.logits], 1)


# how far the first step's logits of a sample may move between its batched and its lone run (relative to their
# largest magnitude): numerical noise of the kernels at different shapes, not a different computation
NOISE_LIMIT = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


def compare_answers(batched, batched_logits, alone, alone_logits, dtype_name: str) -> dict:
    """Batched answer of one sample against the sample run alone. Equal tokens pass. Where they part, the answers
    still agree up to a near-tie when, at the first differing step (same prefix in both runs), either run's two
    candidates are within twice the numerical noise (the first step's largest logit difference) of each other,
    and that noise itself is within NOISE_LIMIT of the logits' magnitude."""
    import torch

    noise = float((batched_logits[0] - alone_logits[0]).abs().max())
    scale = float(alone_logits[0].abs().max()) or 1.0
    rec = {"noise": noise, "noise_rel": noise / scale, "noise_limit": NOISE_LIMIT.get(dtype_name, 1e-3)}
    if rec["noise_rel"] > rec["noise_limit"]:
        return {**rec, "ok": False, "why": f"first-step logits differ by {noise:.3g} ({noise / scale:.2%} of their "
                                           f"magnitude; limit {rec['noise_limit']:.1%})"}
    diff = (batched != alone).nonzero()
    if diff.numel() == 0:
        return {**rec, "ok": True, "exact": True}
    j = int(diff[0, 0])
    a, b = int(alone[j]), int(batched[j])
    gap = max(float(alone_logits[j, a] - alone_logits[j, b]), float(batched_logits[j, b] - batched_logits[j, a]))
    tie = gap <= 2 * noise
    return {**rec, "ok": tie, "exact": False, "step": j, "gap": gap,
            "why": (f"near-tie at step {j} (tokens {a} / {b}, logit gap {gap:.3g} <= 2 x noise {noise:.3g})" if tie
                    else f"answers part at step {j} (tokens {a} / {b}) by a logit gap of {gap:.3g}, above twice "
                         f"the noise {noise:.3g}")}


def run_bench(model, processor, configs: list[Config], *, device="cpu", dtype=None, text_tokens=50,
              image_size=(336, 336), decode_tokens=8, repeats=3, seed=0, log=print, deadline: float | None = None):
    """Time every configuration, interleaved; returns (rows, checks). See the module docstring."""
    import torch

    import vlprune
    from vlprune.cli import kept_tokens
    from vlprune.testing import identity_method

    batches = sorted({c.batch for c in configs})
    inputs = {b: build_inputs(processor, b, text_tokens, image_size, seed, dtype, device) for b in batches}
    tcfg = model.config.text_config
    layers = model.model.language_model.layers
    attn0 = tcfg._attn_implementation
    n_check = max(decode_tokens, 1)
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")

    def eager_from(first):
        def pre(mod, args_, kwargs, i):
            tcfg._attn_implementation = "eager" if i >= first else attn0
            q = args_[0].shape[1]
            if i >= first and kwargs.get("attention_mask") is None and q > 1:
                kwargs["attention_mask"] = torch.triu(torch.full((q, q), torch.finfo(args_[0].dtype).min,
                                                                 dtype=args_[0].dtype, device=args_[0].device),
                                                      1)[None, None]
            return args_, kwargs
        return [l.register_forward_pre_hook(lambda mod, a, k, i=i: pre(mod, a, k, i), with_kwargs=True)
                for i, l in enumerate(layers)]

    class attached:
        def __init__(self, cfg):
            self.cfg = cfg

        def __enter__(self):
            if self.cfg.method is not None:
                vlprune.apply(model, self.cfg.method)
            self.handles = eager_from(self.cfg.eager_from) if self.cfg.eager_from is not None else []

        def __exit__(self, *exc):
            for h in self.handles:
                h.remove()
            tcfg._attn_implementation = attn0
            vlprune.remove(model)
            return False

    def prefill(inp):
        return model(**inp, use_cache=True, logits_to_keep=1)

    def time_one(c: Config, r: dict) -> None:
        """One timed prefill, then (M > 0) one timed generate with a token clock, under a peak-memory probe."""
        inp = inputs[c.batch]
        _sync(device)
        t = time.perf_counter()
        prefill(inp)
        _sync(device)
        dt = time.perf_counter() - t
        ms = vlprune.stats(model)["method_seconds"] if c.method is not None else None
        if decode_tokens:
            clock = _TokenClock()
            with PeakMemory(device) as pm:
                _sync(device)
                t = time.perf_counter()
                model.generate(**inp, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                               streamer=clock)
                _sync(device)
                end = time.perf_counter()
            r["gen"].append(end - t)
            if clock.times:  # the streamer saw the new tokens
                r["ttft"].append(clock.times[0] - t)
                if decode_tokens > 1 and len(clock.times) > 1:
                    r["decode"].append(clock.times[-1] - clock.times[0])
        else:
            with PeakMemory(device) as pm:
                prefill(inp)
        r["prefill"].append(dt)
        if ms is not None:
            r["method_s"].append(ms)
        r["peak"].append(pm.peak)

    singles: dict[tuple[str, int], torch.Tensor] = {}  # (label, sample) -> answer of the sample alone
    info: dict[str, dict] = {}
    checks: dict[str, dict] = {}
    failed: dict[str, str] = {}
    rec = {c.key: {"prefill": [], "ttft": [], "gen": [], "decode": [], "method_s": [], "peak": []} for c in configs}
    with torch.inference_mode():
        # warm-up round: stats, answers, and the batch = one-by-one check, before anything is timed
        for c in configs:
            try:
                with attached(c):
                    prefill(inputs[c.batch])
                    st = vlprune.stats(model) if c.method is not None else None
                    ans, logits = _answers(model, inputs[c.batch], n_check)
                    kv = vlprune.stats(model)["cost"].kv_bytes if c.method is not None and decode_tokens else None
                    per_sample = []
                    for b in range(c.batch):
                        if (c.label, b) not in singles:
                            t1, l1 = _answers(model, single(inputs[c.batch], b), n_check)
                            singles[(c.label, b)] = (t1[0], l1[0])
                        per_sample.append(compare_answers(ans[b], logits[b], *singles[(c.label, b)], dtype_name))
            except Exception as e:  # noqa: BLE001 - a configuration that fails on this model is reported, not fatal
                failed[c.key] = " ".join(f"{type(e).__name__}: {e}".split())
                log(f"  {c.key}: failed in the warm-up round: {failed[c.key]}")
                continue
            info[c.key] = {"stats": st, "kv_bytes": kv, "answers": ans.tolist()}
            bad = [b for b, r in enumerate(per_sample) if not r["ok"]]
            ties = [b for b, r in enumerate(per_sample) if r["ok"] and not r.get("exact")]
            checks[c.key] = {"batch": c.batch, "samples": c.batch, "new_tokens": n_check, "ok": not bad,
                             "exact": c.batch - len(bad) - len(ties), "near_ties": ties, "failed_samples": bad,
                             "per_sample": per_sample}
            if bad:
                failed[c.key] = "; ".join(f"sample {b}: {per_sample[b]['why']}" for b in bad)
                failed[c.key] = f"batched answers differ from the samples run alone ({n_check} greedy tokens): " \
                                + failed[c.key]
                log(f"  {c.key}: CHECK FAILED: {failed[c.key]}")
            for b in ties:
                log(f"  {c.key}: sample {b}: {per_sample[b]['why']}")
        log(f"  warm-up done; batch = one-by-one: {sum(ch['ok'] for ch in checks.values())}/{len(checks)} "
            f"configurations" + (f"; {len(failed)} failed" if failed else ""))
        # the unpruned model's schedule and cost (per batch size), through a method that changes nothing
        for b in batches:
            with attached(Config("none", None, None, identity_method(), b)):
                prefill(inputs[b])
                st = vlprune.stats(model)
                kv = None
                if decode_tokens:
                    _answers(model, inputs[b], decode_tokens)  # for the KV bytes after M tokens
                    kv = vlprune.stats(model)["cost"].kv_bytes
            for c in configs:
                if c.method is None and c.batch == b and c.key in info:
                    info[c.key]["stats"], info[c.key]["kv_bytes"] = st, kv
        timed = [c for c in configs if c.key not in failed]
        for rnd in range(1, repeats + 1):
            if deadline is not None and time.monotonic() > deadline and rnd > 1:
                log(f"  time budget reached: {rnd - 1} timed round(s) instead of {repeats}")
                break
            for c in list(timed):
                r = rec[c.key]
                try:
                    with attached(c):
                        time_one(c, r)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at one batch size: reported, not fatal
                    failed[c.key] = " ".join(f"{type(e).__name__}: {e}".split())
                    log(f"  {c.key}: failed in round {rnd}: {failed[c.key]}")
                    timed.remove(c)
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()
            log(f"  round {rnd}: " + ", ".join(f"{c.key} {rec[c.key]['prefill'][-1]:.3f}s" for c in timed))
        # one profiled prefill per configuration: seconds per stage (synchronised hooks)
        stages: dict[str, dict] = {}
        for c in timed:
            with attached(c):
                clock = StageClock(model, device)
                try:
                    _sync(device)
                    t = time.perf_counter()
                    prefill(inputs[c.batch])
                    _sync(device)
                    total = time.perf_counter() - t
                finally:
                    clock.remove()
                ms = vlprune.stats(model)["method_seconds"] if c.method is not None else 0.0
            stages[c.key] = {**clock.seconds, "method (inside the stages above)": ms, "total": total}

    rows = []
    base = {}
    for c in configs:
        if c.method is None and c.key not in failed:
            base[c.batch] = c.key
    for c in configs:
        row = {"key": c.key, "method": c.label, "name": c.name or "unpruned", "budget": c.budget, "batch": c.batch,
               "stage": "in-LLM" if in_llm(c.method) else ("pre-LLM" if c.method is not None else None)}
        if c.key in failed:
            row.update(error=failed[c.key], check=checks.get(c.key))
            rows.append(row)
            continue
        r, st = rec[c.key], info[c.key]["stats"]
        b0 = base.get(c.batch)
        cost = st["cost"]
        n_in = sum(int(i["visual_tokens"]) for i in st["images"] if i["sample"] == 0)
        med = statistics.median(r["prefill"])
        bmed = statistics.median(rec[b0]["prefill"]) if b0 else None
        bcost = info[b0]["stats"]["cost"].total if b0 else None
        ratio = cost.total / bcost if bcost else None
        speedup = bmed / med if bmed else None
        gen = statistics.median(r["gen"]) if r["gen"] else None
        dec = statistics.median(r["decode"]) if r["decode"] else None
        peaks = [p for p in r["peak"] if p is not None]
        row.update({
            "visual_in": n_in,
            "kept": n_in if c.method is None else kept_tokens(st, c.method),
            "equivalent_tokens": float(st["equivalent_tokens"][0]) if st["equivalent_tokens"] else None,
            "prefill_s": med, "prefill_s_min": min(r["prefill"]), "prefill_s_all": r["prefill"],
            "prefill_samples_per_s": c.batch / med,
            "speedup": speedup,
            "total_flops": cost.total, "flops_ratio": ratio,
            "ideal_speedup": 1 / ratio if ratio else None,
            "of_ideal": speedup * ratio if (speedup and ratio) else None,
            "target": None if c.method is None else (IN_LLM_TARGET if in_llm(c.method) else PRE_LLM_TARGET),
            "scoring_flops": cost.scoring, "scoring_share": cost.scoring / cost.total if cost.total else 0.0,
            "ttft_s": statistics.median(r["ttft"]) if r["ttft"] else None,
            "generate_s": gen,
            "generate_samples_per_s": c.batch / gen if gen else None,
            "decode_tokens_per_s": c.batch * (decode_tokens - 1) / dec if dec else None,
            "kv_bytes_per_sample": (info[c.key]["kv_bytes"] / c.batch) if info[c.key]["kv_bytes"] is not None else None,
            "peak_bytes": max(peaks) if peaks else None,
            "method_s": statistics.median(r["method_s"]) if r["method_s"] else None,
            "method_share": statistics.median(r["method_s"]) / med if r["method_s"] else None,
            "stages_s": stages.get(c.key),
            "check": checks.get(c.key),
            "answers": info[c.key]["answers"],
            "cost": cost.as_dict(),
        })
        row["meets_target"] = None if row["target"] is None or row["of_ideal"] is None else row["of_ideal"] >= row["target"]
        rows.append(row)
    for row in rows:  # where a method falls short: where the time goes, stage by stage, against the unpruned
        if row.get("meets_target") is False and base.get(row["batch"]):
            row["profile"] = profile_line(row, next(r for r in rows if r["key"] == base[row["batch"]]))
    return rows, checks


def _flops(v: float) -> str:
    return f"{v / 1e12:.3g} TFLOPs" if v >= 1e11 else f"{v / 1e9:.3g} GFLOPs"


def profile_line(row: dict, unpruned: dict) -> str:
    """Where the time goes, stage by stage: seconds against the unpruned model's, and the time ratio beside the
    FLOPs ratio of that stage (a stage whose time fell less than its FLOPs is where the speed-up is lost)."""
    s, u = row["stages_s"] or {}, unpruned["stages_s"] or {}
    fl, ufl = row["cost"], unpruned["cost"]
    parts = []
    for stage, key in (("vision tower", "vision"), ("projector", "projector"), ("decoder", "llm"),
                       ("lm_head", "lm_head")):
        t, ut = s.get(stage, 0.0), u.get(stage, 0.0)
        tr = f"time x{t / ut:.2f}" if ut else "time -"
        fr = f"FLOPs x{fl[key] / ufl[key]:.2f}" if ufl.get(key) else "FLOPs -"
        parts.append(f"{stage} {t:.3f} s (unpruned {ut:.3f}; {tr}, {fr})")
    parts.append(f"method's own work {s.get('method (inside the stages above)', 0.0):.3f} s "
                 f"({_flops(fl['scoring'])} of scoring)")
    other = s.get("total", 0.0) - sum(s.get(k, 0.0) for k in ("vision tower", "projector", "decoder", "lm_head"))
    uother = u.get("total", 0.0) - sum(u.get(k, 0.0) for k in ("vision tower", "projector", "decoder", "lm_head"))
    parts.append(f"outside the stages {other:.3f} s (unpruned {uother:.3f})")
    return f"{row['key']}: {row['of_ideal']:.2f} of ideal (target {row['target']}): " + "; ".join(parts)


# --------------------------------------------------------------------------------------------------- report
def _f(v, fmt, none="-"):
    return none if v is None else format(v, fmt)


def _check_cell(chk) -> str:
    if not chk:
        return "-"
    if not chk["ok"]:
        return f"NO ({len(chk['failed_samples'])} of {chk['samples']})"
    ties = f", {len(chk['near_ties'])} near-tie" if chk["near_ties"] else ""
    return f"yes ({chk['exact']} of {chk['samples']} exact{ties})"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| batch | method | kept / visual | prefill s | prefill samples/s | speed-up | FLOPs ratio | ideal speed-up | "
        "of ideal (target) | TTFT s | samples/s (prefill + M) | decode tok/s | KV MiB / sample | peak MiB | "
        "method's work | batch = one-by-one |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['method']} | failed: {r['error']} |" + " |" * 13)
            continue
        target = "" if r["target"] is None else f" ({r['target']}{'' if r['meets_target'] else ', below'})"
        chk = r["check"]
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['kept']} / {r['visual_in']} | {r['prefill_s']:.3f} | "
            f"{r['prefill_samples_per_s']:.2f} | {_f(r['speedup'], '.2f')}x | {_f(r['flops_ratio'], '.3f')} | "
            f"{_f(r['ideal_speedup'], '.2f')}x | {_f(r['of_ideal'], '.2f')}{target} | {_f(r['ttft_s'], '.3f')} | "
            f"{_f(r['generate_samples_per_s'], '.2f')} | {_f(r['decode_tokens_per_s'], '.1f')} | "
            f"{_f(None if r['kv_bytes_per_sample'] is None else r['kv_bytes_per_sample'] / 2**20, '.2f')} | "
            f"{_f(None if r['peak_bytes'] is None else r['peak_bytes'] / 2**20, '.0f')} | "
            f"{'-' if r['method_s'] is None else format(100 * r['method_share'], '.2f') + '%'} | "
            f"{_check_cell(chk)} |"
        )
    return "\n".join(lines)


def summary_lines(rows: list[dict], skipped: dict[str, str], notes=()) -> list[str]:
    out = list(notes)
    for name, why in skipped.items():
        out.append(f"skipped {name}: {why}")
    for r in rows:
        if r.get("profile"):
            out.append("below target, " + r["profile"])
    return out


def write_outputs(result: dict, out: Path, header: str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)
    md = out.with_suffix(".md")
    notes = summary_lines(result["rows"], result.get("skipped", {}), result.get("host_params", {}).values())
    md.write_text(header + "\n\n" + markdown_table(result["rows"]) + "\n"
                  + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else ""))
    return md


def host_param_label(name: str, host_params: dict) -> str:
    """" merging=False" for a method run with values its host needs (``args.host_params``), else ""."""
    if name not in host_params:
        return ""
    return "".join(f" {k}={v}" for k, v in host_params[name][0].items())


def make_configs(args, skipped) -> list[Config]:
    n_layers = text_layers(args.size, getattr(args, "host", "llava"))
    host_params = getattr(args, "host_params", {})
    configs = []
    for b in args.batch:
        configs.append(Config("unpruned", None, None, None, b))
        for (name, bl), m in args.method_objs.items():
            if name in skipped:
                continue
            label = name + (f" k={args.k}" if name == "fastv" else "") + host_param_label(name, host_params) \
                + (f" {bl}" if len(args.budgets) > 1 else "")
            configs.append(Config(label, name, bl, m, b))
        for n in args.official_attention:
            if n in skipped:
                continue
            for bl in [budget_label(x) for x in args.budgets]:
                m = args.method_objs[(n, bl)]
                first = min(m.score_layers(n_layers) or [0])
                configs.append(Config(f"{n}{host_param_label(n, host_params)} (eager attention from layer {first})"
                                      + (f" {bl}" if len(args.budgets) > 1 else ""), n, bl, m, b, first))
    return configs


def versions() -> dict:
    import torch
    import transformers

    import vlprune

    v = {"vlprune": vlprune.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
         "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name(0)
    return v


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ArgError as e:
        print(f"bench_prefill.py: error: {e}", file=sys.stderr)
        return 2
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    print(f"dtype {args.dtype_name} ({args.dtype_why}); device {args.device}; attention {args.attn}", flush=True)
    skipped = probe_methods(args.method_objs, args.host)
    if skipped and args.explicit:
        name, why = next(iter(skipped.items()))
        print(f"bench_prefill.py: error: --methods {name} cannot run on a {HOST_NAMES[args.host]} host: {why}; "
              f"drop it from --methods", file=sys.stderr)
        return 2
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", flush=True)
    host_notes = host_param_notes(args, skipped)
    for line in host_notes.values():
        print(line, flush=True)
    configs = make_configs(args, skipped)

    t0 = time.perf_counter()
    model, processor = build_model(args.size, args.host, args.dtype_name, args.device, args.attn, args.seed)
    build_s = time.perf_counter() - t0
    dtype = getattr(torch, args.dtype_name)
    n_params = sum(p.numel() for p in model.parameters())
    probe = build_inputs(processor, max(args.batch), args.text_tokens, args.image_wh, args.seed)
    n_image = int((probe["input_ids"][0] == model.config.image_token_id).sum())
    lengths = probe["attention_mask"].sum(1).tolist()
    budgets = ", ".join(budget_label(b) for b in args.budgets)
    print(f"{model_name(args.size, args.host)} ({n_params / 1e6:.0f}M params, {args.dtype_name}, built in "
          f"{build_s:.1f} s); {n_image} image tokens per sample, prompt lengths {lengths}; batch "
          f"{' '.join(map(str, args.batch))}; {budgets}, fastv k={args.k}; M={args.decode_tokens} new tokens; "
          f"{args.threads} threads; 1 warm-up + {args.repeats} interleaved rounds of {len(configs)} configurations",
          flush=True)
    rows, checks = run_bench(model, processor, configs, device=args.device, dtype=dtype, text_tokens=args.text_tokens,
                             image_size=args.image_wh, decode_tokens=args.decode_tokens, repeats=args.repeats,
                             seed=args.seed)
    result = {
        "benchmark": "prefill",
        "model": model_name(args.size, args.host),
        "size": args.size, "host": args.host, "image_size": list(args.image_wh),
        "dtype": args.dtype_name, "dtype_why": args.dtype_why, "device": args.device, "attn": args.attn,
        "params": n_params, "image_tokens": n_image, "prompt_lengths": lengths,
        "batch": args.batch, "budgets": args.budgets, "fastv_k": args.k, "decode_tokens": args.decode_tokens,
        "repeats": args.repeats, "threads": args.threads, "skipped": skipped, "host_params": host_notes,
        "call": "model(**inputs, use_cache=True, logits_to_keep=1); generate(max_new_tokens=M, min_new_tokens=M)",
        "command": "python benchmarks/bench_prefill.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": versions(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or platform.platform()})",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "rows": rows,
    }
    header = (f"{result['model']}, {args.dtype_name} on {args.device} ({args.attn}), {n_image} image tokens per "
              f"sample, prompt lengths {lengths}, {budgets}, M={args.decode_tokens}, median of {args.repeats} "
              f"interleaved rounds, {args.threads} threads, torch {torch.__version__}, {result['date']}. FLOPs from "
              f"vlprune.stats (FLOPs = 2 x MACs, whole prefill incl. vision tower); of ideal = speed-up x FLOPs ratio.")
    print()
    print(markdown_table(rows))
    for line in summary_lines(rows, skipped, host_notes.values()):
        print(line)
    md = write_outputs(result, Path(args.out), header)
    print(f"\nwrote {args.out} and {md}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
