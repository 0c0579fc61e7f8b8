"""The ``vlprune`` console script.

    vlprune demo      apply every registered method to tiny random-weight hosts built from configs (offline, CPU):
                      LLaVA-1.5 and LLaVA-NeXT by default, Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision with --hosts;
                      print tokens kept, FLOPs and time per method
    vlprune methods   list the registered methods with their hyperparameters and defaults
    vlprune eval      the evaluation harness (evals.run): accuracy against cost for methods and budgets on the
                      shipped proxy LVLM or a LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL or LLaVA-OneVision model
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time


# ------------------------------------------------------------------------------------------------------ methods
def _field_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f"{f.default_factory.__name__}()"  # type: ignore[misc]
    return "(required)"


def _class_stages(cls) -> tuple:
    """A method class's stages. A composition (e.g. MustDrop) computes them from its parts, so its default
    instance is asked; a method that needs a budget to be built is built with one."""
    stages = getattr(cls, "stages", ())
    if not isinstance(stages, property):
        return tuple(stages)
    for kwargs in ({}, {"keep": 64}):
        try:
            return tuple(cls(**kwargs).stages)
        except (TypeError, ValueError):
            continue
    return ()


def method_rows() -> list[dict]:
    """One dict per registered method: name, class, stages, summary and hyperparameters [(name, type, default)]."""
    from .registry import get_method_class, list_methods

    rows = []
    for name in list_methods():
        cls = get_method_class(name)
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        params = [
            (f.name, f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)), _field_default(f))
            for f in dataclasses.fields(cls)
            if f.repr
        ] if dataclasses.is_dataclass(cls) else []
        stages = ", ".join(str(getattr(s, "value", s)) for s in _class_stages(cls))
        rows.append({"name": name, "class": cls.__name__, "stages": stages, "summary": " ".join(doc.split()),
                     "params": params})
    return rows


def cmd_methods(args) -> int:
    rows = method_rows()
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']}  ({r['class']}; stages: {r['stages']})")
        summary = r["summary"]
        if summary:
            print(f"    {summary[:200]}{'...' if len(summary) > 200 else ''}")
        for pname, ptype, default in r["params"]:
            print(f"    {pname:<16} {ptype:<20} default {default}")
        print()
    print("Budgets: give keep=<tokens> or keep_ratio=<share in (0, 1]>, e.g. vlprune.apply(model, 'pool', keep=64).")
    return 0


# ------------------------------------------------------------------------------------------------------ demo
def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def method_kwargs(name: str, keep: int, k: int) -> dict:
    """Hyperparameters of a method at budget ``keep`` (FastV also takes its layer ``k``)."""
    return {"k": k, "keep": keep} if name == "fastv" else {"keep": keep}


def kept_tokens(stats: dict, method, sample: int = 0) -> int:
    """Visual tokens that sample ``sample`` kept: for methods acting inside the decoder, what reached the last layer;
    otherwise what the PRE_LLM stage kept."""
    from .methods.base import Stage

    stages = getattr(method, "stages", ())
    if Stage.LLM_LAYER in stages and stats["visual_per_layer"]:
        return int(stats["visual_per_layer"][sample][-1])
    images = [i for i in stats["images"] if i["sample"] == sample]
    if images:
        return sum(int(i["kept"]) for i in images)
    return int(stats["visual_per_layer"][sample][-1]) if stats["visual_per_layer"] else 0


def _demo_host(host: str, seed: int, image):
    """``(model, inputs)``: the tiny host ``host`` and its processor's tensors for ``image`` with one question, in
    the LLaVA-1.5 prompt on the LLaVA hosts and in the host's chat template on the others."""
    from . import hosts_tiny, testing

    if host in ("llava-1.5", "llava-next"):
        model, processor = (testing.tiny_llava if host == "llava-1.5" else testing.tiny_llava_next)(seed=seed)
        return model, testing.tiny_inputs(processor, [image], [testing.DEFAULT_PROMPT])
    build = {"qwen2-vl": hosts_tiny.tiny_qwen2_vl, "qwen2.5-vl": hosts_tiny.tiny_qwen2_5_vl,
             "llava-onevision": hosts_tiny.tiny_llava_onevision}[host]
    model, processor = build(seed=seed)
    return model, hosts_tiny.tiny_host_inputs(processor, [image], [hosts_tiny.host_prompt(processor)])


def _skipped_row(host: str, label: str, reason: str) -> dict:
    """A (host, method) the demo could not run: the row says why, its figures are None."""
    return {"host": host, "method": label, "visual_in": None, "kept": None, "equivalent_tokens": None,
            "prefill_tflops": None, "generate_tflops": None, "scoring_gflops": None, "prefill_s": None,
            "generate_s": None, "tokens": None, "skipped": " ".join(str(reason).split())}


def run_demo(keep: int = 64, k: int = 2, new_tokens: int = 8, repeats: int = 3, seed: int = 0,
             hosts=("llava-1.5", "llava-next"), methods=None, out=print) -> list[dict]:
    """Apply every registered method (or ``methods``) to the tiny models and return one row per (host, method),
    the unpruned model first. A method a host refuses (``vlprune.apply`` raises ``ValueError``, or ``TypeError``
    for a host class vlprune has no adapter for) is a row whose ``skipped`` gives the reason and whose figures are
    None; measured rows have ``skipped`` None. The unpruned row of a host vlprune cannot read is measured without
    its cost (None)."""
    import torch

    from . import api
    from .registry import get_method, list_methods
    from .testing import identity_method, synthetic_image

    for h in hosts:
        if h not in DEMO_VISUAL_TOKENS:
            raise ValueError(f"unknown host {h!r}; choose from {', '.join(DEMO_VISUAL_TOKENS)}")
    names = list(methods) if methods else list_methods()
    for name in names:  # hyperparameters checked before any model is built (MQT's weights come per host)
        if name != "mqt":
            get_method(name, **method_kwargs(name, keep, k))
    image = synthetic_image((336, 336), seed=seed)
    rows: list[dict] = []
    with torch.inference_mode():
        for host in hosts:
            model, inputs = _demo_host(host, seed, image)
            n_img = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
            if keep >= n_img:  # the API's rule: a budget at or above the image's tokens prunes nothing
                out(f"{host:<{HOST_WIDTH}} note: keep={keep} is at or above this image's {n_img} visual tokens, so "
                    f"every method keeps all of them (the unpruned model); give a smaller --keep to see pruning")
            unreadable = None       # vlprune.apply's TypeError when vlprune has no adapter for this host's class
            try:
                api.apply(model, identity_method())
            except TypeError as e:
                unreadable = e
            finally:
                api.remove(model)

            def prefill():
                return model(**inputs, use_cache=True, logits_to_keep=1)

            def gen():
                return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False)

            def measure(label: str, method_obj):
                prefill(); gen()  # warm-up
                t_pre = _median_time(prefill, repeats)
                t_gen = _median_time(gen, repeats)
                # the cost of one prefill and of one generate, from the schedule the engine recorded
                if method_obj is None and unreadable is None:  # unpruned: timed without hooks, cost read
                    api.apply(model, identity_method())          # through a no-op method
                try:
                    prefill()
                    s_pre = None if unreadable else api.stats(model)
                    tokens = gen()
                    s_gen = None if unreadable else api.stats(model)
                finally:
                    if method_obj is None and unreadable is None:
                        api.remove(model)
                row = _skipped_row(host, label, "")
                row.update(skipped=None, prefill_s=t_pre, generate_s=t_gen, tokens=tokens[0, -new_tokens:].tolist())
                if s_pre is None:           # no adapter: the image's tokens from the prompt, no cost
                    row.update(visual_in=n_img, kept=n_img)
                else:
                    n_in = sum(int(i["visual_tokens"]) for i in s_pre["images"] if i["sample"] == 0)
                    row.update(
                        visual_in=n_in,
                        kept=n_in if method_obj is None else kept_tokens(s_pre, method_obj),
                        equivalent_tokens=(float(s_pre["equivalent_tokens"][0]) if s_pre["equivalent_tokens"]
                                           else None),
                        prefill_tflops=s_pre["cost"].tflops,
                        generate_tflops=s_gen["cost"].tflops,
                        scoring_gflops=s_pre["cost"].scoring / 1e9,
                    )
                rows.append(row)
                out(_format_row(row))

            def skip(label: str, reason) -> None:
                row = _skipped_row(host, label, reason)
                rows.append(row)
                out(_format_row(row))

            # every method is built and attached once before anything is timed: one that cannot run on this
            # host says why at once
            plan = []               # (name, method, why it cannot run here or None), in the order asked
            for name in names:
                if unreadable is not None:
                    plan.append((name, None, unreadable))
                    continue
                kw = method_kwargs(name, keep, k)
                if name == "mqt":  # a learned projector: the tiny model gets a seeded random one
                    kw["weights"] = _random_mqt_folder(model, seed)
                method_obj = get_method(name, **kw)
                try:
                    api.apply(model, method_obj)
                except (ValueError, TypeError) as e:  # a method that does not run on this host says why
                    plan.append((name, None, e))
                    continue
                finally:
                    api.remove(model)
                plan.append((name, method_obj, None))
            # the unpruned model: timed without any hooks; its cost read through a method that changes nothing
            measure("(unpruned)", None)
            for name, method_obj, why in plan:
                label = name + ("" if name != "fastv" else f" k={k}")
                if why is not None:
                    skip(label, why)
                    continue
                api.apply(model, method_obj)
                try:
                    measure(label, method_obj)
                finally:
                    api.remove(model)
    return rows


def _random_mqt_folder(model, seed: int) -> str:
    import tempfile

    import torch

    from .methods.mqt import MQTProjector, save_mqt

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mqt = MQTProjector(model.config.vision_config.hidden_size, model.config.text_config.hidden_size,
                           n_queries=256, n_heads=4)
    folder = tempfile.mkdtemp(prefix="vlprune-demo-mqt-")
    save_mqt(mqt, folder)
    return folder


HOST_WIDTH = 15  # the host column: "llava-onevision"
_HEADER = (f"{'host':<{HOST_WIDTH}} {'method':<13} {'visual in':>9} {'kept':>6} {'equiv.':>7} {'TFLOPs pre':>10} "
           f"{'TFLOPs gen':>10} {'prefill s':>9} {'generate s':>10}")


def _format_row(r: dict) -> str:
    if r.get("skipped"):
        return f"{r['host']:<{HOST_WIDTH}} {r['method']:<13} skipped: {r['skipped']}"

    def cell(key: str, width: int, fmt: str) -> str:
        return f"{'-' if r[key] is None else format(r[key], fmt):>{width}}"

    return (f"{r['host']:<{HOST_WIDTH}} {r['method']:<13} {r['visual_in']:>9} {r['kept']:>6} "
            f"{cell('equivalent_tokens', 7, '.1f')} {cell('prefill_tflops', 10, '.5f')} "
            f"{cell('generate_tflops', 10, '.5f')} {r['prefill_s']:>9.4f} {r['generate_s']:>10.4f}")


def cmd_demo(args) -> int:
    import platform

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the torchvision-less image processor fallback notice is expected here
    except Exception:  # pragma: no cover
        pass
    import vlprune

    print(f"vlprune {vlprune.__version__} demo: tiny random-weight models built from configs (no download), "
          f"keep={args.keep}, fastv k={args.k}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} CPU; "
          f"TFLOPs pre = one prefill (vision + projector + LLM + lm_head + scoring), gen = prefill + "
          f"{args.new_tokens - 1} decode steps; kept = visual tokens reaching the last decoder layer (sample 0)")
    print(_HEADER)
    print("-" * len(_HEADER))
    t0 = time.perf_counter()
    rows = run_demo(keep=args.keep, k=args.k, new_tokens=args.new_tokens, repeats=args.repeats, seed=args.seed,
                    hosts=args.hosts, methods=args.methods)
    skipped = sum(1 for r in rows if r.get("skipped"))
    runs = f"{len(rows) - skipped} runs" + (f" ({skipped} skipped)" if skipped else "")
    print(f"{runs} in {time.perf_counter() - t0:.1f} s. Random weights: the generated tokens carry no "
          f"meaning; times are for this machine.")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------------------------------ main
# visual tokens of the demo's 336x336 image on each tiny host (checked against the built models in the tests)
DEMO_VISUAL_TOKENS = {"llava-1.5": 576, "llava-next": 1176, "qwen2-vl": 64, "qwen2.5-vl": 64, "llava-onevision": 664}
DEMO_HOSTS_DEFAULT = ["llava-1.5", "llava-next"]
DEMO_LAYERS = 4  # decoder layers of the tiny hosts


def build_parser() -> argparse.ArgumentParser:
    from .cliargs import Parser, method_name, nonneg_int, positive_int

    p = Parser(
        prog="vlprune",
        description="Visual-token compression for LLaVA-style models, attached with hooks and removable.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    d = sub.add_parser("demo", help="apply every method to tiny LLaVA-1.5 / LLaVA-NeXT models and print a table",
                       description="Build tiny random-weight models from configs (offline, CPU): LLaVA-1.5 and "
                                   "LLaVA-NeXT, or the --hosts given (also Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision), "
                                   "apply every registered method and print visual tokens kept, FLOPs and time per "
                                   "method, with the unpruned model first; a method a host refuses is a row with "
                                   "the reason.")
    d.add_argument("--keep", type=positive_int, default=64,
                   help=f"visual tokens to keep (default: 64; the demo image has "
                        f"{', '.join(f'{v} on {k}' for k, v in DEMO_VISUAL_TOKENS.items())})")
    d.add_argument("--k", type=positive_int, default=2,
                   help=f"FastV's pruning layer K, 1..{DEMO_LAYERS - 1} on the tiny hosts (default: 2)")
    d.add_argument("--new-tokens", type=positive_int, default=8, help="tokens to generate (default: 8)")
    d.add_argument("--repeats", type=positive_int, default=3, help="timed repeats; the median is shown (default: 3)")
    d.add_argument("--seed", type=nonneg_int, default=0, help="seed of the random weights and the image (default: 0)")
    d.add_argument("--hosts", nargs="+", type=demo_host, default=list(DEMO_HOSTS_DEFAULT), metavar="HOST",
                   help=f"tiny hosts to run, from {', '.join(DEMO_VISUAL_TOKENS)} "
                        f"(default: {' '.join(DEMO_HOSTS_DEFAULT)})")
    d.add_argument("--methods", nargs="+", type=method_name, default=None,
                   help="methods to run (default: all registered)")
    d.add_argument("--threads", type=nonneg_int, default=0, help="torch threads (default: torch's choice)")
    d.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    d.set_defaults(func=cmd_demo, check=check_demo)

    sub.add_parser("eval", help="the evaluation harness: accuracy against cost per method and budget "
                               "(see `vlprune eval --help`)", add_help=False)
    m = sub.add_parser("methods", help="list registered methods with their hyperparameters and defaults")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_methods)
    return p


def demo_host(text: str) -> str:
    """One tiny host of ``vlprune demo --hosts`` (case-insensitive)."""
    from .cliargs import did_you_mean

    name = str(text).strip().lower()
    if name not in DEMO_VISUAL_TOKENS:
        raise argparse.ArgumentTypeError(f"unknown host {text!r}{did_you_mean(name, list(DEMO_VISUAL_TOKENS))}; "
                                         f"choose from {', '.join(DEMO_VISUAL_TOKENS)}")
    return name


def check_demo(args, parser) -> None:
    """Refuse what the demo cannot show before any model is built."""
    if args.k >= DEMO_LAYERS:
        parser.error(f"--k {args.k} is not a decoder layer FastV can prune at on the tiny hosts "
                     f"({DEMO_LAYERS} layers); give 1..{DEMO_LAYERS - 1}, e.g. --k 2")
    if args.json:
        import os

        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json {args.json!r}: folder {folder!r} does not exist; create it or give another path")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:  # the evaluation harness keeps its own options (see `vlprune eval --help`)
        try:
            from evals.run import main as eval_main
        except ImportError as e:  # pragma: no cover
            print(f"vlprune eval: error: the evaluation harness (package 'evals') is not installed: {e}; install "
                  f"vlprune from its source tree with the 'eval' extra: pip install -e '.[eval]'", file=sys.stderr)
            return 2
        return eval_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    if getattr(args, "check", None):
        args.check(args, sub)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad method names or hyperparameters: the message names the value and the fix
        print(f"vlprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `vlprune methods | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
