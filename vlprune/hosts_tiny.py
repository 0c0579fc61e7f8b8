"""Tiny random-weight Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision and Qwen3-VL hosts, built from configs, offline.

    from vlprune.hosts_tiny import tiny_qwen2_vl, tiny_host_inputs
    from vlprune.testing import synthetic_image
    model, processor = tiny_qwen2_vl(seed=0)
    inputs = tiny_host_inputs(processor, [synthetic_image((112, 84)), synthetic_image((168, 112))])
    model.generate(**inputs, max_new_tokens=3, do_sample=False)

Each builder returns transformers' own ``...ForConditionalGeneration`` with random weights (text: hidden 128,
4 layers, 4 heads, 2 KV heads, initializer_range 0.3) and the host's own processor class around an offline byte-level
BPE tokenizer with the host's special tokens, a cut-down chat template and the PIL image processor. The video
processors import torchvision, so the processors are built with ``video_processor=None``: images and text only.
A forward takes a few tens of milliseconds on one CPU thread.

What an adapter must hook (transformers 5.25; each line is checked in tests/test_hosts_tiny.py unless marked
"(code)"). N = image tokens in the LLM, D = text hidden size.

All four
- ``generate`` encodes images once before prefill: it calls ``model.model.get_image_features`` by keyword with the
  arguments it reads from that method's signature (a wrapper must keep it, e.g. ``functools.wraps``; else the pixels
  reach forward next to the features and it raises), pops them (``pixel_values``, ``image_grid_thw`` /
  ``image_sizes``) and hands the output to the prefill forward as ``mm_encoder_outputs={"image": ...}``. A plain
  forward calls it positionally. Features are spliced by ``masked_scatter`` at ``input_ids == image_token_id``
  (code).
- Decoder layers: ``model.model.language_model.layers``; they receive ``position_embeddings`` (cos, sin) of shape
  (B, T, head_dim) (M-RoPE already folded in, so slicing ``[:, keep]`` works as for Llama; (1, T, head_dim) in a
  plain LLaVA-OneVision forward) and the cache as the ``cache`` keyword (``past_key_values`` is a deprecated
  alias).
- transformers adds its own output-capturing forward hooks to vision layers on the first call: hook-cleanliness
  checks must compare before/after, not expect none.
- No CLS token in any of these towers: CLS-attention scores must come from another row or be computed otherwise.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL (``tiny_qwen2_vl``, ``tiny_qwen2_5_vl``, ``tiny_qwen3_vl``)
- Tower ``model.model.visual``: ``.patch_embed`` (Conv3d over 2 frames x p x p), ``.blocks[i]`` (``.attn.qkv``
  fused, ``.mlp``), ``.merger``. ``pixel_values`` is (sum t*h*w, 3*2*p*p): all images of the batch packed into one
  sequence, separated by ``cu_seqlens`` from ``image_grid_thw`` (B_img, 3) (patches, before merging); the non-flash
  attention runs image by image (code).
- Patch rows are block-major: rows 4k..4k+3 are the 2x2 patches of LLM token k, tokens in raster order over
  (h/2, w/2). The merger (norm, view(-1, 4*D_vit), MLP) turns 4 ViT patches into 1 LLM token.
- ``model.model.get_image_features(pixel_values, image_grid_thw)`` -> ``pooler_output``: tuple per image of
  (t*h*w/4, D); ``last_hidden_state``: (sum t*h*w, D_vit), the last block before the merger.
- Image token ``<|image_pad|>`` (``config.image_token_id``) between ``<|vision_start|>`` and ``<|vision_end|>``;
  N = t*h*w/4 with (h, w) = smart_resize(H, W) / p: multiples of 28 px (Qwen3-VL: 32 px) within the pixel bounds.
  Tiny: 112x84 -> grid (1, 6, 8) -> 12 tokens; 168x112 -> 24 (Qwen3-VL: 20). The processor also returns
  ``mm_token_type_ids`` (0 text, 1 image, 2 video), required for M-RoPE.
- M-RoPE: ``model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=, attention_mask=)`` ->
  position_ids (3, B, T) and rope_deltas (B, 1). Image token (row r, col c) gets (s, s+r, s+c); the text after the
  image resumes at s + max(h, w)/2; rope_deltas = max position + 1 - valid length (< 0), kept in
  ``model.model.rope_deltas`` for decoding (decode position = the padding-aware 1-D position + delta, on all three
  rows). A plain forward hands the
  language model (3, B, T); ``generate`` (``_prepare_position_ids_for_generation``) hands (4, B, T) whose row 0 is
  the 1-D text position used for the mask, and decoder layers then get ``position_ids`` = that row (B, T) (None in a
  plain forward). Positions are recomputed from input_ids and the grid, so dropping tokens before the LLM needs
  explicit position_ids (the kept tokens' original rows) and a matching ``rope_deltas``.
- Qwen2.5-VL windowed attention: blocks in ``visual.fullatt_block_indexes`` (released 7, 15, 23, 31; tiny 1, 3) see
  the whole image, the others windows of ``window_size`` 112 px = 4x4 LLM tokens = 8x8 patches. Before block 0 the
  patches are permuted window by window, in groups of 4, by ``transformers.vision_utils.get_vision_window_index``;
  block inputs/outputs and ``last_hidden_state`` stay in that order, and only the merged tokens are put back
  (``[argsort(window_index)]``), so ``pooler_output`` is raster order.
- Qwen3-VL: patch 16, learned position grid (``visual.pos_embed``, bilinearly resampled) plus 2-D RoPE. DeepStack:
  after vision blocks ``visual.deepstack_visual_indexes`` (released 8, 16, 24; tiny 0, 1, 2) a merger in
  ``visual.deepstack_merger_list`` makes an extra (N, D) feature set; ``get_image_features(...).deepstack_features``
  is a list per tap of per-image tuples. ``model.model`` passes ``visual_pos_masks`` (B, T bool) and
  ``deepstack_visual_embeds`` (list of (N_total, D)) to ``language_model.forward`` (prefill only), whose loop adds tap
  i at the image tokens after decoder layer i (outside the layer: layer i's forward hook sees the sum before, layer
  i+1's pre-hook after). Dropping image tokens before the LLM or at a layer below the number of taps must drop the
  same rows of every tap and of the mask. The text model has q/k RMSNorm and interleaved M-RoPE (code).

LLaVA-OneVision (``tiny_llava_onevision``)
- ``model.model.vision_tower`` is a ``SiglipVisionModel`` (layers ``.encoder.layers[i].self_attn``; no
  ``.vision_model`` in 5.x), feature layer -1, strategy "full" (no CLS: 64 tokens per 112 px view here, 729 per
  384 px view released); ``model.model.multi_modal_projector`` (2-layer GELU MLP); ``model.model.image_newline``
  (D); the language model is ``Qwen2Model`` with 1-D RoPE. A plain forward gives it no position_ids (0..T-1, not
  padding-aware); ``generate`` gives padding-aware (B, T).
- ``get_image_features(pixel_values (B, max views, 3, S, S), image_sizes (B, 2) as (H, W), batch_num_images)`` runs
  the tower on every view (``last_hidden_state`` (views, 64, D_vit)) and packs each image
  (``pack_image_features``, ``pooler_output`` a list of (N_i, D)): the base view first (64 tokens, no newline), then
  the AnyRes crops as one grid, unpadded to the image's aspect, bilinearly shrunk when
  sqrt(rows*cols / (9*64)) > 1.1 ("anyres_max_9"), with ``image_newline`` after each row.
  Tiny: 112x84 -> 2 views, 118 = 64 + 6*(8+1); 168x112 -> 3 views, 168; 448x448 -> 17 views, 32x32 crops grid
  shrunk to 24x24, 664 tokens. In a prompt with several images (``batch_num_images`` > 1) each image is its base
  view plus one newline (65); videos are 2x2 bilinear-pooled per frame plus one newline (code).
- Image token ``<image>`` (``config.image_token_id``), expanded by the processor to N_i.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .testing import _CLIP_MEAN, _CLIP_STD, _build

__all__ = [
    "QWEN_SPECIAL",
    "ONEVISION_SPECIAL",
    "ONEVISION_PINPOINTS",
    "make_host_tokenizer",
    "host_prompt",
    "tiny_qwen2_vl",
    "tiny_qwen2_5_vl",
    "tiny_llava_onevision",
    "tiny_qwen3_vl",
    "tiny_host_inputs",
]

CORPUS = [
    "user: What is shown in this image? assistant: A red square on a white background.",
    "Describe the picture in detail. There is a cat, a dog and a tree.",
    "How many objects are there? Two. Yes. No. The color is blue, green or red.",
    "system: You are a helpful assistant. Answer in one word.",
] * 4

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
ONEVISION_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# the released chat templates, cut down to text, image and video parts
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ONEVISION_SIZE = 112          # SigLIP input side (the released models: 384)
ONEVISION_PATCH = 14          # 8 x 8 = 64 tokens per view, no CLS
# the released pinpoints are 384 * (i, j) for i, j in 1..6; here 112 * (i, j) for i, j in 1..4, as [height, width]
ONEVISION_PINPOINTS = [[ONEVISION_SIZE * i, ONEVISION_SIZE * j] for i in range(1, 5) for j in range(1, 5)]
_SIGLIP_MEAN = [0.5, 0.5, 0.5]
_SIGLIP_STD = [0.5, 0.5, 0.5]


def make_host_tokenizer(special: Sequence[str], named: dict | None = None, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained offline on ``CORPUS``: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3,
    then ``special`` in order (4, 5, ...). ``named`` maps attribute names (``image_token``...) to tokens in
    ``special``. No BOS is added (as Qwen's tokenizers). Deterministic."""
    from transformers import PreTrainedTokenizerFast

    from .testing import bpe_tokenizer

    tok = bpe_tokenizer(CORPUS, ["<unk>", "<s>", "</s>", "<pad>", *special], vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=dict(named or {}), model_max_length=32768,
    )


def _without_video_processor(proc_cls, **kwargs):
    """``proc_cls(video_processor=None, **kwargs)``. transformers' video processors need torchvision, and without it
    ``ProcessorMixin.__init__`` cannot even check a ``None`` video processor (it looks the class
    ``VideoProcessorMixin`` up in the transformers namespace, where it is missing). The check is skipped for this
    one construction; images and text work as usual, videos are not supported."""
    proc = proc_cls.__new__(proc_cls)
    orig = proc.check_argument_for_proper_class

    def check(name, arg):
        if name == "video_processor" and arg is None:
            return None
        return orig(name, arg)

    proc.check_argument_for_proper_class = check
    try:
        proc_cls.__init__(proc, video_processor=None, **kwargs)
    finally:
        del proc.check_argument_for_proper_class
    return proc


def _text_kwargs(tok, **overrides):
    # hidden 128, 4 layers, 4 heads of 32, 2 KV heads (GQA); initializer_range 0.3 gives varied greedy tokens
    kw = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    return kw


def _qwen_processor(proc_cls, patch_size: int, min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = make_host_tokenizer(QWEN_SPECIAL)
    img_proc = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch_size, merge_size=2,
        temporal_patch_size=2, image_mean=_CLIP_MEAN if patch_size == 14 else _SIGLIP_MEAN,
        image_std=_CLIP_STD if patch_size == 14 else _SIGLIP_STD,
    )
    proc = _without_video_processor(proc_cls, image_processor=img_proc, tokenizer=tok, chat_template=_QWEN_TEMPLATE)
    return tok, proc


def _qwen_ids(tok) -> dict:
    tid = tok.convert_tokens_to_ids
    return dict(image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))


def tiny_qwen2_vl(seed: int = 0, attn: str = "sdpa"):
    """A tiny ``Qwen2VLForConditionalGeneration`` and its ``Qwen2VLProcessor`` (PIL image processor, no video).

    Vision: patch 14, temporal patch 2, merge 2, embed 64, 2 blocks; images resized to multiples of 28 px within
    [56*56, 224*224] pixels. Text: Qwen2-style decoder, hidden 128, 4 layers, GQA 4/2, M-RoPE sections [4, 6, 6].
    Returns ``(model, processor)``, eval mode, float32, CPU."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok, proc = _qwen_processor(Qwen2VLProcessor, 14, 56 * 56, 224 * 224)
    text = _text_kwargs(tok, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        **_qwen_ids(tok),
    )
    return _build(Qwen2VLForConditionalGeneration, cfg, seed, attn), proc


def tiny_qwen2_5_vl(seed: int = 0, attn: str = "sdpa"):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` and its ``Qwen2_5_VLProcessor`` (PIL image processor, no
    video). Vision: patch 14, merge 2, hidden 64, 4 blocks, window 112 px (4 x 4 merged tokens) with full attention
    in blocks 1 and 3 (the released models: 32 blocks, full in 7, 15, 23, 31). Text as ``tiny_qwen2_vl``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok, proc = _qwen_processor(Qwen2_5_VLProcessor, 14, 56 * 56, 224 * 224)
    text = _text_kwargs(tok, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=4, hidden_size=64, out_hidden_size=128, intermediate_size=128, num_heads=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1, 3]),
        **_qwen_ids(tok),
    )
    return _build(Qwen2_5_VLForConditionalGeneration, cfg, seed, attn), proc


def tiny_qwen3_vl(seed: int = 0, attn: str = "sdpa"):
    """A tiny ``Qwen3VLForConditionalGeneration`` and its ``Qwen3VLProcessor`` (PIL image processor, no video).

    Vision: patch 16, merge 2, hidden 64, 4 blocks, learned position grid 16 x 16, DeepStack taps after blocks
    0, 1, 2 (the released models: 27 blocks, taps 8, 16, 24). Text: Qwen3-style decoder (q/k norm), hidden 128,
    4 layers, GQA 4/2, head 32, interleaved M-RoPE sections [6, 5, 5]."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tok, proc = _qwen_processor(Qwen3VLProcessor, 16, 64 * 64, 256 * 256)
    text = _text_kwargs(tok, head_dim=32, rope_parameters={
        "rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True})
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                           num_position_embeddings=256, deepstack_visual_indexes=[0, 1, 2]),
        **_qwen_ids(tok),
    )
    return _build(Qwen3VLForConditionalGeneration, cfg, seed, attn), proc


def tiny_llava_onevision(seed: int = 0, attn: str = "sdpa"):
    """A tiny ``LlavaOnevisionForConditionalGeneration`` and its ``LlavaOnevisionProcessor`` (PIL image processor,
    no video). Vision: SigLIP at 112 px, patch 14 (64 tokens per view, no CLS), hidden 64, 4 layers; AnyRes with
    pinpoints 112 * (i, j), i, j in 1..4, "anyres_max_9". Text: Qwen2, hidden 128, 4 layers, GQA 4/2."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = make_host_tokenizer(ONEVISION_SPECIAL, named={"image_token": "<image>", "video_token": "<video>"})
    pins = [list(p) for p in ONEVISION_PINPOINTS]
    img_proc = LlavaOnevisionImageProcessorPil(
        size={"height": ONEVISION_SIZE, "width": ONEVISION_SIZE}, image_grid_pinpoints=pins,
        image_mean=_SIGLIP_MEAN, image_std=_SIGLIP_STD, do_pad=True, do_convert_rgb=True,
    )
    n_view = (ONEVISION_SIZE // ONEVISION_PATCH) ** 2
    proc = _without_video_processor(
        LlavaOnevisionProcessor, image_processor=img_proc, tokenizer=tok, num_image_tokens=n_view,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=_ONEVISION_TEMPLATE,
    )
    vis = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             image_size=ONEVISION_SIZE, patch_size=ONEVISION_PATCH, vision_use_head=False)
    cfg = LlavaOnevisionConfig(
        vision_config=vis, text_config=Qwen2Config(**_text_kwargs(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pins, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return _build(LlavaOnevisionForConditionalGeneration, cfg, seed, attn), proc


def host_prompt(processor, question: str = "What is shown in this image?") -> str:
    """One user turn with one image and ``question``, in the host's chat format, ending with the assistant cue."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def tiny_host_inputs(processor, images, prompts=None, padding_side: str = "left"):
    """Processor outputs for one image per prompt (images may differ in size), padded on ``padding_side``.

    ``prompts``: a string or a list (one per image) with the host's image placeholder, or None for
    ``host_prompt(processor)`` for each image. Returns a ``BatchFeature`` of tensors (``input_ids``,
    ``attention_mask``, pixel inputs and, for Qwen hosts, ``image_grid_thw`` and ``mm_token_type_ids``)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    if not isinstance(images, (list, tuple)):
        images = [images]
    images = list(images)
    if prompts is None:
        prompts = [host_prompt(processor)] * len(images)
    elif isinstance(prompts, str):
        prompts = [prompts] * len(images)
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"one image per prompt: got {len(prompts)} prompts and {len(images)} images")
    tok = processor.tokenizer
    previous = tok.padding_side
    tok.padding_side = padding_side
    try:
        return processor(text=prompts, images=images, return_tensors="pt", padding=len(prompts) > 1)
    finally:
        tok.padding_side = previous
