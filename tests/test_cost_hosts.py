"""vlprune.cost against torch's FlopCounterMode on the tiny Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision hosts.

Each host runs unpatched (SDPA attention, the CPU SDPA formula registered) on a batch of two images of different
sizes. The cost model is fed a schedule written by hand from ``image_grid_thw`` (Qwen) or the view count
(OneVision), never from vlprune's hooks.

Counted (as FlopCounterMode counts them, FLOPs = 2 x MACs, biases not counted): the patch embedding (Conv3d /
Conv2d), every Linear (fused qkv, proj, MLP, the merger and Qwen3-VL's DeepStack mergers, LLaVA's projector, the
decoder's q/k/v/o and MLP, lm_head) and SDPA attention over the full q x kv rectangle of each attention group.
Not counted: elementwise ops, norms (LayerNorm / RMSNorm, Qwen3's q/k norms), softmax, activations, RoPE and
M-RoPE, Qwen3-VL's learned position embedding (a lookup and a weighted sum), DeepStack's additions in the decoder,
OneVision's bilinear resizing and newline tokens, embedding lookups.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlprune import cost
from vlprune.hosts_tiny import tiny_llava_onevision, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl, tiny_host_inputs
from vlprune.testing import synthetic_image

BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl,
            "onevision": tiny_llava_onevision}
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module", autouse=True)
def _sdpa_formula():
    cost.register_sdpa_cpu_flop_formula()


@pytest.fixture(scope="module")
def hosts():
    built = {}

    def get(name):
        if name not in built:
            model, proc = BUILDERS[name](seed=0, attn="sdpa")
            images = [synthetic_image((112, 84)), synthetic_image((168, 112), seed=1)]
            built[name] = model, tiny_host_inputs(proc, images)
        return built[name]

    return get


def _count(fn) -> tuple[int, dict]:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops(), counter.get_flop_counts()


def _module_flops(counts: dict, suffix: str) -> int:
    """FLOPs counted inside the outermost module whose name ends with ``suffix``."""
    keys = sorted((k for k in counts if k.endswith(suffix)), key=len)
    assert keys, (suffix, sorted(counts))
    return sum(counts[keys[0]].values())


def qwen_vision_call(model, grid_thw: torch.Tensor) -> cost.VisionCall:
    """The VisionCall an adapter records for one unpruned tower forward: groups = diff(cu_seqlens) per block.

    Full attention: one group per image frame (h*w patches, t times). Qwen2.5-VL's windowed blocks: the windows of
    transformers' own ``get_vision_window_index`` (its ``cu_window_seqlens``)."""
    vc = model.config.vision_config
    full = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    n = sum(full)
    windows = None
    if vc.model_type == "qwen2_5_vl_vision":
        from transformers.vision_utils import get_vision_window_index

        _, cu = get_vision_window_index(grid_thw, spatial_merge_size=vc.spatial_merge_size,
                                        window_size=vc.window_size, patch_size=vc.patch_size)
        windows = torch.diff(cu).tolist()
    groups = [full if windows is None or i in vc.fullatt_block_indexes else windows for i in range(vc.depth)]
    return cost.VisionCall(batch=len(grid_thw), tokens_per_layer=[n] * vc.depth, groups=groups)


def onevision_views(model, inputs) -> int:
    """Views the tower runs on: each image's real views (base + AnyRes crops), padding views dropped."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    cfg = model.config
    return sum(image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                         patch_size=cfg.vision_config.image_size)
               for s in inputs["image_sizes"].tolist())


def test_windows_of_the_tiny_qwen2_5_vl(hosts):
    """Window groups: 112 px windows = 4x4 merged tokens = 8x8 patches. 112x84 -> grid 6x8 (one 48-patch window);
    168x112 -> grid 8x12: a 4x4 and a 4x2 window of merged tokens (64 and 32 patches)."""
    model, inputs = hosts("qwen2_5_vl")
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8], [1, 8, 12]]
    call = qwen_vision_call(model, inputs["image_grid_thw"])
    assert call.groups == [[48, 64, 32], [48, 96], [48, 64, 32], [48, 96]]


@pytest.mark.parametrize("host", QWEN)
def test_qwen_tower_and_merger_match_flop_counter(hosts, host):
    model, inputs = hosts(host)
    vis = model.model.visual
    grid = inputs["image_grid_thw"]
    seen = []  # what each block received: (packed length, diff(cu_seqlens))

    def record(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((int(hidden.shape[0]), torch.diff(kwargs["cu_seqlens"]).tolist()))

    handles = [blk.register_forward_pre_hook(record, with_kwargs=True) for blk in vis.blocks]
    try:
        counted, by_module = _count(lambda: vis(inputs["pixel_values"], grid_thw=grid))
    finally:
        for h in handles:
            h.remove()
    call = qwen_vision_call(model, grid)
    assert [n for n, _ in seen] == call.tokens_per_layer and [g for _, g in seen] == call.groups
    patches = int(inputs["pixel_values"].shape[0])
    assert call.tokens_per_layer[0] == patches
    tower = cost.vision_flops(model.config.vision_config, call)
    merger = cost.projector_flops(model.config, patches)  # rows = the merger's input rows = ViT patches
    assert merger == _module_flops(by_module, ".merger")
    assert tower + merger == pytest.approx(counted, rel=0.01)
    if host == "qwen3_vl":  # DeepStack mergers: one per tap, each a merger on all patches
        taps = model.config.vision_config.deepstack_visual_indexes
        for i in range(len(taps)):
            assert _module_flops(by_module, f".deepstack_merger_list.{i}") == merger


def test_onevision_tower_and_projector_match_flop_counter(hosts):
    """SigLIP has no CLS token: every view is 64 patch tokens in every layer."""
    model, inputs = hosts("onevision")
    cfg = model.config
    counted, _ = _count(lambda: model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]))
    views = onevision_views(model, inputs)
    assert views == 5  # 112x84: base + 1 crop; 168x112: base + 2 crops
    per_view = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    call = cost.VisionCall(batch=views, tokens_per_layer=[per_view] * cfg.vision_config.num_hidden_layers)
    expected = cost.vision_flops(cfg.vision_config, call) + cost.projector_flops(cfg, views * per_view)
    assert expected == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize("host", QWEN + ("onevision",))
def test_whole_prefill_matches_schedule_cost(hosts, host):
    """A plain forward of the whole model (tower, merger / projector, decoder, lm_head on all T rows)."""
    model, inputs = hosts(host)
    cfg = model.config
    counted, by_module = _count(lambda: model(**inputs))
    if host == "onevision":
        views = onevision_views(model, inputs)
        per_view = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        vision = cost.VisionCall(batch=views, tokens_per_layer=[per_view] * cfg.vision_config.num_hidden_layers)
        rows = views * per_view
    else:
        vision = qwen_vision_call(model, inputs["image_grid_thw"])
        rows = int(inputs["pixel_values"].shape[0])
    batch, t = inputs["input_ids"].shape
    layers = cfg.text_config.num_hidden_layers
    schedule = cost.Schedule(vision=[vision], projector_rows=rows,
                             llm=[cost.LLMCall(batch=batch, q_per_layer=[t] * layers, kv_per_layer=[t] * layers,
                                               lm_head_rows=t)])
    report = cost.schedule_cost(cfg, schedule)
    assert report.total == pytest.approx(counted, rel=0.01)
    # the decoder alone: FlopCounterMode's language-model share against the report's
    decoder = _module_flops(by_module, ".language_model")
    assert report.llm == pytest.approx(decoder, rel=0.01)
    assert report.lm_head == _module_flops(by_module, ".lm_head")


def test_qwen3_text_reads_explicit_head_dim():
    from transformers import Qwen3VLConfig

    cfg = Qwen3VLConfig(text_config=dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=48,
                                         intermediate_size=256, num_hidden_layers=2, vocab_size=100))
    flops = cost.llm_layer_flops(cfg, 10)
    d, dq, dkv, m = 128, 4 * 48, 2 * 48, 256
    assert flops == 4 * 10 * d * dq + 4 * 10 * d * dkv + 4 * 10 * 10 * dq + 2 * 3 * 10 * d * m


def test_packed_tower_without_groups_is_equal_images():
    from transformers import Qwen2VLConfig

    vc = Qwen2VLConfig(vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2)).vision_config
    implicit = cost.vision_flops(vc, cost.VisionCall(batch=2, tokens_per_layer=[96, 96]))
    explicit = cost.vision_flops(vc, cost.VisionCall(batch=2, tokens_per_layer=[96, 96], groups=[[48, 48], [48, 48]]))
    assert implicit == explicit
    # unequal images attend less than one 96-token sequence, more than two equal halves
    unequal = cost.vision_flops(vc, cost.VisionCall(batch=2, tokens_per_layer=[96, 96], groups=[[32, 64], [32, 64]]))
    assert unequal - explicit == 2 * 4 * 64 * (32**2 + 64**2 - 2 * 48**2)


def test_packed_tower_errors_name_the_numbers():
    from transformers import Qwen2_5_VLConfig

    vc = Qwen2_5_VLConfig(vision_config=dict(depth=4, hidden_size=64, out_hidden_size=128, intermediate_size=128,
                                             num_heads=4, fullatt_block_indexes=[1, 3])).vision_config
    with pytest.raises(ValueError, match=r"blocks \[0, 2\] attend in windows"):
        cost.vision_flops(vc, cost.VisionCall(batch=1, tokens_per_layer=[64] * 4))
    with pytest.raises(ValueError, match="sums to 60 but tokens_per_layer\\[1\\] is 64"):
        cost.vision_flops(vc, cost.VisionCall(batch=1, tokens_per_layer=[64] * 2, groups=[[64], [30, 30]]))
    with pytest.raises(ValueError, match="groups has 1 entries but tokens_per_layer has 2"):
        cost.vision_flops(vc, cost.VisionCall(batch=1, tokens_per_layer=[64] * 2, groups=[[64]]))
    # a tower call in which no block ran costs nothing
    assert cost.vision_flops(vc, cost.VisionCall(batch=1, tokens_per_layer=[])) == 0.0


def test_merger_formula():
    """projector rows are ViT patch rows: 2 * rows * d * (4*d + out), = 2 * (rows/4) * (4d*4d + 4d*out)."""
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(vision_config=dict(hidden_size=64, out_hidden_size=128, intermediate_size=128))
    assert cost.projector_flops(cfg, 400) == 2 * (400 / 4) * (256 * 256 + 256 * 128)
