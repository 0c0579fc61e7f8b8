"""Cost model: papers' numbers, agreement with FlopCounterMode on tiny models, input validation."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig

from vlprune.cost import (
    CostReport,
    LLMCall,
    Schedule,
    VisionCall,
    decode_flops,
    equivalent_tokens,
    kv_cache_bytes,
    llm_layer_flops,
    llm_prefill_flops,
    lm_head_flops,
    projector_flops,
    register_sdpa_cpu_flop_formula,
    schedule_cost,
    vision_flops,
)

LLAVA15_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=11008, vocab_size=32000)
PINPOINTS = [[336, 672], [672, 336], [672, 672]]


# ---------------------------------------------------------------------------------------------------------
# Tiny model builders (fp32, CPU, sdpa, random weights)
# ---------------------------------------------------------------------------------------------------------
def tiny_llama_config(layers: int = 3) -> LlamaConfig:
    return LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=344,
                       num_hidden_layers=layers, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def tiny_clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                            image_size=336, patch_size=14)


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["USER: What is shown in this image? ASSISTANT: A red square on a white background.",
              "Describe the picture in detail. There is a cat, a dog and a tree.",
              "How many objects are there? Two. Yes. No. The color is blue, green or red."] * 4
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def counted_flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module", autouse=True)
def _sdpa_formula():
    register_sdpa_cpu_flop_formula()


# ---------------------------------------------------------------------------------------------------------
# Papers' convention
# ---------------------------------------------------------------------------------------------------------
def test_paper_convention_llava15_7b_full():
    cfg = LlamaConfig(**LLAVA15_7B)
    tflops = llm_prefill_flops(cfg, [576] * 32, convention="paper") / 1e12
    assert tflops == pytest.approx(3.82, rel=5e-3)


def test_paper_convention_transprune_schedule():
    cfg = LlamaConfig(**LLAVA15_7B)
    schedule = [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    assert len(schedule) == 32
    tflops = llm_prefill_flops(cfg, schedule, convention="paper") / 1e12
    assert tflops == pytest.approx(1.557, rel=5e-3)


def test_conventions_relate():
    cfg = LlamaConfig(**LLAVA15_7B)  # MHA + SwiGLU: "flops" = 2 x "paper" = 2 x "macs"
    flops = llm_prefill_flops(cfg, [576] * 32)
    assert llm_prefill_flops(cfg, [576] * 32, convention="macs") == flops / 2
    assert llm_prefill_flops(cfg, [576] * 32, convention="paper") == pytest.approx(flops / 2, rel=1e-12)
    assert llm_prefill_flops(cfg, 576) == flops
    assert llm_prefill_flops(cfg, [576] * 32, batch=3) == 3 * flops


def test_gqa_and_explicit_head_dim():
    mha = LlamaConfig(**{**LLAVA15_7B, "num_hidden_layers": 1})
    gqa = LlamaConfig(**{**LLAVA15_7B, "num_hidden_layers": 1, "num_key_value_heads": 8})
    n, d, m = 100, 4096, 11008
    assert llm_layer_flops(mha, n) == 2 * n * (4 * d * d + 2 * n * d + 3 * d * m)
    assert llm_layer_flops(mha, n) - llm_layer_flops(gqa, n) == 4 * n * d * (d - 1024)
    wide = LlamaConfig(**{**LLAVA15_7B, "num_hidden_layers": 1, "head_dim": 256})  # d_q = 32 * 256 = 8192
    d_q = 8192
    assert llm_layer_flops(wide, n) == 4 * n * d * d_q + 4 * n * d * d_q + 4 * n * n * d_q + 6 * n * d * m


def test_two_matrix_mlp_when_not_gated():
    cfg = LlamaConfig(**{**LLAVA15_7B, "num_hidden_layers": 1})
    gated = llm_layer_flops(cfg, 10)
    cfg.mlp_matrices = 2
    assert gated - llm_layer_flops(cfg, 10) == 2 * 10 * 4096 * 11008


def test_kv_bytes_and_equivalent_tokens():
    cfg = tiny_llama_config(layers=3)  # 2 kv heads x head_dim 32
    assert kv_cache_bytes(cfg, [10, 20, 30], batch=2, dtype=torch.float16) == 2 * 2 * 60 * 64 * 2
    assert kv_cache_bytes(cfg, [10, 20, 30], dtype=4) == 2 * 60 * 64 * 4
    assert kv_cache_bytes(cfg, [10, 20, 30], dtype="bfloat16") == 2 * 60 * 64 * 2
    assert equivalent_tokens([576, 576, 64, 64]) == 320.0


# ---------------------------------------------------------------------------------------------------------
# Agreement with FlopCounterMode
# ---------------------------------------------------------------------------------------------------------
def test_register_sdpa_formula_idempotent():
    from torch.utils import flop_counter

    register_sdpa_cpu_flop_formula()
    assert register_sdpa_cpu_flop_formula() is False
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry


def test_llama_prefill_matches_flop_counter():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(layers=3)
    model = LlamaForCausalLM(cfg).eval()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(5, 300, (2, 50))
    got = counted_flops(lambda: model(input_ids=ids, use_cache=False))
    want = llm_prefill_flops(cfg, [50] * 3, batch=2) + lm_head_flops(cfg, 50, batch=2)
    assert got / want == pytest.approx(1.0, rel=1e-2)


def test_llava_forward_matches_flop_counter():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=tiny_clip_config(), text_config=tiny_llama_config(layers=4), image_token_id=4,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    ids = torch.randint(5, 300, (1, 600))
    ids[0, 12:12 + 576] = 4
    pixel_values = torch.randn(1, 3, 336, 336)
    got = counted_flops(lambda: model(input_ids=ids, pixel_values=pixel_values, use_cache=False))

    # The tower runs all its layers; hidden_states[-2] is only a selection.
    schedule = Schedule(vision=[VisionCall(batch=1, tokens_per_layer=[577] * 4)], projector_rows=576,
                        llm=[LLMCall(batch=1, q_per_layer=[600] * 4, kv_per_layer=[600] * 4, lm_head_rows=600)])
    report = schedule_cost(cfg, schedule)
    assert got / report.total == pytest.approx(1.0, rel=1e-2)
    assert report.vision == vision_flops(cfg.vision_config, schedule.vision[0])
    assert report.projector == projector_flops(cfg, 576)


def test_llava_next_forward_matches_flop_counter():
    from PIL import Image
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tok = make_tokenizer()
    img_proc = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                       image_grid_pinpoints=PINPOINTS, do_pad=True)
    proc = LlavaNextProcessor(image_processor=img_proc, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image = Image.new("RGB", (640, 480), (200, 30, 30))
    inputs = proc(images=image, text="USER: <image>\nWhat is shown in this image? ASSISTANT:", return_tensors="pt")
    seq_len = inputs["input_ids"].shape[1]
    n_crops = inputs["pixel_values"].shape[1]  # base image + AnyRes tiles

    torch.manual_seed(0)
    cfg = LlavaNextConfig(vision_config=tiny_clip_config(), text_config=tiny_llama_config(layers=4),
                          image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaNextForConditionalGeneration(cfg).eval()
    got = counted_flops(lambda: model(**inputs, use_cache=False))

    schedule = Schedule(vision=[VisionCall(batch=n_crops, tokens_per_layer=[577] * 4)],
                        projector_rows=n_crops * 576,
                        llm=[LLMCall(batch=1, q_per_layer=[seq_len] * 4, kv_per_layer=[seq_len] * 4,
                                     lm_head_rows=seq_len)])
    report = schedule_cost(cfg, schedule)
    assert n_crops > 1
    assert got / report.total == pytest.approx(1.0, rel=1e-2)


def test_decode_matches_flop_counter():
    from transformers import DynamicCache, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(layers=3)
    model = LlamaForCausalLM(cfg).eval()
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    batch, prompt, n_new = 2, 20, 4
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        out = model(input_ids=torch.randint(5, 300, (batch, prompt)), use_cache=True, **{cache_kw: cache})
    next_ids = out.logits[:, -1:].argmax(-1)

    def steps():
        nonlocal next_ids
        for _ in range(n_new):
            step = model(input_ids=next_ids, use_cache=True, **{cache_kw: cache})
            next_ids = step.logits[:, -1:].argmax(-1)

    got = counted_flops(steps)
    want = decode_flops(cfg, [prompt] * 3, n_new, batch=batch)
    assert got / want == pytest.approx(1.0, rel=1e-2)
    assert cache.get_seq_length() == prompt + n_new


def test_decode_equals_sum_of_single_token_calls():
    cfg = tiny_llama_config(layers=3)
    prompt = [40, 30, 10]
    calls = [LLMCall(batch=2, q_per_layer=[1] * 3, kv_per_layer=[p + s + 1 for p in prompt], lm_head_rows=1)
             for s in range(5)]
    report = schedule_cost(_llava_config(), Schedule(vision=[], projector_rows=0, llm=calls))
    assert report.llm + report.lm_head == decode_flops(cfg, prompt, 5, batch=2)
    assert report.kv_bytes == kv_cache_bytes(cfg, [p + 5 for p in prompt], batch=2)


def _llava_config():
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=tiny_clip_config(), text_config=tiny_llama_config(layers=3), image_token_id=4)


def test_cost_report_dict():
    schedule = Schedule(vision=[VisionCall(1, [577] * 4)], projector_rows=576,
                        llm=[LLMCall(1, [100, 100, 40], [100, 100, 40], 1)], scoring_flops=1e6,
                        visual_per_layer=[64.0, 64.0, 4.0])
    report = schedule_cost(_llava_config(), schedule)
    assert isinstance(report, CostReport)
    d = report.as_dict()
    assert d["total"] == pytest.approx(d["vision"] + d["projector"] + d["llm"] + d["lm_head"] + d["scoring"])
    assert d["macs"] == report.total / 2 and d["tflops"] == report.total / 1e12
    assert d["equivalent_tokens"] == 44.0
    assert all(isinstance(v, float) for v in d.values())


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
def test_wrong_layer_count_names_both_numbers():
    cfg = LlamaConfig(**LLAVA15_7B)
    with pytest.raises(ValueError, match=r"31 entries.*num_hidden_layers=32"):
        llm_prefill_flops(cfg, [576] * 31)
    with pytest.raises(ValueError, match=r"31 entries.*num_hidden_layers=32"):
        decode_flops(cfg, [576] * 31, 4)


def test_negative_counts_rejected():
    cfg = tiny_llama_config(layers=3)
    with pytest.raises(ValueError, match=r"tokens_per_layer\[1\]=-5"):
        llm_prefill_flops(cfg, [10, -5, 10])
    with pytest.raises(ValueError, match=r"rows=-1"):
        lm_head_flops(cfg, -1)
    with pytest.raises(ValueError, match=r"batch=0"):
        llm_layer_flops(cfg, 10, batch=0)
    with pytest.raises(ValueError, match=r"n_new=-2"):
        decode_flops(cfg, [1, 1, 1], -2)
    with pytest.raises(ValueError, match=r"VisionCall.tokens_per_layer\[0\]=-577"):
        vision_flops(tiny_clip_config(), VisionCall(1, [-577]))
    with pytest.raises(ValueError, match=r"5 entries.*num_hidden_layers=4"):
        vision_flops(tiny_clip_config(), VisionCall(1, [577] * 5))


def test_unknown_convention_lists_allowed():
    cfg = tiny_llama_config(layers=3)
    with pytest.raises(ValueError, match=r"'gflops'.*'flops', 'macs', 'paper'"):
        llm_prefill_flops(cfg, [10] * 3, convention="gflops")
