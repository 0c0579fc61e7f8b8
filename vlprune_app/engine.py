"""The shared model and one comparison request: the unpruned model and each method on one image and question.

One model is loaded once and shared by every request. Methods are attached to it with hooks, so two requests must
never overlap: ``Session.compare`` holds a process-wide ``threading.Lock`` around apply -> prefill -> generate ->
remove of every method, with ``vlprune.remove`` in ``finally`` (no leaked patch, even when a method fails), and
grad mode is set inside the worker thread (it is thread-local). Gradio's queue (concurrency_id "model", limit 1)
lines users up in front of the lock; the lock is the guarantee.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROXY_SPECS = {"proxy": "llava", "proxy-next": "next", "proxy-mqt": "mqt"}
DEFAULT_REPEATS = 3  # timed runs per method, interleaved across the methods of a request


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """``(model, processor)`` for 'proxy', 'proxy-next', 'proxy-mqt', a local folder or a hub id of a transformers
    LLaVA / LLaVA-NeXT model (hub ids are read from the local cache when HF_HUB_OFFLINE=1)."""
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    if spec in PROXY_SPECS:
        from evals.proxy import load

        return load(PROXY_SPECS[spec], dtype=torch_dtype, device=device)
    from evals.models import check_model_name

    check_model_name(spec, "--model ")  # at once, without a round of hub retries, for a mistyped proxy name
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    try:
        cfg = AutoConfig.from_pretrained(spec)
    except OSError as e:
        what = ("the folder has no readable config.json" if Path(spec).exists()
                else "not a local folder, and not found as a hub id in the local cache")
        names = ", ".join(repr(k) for k in PROXY_SPECS)
        raise ValueError(
            f"--model {spec!r}: {what} ({str(e).splitlines()[0]}). Use a proxy model ({names}), a folder saved with "
            f"save_pretrained, or a hub id (set HF_HUB_OFFLINE=0 to let transformers download it)"
        ) from None
    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    if cfg.model_type not in classes:
        raise ValueError(f"--model {spec!r} is a {cfg.model_type!r} model; the demo runs transformers LLaVA ('llava') "
                         f"and LLaVA-NeXT ('llava_next') models")
    model = classes[cfg.model_type].from_pretrained(spec, dtype=torch_dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(spec)


@dataclass
class MethodResult:
    """One column of a comparison: what the model answered and what it cost with one method (or none)."""

    name: str  # "unpruned" or the registered name
    label: str  # the method's label with its hyperparameters
    params: dict
    answer: str = ""
    error: str | None = None
    visual_tokens: int = 0
    kept: int = 0
    kept_before_llm: int = 0
    merged: bool = False
    equivalent_tokens: float | None = None
    visual_per_layer: list = field(default_factory=list)
    tflops_prefill: float | None = None
    tflops_generate: float | None = None
    scoring_gflops: float | None = None
    kv_mib: float | None = None
    prefill_ms: float | None = None
    e2e_ms: float | None = None
    method_ms: float | None = None
    prefill_runs_ms: list = field(default_factory=list)  # every timed run, in the order they ran
    e2e_runs_ms: list = field(default_factory=list)
    timing_note: str | None = None  # set when the medians contradict each other (prefill slower than end-to-end)
    budget: int | None = None  # visual tokens the request's budget allows this method (None: unpruned / no budget)
    newlines_kept: int = 0  # AnyRes row-end ("newline") tokens among the kept tokens
    notes: list = field(default_factory=list)  # the method's own notes from vlprune.stats
    placed: bool = True  # False when the visual tokens have no place on the image (learned queries: MQT)
    depth: object = None  # (N,) numpy: share of decoder layers each visual token entered (drawing only)
    merged_into: object = None  # (N,) merge representative per token, or None (drawing only)

    def as_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("depth", "merged_into")}
        return out


@dataclass
class Comparison:
    image: object  # PIL image (RGB) as given to the processor
    question: str
    prompt: str
    visual_tokens: int
    layout: object
    rows: list[MethodResult]
    waited_s: float
    ran_s: float
    started_at: float = 0.0  # epoch seconds when this request got the model lock
    finished_at: float = 0.0  # epoch seconds when it gave the lock back
    repeats: int = 1
    timing_order: list = field(default_factory=list)  # (round, row name) of every timed run, in the order they ran


class Session:
    """The loaded model, its processor and the lock that every request takes."""

    def __init__(self, model, processor, spec: str = "proxy", max_new_tokens: int | None = None):
        import vlprune  # noqa: F401  (registers the built-in methods)
        from vlprune.adapters import find_adapter

        self.model, self.processor, self.spec = model, processor, spec
        self.proxy = spec in PROXY_SPECS
        self.adapter = find_adapter(model)
        self.n_layers = self.adapter.info.n_layers
        self.anyres = bool(self.adapter.anyres)
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.default_new_tokens = max_new_tokens or (4 if self.proxy else 32)
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.image_token_id = model.config.image_token_id

    # -- prompts
    def prompt(self, question: str) -> str:
        if self.proxy:
            from evals.proxy.model import prompt

            return prompt(question)
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True)
        return f"USER: <image>\n{question} ASSISTANT:"

    def inputs(self, image, question: str):
        text = self.prompt(question)
        return text, self.processor(images=[image], text=[text], return_tensors="pt").to(self.device)

    @property
    def description(self) -> str:
        kind = "LLaVA-NeXT (AnyRes)" if self.anyres else "LLaVA-1.5"
        name = {"proxy": "the shipped proxy LVLM", "proxy-next": "the shipped proxy LVLM (AnyRes)",
                "proxy-mqt": "the shipped proxy LVLM with an MQT projector"}.get(self.spec, self.spec)
        return f"{name}: transformers {type(self.model).__name__}, {kind} geometry, {self.n_layers} decoder layers, {self.device}"

    def warm_up(self) -> None:
        """One unpruned generate, so that the first user's timings do not include lazy initialisation."""
        from PIL import Image

        img = Image.new("RGB", (336, 336), (128, 128, 128))
        with self.lock, torch.inference_mode():
            _, inputs = self.inputs(img, "what is in the image ?")
            self.model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=self.pad_id)

    # -- one request
    def compare(self, image, question: str, methods, max_new_tokens: int | None = None,
                repeats: int = DEFAULT_REPEATS, queued_s: float = 0.0) -> Comparison:
        """Run the unpruned model and then each ``(name, method_instance)`` on ``image`` and ``question``.

        First one pass per method (answer, kept tokens, schedule, cost; it also warms the method up), then
        ``repeats`` timing rounds: each round times every method once, prefill then end-to-end generate, starting
        one method later than the round before, so that a slow moment of a shared machine is spread over all
        methods instead of landing on one. Times are medians over the rounds. ``queued_s``: time the request
        already waited before it got here (in Gradio's queue); the wait for the lock is added to it."""
        import vlprune

        image = image.convert("RGB")
        new_tokens = int(max_new_tokens or self.default_new_tokens)
        repeats = max(1, int(repeats))
        text, inputs = self.inputs(image, question)
        ids = inputs["input_ids"][0]
        img_pos = (ids == self.image_token_id).nonzero()
        if img_pos.numel() == 0:
            raise ValueError(f"the prompt has no image token (id {self.image_token_id}); prompt: {text[:200]!r}")
        start = int(img_pos[0, 0])
        layout = self.adapter.layouts(1, inputs.get("image_sizes"))[0]
        t_wait = time.perf_counter()
        with self.lock, torch.inference_mode():
            t_run, started_at = time.perf_counter(), time.time()
            order: list = []
            try:
                runs = [(None, "unpruned", {})]
                for name, method in methods:
                    params = {f: getattr(method, f) for f in getattr(method, "__dataclass_fields__", {})
                              if f != "budget" and not f.startswith("_")}
                    runs.append((method, name, params))
                rows = []
                for method, name, params in runs:
                    try:
                        rows.append(self._run(method, name, params, inputs, start, layout, new_tokens))
                    except Exception as e:  # one method failing must not hide the others' results
                        rows.append(MethodResult(name=name, label=getattr(method, "label", name), params=params,
                                                 error=f"{type(e).__name__}: {e}", visual_tokens=layout.n))
                ok = [i for i, r in enumerate(rows) if r.error is None]
                for rnd in range(repeats):
                    for j in range(len(ok)):
                        i = ok[(j + rnd) % len(ok)]
                        method, row = runs[i][0], rows[i]
                        try:
                            t_pre, t_gen = self._time(method, inputs, new_tokens)
                        except Exception as e:
                            row.error = f"{type(e).__name__} while timing: {e}"
                            continue
                        row.prefill_runs_ms.append(1000 * t_pre)
                        row.e2e_runs_ms.append(1000 * t_gen)
                        order.append((rnd, row.name))
                for r in rows:
                    if r.prefill_runs_ms:
                        r.prefill_ms = statistics.median(r.prefill_runs_ms)
                        r.e2e_ms = statistics.median(r.e2e_runs_ms)
                        if r.prefill_ms > r.e2e_ms:
                            r.timing_note = (f"prefill ({r.prefill_ms:.0f} ms) timed slower than end-to-end "
                                             f"({r.e2e_ms:.0f} ms), which includes a prefill: the machine was busy; "
                                             f"run again or time more rounds")
            finally:
                if vlprune.is_applied(self.model):  # belt and braces: _run and _time remove in their own finally
                    vlprune.remove(self.model)
            t_end, finished_at = time.perf_counter(), time.time()
        return Comparison(image=image, question=question, prompt=text, visual_tokens=layout.n, layout=layout,
                          rows=rows, waited_s=queued_s + (t_run - t_wait), ran_s=t_end - t_run,
                          started_at=started_at, finished_at=finished_at, repeats=repeats, timing_order=order)

    def _prefill(self, inputs):
        self.model(**inputs, use_cache=True, logits_to_keep=1)

    def _generate(self, inputs, new_tokens):
        return self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad_id)

    def _time(self, method, inputs, new_tokens) -> tuple[float, float]:
        """One timed prefill and one timed end-to-end generate (seconds); the unpruned model runs without hooks.

        An untimed prefill comes first: the method before this one in the round ran with other tensor sizes, and
        the first call at this method's sizes pays for fresh memory (on the CPU the unpruned model's prefill then
        timed slower than its whole generate)."""
        import vlprune

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        if method is not None:
            vlprune.apply(self.model, method)
        try:
            self._prefill(inputs)
            sync()
            t0 = time.perf_counter()
            self._prefill(inputs)
            sync()
            t1 = time.perf_counter()
            self._generate(inputs, new_tokens)
            sync()
            t2 = time.perf_counter()
        finally:
            if method is not None:
                vlprune.remove(self.model)
        return t1 - t0, t2 - t1

    def _run(self, method, name, params, inputs, start, layout, new_tokens) -> MethodResult:
        """The untimed pass of one method: answer, kept tokens, schedule and cost (read through a method that
        changes nothing for the unpruned model)."""
        import vlprune
        from vlprune.cli import kept_tokens
        from vlprune.testing import identity_method

        from .overlay import TOKEN_NEWLINE, TOKEN_PATCH, token_depths

        model = self.model
        T = inputs["input_ids"].shape[1]
        vlprune.apply(model, identity_method() if method is None else method)
        try:
            self._prefill(inputs)
            s_pre = vlprune.stats(model)
            out = self._generate(inputs, new_tokens)
            s_gen = vlprune.stats(model)
        finally:
            vlprune.remove(model)
        label = "unpruned" if method is None else method.label
        answer = self.processor.tokenizer.decode(out[0, T:], skip_special_tokens=True).strip()
        img = s_pre["images"][0] if s_pre["images"] else {}
        merged_into = img.get("merged_into")
        vpl = [int(v) for v in s_pre["visual_per_layer"][0]] if s_pre["visual_per_layer"] else []
        n = int(img.get("visual_tokens", layout.n))
        depth = token_depths(n, start, s_pre.get("visual_positions") or {}, len(vpl), merged_into)
        cost_pre, cost_gen = s_pre["cost"], s_gen["cost"]
        kind = layout.kind.cpu().numpy()
        placed = bool(((kind == TOKEN_PATCH) & (layout.vit_index.cpu().numpy() >= 1)).any())
        kept = n if method is None else kept_tokens(s_pre, method)
        budget = None
        b = getattr(method, "budget", None)
        if method is not None and b is not None and hasattr(b, "resolve"):
            try:
                budget = int(b.resolve(n))
            except Exception:  # a budget the method interprets its own way
                budget = None
        return MethodResult(
            name=name, label=label, params=params, answer=answer, visual_tokens=n, kept=kept,
            kept_before_llm=int(img.get("kept", n)), merged=merged_into is not None,
            equivalent_tokens=float(s_pre["equivalent_tokens"][0]) if s_pre["equivalent_tokens"] else None,
            visual_per_layer=vpl,
            tflops_prefill=cost_pre.tflops if cost_pre else None,
            tflops_generate=cost_gen.tflops if cost_gen else None,
            scoring_gflops=cost_pre.scoring / 1e9 if cost_pre else None,
            kv_mib=cost_gen.kv_bytes / 2 ** 20 if cost_gen and cost_gen.kv_bytes else None,
            method_ms=None if method is None else 1000 * float(s_pre["method_seconds"]),
            budget=budget, newlines_kept=_newlines_kept(s_pre, kind, start, n, method, TOKEN_NEWLINE),
            notes=[str(x) for x in (s_pre.get("notes") or [])], placed=placed,
            depth=depth, merged_into=merged_into,
        )


def _newlines_kept(stats: dict, kind, start: int, n: int, method, newline: int) -> int:
    """How many of the kept visual tokens are AnyRes row-end ("newline") tokens: among those reaching the last
    decoder layer for methods that prune inside the decoder, else among those the PRE_LLM stage kept."""
    import numpy as np

    if method is None or not (kind == newline).any():
        return 0
    from vlprune.methods.base import Stage

    idx = None
    vp = stats.get("visual_positions") or {}
    if Stage.LLM_LAYER in getattr(method, "stages", ()) and vp:
        pos = vp[max(int(k) for k in vp)]
        pos = pos[0] if isinstance(pos, (list, tuple)) else pos
        idx = np.asarray(pos.tolist() if hasattr(pos, "tolist") else pos, dtype=np.int64) - start
    elif stats.get("images") and stats["images"][0].get("kept_indices") is not None:
        ki = stats["images"][0]["kept_indices"]
        idx = np.asarray(ki.tolist() if hasattr(ki, "tolist") else ki, dtype=np.int64)
    if idx is None:
        return 0
    idx = idx[(idx >= 0) & (idx < n)]
    return int((kind[idx] == newline).sum())
