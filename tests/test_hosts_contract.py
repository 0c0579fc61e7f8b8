"""The registry-wide contract on the tiny hosts of vlprune.hosts_tiny that vlprune supports: a budget that covers the
image is the identity, ``remove`` restores exactly, a left-padded batch of two image sizes equals one by one, cached
``generate`` and a second chat turn on the pruned cache equal a no-cache reference, the cost record matches torch's
FlopCounterMode; methods a host cannot run are refused with the reason. Then facts of each host's adapter.

A host is added to ``HOSTS`` (the name of its ``vlprune.hosts_tiny.tiny_<name>`` builder); its refused methods go in
``REFUSED``.
"""
from __future__ import annotations

import pytest
import torch

import vlprune
from conftest import contract_kwargs, tiny_mqt_folder
from conftest import new_host as built  # built once per session and run once
from conftest import new_host_images as images
from vlprune import hosts_tiny as H
from vlprune.testing import synthetic_image

HOSTS = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_HOSTS = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
              "qwen3_vl": "Qwen3VLForConditionalGeneration"}
# (host, method) -> (why the host cannot run it, a pattern its error message must match)
REFUSED = {
    ("llava_onevision", "mqt"): ("MQT-LLaVA's learned projector is trained for LLaVA-1.5's single 24 x 24 grid; "
                                 "OneVision packs AnyRes views", r"^mqt: .*AnyRes.*LlavaOnevisionForConditionalGeneration"),
    **{(h, "mqt"): ("the patch merger sits inside the vision tower; MQT replaces LLaVA's projector",
                    rf"^mqt: .*{c} has a patch merger") for h, c in QWEN_HOSTS.items()},
    **{(h, "mustdrop"): ("its default merges ViT tokens in 3 x 3 windows, which needs a tower that runs images as a "
                         "batch of equal grids; the Qwen towers pack every image into one sequence "
                         "(mustdrop with merging=False runs)",
                         rf"^mustdrop: .*{c}.*merging=False") for h, c in QWEN_HOSTS.items()},
}
# a method a host refuses by default but runs with a documented option: (host, method) -> kwargs
RUNS_WITH = {(h, "mustdrop"): {"merging": False} for h in QWEN_HOSTS}
ALL = vlprune.list_methods()
RUNS = [(h, n) for h in HOSTS for n in ALL if (h, n) not in REFUSED or (h, n) in RUNS_WITH]
N_NEW = 3
KEEP = 16


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs, n=N_NEW, **kw):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    seqs = out.sequences if hasattr(out, "sequences") else out
    return seqs[:, inputs["input_ids"].shape[1]:], out


def _kwargs(name, host, full_budget=False, reference=False):
    kw = dict(contract_kwargs(name, host, full_budget), **RUNS_WITH.get((host, name), {}))
    if reference:
        kw.pop("tau", None)  # ToDRE's stage 2 drops too
        if name == "mustdrop":
            kw["decode"] = False  # its decode-time eviction is checked against its own reference (test_mustdrop.py)
        # the reference follows each row by its position id, which the "original" policy keeps
        kw["rope_positions"] = "original"
    return kw


@pytest.mark.parametrize("host,name", RUNS)
def test_full_budget_is_bit_identical(host, name):
    model, proc = built(host)
    inputs = H.tiny_host_inputs(proc, images())
    ref = _logits(model, inputs)
    with vlprune.pruned(model, name, keep=10**6, **_kwargs(name, host, full_budget=True)):
        out = _logits(model, inputs)
        st = vlprune.stats(model)
    assert torch.equal(out, ref)
    n_vis = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert [i["visual_tokens"] for i in st["images"]] == [i["kept"] for i in st["images"]] == n_vis


@pytest.mark.parametrize("host,name", RUNS)
def test_remove_restores_exactly(host, name):
    model, proc = built(host)
    inputs = H.tiny_host_inputs(proc, images())
    ref = _logits(model, inputs)
    hooks, modules = _hook_count(model), {n: id(m) for n, m in model.named_modules()}
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    vlprune.apply(model, name, keep=KEEP, **_kwargs(name, host))
    pruned = _logits(model, inputs)
    assert pruned.shape[1] < ref.shape[1] or not torch.equal(pruned, ref)
    vlprune.remove(model)
    assert not vlprune.is_applied(model) and _hook_count(model) == hooks
    assert {n: id(m) for n, m in model.named_modules()} == modules
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize("host,name", RUNS)
def test_left_padded_batch_equals_one_by_one(host, name):
    model, proc = built(host)
    batch = H.tiny_host_inputs(proc, images(), padding_side="left")
    assert (batch["attention_mask"] == 0).any()
    with vlprune.pruned(model, name, keep=KEEP, **_kwargs(name, host)):
        toks, _ = _generate(model, batch)
        st = vlprune.stats(model)
        for b, im in enumerate(images()):
            one, _ = _generate(model, H.tiny_host_inputs(proc, [im]))
            (single,) = vlprune.stats(model)["images"]
            assert one[0].tolist() == toks[b].tolist()
            assert torch.equal(single["kept_indices"], st["images"][b]["kept_indices"])


@pytest.mark.parametrize("host,name", RUNS)
def test_text_only_passes_through(host, name):
    model, proc = built(host)
    enc = proc.tokenizer(["user How many objects are there? assistant"], return_tensors="pt")
    ref = _logits(model, enc)
    gen_ref, _ = _generate(model, enc)
    with vlprune.pruned(model, name, keep=KEEP, **_kwargs(name, host)):
        _logits(model, H.tiny_host_inputs(proc, images()[:1]))  # an image call first: nothing of it may leak
        out = _logits(model, enc)
        gen, _ = _generate(model, enc)
        st = vlprune.stats(model)
    assert st["images"] == [] and st["schedule"].vision == [] and st["schedule"].projector_rows == 0
    assert torch.equal(out, ref) and torch.equal(gen, gen_ref)


def _capture(model, rec):
    """Hooks (registered after vlprune's) recording the prefill's decoder input: inputs_embeds, position ids, and the
    position ids each decoder layer receives."""
    text = model.model.language_model

    def cap_in(mod, args, kwargs):
        if "emb" not in rec:
            rec["emb"] = kwargs["inputs_embeds"].detach().clone()
            rec["pos"] = kwargs["position_ids"].detach().clone()
            if kwargs.get("deepstack_visual_embeds") is not None:  # Qwen3-VL: the whole prompt's DeepStack rows
                rec["deepstack"] = (kwargs["visual_pos_masks"].clone(), list(kwargs["deepstack_visual_embeds"]))

    def cap_layer(i):
        def hook(mod, args, kwargs):
            rec.setdefault(i, kwargs["position_ids"].detach().clone())
        return hook

    return [text.register_forward_pre_hook(cap_in, with_kwargs=True)] + [
        layer.register_forward_pre_hook(cap_layer(i), with_kwargs=True) for i, layer in enumerate(text.layers)]


def _no_cache_reference(model, rec, forced, n_new):
    """Greedy decoding without a cache on the unpatched decoder (batch 1), end-of-sequence suppressed as
    ``_generate``'s min_new_tokens does: the recorded prefill input, then the
    embeddings of ``forced`` token ids and of the tokens generated so far, at the positions after the prompt's; each
    layer masks the prompt rows that the pruned prefill no longer had there."""
    text = model.model.language_model
    emb, pos = rec["emb"], rec["pos"]
    # the next position on every axis (1-D: (B, T); M-RoPE: (3 or 4, B, T), whose last prompt token, text, holds the
    # largest position of each axis and decoding continues from there on all axes)
    t, nxt = emb.shape[1], pos.amax(-1, keepdim=True) + 1
    kept = [torch.isin(rec[0][0], rec[i][0]) for i in range(len(text.layers))]
    extra = {}
    if "deepstack" in rec:  # the DeepStack rows of the image tokens the prefill input still has
        full, taps = rec["deepstack"]
        rank = torch.cumsum(full[0].long(), 0) - 1
        vis = rec["visual0"]  # prompt positions of the image tokens entering layer 0, ascending
        prompt = torch.cat([(~full[0]).nonzero().squeeze(1), vis]).sort().values  # the prefill input's tokens
        extra = {"mask": torch.isin(prompt, vis)[None], "embeds": [tap[rank[vis]] for tap in taps]}
    assert bool(kept[-1][-1])  # the last prompt token always reaches the last layer

    def layer_mask(i):
        def pre(mod, args, kwargs):
            n = args[0].shape[1]
            keys = torch.ones(n, dtype=torch.bool)
            keys[:t] = kept[i]
            m = (torch.tril(torch.ones(n, n, dtype=torch.bool)) & keys[None, :]) | torch.eye(n, dtype=torch.bool)
            kwargs["attention_mask"] = m[None, None]
            return args, kwargs
        return pre

    handles = [l.register_forward_pre_hook(layer_mask(i), with_kwargs=True) for i, l in enumerate(text.layers)]
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    ids, out = list(forced), []
    try:
        with torch.no_grad():
            for _ in range(n_new):
                new = model.get_input_embeddings()(torch.tensor([ids], dtype=torch.long))
                p = torch.cat([pos, nxt + torch.arange(len(ids))], -1)
                kw = {}
                if extra:
                    mask = torch.zeros(1, t + len(ids), dtype=torch.bool)
                    mask[:, :t] = extra["mask"]
                    kw = {"visual_pos_masks": mask, "deepstack_visual_embeds": extra["embeds"]}
                hs = text(inputs_embeds=torch.cat([emb, new], 1), position_ids=p, use_cache=False,
                          **kw).last_hidden_state
                logits = model.lm_head(hs[:, -1])
                logits[:, eos] = float("-inf")  # as min_new_tokens does in _generate
                out.append(int(logits.argmax(-1)))
                ids.append(out[-1])
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("host,name", RUNS)
def test_cached_generate_and_second_turn_match_no_cache_reference(host, name):
    model, proc = built(host)
    inputs = H.tiny_host_inputs(proc, images()[1:])
    rec: dict = {}
    turn2 = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "How many?"}]}],
                                     add_generation_prompt=True, tokenize=False)
    ids2 = proc.tokenizer(turn2, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with vlprune.pruned(model, name, keep=KEEP, **_kwargs(name, host, reference=True)):
        handles = _capture(model, rec)
        try:
            toks, out1 = _generate(model, inputs, return_dict_in_generate=True)
        finally:
            for h in handles:
                h.remove()
        st = vlprune.stats(model)
        rec["visual0"] = st["visual_positions"][0][0].sort().values
        cache = out1.past_key_values if getattr(out1, "past_key_values", None) is not None else out1.cache
        seq2 = torch.cat([out1.sequences, ids2], 1)
        toks2, _ = _generate(model, {"input_ids": seq2, "attention_mask": torch.ones_like(seq2)}, cache=cache)
        st2 = vlprune.stats(model)
    assert st["images"][0]["kept"] < st["images"][0]["visual_tokens"] or name in ("fastv", "transprune", "mustdrop")
    assert toks[0].tolist() == _no_cache_reference(model, rec, [], N_NEW)
    # turn 2 ran only its new tokens (the last answer token and the new turn), through every layer
    assert st2["schedule"].llm[0].q_per_layer == [ids2.shape[1] + 1] * len(model.model.language_model.layers)
    assert toks2[0].tolist() == _no_cache_reference(model, rec, toks[0].tolist() + ids2[0].tolist(), N_NEW)


@pytest.mark.parametrize("host,name", list(REFUSED))
def test_refused_methods_say_why(host, name):
    model, proc = built(host)
    hooks = _hook_count(model)
    kw = {"weights": tiny_mqt_folder()} if name == "mqt" else {}
    with pytest.raises((ValueError, TypeError), match=REFUSED[host, name][1]):
        vlprune.apply(model, name, keep=KEEP, **kw)
    assert not vlprune.is_applied(model) and _hook_count(model) == hooks


COST_CASES = [("random", {"keep": 10**6}), ("cls_attn", {"keep": KEEP}), ("fastv", {"k": 2, "keep": KEEP}),
              ("hired", {"keep_ratio": 0.2}), ("mustdrop", {"threshold": 0.5})]


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("case", COST_CASES, ids=lambda c: c[0])
def test_stats_cost_matches_flop_counter(host, case):
    from torch.utils.flop_counter import FlopCounterMode

    from vlprune import cost

    cost.register_sdpa_cpu_flop_formula()
    model, proc = built(host)
    name, kw = case
    if (host, name) in RUNS_WITH:  # without its ViT merge (the threshold's subject), MustDrop is given a count
        kw = dict(RUNS_WITH[host, name], keep=KEEP)
    inputs = H.tiny_host_inputs(proc, images())

    def count():
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
        return counter.get_total_flops()

    unpruned = count()
    with vlprune.pruned(model, name, **kw):
        counted = count()
        st = vlprune.stats(model)
        report = st["cost"]
    assert report.total == pytest.approx(counted, rel=0.01)
    n_visual = [i["visual_tokens"] for i in st["images"]]
    if kw.get("keep") == 10**6:
        assert counted == unpruned
    else:  # tokens were dropped (on these tiny shapes a method's scoring may cost more FLOPs than the drop saves)
        assert sum(map(sum, st["visual_per_layer"])) < sum(n_visual) * len(model.model.language_model.layers)
    assert (report.scoring > 0) == (name not in ("random", "pool"))


# ------------------------------------------------------------------------------------------- LLaVA-OneVision

# (width, height) -> image tokens (base view 64, crops grid with a newline per row; 448 x 448: 32 x 32 shrunk to 24)
ONEVISION_TOKENS = {(112, 84): 118, (168, 112): 168, (300, 100): 264, (448, 448): 664}


@pytest.mark.parametrize("size", list(ONEVISION_TOKENS))
def test_onevision_layout_matches_the_host_packing(size):
    """The host's own pack_image_features on views whose channels are (crop, ViT index, grid row, grid column): every
    packed token is where the layout says; a token of a shrunk grid is a bilinear mix, and the layout names the source
    patch nearest the grid position it interpolates (its rounded row and column)."""
    from vlprune.adapters import find_adapter
    from vlprune.methods.base import TOKEN_NEWLINE

    model, proc = built("llava_onevision")
    adapter = find_adapter(model)
    assert type(adapter).__name__ == "HFLlavaOnevisionAdapter" and adapter.info.cls_token is False
    inputs = H.tiny_host_inputs(proc, [synthetic_image(size)])
    (lay,) = adapter.layouts(1, inputs["image_sizes"])
    assert lay.n == ONEVISION_TOKENS[size] == int((inputs["input_ids"] == model.config.image_token_id).sum())
    s, (nph, npw) = adapter.side, lay.tiles
    p = torch.arange(s * s)
    views = [torch.stack([torch.zeros(s * s), p, -torch.ones(s * s), -torch.ones(s * s)], -1)]
    for k in range(lay.n_crops - 1):
        r, c = k // npw, k % npw
        views.append(torch.stack([torch.full((s * s,), 1.0 + k), p, r * s + p // s, c * s + p % s], -1).float())
    newline = torch.full((4,), -7.0)
    (packed,), _ = model.model.pack_image_features([torch.stack(views)], inputs["image_sizes"], image_newline=newline,
                                                   vision_aspect_ratio=model.config.vision_aspect_ratio)
    assert packed.shape[0] == lay.n
    is_nl = lay.kind == TOKEN_NEWLINE
    assert torch.equal(is_nl, (packed == newline).all(-1))
    assert torch.equal(lay.crop[:64], torch.zeros(64, dtype=torch.long)) and torch.equal(lay.vit_index[:64], p)
    rc = torch.floor(packed[64:][~is_nl[64:], 2:] + 0.5 + 1e-4).long()  # nearest grid row / column (ties: upper)
    grid = ~is_nl & (torch.arange(lay.n) >= 64)
    assert torch.equal(lay.crop[grid], 1 + (rc[:, 0] // s) * npw + rc[:, 1] // s)
    assert torch.equal(lay.vit_index[grid], (rc[:, 0] % s) * s + rc[:, 1] % s)
    assert torch.equal(lay.crop_grid[grid], rc // s)
    shrunk = size == (448, 448)
    assert lay.partitions[1].grid == ((24, 24) if shrunk else lay.partitions[1].grid)
    if not shrunk:  # no interpolation: the crop and ViT-index channels arrive exactly
        assert torch.equal(packed[grid][:, :2].long(), torch.stack([lay.crop[grid], lay.vit_index[grid]], -1))


def test_onevision_several_images_in_one_prompt():
    """A prompt with two images (each its base view and one newline) next to a prompt with one AnyRes image."""
    model, proc = built("llava_onevision")
    ims = images() + [synthetic_image((140, 140), seed=2)]
    prompts = [H.host_prompt(proc), "<|im_start|>user <image>\n<image>\nCompare.<|im_end|>\n<|im_start|>assistant\n"]
    side, proc.tokenizer.padding_side = proc.tokenizer.padding_side, "left"
    try:
        batch = proc(text=prompts, images=[[ims[0]], ims[1:]], return_tensors="pt", padding=True)
    finally:
        proc.tokenizer.padding_side = side
    assert batch["batch_num_images"].tolist() == [1, 2]
    ref = _logits(model, batch)
    with vlprune.pruned(model, "cls_attn", keep=10**6):
        assert torch.equal(_logits(model, batch), ref)
    with vlprune.pruned(model, "cls_attn", keep=KEEP):
        toks, _ = _generate(model, batch)
        st = vlprune.stats(model)
        one = proc(text=prompts[1:], images=[ims[1:]], return_tensors="pt")
        single, _ = _generate(model, one)
        st1 = vlprune.stats(model)
    assert [i["visual_tokens"] for i in st["images"]] == [118, 65, 65]
    assert [i["sample"] for i in st["images"]] == [0, 1, 1] and [i["kept"] for i in st["images"]] == [KEEP] * 3
    assert single[0].tolist() == toks[1].tolist()
    assert all(torch.equal(a["kept_indices"], b["kept_indices"]) for a, b in zip(st["images"][1:], st1["images"]))


def test_onevision_video_is_refused_while_applied():
    model, proc = built("llava_onevision")
    frames = torch.randn(1, 2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        n_tok = model.model.get_video_features(frames).pooler_output.shape[1]  # 2 frames x 4 x 4 pooled + newline
    vid = torch.full((1, n_tok), model.config.video_token_id)
    text = proc.tokenizer("user describe", return_tensors="pt")["input_ids"]
    inputs = {"input_ids": torch.cat([text, vid, text], 1), "pixel_values_videos": frames}
    ref = _logits(model, inputs)
    with vlprune.pruned(model, "random", keep=KEEP):
        with pytest.raises(ValueError, match=r"prunes image tokens; video inputs .* LlavaOnevisionForConditional"
                                             r"Generation .*vlprune\.remove\(model\)"):
            _logits(model, inputs)
        with pytest.raises(ValueError, match=r"prunes image tokens; video inputs"):
            _generate(model, inputs, n=1)
    assert torch.equal(_logits(model, inputs), ref)  # the unpatched model runs videos as before
