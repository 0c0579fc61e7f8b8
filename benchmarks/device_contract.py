"""The contract checks of tests/ (identity at full budget, exact removal, batch = one-by-one, cache = no cache),
run over every registered method on the tiny LLaVA-1.5 and LLaVA-NeXT models on any device, dtype and attention
kernel, measuring instead of asserting: on CUDA in bfloat16 with SDPA, do the CPU float32 bounds (exact equality)
still hold?

    python benchmarks/device_contract.py --device cuda --dtype bfloat16 --out /tmp/contract.json

Per host and method (the registry-wide settings of tests/conftest.py: FastV k=2, ToDRE tau=0, MustDrop without
window merging, MQT with a seeded random projector on LLaVA-1.5 only):

- identity: ``keep=10**6`` gives logits bit-identical to the unpatched model (max |diff| reported);
- remove: after apply (keep=16), a forward and ``vlprune.remove``, the logits are bit-identical again;
- batch: two samples of different lengths and images, left padded, 8 greedy tokens with keep=40 (MQT: 8) equal each sample
  run alone (tokens that agree, and the max |diff| of the first step's logits);
- cache: for methods that act before the decoder only, ``generate`` with the KV cache equals a greedy loop without
  a cache (every step re-runs the pruned prefill), 8 tokens. Methods acting inside the decoder are checked against
  masked references in tests/test_generate.py (CPU); here they are "n/a".
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

N_NEW = 8
METHOD_KWARGS = {"fastv": {"k": 2}, "todre": {"tau": 0.0}, "mustdrop": {"merging": False}}
HOSTS = ("llava", "llava_next")


def _mqt_folder(cache: list) -> str:
    import torch

    if not cache:
        from vlprune.methods.mqt import MQTProjector, save_mqt

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mqt = MQTProjector(64, 128, n_queries=16, n_heads=4)
        folder = tempfile.mkdtemp(prefix="vlprune-mqt-")
        save_mqt(mqt, folder)
        cache.append(folder)
    return cache[0]


def _inputs(host, processor, n, device, dtype):
    from vlprune.testing import synthetic_image, tiny_inputs

    prompts = ["USER: <image>\nWhat is shown in this image? ASSISTANT:",
               "USER: <image>\nHow many objects are there? Describe the picture in detail. ASSISTANT:"][:n]
    sizes = [(336, 336), (336, 336)] if host == "llava" else [(640, 480), (480, 360)]
    images = [synthetic_image(s, seed=i) for i, s in zip(range(n), sizes)]
    inputs = dict(tiny_inputs(processor, images, prompts, padding_side="left"))
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


def _generate(model, inputs, n=N_NEW):
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:].cpu()


def _no_cache(model, inputs, n=N_NEW):
    import torch

    ids, am = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = model(input_ids=ids, attention_mask=am, use_cache=False, **extra).logits[:, -1].argmax(-1)
            out.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            am = torch.cat([am, torch.ones_like(nxt[:, None])], 1)
    return torch.stack(out, 1).cpu()


def _single(inputs, b):
    n_pad = int((inputs["attention_mask"][b] == 0).sum())
    return {k: (v[b:b + 1, n_pad:] if k in ("input_ids", "attention_mask") else v[b:b + 1]) for k, v in inputs.items()}


def _maxdiff(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max())


def check_method(model, processor, host, name, device, dtype, mqt_cache) -> dict:
    import torch

    import vlprune
    from vlprune.methods.base import Stage

    kw = dict(METHOD_KWARGS.get(name, {}))
    if name == "mqt":
        if host != "llava":
            return {"host": host, "method": name, "skipped": "MQT-LLaVA is a LLaVA-1.5 model"}
        kw["weights"] = _mqt_folder(mqt_cache)
    rec: dict = {"host": host, "method": name}
    one = _inputs(host, processor, 1, device, dtype)
    two = _inputs(host, processor, 2, device, dtype)
    with torch.inference_mode():
        ref_two = model(**two).logits
        ref_one = model(**one).logits
    # identity at full budget (MQT replaces the projector: no budget gives the unpatched model back)
    if name != "mqt":
        with vlprune.pruned(model, name, keep=10**6, **kw), torch.inference_mode():
            out = model(**two).logits
        rec["identity_max_diff"] = _maxdiff(out, ref_two)
        rec["identity_ok"] = bool(torch.equal(out, ref_two))
    # exact removal
    vlprune.apply(model, name, keep=16, **kw)
    try:
        with torch.inference_mode():
            model(**one)
    finally:
        vlprune.remove(model)
    with torch.inference_mode():
        after = model(**one).logits
    rec["remove_ok"] = bool(torch.equal(after, ref_one))
    rec["remove_max_diff"] = _maxdiff(after, ref_one)
    # batch = one-by-one, and cache = no cache for methods acting before the decoder
    method = vlprune.get_method(name, keep=8 if name == "mqt" else 40, **kw)  # the tiny MQT has 16 queries
    with vlprune.pruned(model, method):
        toks = _generate(model, two)
        singles = [_generate(model, _single(two, b))[0] for b in range(2)]
        with torch.inference_mode():
            first = model(**two, logits_to_keep=1).logits[:, -1]
            first_single = [model(**_single(two, b), logits_to_keep=1).logits[0, -1] for b in range(2)]
        pre_only = Stage.LLM_LAYER not in method.stages and Stage.KV_CACHE not in method.stages
        if pre_only:
            cached = _generate(model, one)
            nocache = _no_cache(model, one)
    agree = sum(int((toks[b] == singles[b]).sum()) for b in range(2))
    rec["batch_tokens_agree"] = f"{agree}/{2 * N_NEW}"
    rec["batch_ok"] = agree == 2 * N_NEW
    rec["batch_first_logits_max_diff"] = max(_maxdiff(first[b], first_single[b]) for b in range(2))
    if pre_only:
        rec["cache_tokens_agree"] = f"{int((cached == nocache).sum())}/{N_NEW}"
        rec["cache_ok"] = bool(torch.equal(cached, nocache))
    else:
        rec["cache_ok"] = None
    return rec


def run_contract(device="cpu", dtype="bfloat16", attn="sdpa", methods=None, log=print) -> dict:
    import torch

    import vlprune
    from vlprune.testing import tiny_llava, tiny_llava_next

    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    names = methods or vlprune.list_methods()
    records, mqt_cache = [], []
    for host in HOSTS:
        model, proc = (tiny_llava if host == "llava" else tiny_llava_next)(seed=0, attn=attn)
        model = model.to(device=device, dtype=dt)
        for name in names:
            try:
                rec = check_method(model, proc, host, name, device, dt, mqt_cache)
            except Exception as e:  # noqa: BLE001 - a failing method is a finding, reported with its error
                rec = {"host": host, "method": name, "error": " ".join(f"{type(e).__name__}: {e}".split())}
                vlprune.remove(model)
            records.append(rec)
            log("  contract " + json.dumps(rec))
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    keys = ("identity_ok", "remove_ok", "batch_ok", "cache_ok")
    summary = {k: {"pass": sum(1 for r in records if r.get(k) is True), "fail": sum(1 for r in records if r.get(k) is False)}
               for k in keys}
    summary["errors"] = sum(1 for r in records if "error" in r)
    return {"device": str(device), "dtype": str(dt).replace("torch.", ""), "attn": attn, "new_tokens": N_NEW,
            "records": records, "summary": summary}


def markdown(result: dict) -> str:
    def ok(v):
        return "-" if v is None else ("yes" if v else "NO")

    lines = [f"Contract checks on {result['device']}, {result['dtype']}, {result['attn']} (tiny models; exact "
             f"equality is the CPU float32 bound):", "",
             "| host | method | identity (max diff) | remove | batch = one-by-one (tokens, first-step max diff) | "
             "cache = no cache |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["records"]:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['host']} | {r['method']} | {r.get('error') or 'skipped: ' + r['skipped']} | | | |")
            continue
        ident = "-" if "identity_ok" not in r else f"{ok(r['identity_ok'])} ({r['identity_max_diff']:.3g})"
        cache = "n/a" if r["cache_ok"] is None else f"{ok(r['cache_ok'])} ({r['cache_tokens_agree']})"
        lines.append(f"| {r['host']} | {r['method']} | {ident} | {ok(r['remove_ok'])} | {ok(r['batch_ok'])} "
                     f"({r['batch_tokens_agree']}, {r['batch_first_logits_max_diff']:.3g}) | {cache} |")
    s = result["summary"]
    lines += ["", "Summary: " + ", ".join(f"{k} {v['pass']} pass / {v['fail']} fail" for k, v in s.items()
                                          if isinstance(v, dict)) + f", {s['errors']} errors"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--out", default=None, help="JSON path (and .md beside it)")
    args = ap.parse_args(argv)
    result = run_contract(args.device, args.dtype, args.attn, args.methods)
    print(markdown(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result) + "\n")
    return 1 if result["summary"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
