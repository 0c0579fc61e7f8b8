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


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """``(model, processor)`` for 'proxy', 'proxy-next', a local folder or a hub id of a transformers LLaVA /
    LLaVA-NeXT model (hub ids are read from the local cache when HF_HUB_OFFLINE=1)."""
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    if spec in PROXY_SPECS:
        from evals.proxy import load

        return load(PROXY_SPECS[spec], dtype=torch_dtype, device=device)
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    try:
        cfg = AutoConfig.from_pretrained(spec)
    except OSError as e:
        what = ("the folder has no readable config.json" if Path(spec).exists()
                else "not a local folder, and not found as a hub id in the local cache")
        raise ValueError(
            f"--model {spec!r}: {what} ({str(e).splitlines()[0]}). Use 'proxy', 'proxy-next', a folder saved with "
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
    def compare(self, image, question: str, methods, max_new_tokens: int | None = None, repeats: int = 1
                ) -> Comparison:
        """Run the unpruned model and then each ``(name, method_instance)`` on ``image`` and ``question``."""
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
            try:
                rows = [self._run(None, "unpruned", {}, inputs, start, layout, new_tokens, repeats)]
                for name, method in methods:
                    params = {f: getattr(method, f) for f in getattr(method, "__dataclass_fields__", {})
                              if f != "budget" and not f.startswith("_")}
                    try:
                        rows.append(self._run(method, name, params, inputs, start, layout, new_tokens, repeats))
                    except Exception as e:  # one method failing must not hide the others' results
                        rows.append(MethodResult(name=name, label=getattr(method, "label", name), params=params,
                                                 error=f"{type(e).__name__}: {e}", visual_tokens=layout.n))
            finally:
                if vlprune.is_applied(self.model):  # belt and braces: _run removes in its own finally
                    vlprune.remove(self.model)
            t_end, finished_at = time.perf_counter(), time.time()
        return Comparison(image=image, question=question, prompt=text, visual_tokens=layout.n, layout=layout,
                          rows=rows, waited_s=t_run - t_wait, ran_s=t_end - t_run, started_at=started_at,
                          finished_at=finished_at)

    def _run(self, method, name, params, inputs, start, layout, new_tokens, repeats) -> MethodResult:
        import vlprune
        from vlprune.cli import kept_tokens
        from vlprune.testing import identity_method

        from .overlay import token_depths

        model = self.model
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        T = inputs["input_ids"].shape[1]

        def prefill():
            model(**inputs, use_cache=True, logits_to_keep=1)

        def generate():
            return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad_id)

        def timed(fn):
            times, out = [], None
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                out = fn()
                sync()
                times.append(time.perf_counter() - t0)
            return statistics.median(times), out

        if method is None:
            # timed without any hooks (after one warm-up prefill); cost and schedule read through a method that
            # changes nothing
            prefill()
            t_pre, _ = timed(prefill)
            t_gen, out = timed(generate)
            vlprune.apply(model, identity_method())
            try:
                prefill()
                s_pre = vlprune.stats(model)
                generate()
                s_gen = vlprune.stats(model)
            finally:
                vlprune.remove(model)
            label = "unpruned"
        else:
            vlprune.apply(model, method)
            try:
                prefill()  # warm-up
                t_pre, _ = timed(prefill)
                s_pre = vlprune.stats(model)
                t_gen, out = timed(generate)
                s_gen = vlprune.stats(model)
            finally:
                vlprune.remove(model)
            label = method.label
        answer = self.processor.tokenizer.decode(out[0, T:], skip_special_tokens=True).strip()
        img = s_pre["images"][0] if s_pre["images"] else {}
        merged_into = img.get("merged_into")
        vpl = [int(v) for v in s_pre["visual_per_layer"][0]] if s_pre["visual_per_layer"] else []
        n = int(img.get("visual_tokens", layout.n))
        depth = token_depths(n, start, s_pre.get("visual_positions") or {}, len(vpl), merged_into)
        cost_pre, cost_gen = s_pre["cost"], s_gen["cost"]
        return MethodResult(
            name=name, label=label, params=params, answer=answer, visual_tokens=n,
            kept=n if method is None else kept_tokens(s_pre, method),
            kept_before_llm=int(img.get("kept", n)), merged=merged_into is not None,
            equivalent_tokens=float(s_pre["equivalent_tokens"][0]) if s_pre["equivalent_tokens"] else None,
            visual_per_layer=vpl,
            tflops_prefill=cost_pre.tflops if cost_pre else None,
            tflops_generate=cost_gen.tflops if cost_gen else None,
            scoring_gflops=cost_pre.scoring / 1e9 if cost_pre else None,
            kv_mib=cost_gen.kv_bytes / 2 ** 20 if cost_gen and cost_gen.kv_bytes else None,
            prefill_ms=1000 * t_pre, e2e_ms=1000 * t_gen,
            method_ms=None if method is None else 1000 * float(s_pre["method_seconds"]),
            depth=depth, merged_into=merged_into,
        )
