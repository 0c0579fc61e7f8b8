"""Tiny random-weight LLaVA-1.5 and LLaVA-NeXT models, built from configs, offline, for demos and tests.

Everything here is deterministic by seed and needs no download: the tokenizer is a byte-level BPE trained on a
few sentences with the ``tokenizers`` library, and the models are transformers' own
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` with random weights.

    from vlprune.testing import tiny_llava, tiny_inputs, synthetic_image
    model, processor = tiny_llava(seed=0)
    inputs = tiny_inputs(processor, [synthetic_image()], ["USER: <image>\\nWhat is shown? ASSISTANT:"])
    model.generate(**inputs, max_new_tokens=8, do_sample=False)

Geometry (LLaVA-1.5): 336 px, patch 14, so 576 visual tokens per image; the vision tower is a CLIP ViT with hidden
64, 4 layers, 4 heads, MLP 256; the language model is Llama with hidden 128, 4 layers, 4 heads, 2 KV heads (GQA),
MLP 344 and ``initializer_range=0.3`` (with the default 0.02 a random model repeats one token, which makes
equivalence checks insensitive). LLaVA-NeXT adds AnyRes with pinpoints [[336, 672], [672, 336], [672, 672]].

This module imports neither pytest nor anything outside vlprune's runtime dependencies.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "CORPUS",
    "PINPOINTS",
    "DEFAULT_PROMPT",
    "make_tokenizer",
    "tiny_vision_config",
    "tiny_text_config",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_inputs",
    "synthetic_image",
    "identity_method",
    "tiny_llava_repo",
    "llava_repo_inputs",
]

CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A red square on a white background.",
    "Describe the picture in detail. There is a cat, a dog and a tree.",
    "How many objects are there? Two. Yes. No. The color is blue, green or red.",
] * 4

PINPOINTS = [[336, 672], [672, 336], [672, 672]]
DEFAULT_PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def bpe_tokenizer(corpus: Sequence[str], special: Sequence[str], vocab_size: int):
    """A ``tokenizers.Tokenizer``: byte-level BPE trained offline on ``corpus``, ``special`` first (ids 0, 1, ...).
    Deterministic (the same corpus and settings always give the same vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    return tok


def make_tokenizer(vocab_size: int = 300, extra_special: Sequence[str] = ("<image>",)):
    """A byte-level BPE tokenizer trained offline on ``CORPUS``: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3,
    ``<image>``=4. Deterministic (the same corpus and settings always give the same vocabulary)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = bpe_tokenizer(CORPUS, ["<unk>", "<s>", "</s>", "<pad>", *extra_special], vocab_size)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    extra = {"image_token": "<image>"} if "<image>" in extra_special else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=extra, model_max_length=8192,
    )


def tiny_vision_config(**overrides):
    """CLIP ViT at 336 px / patch 14 (576 patches + CLS): hidden 64, 4 layers, 4 heads, MLP 256."""
    from transformers import CLIPVisionConfig

    kw = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              image_size=336, patch_size=14)
    kw.update(overrides)
    return CLIPVisionConfig(**kw)


def tiny_text_config(vocab_size: int, **overrides):
    """Llama with hidden 128, 4 layers, 4 heads, 2 KV heads (GQA), MLP 344, initializer_range 0.3."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
              bos_token_id=1, eos_token_id=2, pad_token_id=3)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _build(model_cls, config, seed: int, attn: str):
    """Random weights drawn from a private RNG stream seeded by ``seed``; the caller's RNG state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_llava(seed: int = 0, attn: str = "sdpa", text_overrides: dict | None = None,
               vision_overrides: dict | None = None):
    """A tiny ``LlavaForConditionalGeneration`` (LLaVA-1.5 geometry: 576 visual tokens) and its ``LlavaProcessor``.

    ``attn`` is the attention implementation for the text and vision towers ("sdpa" or "eager").
    Returns ``(model, processor)``; the model is in eval mode, float32, on the CPU.
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = make_tokenizer()
    img_proc = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD, do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=img_proc, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    cfg = LlavaConfig(
        vision_config=tiny_vision_config(**(vision_overrides or {})),
        text_config=tiny_text_config(len(tok), **(text_overrides or {})),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return _build(LlavaForConditionalGeneration, cfg, seed, attn), processor


def tiny_llava_next(seed: int = 0, attn: str = "sdpa", pinpoints: Sequence[Sequence[int]] | None = None,
                    text_overrides: dict | None = None, vision_overrides: dict | None = None):
    """A tiny ``LlavaNextForConditionalGeneration`` (AnyRes: base image plus crops, unpad, newline tokens) and its
    ``LlavaNextProcessor``. A 336x336 image gives 3 views and 1176 visual tokens; 640x480 gives 5 views.
    Returns ``(model, processor)``."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    pins = [list(p) for p in (pinpoints or PINPOINTS)]
    tok = make_tokenizer()
    img_proc = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pins,
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD, do_pad=True, do_convert_rgb=True,
    )
    processor = LlavaNextProcessor(
        image_processor=img_proc, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    cfg = LlavaNextConfig(
        vision_config=tiny_vision_config(**(vision_overrides or {})),
        text_config=tiny_text_config(len(tok), **(text_overrides or {})),
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pins,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return _build(LlavaNextForConditionalGeneration, cfg, seed, attn), processor


def tiny_llava_repo(seed: int = 0, anyres: bool = False, attn: str = "sdpa", folder: str | None = None,
                    pinpoints: Sequence[Sequence[int]] | None = None, decoder: str = "llama"):
    """A tiny LLaVA-codebase ``LlavaLlamaForCausalLM`` (PyPI ``llava-torch``, installed with ``--no-deps``) with the
    same towers as ``tiny_llava``: a random CLIP (saved to ``folder``, a new temporary folder by default, because the
    codebase always loads its tower by path), an ``mlp2x_gelu`` projector and the tiny Llama.

    ``anyres=False``: the LLaVA-1.5 layout (``image_aspect_ratio="pad"``, ``mm_patch_merge_type="flat"``);
    ``anyres=True``: LLaVA-1.6 (``"anyres"``, ``"spatial_unpad"``, pinpoints in the codebase's (width, height)).
    ``decoder="mistral"`` builds the codebase's ``LlavaMistralForCausalLM`` (LLaVA-1.6-Mistral) instead.
    Returns ``(model, tokenizer, image_processor)``; build inputs with ``llava_repo_inputs``.
    """
    import os
    import tempfile

    from transformers import CLIPImageProcessor, CLIPVisionModel

    if decoder not in ("llama", "mistral"):
        raise ValueError(f"decoder must be 'llama' or 'mistral'; got {decoder!r}")
    try:
        if decoder == "llama":
            from llava.model import LlavaConfig, LlavaLlamaForCausalLM
        else:
            from llava.model.language_model.llava_mistral import LlavaMistralConfig as LlavaConfig
            from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM as LlavaLlamaForCausalLM
    except ImportError as e:  # llava/model/__init__.py hides the real error behind a bare except
        raise ImportError(
            f"the LLaVA codebase is not importable ({e}); install it with: pip install --no-deps "
            f"llava-torch==1.2.2.post1 && pip install einops einops-exts shortuuid sentencepiece"
        ) from None

    tok = make_tokenizer()
    folder = folder or tempfile.mkdtemp(prefix="vlprune-llava-clip-")
    if not os.path.exists(os.path.join(folder, "config.json")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            CLIPVisionModel(tiny_vision_config()).save_pretrained(folder)
        CLIPImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            image_mean=_CLIP_MEAN, image_std=_CLIP_STD, do_convert_rgb=True,
        ).save_pretrained(folder)
    text = tiny_text_config(len(tok)).to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        text.pop(k, None)
    mm = dict(mm_vision_tower=folder, mm_hidden_size=64, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
              mm_vision_select_feature="patch", use_mm_proj=True, tokenizer_padding_side="right",
              mm_use_im_start_end=False, mm_use_im_patch_token=False)  # as the released LLaVA-1.5/1.6 configs
    if anyres:
        pins = [list(p) for p in (pinpoints or PINPOINTS)]
        mm.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=pins)
    else:
        mm.update(image_aspect_ratio="pad", mm_patch_merge_type="flat")
    cfg = LlavaConfig(**text, **mm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaLlamaForCausalLM(cfg)
        if anyres:  # the codebase creates image_newline with torch.empty
            torch.nn.init.normal_(model.get_model().image_newline, std=cfg.hidden_size ** -0.5)
    model.get_model().vision_tower.load_model()
    model.set_attn_implementation(attn)
    model.eval()
    return model, tok, model.get_model().vision_tower.image_processor


def llava_repo_inputs(model, tokenizer, image_processor, images, prompts: str | Sequence[str] = DEFAULT_PROMPT,
                      padding_side: str = "right") -> dict:
    """``input_ids`` (``<image>`` spliced as the codebase's IMAGE_TOKEN_INDEX by its ``tokenizer_image_token``),
    ``attention_mask``, ``images`` (the codebase's ``process_images``) and ``image_sizes`` (PIL ``(width, height)``),
    ready for ``model(**inputs)`` or ``model.generate(input_ids, images=..., image_sizes=...)``."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(images, (list, tuple)):
        images = [images]
    seqs = [torch.tensor(tokenizer_image_token(p, tokenizer, IMAGE_TOKEN_INDEX)) for p in prompts]
    t = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), t), tokenizer.pad_token_id, dtype=torch.long)
    am = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, x in enumerate(seqs):
        sl = slice(t - len(x), t) if padding_side == "left" else slice(0, len(x))
        ids[i, sl] = x
        am[i, sl] = 1
    pix = process_images(list(images), image_processor, model.config)
    return {"input_ids": ids, "attention_mask": am, "images": pix, "image_sizes": [im.size for im in images]}


def tiny_inputs(processor, images=None, prompts: str | Sequence[str] = DEFAULT_PROMPT, padding_side: str = "left"):
    """Processor outputs (``BatchFeature`` of tensors) for ``prompts`` with ``images`` (a PIL image, a list of them,
    or None for text-only prompts). Several prompts are padded on ``padding_side`` ("left" or "right")."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    tok = processor.tokenizer
    previous = tok.padding_side
    tok.padding_side = padding_side
    try:
        kw = dict(text=prompts, return_tensors="pt", padding=len(prompts) > 1)
        if images is not None:
            kw["images"] = list(images)
        return processor(**kw)
    finally:
        tok.padding_side = previous


def synthetic_image(size: tuple[int, int] = (336, 336), seed: int = 0):
    """A deterministic RGB PIL image (width, height): smooth colour gradients, a few rectangles and a disc,
    plus a little seeded noise, so that different regions carry different content."""
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 23.0)], -1) * 160.0
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 3)), y0 + int(rng.integers(h // 10, h // 3))
        img[y0:y1, x0:x1] = rng.integers(0, 256, size=3)
    cx, cy, r = w * 0.6, h * 0.4, min(w, h) / 6
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = (250, 220, 40)
    img = img + rng.normal(0, 6, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def identity_method():
    """A method that changes nothing (no stages), for reading the engine's schedule and cost report of the unpruned
    model: ``vlprune.apply(model, identity_method()); model(**inputs); vlprune.stats(model)["cost"]``. Not
    registered."""
    import dataclasses

    from .methods.base import Method

    @dataclasses.dataclass
    class Unpruned(Method):
        """Changes nothing; used to read the cost of the unpruned model. Not registered."""

        name = "none"

    return Unpruned()
