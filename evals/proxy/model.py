"""The proxy LVLM's tokenizer, processor and model configurations (transformers' own LLaVA classes).

The tokenizer is word-level (the benchmark's closed vocabulary, lower-cased, punctuation split off), built offline
with the ``tokenizers`` library and saved with a LLaVA-1.5 style chat template:
``USER: <image>\\n{question} ASSISTANT: {answer}</s>``.

Architecture (both geometries share every trained weight; NeXT adds ``image_newline``):

- vision: ``CLIPVisionModel`` with a CLS token, 336 px, patch 14 (576 patches), hidden 192, 6 layers, 6 heads,
  MLP 768; LLaVA takes features from layer -2 without the CLS token ("default").
- projector: LLaVA's two-layer GELU MLP, 192 -> 128 -> 128.
- decoder: ``LlamaForCausalLM`` body, hidden 128, 16 layers, 4 query heads and 2 KV heads (GQA), SwiGLU MLP 384.
  Deep and narrow: steps stay cheap, and every in-LLM method's pruning layers, scaled from the papers' 32-layer
  schedules, land on distinct layers (TransPrune [4, 5, 6], MustDrop [2, 4, 6, 8]); 8 layers fold them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .scenes import vocabulary

__all__ = [
    "CHAT_TEMPLATE", "SPECIAL", "PINPOINTS", "CLIP_MEAN", "CLIP_STD", "VISION", "TEXT",
    "build_tokenizer", "build_processor", "build_config", "build_model", "next_from_llava", "prompt",
    "vision_body",
]

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
PINPOINTS = [[336, 672], [672, 336], [672, 672]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
              image_size=336, patch_size=14)
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=16, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)


def prompt(question: str, image: bool = True) -> str:
    """The single-turn prompt the model answers: ``USER: <image>\\n{question} ASSISTANT:``."""
    return f"USER: {'<image>' + chr(10) if image else ''}{question} ASSISTANT:"


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` over the benchmark's vocabulary; ``<s>`` is prepended."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=8192, padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(geometry: str = "llava", tokenizer=None):
    """``LlavaProcessor`` (336 px, 576 image tokens) or ``LlavaNextProcessor`` (AnyRes over ``PINPOINTS``)."""
    from transformers import LlavaNextProcessor, LlavaProcessor

    try:  # the PIL backends, named explicitly: the same pixels with or without torchvision installed
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        from transformers import LlavaNextImageProcessorPil as LlavaNextImageProcessor
    except ImportError:  # older transformers: one backend only
        from transformers import CLIPImageProcessor, LlavaNextImageProcessor
    tok = tokenizer or build_tokenizer()
    common = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                  image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
    kw = dict(tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
              num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    if geometry == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessor(**common), **kw)
    if geometry == "next":
        ip = LlavaNextImageProcessor(image_grid_pinpoints=PINPOINTS, do_pad=True, **common)
        return LlavaNextProcessor(image_processor=ip, **kw)
    raise ValueError(f"geometry {geometry!r} is not 'llava' or 'next'")


def build_config(geometry: str = "llava", vocab_size: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    tok_ids = {t: i for i, t in enumerate(SPECIAL)}
    vocab_size = vocab_size or len(SPECIAL) + len(vocabulary())
    text = LlamaConfig(vocab_size=vocab_size, bos_token_id=tok_ids["<s>"], eos_token_id=tok_ids["</s>"],
                       pad_token_id=tok_ids["<pad>"], **TEXT)
    common = dict(vision_config=CLIPVisionConfig(**VISION), text_config=text, image_token_id=tok_ids["<image>"],
                  vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    if geometry == "llava":
        return LlavaConfig(**common)
    if geometry == "next":
        return LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common)
    raise ValueError(f"geometry {geometry!r} is not 'llava' or 'next'")


def build_model(geometry: str = "llava", seed: int = 0):
    """A freshly initialised proxy model (float32, SDPA) from a private RNG stream seeded by ``seed``."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaForConditionalGeneration if geometry == "llava" else LlavaNextForConditionalGeneration
    cfg = build_config(geometry)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.set_attn_implementation("sdpa")
    return model


def vision_body(tower):
    """The ``CLIPVisionTransformer`` inside a LLaVA ``vision_tower`` (a ``CLIPVisionModel`` wraps it as
    ``vision_model``; a bare transformer is returned as it is)."""
    return getattr(tower, "vision_model", tower)


def next_from_llava(llava_model, seed: int = 0):
    """A LLaVA-NeXT proxy that starts from a trained LLaVA-1.5 proxy: every tower weight copied, ``image_newline``
    drawn fresh."""
    model = build_model("next", seed=seed)
    missing, unexpected = model.load_state_dict(llava_model.state_dict(), strict=False)
    if unexpected or [m for m in missing if "image_newline" not in m]:
        raise RuntimeError(f"weights do not carry over: missing {missing}, unexpected {unexpected}")
    return model


def save(model, processor, path: str | os.PathLike, card: str | None = None, extra: dict | None = None) -> Path:
    """``save_pretrained`` for model and processor (safetensors), plus README.md and training.json if given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    if card is not None:
        (path / "README.md").write_text(card)
    if extra is not None:
        (path / "training.json").write_text(json.dumps(extra, indent=1))
    return path
