"""The ``vlprune`` lmms-eval model: a transformers LLaVA / LLaVA-NeXT model with a vlprune method attached.

``--model_args`` (comma-separated ``key=value``):

- ``pretrained``: ``proxy`` (the shipped proxy LVLM, the default), ``proxy-next``, ``proxy-mqt``, a local folder or a
  hub id of a ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` model (from the local cache,
  or ``owner/name`` downloaded unless ``HF_HUB_OFFLINE=1``); any other name is refused at once with the proxy names;
- ``method``: a registered vlprune method (``vlprune.list_methods()``) or ``none`` for the unpruned model;
- ``keep`` (tokens) or ``keep_ratio`` (share): the budget; every other key is a hyperparameter of the method
  (``k=2`` for FastV, ``alpha=0.5`` for HiRED, ...), checked by the method itself;
- ``dtype`` (``auto``, the default: bfloat16 where the device computes it natively, else float32 | ``float32`` |
  ``bfloat16`` | ``float16``), ``device`` (default: this process's GPU under accelerate, else
  ``cuda``, else ``cpu``), ``batch_size`` (left-padded batches; methods give the same answer per sample as at
  batch 1), ``max_new_tokens`` (default: 2 on the proxy models, 16 otherwise, as vlprune's harness; a task's
  ``generation_kwargs.max_new_tokens`` wins).

Prompts are built exactly as vlprune's own harness builds them (``evals.run.build_prompt``), so both runners score
the same answers. Greedy decoding unless a task asks for ``temperature > 0``. Under ``accelerate launch`` each process
evaluates its shard (lmms-eval splits the requests by rank). One image per question; ``loglikelihood`` tasks
(multiple choice by likelihood) are not supported and say so.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger

PROXY_MODELS = ("proxy", "proxy-next", "proxy-mqt")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# keys lmms-eval itself passes to every model, which are not method hyperparameters
_LMMS_EVAL_KEYS = ("max_batch_size",)


class VlpruneModel(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "proxy", method: str | None = None, keep: int | None = None,
                 keep_ratio: float | None = None, dtype: str = "auto", device: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | None = None, **kwargs) -> None:
        super().__init__()
        import vlprune
        from evals.run import load_model

        for k in _LMMS_EVAL_KEYS:
            kwargs.pop(k, None)
        if dtype not in DTYPES:
            raise ValueError(f"vlprune model: dtype={dtype!r} is not one of {', '.join(DTYPES)}; pass e.g. dtype=auto")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"vlprune model: batch_size={batch_size!r} must be a positive integer "
                             f"('auto' is not supported)") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"vlprune model: batch_size={batch_size!r} must be a positive integer")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"vlprune model: max_new_tokens={max_new_tokens!r} must be a positive integer")

        from evals.models import check_model_name

        # a mistyped name fails here at once, not after a minute of hub retries inside from_pretrained
        check_model_name(str(pretrained), "vlprune model: pretrained=")
        from accelerate import PartialState

        # on a machine without CUDA, processes of `accelerate launch --multi_gpu` join a gloo group only when the
        # state is told to run on the CPU (lmms-eval shards the requests by RANK / WORLD_SIZE itself)
        state = PartialState(cpu=not torch.cuda.is_available())
        self._rank, self._world_size = state.process_index, state.num_processes
        if device is None:
            if torch.cuda.is_available():
                device = f"cuda:{state.local_process_index}" if state.num_processes > 1 else "cuda"
            else:
                device = "cpu"
        self._device = torch.device(device)

        if isinstance(method, str) and method.strip().lower() in ("", "none", "unpruned"):
            method = None
        self.method = None
        if method is not None:
            budget = {k: v for k, v in (("keep", keep), ("keep_ratio", keep_ratio)) if v is not None}
            self.method = vlprune.get_method(str(method), **budget, **kwargs)   # checks names and values
        elif keep is not None or keep_ratio is not None or kwargs:
            given = sorted([k for k, v in (("keep", keep), ("keep_ratio", keep_ratio)) if v is not None] + list(kwargs))
            raise ValueError(f"vlprune model: {given} given without method=...; name a method "
                             f"({', '.join(vlprune.list_methods())}) or drop them")

        self.pretrained = str(pretrained)
        self.proxy = self.pretrained in PROXY_MODELS
        from vlprune.precision import auto_dtype

        torch_dtype, why = auto_dtype(dtype, self._device)
        logger.info(f"vlprune model: dtype {str(torch_dtype).replace('torch.', '')} ({why})")
        self._model, self.processor, _ = load_model(self.pretrained, torch_dtype, self._device)
        self._model.eval()
        self.tokenizer = self.processor.tokenizer
        self.max_new_tokens = max_new_tokens or (2 if self.proxy else 16)
        if self.method is not None:
            vlprune.apply(self._model, self.method)       # the model's own generate runs with the method attached
        self._costs: list[float] = []
        self._visual: list[float] = []
        label = self.method.label if self.method is not None else "unpruned"
        logger.info(f"vlprune: {self.pretrained} with {label} on {self._device} "
                    f"(rank {self._rank} of {self._world_size})")

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def summary(self) -> dict:
        """Mean prefill TFLOPs and mean visual tokens per decoder layer of the samples this process answered."""
        return {"samples": len(self._costs),
                "tflops_prefill": statistics.fmean(self._costs) if self._costs else None,
                "equivalent_tokens": statistics.fmean(self._visual) if self._visual else None}

    # ------------------------------------------------------------------------------------------------ requests
    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError("the vlprune model answers generation tasks (output_type: generate_until); this task "
                                  "asks for loglikelihood, which it does not compute")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the vlprune model answers single-turn generation tasks; multi-round generation is "
                                  "not supported")

    def _prompt(self, question: str) -> str:
        from evals.run import build_prompt

        return build_prompt(self.processor, question, self.proxy)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        import vlprune
        from evals.run import batch_inputs

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        for idxs in groups.values():
            gen = dict(requests[idxs[0]].args[1])
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen.pop("max_new_tokens", None) or self.max_new_tokens)
            temperature = float(gen.pop("temperature", 0) or 0)
            sample = dict(do_sample=True, temperature=temperature, top_p=gen.pop("top_p", None) or 1.0) \
                if temperature > 0 else dict(do_sample=False)
            for s in range(0, len(idxs), self.batch_size_per_gpu):
                chunk = idxs[s:s + self.batch_size_per_gpu]
                images, texts = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                    visuals = [v for v in (visuals or []) if v is not None]
                    if len(visuals) != 1:
                        raise ValueError(f"vlprune model: task {task!r} document {doc_id} gives {len(visuals)} "
                                         f"visuals; it evaluates exactly one image per question")
                    images.append(visuals[0].convert("RGB"))
                    texts.append(self._prompt(context))
                inputs = batch_inputs(self.processor, images, texts, self._device)
                if "pixel_values" in inputs and self._model.dtype != torch.float32:
                    inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
                with torch.inference_mode():
                    seq = self._model.generate(**inputs, max_new_tokens=max_new,
                                               pad_token_id=self.tokenizer.pad_token_id, **sample)
                if vlprune.is_applied(self._model):
                    st = vlprune.stats(self._model)
                    self._costs.extend([st["cost"].tflops / len(chunk)] * len(chunk))
                    self._visual.extend(st["equivalent_tokens"])
                for i, text in zip(chunk, self.tokenizer.batch_decode(seq[:, inputs["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)):
                    for u in until:
                        if u and u in text:
                            text = text.split(u)[0]
                    out[i] = text.strip()
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), out[i])
        if self._costs:
            s = self.summary
            logger.info(f"vlprune: {s['samples']} samples, mean prefill {s['tflops_prefill']:.4f} TFLOPs, "
                        f"{s['equivalent_tokens']:.1f} visual tokens per decoder layer")
        return out
