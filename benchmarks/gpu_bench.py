#!/usr/bin/env python
"""The one-shot GPU benchmark behind benchmarks/gpu.sh: contract checks on the device, then 7B-shaped LLaVA-1.5 and
LLaVA-NeXT with every method at the papers' budgets, batch 1 and 8. Writes gpu_bench.json and gpu_bench.md (and
a log) to the folder given, after every section, so a run cut short still leaves what it measured.

    python benchmarks/gpu_bench.py OUT                       # CUDA, 7B shapes (one H100/H200: about 6-7 minutes)
    python benchmarks/gpu_bench.py OUT --tiny --device cpu   # the same code path on tiny shapes (under a minute)

Sections:
1. contract: benchmarks/device_contract.py on the tiny models, on ``--device`` in ``--contract-dtype`` (default
   bfloat16 where native, i.e. on the GPU) with ``--attn`` (default sdpa): identity, exact removal, batch = one-by-one, cache = no cache, for every
   registered method (``--tiny``: pool, fastv and mqt only);
2. llava: LLaVA-1.5-7B shapes (Llama 4096 x 32, CLIP ViT-L/14-336, random weights drawn on the device), every method
   that can run at keep 192 / 128 / 64 (FastV K=2), batch 1 and 8, M=8 new tokens, interleaved;
3. next: LLaVA-NeXT-7B shapes (AnyRes, 672x672 images: thumbnail + 2x2 crops, 2928 visual tokens), every method
   that can run at keep_ratio 0.25 / 0.10, batch 1 and 8.

Each benchmark row carries the prefill time and samples/s, the FLOPs ratio and the speed-up as a share of its
FLOPs-ideal, time to first token, samples/s with M tokens, decode tokens/s, KV-cache bytes per sample and peak
memory (torch.cuda.max_memory_allocated), after a warm-up round that checks batched answers against one-by-one.
``--time-budget`` (default 420 s) stops the timed rounds early and skips sections that can no longer finish.
Exit status: 0 when every section ran (configurations whose batched answers differ from one-by-one are findings,
listed in the log and the report), 1 when a section failed, 2 for a bad argument.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_prefill as bp  # noqa: E402
import device_contract as dc  # noqa: E402

FULL = {
    "llava": dict(size="7b", budgets=[{"keep": 192}, {"keep": 128}, {"keep": 64}], batch=[1, 8], decode=8, repeats=2),
    "next": dict(size="7b", budgets=[{"keep_ratio": 0.25}, {"keep_ratio": 0.1}], batch=[1, 8], decode=8, repeats=2),
}
# --tiny: the same code path in seconds: one budget, a method of every kind (mqt: skipped with its reason), NeXT
# at 336x336 (thumbnail + 2 crops)
TINY_METHODS = ["fastv", "hired", "mqt", "mustdrop", "pool"]
TINY = {
    "llava": dict(size="tiny", budgets=[{"keep": 192}], batch=[1, 2], decode=2, repeats=1, methods=TINY_METHODS),
    "next": dict(size="tiny", budgets=[{"keep_ratio": 0.25}], batch=[1, 2], decode=2, repeats=1,
                 methods=TINY_METHODS, image=(336, 336)),
}
TINY_CONTRACT_METHODS = ["fastv", "mqt", "pool"]
# seconds a section needs at least (warm-up with the batch = one-by-one check, one timed round, the profile pass)
# on one H100/H200; a section is skipped when less of the time budget is left
MIN_LEFT = {"contract": 30, "llava": 150, "next": 130}


class Run:
    def __init__(self, out: Path, args):
        self.out, self.args = out, args
        self.t0 = time.monotonic()
        self.result = {"benchmark": "gpu", "tiny": args.tiny, "device": args.device, "attn": args.attn,
                       "date": datetime.datetime.now().isoformat(timespec="seconds"), "sections": {}}
        self.log_file = open(out / "gpu_bench.log", "a")

    def log(self, msg: str):
        line = f"[{time.monotonic() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.args.time_budget - (time.monotonic() - self.t0)

    def save(self):
        self.result["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "gpu_bench.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        tmp.replace(self.out / "gpu_bench.json")
        (self.out / "gpu_bench.md").write_text(markdown(self.result) + "\n")


def markdown(result: dict) -> str:
    lines = [f"# vlprune GPU benchmark ({'tiny shapes' if result['tiny'] else '7B shapes'}, {result['device']}, "
             f"{result['attn']}), {result['date']}, {result.get('elapsed_s', 0)} s", ""]
    env = result.get("environment")
    if env:
        lines += [f"Environment: {json.dumps(env)}", ""]
    for name, sec in result["sections"].items():
        lines.append(f"## {name}")
        lines.append("")
        if "error" in sec:
            lines += [f"Failed: {sec['error']}", ""]
            continue
        if "skipped" in sec and isinstance(sec["skipped"], str):
            lines += [f"Skipped: {sec['skipped']}", ""]
            continue
        if name == "contract":
            lines += [dc.markdown(sec), ""]
            continue
        lines += [sec["header"], "", bp.markdown_table(sec["rows"]), ""]
        lines += [f"- {n}" for n in bp.summary_lines(sec["rows"], sec.get("skipped_methods", {}))]
        lines.append("")
    return "\n".join(lines)


def section_contract(run: Run):
    a = run.args
    methods = TINY_CONTRACT_METHODS if a.tiny else None
    res = dc.run_contract(a.device, a.contract_dtype, a.attn, methods, log=run.log)
    run.result["sections"]["contract"] = res
    run.log("contract: " + json.dumps(res["summary"]))


def section_bench(run: Run, host: str):
    import torch

    a = run.args
    spec = (TINY if a.tiny else FULL)[host]
    dtype_name, why = bp.resolve_dtype(a.dtype, a.device)
    bp.check_attn(a.attn, a.device, dtype_name)
    names = spec.get("methods") or __import__("vlprune").list_methods()
    methods = bp.build_methods(names, spec["budgets"], 2, {}, explicit=False)
    skipped = bp.probe_methods(methods, host)
    for n, w in skipped.items():
        run.log(f"{host}: skipped {n}: {w}")
    ns = argparse.Namespace(batch=spec["batch"], method_objs=methods, budgets=spec["budgets"], k=2, size=spec["size"],
                            official_attention=[])
    configs = bp.make_configs(ns, skipped)
    t = time.perf_counter()
    model, processor = bp.build_model(spec["size"], host, dtype_name, a.device, a.attn, seed=0)
    build_s = time.perf_counter() - t
    image = spec.get("image") or ((336, 336) if host == "llava" else (672, 672))
    n_params = sum(p.numel() for p in model.parameters())
    attn_used = model.config.text_config._attn_implementation
    run.log(f"{host}: {bp.model_name(spec['size'], host)}, {n_params / 1e9:.2f}B params, {dtype_name} ({why}), "
            f"attention {attn_used}, built on {a.device} in {build_s:.1f} s; {len(configs)} configurations")
    # leave the NeXT section its time (about 170 s on one H100/H200), and 20 s for the profile pass and writing
    reserve = 170 if host == "llava" and "next" in a.sections and not a.tiny else 20
    deadline = time.monotonic() + max(0.0, run.left() - reserve)
    rows, checks = bp.run_bench(model, processor, configs, device=a.device, dtype=getattr(torch, dtype_name),
                                image_size=image, decode_tokens=spec["decode"], repeats=spec["repeats"],
                                log=lambda m: run.log(f"{host}: {m.strip()}"), deadline=deadline)
    budgets = ", ".join(bp.budget_label(b) for b in spec["budgets"])
    header = (f"{bp.model_name(spec['size'], host)}, {n_params / 1e9:.2f}B params, {dtype_name} on {a.device} "
              f"({attn_used}), budgets {budgets}, FastV K=2, batch {spec['batch']}, M={spec['decode']} new tokens, "
              f"median of up to {spec['repeats']} interleaved rounds after a warm-up. Peak memory: "
              f"{'torch.cuda.max_memory_allocated' if a.device.startswith('cuda') else 'peak RSS'} above the "
              f"memory in use before the call (weights excluded).")
    run.result["sections"][host] = {"header": header, "size": spec["size"], "dtype": dtype_name, "dtype_why": why,
                                    "attn": attn_used, "params": n_params, "build_s": build_s,
                                    "skipped_methods": skipped, "rows": rows}
    del model
    gc.collect()
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()


def environment(args) -> dict:
    import torch

    env = bp.versions()
    env["device"] = args.device
    if args.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(args.device))
        env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    import importlib.util

    env["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
    return env


def main(argv=None) -> int:
    ap = bp._Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for gpu_bench.json, gpu_bench.md and gpu_bench.log")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (seconds on a CPU): tests the script itself")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --tiny when no GPU)")
    ap.add_argument("--dtype", default="auto", choices=bp.DTYPES, help="benchmark dtype (auto: bf16 where native)")
    ap.add_argument("--contract-dtype", default=None, choices=["bfloat16", "float32", "float16"],
                    help="dtype of the contract checks (default: bfloat16 where the device computes it natively, "
                         "else float32, where bfloat16 would be emulated and slow)")
    ap.add_argument("--attn", default="sdpa", choices=bp.ATTNS)
    ap.add_argument("--sections", nargs="+", default=["contract", "llava", "next"],
                    choices=["contract", "llava", "next"])
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    try:
        args = ap.parse_args(argv)
        import torch

        if args.device is None:
            args.device = "cuda" if (torch.cuda.is_available() or not args.tiny) else "cpu"
        bp.check_device(args.device)
        dtype_name, _ = bp.resolve_dtype(args.dtype, args.device)
        bp.check_attn(args.attn, args.device, dtype_name)
        if args.contract_dtype is None:
            from vlprune.precision import native_bf16

            args.contract_dtype = "bfloat16" if native_bf16(args.device) else "float32"
        if args.attn == "flash_attention_2" and args.contract_dtype == "float32":
            raise bp.ArgError("--attn flash_attention_2 with --contract-dtype float32: FlashAttention runs in "
                              "bfloat16 or float16 only; use --contract-dtype bfloat16")
        if args.time_budget <= 0:
            raise bp.ArgError(f"--time-budget {args.time_budget}: must be a positive number of seconds; e.g. 420")
        if args.threads is not None and args.threads < 1:
            raise bp.ArgError(f"--threads {args.threads}: must be a positive integer; e.g. --threads 2")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise bp.ArgError(f"{args.out}: exists and is not a folder; give a folder, e.g. /tmp/vlprune-gpu")
        out.mkdir(parents=True, exist_ok=True)
    except bp.ArgError as e:
        print(f"gpu_bench.py: error: {e}", file=sys.stderr)
        return 2
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(out, args)
    run.result["environment"] = environment(args)
    run.log(f"environment: {json.dumps(run.result['environment'])}")
    run.save()
    status = 0
    for name in args.sections:
        if run.left() < MIN_LEFT[name] and not args.tiny:  # a section that cannot finish is skipped, not cut
            run.result["sections"][name] = {"skipped": f"time budget: {run.left():.0f} s left of {args.time_budget:.0f}"}
            run.log(f"{name}: skipped, {run.left():.0f} s left")
            run.save()
            continue
        run.log(f"--- {name}")
        try:
            section_contract(run) if name == "contract" else section_bench(run, name)
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            import traceback

            run.result["sections"][name] = {"error": " ".join(f"{type(e).__name__}: {e}".split())}
            run.log(traceback.format_exc())
            status = 1
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        run.save()
    findings = [f"{name} {r['key']}: {r['error']}" for name, sec in run.result["sections"].items()
                for r in sec.get("rows", []) if "error" in r]
    for f in findings:  # measured and reported, not a failure of the run
        run.log(f"finding: {f}")
    run.log(f"done in {time.monotonic() - run.t0:.0f} s; wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
