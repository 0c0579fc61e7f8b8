"""Run the LLaVA codebase's VQA evaluation (``llava.eval.model_vqa_loader``) with a vlprune method attached.

Two modes, both driven by the codebase's own command-line arguments (``--model-path``, ``--question-file``,
``--image-folder``, ``--answers-file``, ``--conv-mode``, ``--temperature``, ...), both writing the codebase's answers
file, so its scoring scripts (``llava/eval/eval_pope.py``, ``eval_textvqa.py``, ``convert_*`` ...) read the output
unchanged:

``--entry llava.eval.model_vqa_loader`` (or another entry module of the codebase: ``llava.eval.model_vqa``,
``llava.eval.model_vqa_science``, ...)
    runs that module's own ``__main__`` with ``sys.argv`` set to the codebase arguments. The only thing changed is
    ``llava.model.builder.load_pretrained_model``, wrapped for the run so that the model it returns gets
    ``vlprune.apply(model, method, **method_args)``. The codebase's entries move inputs to ``cuda`` in float16, so
    this mode needs a GPU.

no ``--entry`` (the default)
    the same loop as ``model_vqa_loader`` (same prompt: ``conv_templates[conv_mode]`` with ``<image>\\n`` before the
    question; ``process_images``; ``tokenizer_image_token``; greedy unless ``--temperature > 0``; the same answers
    line), on ``--device`` (``cpu`` included) in ``--dtype``, so it also runs where there is no GPU. ``--stats FILE``
    writes vlprune's per-question kept tokens and FLOPs as JSONL.

    python integrations/llava/vlprune_vqa_loader.py --method hired --method-args keep_ratio=0.2 \\
        --model-path liuhaotian/llava-v1.5-7b --question-file q.jsonl --image-folder images \\
        --answers-file answers/hired.jsonl --conv-mode vicuna_v1 --temperature 0

``--method none`` runs the unpruned model (the paired baseline).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import runpy
import sys


def parse_method_args(text: str | None) -> dict:
    """``"keep_ratio=0.2,alpha=0.5"`` -> ``{"keep_ratio": 0.2, "alpha": 0.5}`` (Python literals; bare words stay strings)."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in part:
            raise SystemExit(f"--method-args: {part!r} is not key=value; example: --method-args keep_ratio=0.2,alpha=0.5")
        key, value = (s.strip() for s in part.split("=", 1))
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def vlprune_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--method", required=True, help="a vlprune method name (vlprune methods) or 'none'")
    p.add_argument("--method-args", default="", help="hyperparameters as key=value,key=value")
    p.add_argument("--entry", default=None, help="run this codebase module's own __main__ (needs CUDA)")
    p.add_argument("--device", default="cuda", help="device of the built-in loop (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--stats", default=None, help="JSONL of vlprune stats per question (built-in loop)")
    p.add_argument("-h", "--help", action="store_true")
    return p.parse_known_args(argv)


def codebase_args(argv):
    """The arguments of ``llava.eval.model_vqa_loader``, with its defaults."""
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", type=str, default="facebook/opt-350m")
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--image-folder", type=str, default="")
    p.add_argument("--question-file", type=str, default="tables/question.jsonl")
    p.add_argument("--answers-file", type=str, default="answer.jsonl")
    p.add_argument("--conv-mode", type=str, default="llava_v1")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=128)
    return p.parse_args(argv)


def attach(model, method: str, method_args: dict):
    import vlprune

    if method != "none":
        vlprune.apply(model, method, **method_args)
    return model


def run_entry(entry: str, method: str, method_args: dict, argv: list[str]) -> None:
    """The codebase's own entry, with its model loader wrapped so the loaded model carries the method."""
    import llava.model.builder as builder

    original = builder.load_pretrained_model

    def load_pretrained_model(*args, **kwargs):
        tokenizer, model, image_processor, context_len = original(*args, **kwargs)
        return tokenizer, attach(model, method, method_args), image_processor, context_len

    builder.load_pretrained_model = load_pretrained_model
    argv0 = sys.argv
    sys.argv = [entry] + list(argv)
    try:
        runpy.run_module(entry, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv0
        builder.load_pretrained_model = original


def run_loop(args, method: str, method_args: dict, device: str, dtype: str, stats_file: str | None) -> list[dict]:
    """model_vqa_loader's loop on any device; returns the answers it wrote."""
    import shortuuid
    import torch
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from PIL import Image

    import vlprune

    torch_dtype = getattr(torch, dtype)
    model_path = os.path.expanduser(args.model_path)
    model_name = get_model_name_from_path(model_path)
    dev = torch.device(device)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, args.model_base, model_name, device_map={"": str(dev)} if dev.type != "cpu" else "cpu",
        device=str(dev))
    model.to(device=dev, dtype=torch_dtype)
    attach(model, method, method_args)
    if args.conv_mode not in conv_templates:
        raise SystemExit(f"--conv-mode {args.conv_mode!r} is not a template of the codebase; "
                         f"choose one of: {', '.join(sorted(conv_templates))}")
    conv_mode = args.conv_mode
    if "plain" in model_name and "finetune" not in model_name.lower() and "mmtag" not in conv_mode:
        conv_mode = conv_mode + "_mmtag"  # as the codebase does for plain (pretrain-only) models
    with open(os.path.expanduser(args.question_file)) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    size = math.ceil(len(questions) / args.num_chunks)
    questions = questions[args.chunk_idx * size:(args.chunk_idx + 1) * size]
    answers_file = os.path.expanduser(args.answers_file)
    os.makedirs(os.path.dirname(answers_file) or ".", exist_ok=True)
    written = []
    with open(answers_file, "w") as out, open(stats_file, "w") if stats_file else open(os.devnull, "w") as sf:
        for line in questions:
            qs = line["text"]
            if model.config.mm_use_im_start_end:
                qs = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n" + qs
            else:
                qs = DEFAULT_IMAGE_TOKEN + "\n" + qs
            conv = conv_templates[conv_mode].copy()
            conv.append_message(conv.roles[0], qs)
            conv.append_message(conv.roles[1], None)
            image = Image.open(os.path.join(args.image_folder, line["image"])).convert("RGB")
            images = process_images([image], image_processor, model.config)
            images = [x.to(dev, torch_dtype) for x in images] if isinstance(images, list) else images.to(dev, torch_dtype)
            ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
            with torch.inference_mode():
                output_ids = model.generate(
                    ids.to(dev), images=images, image_sizes=[image.size],
                    do_sample=args.temperature > 0, temperature=args.temperature if args.temperature > 0 else None,
                    top_p=args.top_p, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, use_cache=True)
            text = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
            row = {"question_id": line["question_id"], "prompt": line["text"], "text": text,
                   "answer_id": shortuuid.uuid(), "model_id": model_name, "metadata": {}}
            out.write(json.dumps(row) + "\n")
            written.append(row)
            if stats_file and method != "none":
                st = vlprune.stats(model)
                sf.write(json.dumps({"question_id": line["question_id"], "method": st["method"],
                                     "visual_tokens": [i["visual_tokens"] for i in st["images"]],
                                     "kept": [i["kept"] for i in st["images"]],
                                     "flops": st["cost"].total if st["cost"] else None}) + "\n")
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = vlprune_args(argv)
    if ours.help:
        print(__doc__)
        return 0
    method_args = parse_method_args(ours.method_args)
    if ours.method != "none":
        import vlprune

        vlprune.get_method(ours.method, **method_args)  # a bad name or hyperparameter fails before any loading
    if ours.entry:
        run_entry(ours.entry, ours.method, method_args, rest)
    else:
        run_loop(codebase_args(rest), ours.method, method_args, ours.device, ours.dtype, ours.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
