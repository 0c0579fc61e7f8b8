"""The evaluation harness: accuracy against cost for every method and budget, paired with the unpruned model.

    vlprune eval                                    # the default grid on the shipped proxy LVLM
    python -m evals.run --methods random,pool,cls_attn,fastv --keep 576,192,128,64 --n 200 --seed 0
    accelerate launch --multi_gpu --num_processes 2 -m evals.run ...   # samples sharded over processes / GPUs
                                                    # (on a CPU-only machine too; or torchrun --nproc_per_node 2)

Every run is paired: the unpruned model and the random and pooling baselines run on the same samples as the
methods asked for. Per method and budget it records accuracy (overall, per family and category, POPE's metrics on
POPE files) with 95% Wilson intervals, the paired difference to the unpruned model and to random at the same
budget (95% interval, exact McNemar test: "no difference" unless p < 0.05), agreement with the unpruned model's
answers, visual tokens per decoder layer and equivalent tokens, TFLOPs of a prefill and of a generate call from
vlprune's cost model, the median prefill and end-to-end latency (batch 1, on the first ``--latency-samples``
samples after a warm-up), peak memory, versions, seed and command.
On the proxy benchmark it also records the blind (question-only) baseline on the same samples: each question
answered with its commonest answer in training samples, without the image (``results.json`` key ``blind``).

Output folder (``--out``): ``results.json`` (every number), ``results.md`` (a table for a README),
``accuracy_vs_tflops.png``, and ``records/`` (one JSON line per sample and configuration). A run that stops
continues from ``records/`` when started again with the same arguments; merged results do not depend on the
number of processes (latency aside).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from vlprune.cliargs import Parser, did_you_mean, method_list, nonneg_int, positive_int
from vlprune.precision import DTYPES

from .benchmarks import Benchmark, Item, load_benchmark
from .models import HOST_CLASSES, host_types_text
from .stats import ALPHA, fmt_accuracy, fmt_difference, fmt_versus, paired_difference, wilson

__all__ = ["main", "run", "parse_args", "build_grid", "Config", "load_model", "host_class", "check_prunable",
           "build_prompt", "batch_inputs",
           "summarize", "blind_row", "markdown"]

BASELINES = ("random", "pool")
DEFAULT_METHODS = "random,pool,cls_attn,fastv"
DEFAULT_KEEP = "576,64"
DEFAULT_N = 100
DEFAULT_LATENCY = 2
FULL_METHODS = "random,pool,cls_attn,fastv"
FULL_KEEP = "576,192,128,64"
FULL_N = 200
FULL_LATENCY = 8
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
BLIND_LABEL = "blind (question only)"
BLIND_TRAIN = 3000                       # training samples the blind baseline reads its commonest answers from
STATISTICS = ("accuracy_ci: 95% Wilson interval (%); vs_unpruned, vs_random: paired difference on the same samples "
              "(percentage points) with its 95% Wald interval and the exact McNemar p; verdict 'no difference' when "
              f"p >= {ALPHA}, else 'better' or 'worse'")


@dataclasses.dataclass(frozen=True)
class Config:
    method: str | None                   # None: the unpruned model
    keep: int | float | None  # a token count, a share (keep_ratio), or None
    kwargs: tuple = ()
    label: str | None = None  # a variant's name, e.g. "mustdrop[preset=64]"; default: the method's name

    @property
    def name(self) -> str:
        return "unpruned" if self.method is None else (self.label or self.method)

    @property
    def key(self) -> str:
        return "unpruned" if self.method is None else f"{self.name}@{self.keep}"


# ----------------------------------------------------------------------------------------------------- set-up
PROXY_MODELS = ("proxy", "proxy-next", "proxy-mqt")
PROXY_BENCHMARKS = ("proxy", "proxy-next")
HOST_TYPES = tuple(HOST_CLASSES)   # llava, llava_next, qwen2_vl, qwen2_5_vl, llava_onevision


def _model_spec(text: str) -> str:
    """``--model``: a proxy name, a local folder whose ``config.json`` has a model type of ``HOST_TYPES``, or a hub
    id (``owner/name``). Refused at once: a path that does not exist, a folder without ``config.json`` or of another
    model type, a name that is none of these."""
    forms = (f"give {', '.join(PROXY_MODELS)}, a local folder of a {host_types_text()} model, or a hub id like "
             f"llava-hf/llava-1.5-7b-hf or Qwen/Qwen2-VL-2B-Instruct")
    if text in PROXY_MODELS:
        return text
    path = Path(text).expanduser()
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder without a config.json; {forms}")
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except (OSError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{text!r}: its config.json does not read as JSON ({e}); {forms}") from None
        if model_type not in HOST_TYPES:
            raise argparse.ArgumentTypeError(f"{text!r} is a {model_type!r} model; the harness runs "
                                             f"{host_types_text()} models; {forms}")
        return text
    if path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a model folder; {forms}")
    if looks_like_path:
        raise argparse.ArgumentTypeError(f"{text!r} does not exist; {forms}")
    from .models import check_model_name   # a hub id: cached, or downloadable while the hub is not switched off

    try:
        check_model_name(text, "--model ")
    except ValueError as e:
        raise argparse.ArgumentTypeError(" ".join(str(e).split())) from None
    return text


def _benchmark_spec(text: str) -> str:
    if text in PROXY_BENCHMARKS or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither {' nor '.join(PROXY_BENCHMARKS)} nor an existing JSONL "
                                     f"file{did_you_mean(text, PROXY_BENCHMARKS)}; give one of those")


def _folder(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing folder; give the folder holding the images")
    return text


def _keep_arg(text: str) -> list:
    try:
        return parse_keep(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _param_arg(text: str) -> str:
    try:
        parse_params([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_args(argv=None) -> argparse.Namespace:
    ap = Parser(prog="vlprune eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="proxy", type=_model_spec,
                    help="'proxy' (shipped LLaVA-1.5-geometry proxy), 'proxy-next', 'proxy-mqt' (the proxy with an "
                         "MQT projector), a local folder or a hub id")
    ap.add_argument("--benchmark", default=None, type=_benchmark_spec,
                    help="'proxy', 'proxy-next' or a JSONL file (POPE format or image/question/answer); "
                         "default: the proxy benchmark matching --model")
    ap.add_argument("--format", default="auto", choices=["auto", "pope", "jsonl"])
    ap.add_argument("--images", default=None, type=_folder,
                    help="image folder for a JSONL benchmark (default: its folder)")
    ap.add_argument("--full", action="store_true",
                    help=f"the full grid: methods {FULL_METHODS}, budgets {FULL_KEEP}, {FULL_N} samples and "
                         f"{FULL_LATENCY} timed samples per configuration (about 1.5 min on this project's 2-core CPU, "
                         f"longer without native bfloat16); "
                         f"--methods, --keep, --n and --latency-samples still override")
    ap.add_argument("--methods", default=None, type=method_list,
                    help=f"comma-separated registered methods (default {DEFAULT_METHODS}; --full: {FULL_METHODS})")
    ap.add_argument("--keep", default=None, type=_keep_arg,
                    help=f"comma-separated budgets: token counts (576,192,64) or shares (0.4,0.2,0.1); a count at or "
                         f"above the image's tokens or a share of 1.0 is the unpruned point (default {DEFAULT_KEEP}; "
                         f"--full: {FULL_KEEP})")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE", type=_param_arg,
                    help="a method hyperparameter, e.g. fastv.k=3 (repeatable)")
    ap.add_argument("--n", type=positive_int, default=None, help=f"samples (default {DEFAULT_N}; --full: {FULL_N})")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="chooses the samples and seeds the random baseline")
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: 2 on the proxy, 16 otherwise")
    ap.add_argument("--prompt-suffix", default=None,
                    help="appended to each question (default: none on the proxy, LLaVA's short-answer instruction "
                         "otherwise)")
    ap.add_argument("--latency-samples", type=nonneg_int, default=None,
                    help=f"batch-1 timed samples per configuration (default {DEFAULT_LATENCY}; --full: "
                         f"{FULL_LATENCY}; 0: no timing)")
    ap.add_argument("--dtype", default="auto", choices=list(DTYPES),
                    help="model dtype; auto (default): bfloat16 where the device computes it natively, else float32")
    ap.add_argument("--threads", type=nonneg_int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--out", default="results/eval", help="output folder")
    ap.add_argument("--overwrite", action="store_true", help="discard what --out holds instead of resuming")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    full = args.full
    if args.methods is None:
        args.methods = method_list(FULL_METHODS if full else DEFAULT_METHODS)
    if args.keep is None:
        args.keep = parse_keep(FULL_KEEP if full else DEFAULT_KEEP)
    if args.n is None:
        args.n = FULL_N if full else DEFAULT_N
    if args.latency_samples is None:
        args.latency_samples = FULL_LATENCY if full else DEFAULT_LATENCY
    try:
        check_grid(args.methods, args.keep, parse_params(args.param), args.seed)
    except ValueError as e:
        ap.error(str(e))
    return args


def check_grid(methods: Sequence[str], keeps: Sequence, params: dict, seed: int) -> None:
    """Build every configuration's method once, before any model is loaded: an unknown hyperparameter or a bad
    value fails here, with the allowed names."""
    big = max([k for k in keeps if isinstance(k, int)] + [1]) + 1
    for cfg in build_grid(methods, keeps, big, params, seed):
        if cfg.method is not None and cfg.method != "mqt":   # MQT's projector comes with its model
            _method(cfg)


def _csv(text: str, what: str) -> list[str]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--{what} is empty; give a comma-separated list")
    return parts


def parse_keep(text: str) -> list:
    """Budgets: integers are visual-token counts (>= 1); numbers with a decimal point are shares in (0, 1]
    (``keep_ratio``, the form HiRED and GlobalCom2 state their budgets in). Counts first, each sorted descending."""
    counts, ratios = set(), set()
    for p in _csv(text, "keep"):
        try:
            v = float(p) if "." in p else int(p)
        except ValueError:
            raise ValueError(f"--keep value {p!r} is neither a token count nor a share; e.g. --keep 576,192,128,64 "
                             f"or --keep 0.4,0.2,0.1") from None
        if isinstance(v, int):
            if v < 1:
                raise ValueError(f"--keep value {v} must be at least 1 (a token count) or a share like 0.2")
            counts.add(v)
        else:
            if not 0.0 < v <= 1.0:
                raise ValueError(f"--keep share {p} must be in (0, 1]; e.g. 0.2 keeps 20% of the visual tokens")
            ratios.add(v)
    return sorted(counts, reverse=True) + sorted(ratios, reverse=True)


def budget_label(keep) -> str:
    """'all', a token count, or a share as a percentage."""
    if keep is None:
        return "all"
    return f"{100 * keep:g}%" if isinstance(keep, float) else str(keep)


def parse_params(items: Sequence[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for it in items:
        if "=" not in it or "." not in it.split("=", 1)[0]:
            raise ValueError(f"--param {it!r} must look like METHOD.NAME=VALUE, e.g. fastv.k=3")
        lhs, value = it.split("=", 1)
        method, name = lhs.split(".", 1)
        try:
            val = json.loads(value)
        except json.JSONDecodeError:
            val = value
        out.setdefault(method, {})[name] = val
    return out


def parse_variant(item: str) -> tuple[str, dict]:
    """'mustdrop' -> ('mustdrop', {}); 'mustdrop[preset=64;decode=false]' -> ('mustdrop', {'preset': 64,
    'decode': False}) (values read as JSON where they parse, else as strings)."""
    if "[" not in item:
        return item, {}
    if not item.endswith("]"):
        raise ValueError(f"method variant {item!r} must look like NAME[key=value;key=value], e.g. mustdrop[preset=64]")
    name, body = item[:-1].split("[", 1)
    out = {}
    for part in filter(None, (p.strip() for p in body.split(";"))):
        if "=" not in part:
            raise ValueError(f"method variant {item!r}: {part!r} is not key=value")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v.strip()
    return name.strip(), out


def build_grid(methods: Sequence[str], keeps: Sequence, n_visual: int, params: dict, seed: int) -> list[Config]:
    """The unpruned model, then every method (random and pool first, always present) at every budget below
    ``n_visual`` (a budget at or above ``n_visual`` keeps every token, so the unpruned row stands for it, as
    ``vlprune.apply`` treats it). A method may be a variant, ``NAME[key=value;...]``, with its own hyperparameters (``keep=null``
    runs a method at its own default budget, e.g. MustDrop's presets). Unknown methods raise ``ValueError``."""
    from vlprune import list_methods
    from vlprune.cli import method_kwargs

    known = list_methods()
    variants = {m: parse_variant(m) for m in methods}
    methods = [m for m in methods]
    for m in [v[0] for v in variants.values()]:
        if m not in known:
            import difflib

            close = difflib.get_close_matches(m, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown method {m!r}{hint} Registered methods: {', '.join(known)}")
    for m in params:
        if m not in [v[0] for v in variants.values()] and m not in BASELINES:
            raise ValueError(f"--param names method {m!r}, which is not in --methods ({', '.join(methods)})")
    order = list(BASELINES) + [m for m in methods if m not in BASELINES]
    grid = [Config(None, None)]
    for item in order:
        m, extra = variants.get(item, (item, {}))
        for k in keeps:
            if (k >= n_visual) if isinstance(k, int) else (k >= 1.0):
                continue
            kw = method_kwargs(m, k, 2)
            if isinstance(k, float):
                kw.pop("keep")
                kw["keep_ratio"] = k
            if m == "random":
                kw["seed"] = seed
            kw.update(params.get(m, {}))
            kw.update(extra)
            kw = {key: v for key, v in kw.items() if v is not None or key not in ("keep", "keep_ratio")}
            cfg = Config(m, k, tuple(sorted(kw.items())), label=item if extra else None)
            if cfg.key not in {c.key for c in grid}:
                grid.append(cfg)
    return grid


def host_class(spec: str):
    """``(config, class)`` of a local folder or hub id: the transformers class of its model type
    (``evals.models.HOST_CLASSES``). Another model type raises ``ValueError`` naming the accepted ones."""
    import transformers
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(spec)
    if cfg.model_type not in HOST_CLASSES:
        raise ValueError(f"--model {spec!r} is a {cfg.model_type!r} model; the harness runs {host_types_text()} "
                         f"models")
    return cfg, getattr(transformers, HOST_CLASSES[cfg.model_type])


def check_prunable(spec: str) -> None:
    """Raise ``ValueError`` with ``vlprune.apply``'s own message when vlprune has no adapter for the class that
    ``spec`` loads with; asked of a weightless copy built on the meta device, so that it answers at once, before
    any weight or sample is read. The proxies always pass. A copy that cannot be built on the meta device is not
    judged here: ``vlprune.apply`` says so on the loaded model."""
    if spec in PROXY_MODELS:
        return
    import torch

    from vlprune.adapters import find_adapter

    cfg, cls = host_class(spec)
    try:
        with torch.device("meta"):
            skeleton = cls(cfg)
    except Exception:  # pragma: no cover - a config this transformers cannot build without weights
        return
    try:
        find_adapter(skeleton)
    except TypeError as e:
        raise ValueError(str(e)) from None


def load_model(spec: str, dtype: torch.dtype, device):
    """``(model, processor, label)`` for 'proxy', 'proxy-next', 'proxy-mqt', a local folder or a hub id of a model
    type in ``HOST_TYPES`` (the class from ``evals.models.HOST_CLASSES``, the processor from
    ``evals.models.load_processor``: ``AutoProcessor``, or the same class without a video processor where that
    cannot be loaded)."""
    if spec in ("proxy", "proxy-next", "proxy-mqt"):
        from .proxy import load

        model, proc = load({"proxy": "llava", "proxy-next": "next", "proxy-mqt": "mqt"}[spec], dtype=dtype,
                           device=str(device))
        return model, proc, spec
    from .models import load_processor

    _, cls = host_class(spec)
    model = cls.from_pretrained(spec, dtype=dtype).to(device).eval()
    return model, load_processor(spec), spec


# ----------------------------------------------------------------------------------------------------- running
def build_prompt(processor, question: str, proxy: bool) -> str:
    """The prompt the harness sends for one image and ``question``: the proxy's own template, else the processor's
    chat template with one user turn (the image, then the question) ending with the assistant cue (Qwen2-VL,
    Qwen2.5-VL and LLaVA-OneVision use their ``<|im_start|>`` format; the llava-hf LLaVA processors give
    ``USER: <image>\n... ASSISTANT:``), else LLaVA-1.5's plain ``USER: <image>`` form. The lmms-eval plugin uses it
    too, so that both runners ask the same thing."""
    if proxy:
        from .proxy.model import prompt

        return prompt(question)
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


class _Prompter:
    def __init__(self, processor, bench: Benchmark, proxy: bool, suffix: str | None):
        self.processor, self.bench, self.proxy = processor, bench, proxy
        self.suffix = ("" if proxy else (POPE_SUFFIX if bench.kind == "pope" else "")) if suffix is None else suffix

    def text(self, item: Item) -> str:
        return build_prompt(self.processor, item.question + self.suffix, self.proxy)

    def inputs(self, items: Sequence[Item], device):
        return batch_inputs(self.processor, [it.image() for it in items], [self.text(it) for it in items], device)


def batch_inputs(processor, images: Sequence, texts: Sequence[str], device):
    """The processor's tensors for one batch, left-padded as generation needs (the tokenizer's side is restored):
    everything the processor returns (``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids``,
    ``batch_num_images``...) goes to the model as it is. The lmms-eval plugin batches through it too."""
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return processor(images=list(images), text=list(texts), return_tensors="pt", padding=True).to(device)
    finally:
        tok.padding_side = side


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 2 ms), in MiB."""

    def __enter__(self):
        self.peak, self._stop = 0, False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _loop(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._rss())


def _method(cfg: Config):
    from vlprune import get_method

    return get_method(cfg.method, **dict(cfg.kwargs))


def _generate(model, inputs, max_new_tokens: int, pad_id):
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    return out[:, inputs["input_ids"].shape[1]:]


def _answers(model, prompter, items, cfg, batch_size, max_new_tokens, device, bar=None) -> list[dict]:
    import torch

    import vlprune

    tok = prompter.processor.tokenizer
    recs = []
    if cfg.method is not None:
        vlprune.apply(model, _method(cfg))
    try:
        with torch.inference_mode():
            for i in range(0, len(items), batch_size):
                chunk = items[i:i + batch_size]
                new = _generate(model, prompter.inputs(chunk, device), max_new_tokens, tok.pad_token_id)
                for it, text in zip(chunk, tok.batch_decode(new, skip_special_tokens=True)):
                    recs.append(dict(config=cfg.key, index=it.index, prediction=text.strip()))
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if cfg.method is not None:
            vlprune.remove(model)
    return recs


def _measure(model, prompter, items, cfg, max_new_tokens, device) -> dict:
    """Batch-1 latency (median after one warm-up), cost and tokens per layer of ``cfg`` on ``items``.

    A method's cost is read from ``vlprune.stats`` in the timed pass, between the timed calls; the unpruned model is
    timed without hooks and its cost read in a second, untimed pass through a method that changes nothing."""
    import torch

    import vlprune
    from vlprune.testing import identity_method

    tok = prompter.processor.tokenizer
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pre, e2e, tfl_pre, tfl_gen, vis, eq, eq_off, kv = [], [], [], [], [], [], [], []

    def one_pass(timed: bool, read: bool) -> None:
        with torch.inference_mode():
            for j, it in enumerate(items):
                inputs = prompter.inputs([it], device)
                sync(); t0 = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                sync(); t1 = time.perf_counter()
                if read:
                    s = vlprune.stats(model)
                    tfl_pre.append(s["cost"].tflops)
                    vis.append(s["visual_per_layer"][0])
                    eq.append(s["equivalent_tokens"][0])
                    if s.get("equivalent_tokens_official"):
                        eq_off.append(s["equivalent_tokens_official"][0])
                t2 = time.perf_counter()
                _generate(model, inputs, max_new_tokens, tok.pad_token_id)
                sync(); t3 = time.perf_counter()
                if read:
                    cost = vlprune.stats(model)["cost"]
                    tfl_gen.append(cost.tflops)
                    if cost.kv_bytes is not None:
                        kv.append(cost.kv_bytes)
                if timed and (j > 0 or len(items) == 1):        # the first sample warms up
                    pre.append(t1 - t0)
                    e2e.append(t3 - t2)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if cfg.method is not None:
            vlprune.apply(model, _method(cfg))
        with _PeakRSS() as mem:
            one_pass(timed=True, read=cfg.method is not None)
        if cfg.method is None:
            vlprune.apply(model, identity_method())
            one_pass(timed=False, read=True)
    finally:
        if vlprune.is_applied(model):
            vlprune.remove(model)
    layers = [statistics.fmean(v[i] for v in vis) for i in range(len(vis[0]))] if vis else []
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else mem.peak / 2 ** 20
    return dict(config=cfg.key, prefill_s=statistics.median(pre), e2e_s=statistics.median(e2e),
                tflops_prefill=statistics.fmean(tfl_pre), tflops_generate=statistics.fmean(tfl_gen),
                visual_per_layer=layers, equivalent_tokens=statistics.fmean(eq),
                equivalent_tokens_official=statistics.fmean(eq_off) if eq_off else None,
                kv_cache_kib=statistics.fmean(kv) / 1024 if kv else None,
                peak_memory_mib=peak, peak_memory_kind="cuda allocated" if cuda else "process RSS",
                latency_samples=len(pre))


# ----------------------------------------------------------------------------------------------------- results
def _read_records(path: Path) -> list[dict]:
    out = []
    if path.exists():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass                          # a line cut by an interruption; it is computed again
    return out


def summarize(bench: Benchmark, grid: list[Config], records: list[dict], timing: dict) -> list[dict]:
    by = {}
    for r in records:
        by[(r["config"], r["index"])] = r["prediction"]
    items = sorted(bench.items, key=lambda it: it.index)
    base = {it.index: by[("unpruned", it.index)] for it in items}
    rows = []
    missing = [(cfg.key, it.index) for cfg in grid for it in items if (cfg.key, it.index) not in by]
    if missing:
        raise RuntimeError(f"{len(missing)} answers are missing from the records (first: {missing[0]}); run the same "
                           f"command again to complete them")
    correct = {}
    for cfg in grid:
        recs = []
        for it in items:
            p = by[(cfg.key, it.index)]
            recs.append(dict(index=it.index, family=it.family, category=it.category, answer=it.answer,
                             prediction=p, correct=bench.score(p, it), agree=bench.same(p, base[it.index])))
        n = len(recs)
        fam, cat = {}, {}
        for r in recs:
            fam.setdefault(r["family"], []).append(r["correct"])
            cat.setdefault(r["category"], []).append(r["correct"])
        pct = lambda xs: 100.0 * sum(xs) / len(xs)  # noqa: E731
        correct[cfg.key] = [bool(r["correct"]) for r in recs]
        right = sum(correct[cfg.key])
        row = dict(config=cfg.key, method=cfg.name, keep=cfg.keep, params=dict(cfg.kwargs), n=n,
                   accuracy=pct([r["correct"] for r in recs]), correct=right, accuracy_ci=list(wilson(right, n)),
                   families={k: pct(v) for k, v in sorted(fam.items())},
                   families_ci={k: list(wilson(sum(map(bool, v)), len(v))) for k, v in sorted(fam.items())},
                   categories={k: pct(v) for k, v in sorted(cat.items())},
                   agreement=pct([r["agree"] for r in recs]))
        row.update(_comparisons(cfg, correct))
        pope = bench.extra_metrics(recs)
        if pope:
            row["pope"] = pope
        row.update({k: v for k, v in timing.get(cfg.key, {}).items() if k != "config"})
        rows.append(row)
    return rows


def _comparisons(cfg: Config, correct: dict) -> dict:
    """``vs_unpruned`` and ``vs_random`` (random at the same budget; None for random itself, the unpruned row and
    budgets random did not run at): paired differences on the same samples (``evals.stats.paired_difference``)."""
    if cfg.method is None:
        return dict(vs_unpruned=None, vs_random=None)
    out = dict(vs_unpruned=dict(paired_difference(correct[cfg.key], correct["unpruned"]), reference="unpruned"))
    ref = f"random@{cfg.keep}"
    out["vs_random"] = (dict(paired_difference(correct[cfg.key], correct[ref]), reference=ref)
                        if ref != cfg.key and ref in correct else None)
    return out


def _proxy_geometry(bench: Benchmark) -> str | None:
    if bench.kind != "proxy":
        return None
    return "next" if bench.name == "proxy-next" else "llava"


def blind_row(bench: Benchmark, seed: int, n_train: int = BLIND_TRAIN) -> dict | None:
    """The blind (question-only) baseline of ``evals.proxy.scenes.blind_baseline`` on exactly the samples of a
    proxy benchmark loaded with ``seed``: each question answered with its commonest answer among ``n_train``
    training samples, no image. Returns ``method``, ``accuracy`` (= ``overall``, %), ``correct``, ``n``,
    ``accuracy_ci`` (95% Wilson), ``families``, ``families_ci``, ``family_counts``, ``chance`` (a uniform guess
    per family, %) and ``n_train``; None for a benchmark other than the proxy."""
    geometry = _proxy_geometry(bench)
    if geometry is None:
        return None
    from .proxy.scenes import blind_baseline as question_only, make_sample, split_seed

    items = sorted(bench.items, key=lambda it: it.index)
    samples = [make_sample(split_seed("test", seed * 1_000_000 + it.index), geometry=geometry) for it in items]
    for it, s in zip(items, samples):
        if (it.question, it.answer) != (s.question, s.answer):
            raise RuntimeError(f"sample {it.index} of the {bench.name} benchmark (seed {seed}) asks {it.question!r} "
                               f"(answer {it.answer!r}) but its seed gives {s.question!r} ({s.answer!r}); the blind "
                               f"baseline must be scored on the samples evaluated: evals.benchmarks and "
                               f"evals.run.blind_row must draw the same seeds")
    b = question_only(samples, n_train=n_train, geometry=geometry)
    hits, counts = b["correct"], b["counts"]
    k, n = sum(hits.values()), len(samples)
    return dict(method=BLIND_LABEL, accuracy=b["overall"], overall=b["overall"], correct=k, n=n,
                accuracy_ci=list(wilson(k, n)), families={f: b["families"][f] for f in sorted(b["families"])},
                families_ci={f: list(wilson(hits[f], counts[f])) for f in sorted(hits)},
                family_counts=dict(sorted(counts.items())), chance=dict(sorted(b["chance"].items())),
                n_train=b["n_train"])


def _fmt_equivalent(r: dict) -> str:
    """vlprune's equivalent tokens (tokens entering each decoder layer, averaged), and in parentheses the count
    the MustDrop / SparseVLM codes print where it differs (tokens leaving each layer, divided by views)."""
    if "equivalent_tokens" not in r:
        return "-"
    cell = f"{r['equivalent_tokens']:.1f}"
    off = r.get("equivalent_tokens_official")
    if off is not None and abs(off - r["equivalent_tokens"]) >= 0.05:
        cell += f" ({off:.1f})"
    return cell


def markdown(rows: list[dict], meta: dict, blind: dict | None = None) -> str:
    """The results table (accuracy with its interval, paired differences, the blind row, cost and time), the
    per-family table (with the blind and chance rows) when there are several families, and a note."""
    fams = sorted({f for r in rows for f in r["families"]}) if any(len(r["families"]) > 1 for r in rows) else []
    head = ["method", "keep", "accuracy [95% CI]", "vs unpruned [95% CI]", "vs random, same keep", "agree",
            "equiv. tokens", "TFLOPs prefill", "prefill ms", "e2e ms", "KV KiB", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    blind_acc = fmt_accuracy(blind["accuracy"], blind.get("accuracy_ci")) if blind else "n/a"
    lines.append("| " + " | ".join([BLIND_LABEL, "-", blind_acc] + ["-"] * (len(head) - 3)) + " |")
    for r in rows:
        cells = [r["method"], budget_label(r["keep"]), fmt_accuracy(r["accuracy"], r.get("accuracy_ci")),
                 fmt_difference(r.get("vs_unpruned")), fmt_versus(r.get("vs_random")),
                 f"{r['agreement']:.1f}",
                 _fmt_equivalent(r),
                 f"{r['tflops_prefill']:.4f}" if "tflops_prefill" in r else "-",
                 f"{1000 * r['prefill_s']:.1f}" if "prefill_s" in r else "-",
                 f"{1000 * r['e2e_s']:.1f}" if "e2e_s" in r else "-",
                 f"{r['kv_cache_kib']:.0f}" if r.get("kv_cache_kib") is not None else "-",
                 f"{r['peak_memory_mib']:.0f}" if "peak_memory_mib" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if fams:
        lines += ["", "| method | keep | " + " | ".join(fams) + " |", "|" + "---|" * (len(fams) + 2)]
        fam_cell = lambda r, f: (fmt_accuracy(r["families"][f], (r.get("families_ci") or {}).get(f))  # noqa: E731
                                 if f in r.get("families", {}) else "-")
        if blind:
            lines.append(f"| {BLIND_LABEL} | - | " + " | ".join(fam_cell(blind, f) for f in fams) + " |")
            lines.append("| chance (uniform guess) | - | " + " | ".join(
                f"{blind['chance'][f]:.1f}" if f in blind.get("chance", {}) else "-" for f in fams) + " |")
        else:
            lines.append(f"| {BLIND_LABEL} | - | " + " | ".join("n/a" for _ in fams) + " |")
        for r in rows:
            lines.append(f"| {r['method']} | {budget_label(r['keep'])} | " + " | ".join(fam_cell(r, f) for f in fams)
                         + " |")
        counts = (blind or {}).get("family_counts") or {}
        if counts:
            lines.append("\nsamples per family: " + ", ".join(f"{f} {counts[f]}" for f in fams if f in counts))
    label = "proxy figures: " if meta.get("proxy") else ""
    if blind:
        blind_note = (f"{BLIND_LABEL}: each question answered with its commonest answer in {blind['n_train']} "
                      f"training samples, without the image, on the same samples")
    else:
        blind_note = (f"{BLIND_LABEL}: n/a, only the proxy benchmark has a question-only baseline (its training "
                      f"split)")
    note = (f"\n{label}model `{meta['model']}`, benchmark `{meta['benchmark']}`, {meta['n']} samples, seed "
            f"{meta['seed']}; accuracy and agreement with the unpruned answers in %, accuracy with its 95% Wilson "
            f"interval; vs unpruned / vs random: the paired difference on the same samples in percentage points with "
            f"its 95% interval, and the exact McNemar test: 'no difference' unless p < {ALPHA} (such methods are "
            f"not ranked); {blind_note}; latency is the batch-1 median on {meta['device']} ({meta['processes']} "
            f"process(es)); KV KiB: the KV cache after generating, mean per sample (cost model, the cache's "
            f"dtype); equiv. tokens: visual tokens entering each decoder layer, averaged over layers, with the count the "
            f"MustDrop / SparseVLM codes print in parentheses where it differs.\n")
    if meta.get("grid_note"):
        note += f"\n{meta['grid_note']}\n"
    return "\n".join(lines) + "\n" + note


def plot(rows: list[dict], path: Path, title: str, blind: dict | None = None) -> bool:
    """Accuracy against prefill TFLOPs, one line per method, with 95% intervals where the rows have them and the
    blind (question-only) accuracy as a dashed line. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    base = next(r for r in rows if r["method"] == "unpruned")
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "unpruned"):
        pts = sorted(((r["tflops_prefill"], r["accuracy"], r.get("accuracy_ci")) for r in rows
                      if r["method"] == m and "tflops_prefill" in r), key=lambda p: p[:2])
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ci = [p for p in pts if p[2]]
            if ci:
                ax.errorbar([p[0] for p in ci], [p[1] for p in ci], fmt="none", ecolor=line.get_color(), alpha=0.5,
                            capsize=3, yerr=[[p[1] - p[2][0] for p in ci], [p[2][1] - p[1] for p in ci]])
    if "tflops_prefill" in base:
        ax.scatter([base["tflops_prefill"]], [base["accuracy"]], marker="*", s=220, color="black", zorder=5,
                   label="unpruned")
        if base.get("accuracy_ci"):
            lo, hi = base["accuracy_ci"]
            ax.errorbar([base["tflops_prefill"]], [base["accuracy"]], fmt="none", ecolor="black", capsize=3,
                        yerr=[[base["accuracy"] - lo], [hi - base["accuracy"]]])
    if blind and blind.get("accuracy") is not None:
        ax.axhline(blind["accuracy"], color="grey", linestyle="--", linewidth=1, label=BLIND_LABEL)
    ax.set_xlabel("TFLOPs per request (prefill, vlprune cost model)")
    ax.set_ylabel("accuracy (%), bars: 95% Wilson interval" if any(r.get("accuracy_ci") for r in rows)
                  else "accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------- main
def _state():
    import torch

    try:
        from accelerate import PartialState

        # on a machine without CUDA, processes started by `accelerate launch --multi_gpu` or torchrun join a
        # gloo group only when the state is told to run on the CPU
        return PartialState(cpu=not torch.cuda.is_available())
    except ImportError:
        return None


def _grid_note(args) -> str:
    """The table's footer line on the grid: the default quick grid says how to get the full one."""
    if getattr(args, "full", False):
        return f"Full grid (`--full`): {args.n} samples, {args.latency_samples} timed samples per configuration."
    return (f"Quick grid: {args.n} samples and {args.latency_samples} timed samples per configuration, so intervals "
            f"are wide. The full grid (methods {FULL_METHODS}, budgets {FULL_KEEP}, {FULL_N} samples, "
            f"{FULL_LATENCY} timed samples; about 1.5 min on this project's 2-core CPU, longer without native "
            f"bfloat16): `vlprune eval --full`.")


def run(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    import vlprune

    state = _state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    main_proc = rank == 0
    device = state.device if state else torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    proxy = args.model in PROXY_MODELS
    bench_spec = args.benchmark or ("proxy-next" if args.model == "proxy-next" else "proxy")
    methods = _csv(args.methods, "methods") if isinstance(args.methods, str) else list(args.methods)
    keeps = parse_keep(args.keep) if isinstance(args.keep, str) else list(args.keep)
    params = parse_params(args.param)
    check_prunable(args.model)          # a class vlprune has no adapter for: refused before any data is read
    bench = load_benchmark(bench_spec, args.n, args.seed, args.images, args.format)
    from vlprune.precision import auto_dtype

    dtype, why = auto_dtype(args.dtype, device)
    dtype_name = str(dtype).replace("torch.", "")
    if main_proc:
        print(f"vlprune eval: dtype {dtype_name} ({why})", file=sys.stderr)
    model, processor, label = load_model(args.model, dtype, device)
    prompter = _Prompter(processor, bench, proxy, args.prompt_suffix)
    first = prompter.inputs(bench.items[:1], device)
    n_visual = int((first["input_ids"][0] == model.config.image_token_id).sum())
    grid = build_grid(methods, keeps, n_visual, params, args.seed)
    above = [k for k in keeps if isinstance(k, int) and k > n_visual]
    if above and main_proc:
        print(f"vlprune eval: --keep {', '.join(map(str, above))} is above the {n_visual} visual tokens per image: "
              f"every method keeps all of them there, so the unpruned row stands for it", file=sys.stderr)
    max_new = args.max_new_tokens or (2 if proxy else 16)

    out = Path(args.out)
    rec_dir = out / "records"
    fingerprint = dict(model=args.model, benchmark=bench_spec, format=args.format, n=len(bench.items),
                       seed=args.seed, grid=[dataclasses.asdict(c) for c in grid], max_new_tokens=max_new,
                       prompt_suffix=prompter.suffix, dtype=dtype_name, batch_size=args.batch_size)
    fingerprint = json.loads(json.dumps(fingerprint))
    if main_proc:
        if args.overwrite and out.exists():
            import shutil

            shutil.rmtree(out)
        rec_dir.mkdir(parents=True, exist_ok=True)
        fp_path = out / "run.json"
        if fp_path.exists():
            old = json.loads(fp_path.read_text())
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise ValueError(f"{out} holds a run with other settings ({', '.join(diff)} differ); resume with the "
                                 f"same arguments, pass another --out, or --overwrite to start again")
        else:
            fp_path.write_text(json.dumps(fingerprint, indent=1))
    if state:
        state.wait_for_everyone()

    done = set()
    for f in sorted(rec_dir.glob("records.*.jsonl")):
        for r in _read_records(f):
            done.add((r["config"], r["index"]))
    timing = {}
    for r in _read_records(out / "timing.jsonl"):
        timing[r["config"]] = r
    shard = bench.items[rank::world]
    todo = {cfg.key: [it for it in shard if (cfg.key, it.index) not in done] for cfg in grid}
    total = sum(len(v) for v in todo.values())
    bar = None
    if not args.no_progress and main_proc:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total * world, desc="grid", unit="answer", file=sys.stderr, mininterval=2)
        except ImportError:
            pass
    t_start = time.time()
    rec_path = rec_dir / f"records.{rank}.jsonl"
    if rec_path.exists() and rec_path.stat().st_size:
        with open(rec_path, "rb") as f:                # a line cut by an interruption: end it before appending
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:
            with open(rec_path, "a") as f:
                f.write("\n")
    with open(rec_path, "a") as rec_file:
        for cfg in grid:
            if bar is not None:
                bar.set_postfix_str(cfg.key)
            if todo[cfg.key]:
                for r in _answers(model, prompter, todo[cfg.key], cfg, args.batch_size, max_new, device,
                                  bar if world == 1 else None):
                    rec_file.write(json.dumps(r) + "\n")
                rec_file.flush()
                if bar is not None and world > 1:
                    bar.update(len(todo[cfg.key]) * world)
            if main_proc and cfg.key not in timing and args.latency_samples > 0:
                if bar is not None:
                    bar.set_postfix_str(f"{cfg.key}: timing {args.latency_samples} samples at batch 1")
                t = _measure(model, prompter, shard[: args.latency_samples + 1], cfg, max_new, device)
                timing[cfg.key] = t
                with open(out / "timing.jsonl", "a") as f:
                    f.write(json.dumps(t) + "\n")
    if bar is not None:
        bar.close()
    if state:
        state.wait_for_everyone()
    if not main_proc:
        return {}
    records = []
    for f in sorted(rec_dir.glob("records.*.jsonl")):
        records.extend(_read_records(f))
    rows = summarize(bench, grid, records, timing)
    blind = blind_row(bench, args.seed)
    meta = dict(model=label, benchmark=bench_spec, proxy=proxy, n=len(bench.items), seed=args.seed,
                processes=world, device=str(device),
                command=getattr(args, "command", None) or "vlprune eval " + shlex.join(sys.argv[1:]),
                versions=dict(vlprune=vlprune.__version__, torch=torch.__version__,
                              transformers=transformers.__version__, python=platform.python_version()),
                max_new_tokens=max_new, prompt_suffix=prompter.suffix, visual_tokens_per_image=n_visual,
                dtype=dtype_name, dtype_reason=why, grid_note=_grid_note(args),
                seconds_this_session=round(time.time() - t_start, 1), statistics=STATISTICS,
                note=("proxy figures: a small LVLM trained here on a procedural benchmark, not a pretrained model"
                      if proxy else ""))
    result = dict(meta=meta, blind=blind, results=rows)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(rows, meta, blind))
    plot(rows, out / "accuracy_vs_tflops.png",
         f"{'proxy figures: ' if proxy else ''}{label} on {bench_spec}, n={len(bench.items)}", blind)
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:   # an argument refused (code 2) or --help (code 0): already printed
        return int(e.code or 0)
    try:
        args.command = "vlprune eval " + shlex.join(argv)   # the harness's own arguments, once
        result = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlprune eval: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a hub id that is not cached while the hub cannot be reached
        msg = " ".join(str(e).split())
        print(f"vlprune eval: error: --model {args.model!r} could not be loaded: {msg[:300]}; give a proxy name "
              f"({', '.join(PROXY_MODELS)}), a local model folder, or a hub id that is cached or reachable",
              file=sys.stderr)
        return 1
    if result:
        print((Path(args.out) / "results.md").read_text())
        print(f"wrote {Path(args.out) / 'results.json'}, results.md and accuracy_vs_tflops.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
