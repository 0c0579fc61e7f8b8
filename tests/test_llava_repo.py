"""The registry-wide contract on the original LLaVA codebase (PyPI ``llava-torch``): ``LlavaLlamaForCausalLM`` in its
LLaVA-1.5 layout and its LLaVA-1.6 AnyRes layout, and ``LlavaMistralForCausalLM`` (LLaVA-1.6-Mistral): keep-all identity, exact removal, batch vs single, and generate
with the KV cache against a no-cache reference that runs the unpatched decoder.

``.ci/run`` installs the codebase (``pip install --no-deps llava-torch==1.2.2.post1``) and sets
VLPRUNE_REQUIRE_LLAVA=1, so there these tests run or fail; elsewhere they skip when the codebase is missing.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import vlprune

if os.environ.get("VLPRUNE_REQUIRE_LLAVA") != "1":
    pytest.importorskip("llava.model.language_model.llava_llama",
                        reason="the LLaVA codebase is not installed: pip install --no-deps llava-torch==1.2.2.post1 "
                               "&& pip install -e '.[llava]'")
from llava.model import LlavaLlamaForCausalLM  # noqa: E402
import transformers  # noqa: E402

if os.environ.get("VLPRUNE_REQUIRE_LLAVA") != "1" and tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24):
    pytest.skip(f"the LLaVA codebase's generate fails on transformers {transformers.__version__} (>= 5.24); these tests "
                f"run in .ci/run's own environment with transformers 5.23", allow_module_level=True)

from conftest import METHOD_KWARGS, tiny_mqt_folder  # noqa: E402
from vlprune.methods.base import TOKEN_NEWLINE, TOKEN_PATCH  # noqa: E402
from vlprune.testing import llava_repo_inputs, synthetic_image, tiny_llava_repo  # noqa: E402

warnings.filterwarnings("ignore", message=".*CLIPImageProcessor.*")

ALL = vlprune.list_methods()
HOSTS = ("llava15", "llava16", "llava16_mistral")  # LlavaLlamaForCausalLM 1.5 / 1.6, LlavaMistralForCausalLM 1.6
PROMPTS = ["USER: <image>\nWhat is shown in this image? ASSISTANT:",
           "USER: <image>\nHow many objects are there? Describe the picture in detail. ASSISTANT:"]


@pytest.fixture(scope="module")
def repo_hosts():
    return {"llava15": tiny_llava_repo(seed=0, anyres=False), "llava16": tiny_llava_repo(seed=0, anyres=True),
            "llava16_mistral": tiny_llava_repo(seed=0, anyres=True, decoder="mistral")}


def _sizes(host, n):
    return [(336, 336), (480, 360) if host.startswith("llava16") else (336, 336)][:n]


def _inputs(repo_hosts, host, n=2, padding_side="right"):
    model, tok, ip = repo_hosts[host]
    images = [synthetic_image(s, seed=i) for i, s in enumerate(_sizes(host, n))]
    return llava_repo_inputs(model, tok, ip, images, PROMPTS[:n], padding_side=padding_side)


def _kwargs(name, host, full_budget=False):
    if name == "mqt":
        if host != "llava15":
            pytest.skip("mqt: MQT-LLaVA is a LLaVA-1.5 model")
        if full_budget:
            pytest.skip("mqt: a learned projector replaces the MLP, so no budget gives the unpatched model back")
        return {"weights": tiny_mqt_folder(), "keep": 16}  # the tiny MQT projector has 16 queries
    return dict(METHOD_KWARGS.get(name, {}))


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_apply_recognises_the_codebase_model(repo_hosts):
    from vlprune.adapters import find_adapter
    from vlprune.adapters.llava_repo import LlavaRepoAdapter

    model, _, _ = repo_hosts["llava15"]
    assert isinstance(model, LlavaLlamaForCausalLM)
    assert type(find_adapter(model)) is LlavaRepoAdapter
    inputs = _inputs(repo_hosts, "llava15")
    with vlprune.pruned(model, "random", keep=40):
        _logits(model, inputs)
        st = vlprune.stats(model)
    assert [i["kept"] for i in st["images"]] == [40, 40]
    assert [i["visual_tokens"] for i in st["images"]] == [576, 576]
    # the projector is the codebase's mlp2x_gelu (64 -> 128 -> 128) on 2 x 576 rows, counted by hand
    assert st["schedule"].projector_rows == 2 * 576
    assert st["cost"].projector == 2.0 * 2 * 576 * (64 * 128 + 128 * 128)


def test_unsupported_transformers_is_refused_with_the_reason(repo_hosts, monkeypatch):
    model, _, _ = repo_hosts["llava15"]
    for version in ("4.57.6", "5.24.0"):
        monkeypatch.setattr(transformers, "__version__", version)
        with pytest.raises(RuntimeError, match=rf"found transformers {version}.*pip install 'transformers>=5,<5\.24'"):
            vlprune.apply(model, "random", keep=40)
        assert not vlprune.is_applied(model)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ALL)
def test_full_budget_is_bit_identical(repo_hosts, host, name):
    model, _, _ = repo_hosts[host]
    inputs = _inputs(repo_hosts, host)
    ref = _logits(model, inputs)
    with vlprune.pruned(model, name, keep=10**6, **_kwargs(name, host, full_budget=True)):
        out = _logits(model, inputs)
        st = vlprune.stats(model)
    assert torch.equal(out, ref)
    n_vis = [i["visual_tokens"] for i in st["images"]]
    assert [v[0] for v in st["visual_per_layer"]] == n_vis
    assert all(len(set(v)) == 1 for v in st["visual_per_layer"])


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ALL)
def test_remove_restores_exactly(repo_hosts, host, name):
    model, _, _ = repo_hosts[host]
    inputs = _inputs(repo_hosts, host)
    ref = _logits(model, inputs)
    hooks, attrs, base_attrs = _hooks(model), set(vars(model)), set(vars(model.get_model()))
    projector = model.get_model().mm_projector
    vlprune.apply(model, name, **{"keep": 16, **_kwargs(name, host)})
    assert "prepare_inputs_labels_for_multimodal" in vars(model)  # the instance wrapper
    pruned = _logits(model, inputs)
    assert pruned.shape[1] < ref.shape[1] or not torch.equal(pruned, ref)
    vlprune.remove(model)
    assert (_hooks(model), set(vars(model)), set(vars(model.get_model()))) == (hooks, attrs, base_attrs)
    assert model.get_model().mm_projector is projector
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ALL)
def test_batch_matches_batch_of_one(repo_hosts, host, name):
    """Right padding, as the codebase pads by default (tokenizer_padding_side='right')."""
    model, _, _ = repo_hosts[host]
    batch = _inputs(repo_hosts, host, n=2)
    assert (batch["attention_mask"] == 0).any()
    with vlprune.pruned(model, name, **{"keep": 40, **_kwargs(name, host)}):
        out = _logits(model, batch)
        st = vlprune.stats(model)
        for b in range(2):
            n = int(batch["attention_mask"][b].sum())
            one = {"input_ids": batch["input_ids"][b:b + 1, :n], "attention_mask": batch["attention_mask"][b:b + 1, :n],
                   "images": batch["images"][b:b + 1], "image_sizes": batch["image_sizes"][b:b + 1]}
            single = _logits(model, one)[0]
            rows = st["tokens_per_layer"][b][-1]
            assert single.shape[0] == rows
            torch.testing.assert_close(out[b, :rows], single, rtol=1e-4, atol=1e-4)


def _generate(model, inputs, n_new):
    with torch.no_grad():
        return model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], images=inputs["images"],
                              image_sizes=inputs["image_sizes"], max_new_tokens=n_new, do_sample=False,
                              min_new_tokens=n_new)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ALL)
def test_generate_with_cache_matches_no_cache_reference(repo_hosts, host, name):
    """The reference never uses vlprune's cache logic: the unpatched decoder, without a cache, re-runs the decoder
    input that the pruned prefill built (its embeddings and RoPE positions, recorded after vlprune's hooks) plus the
    generated tokens, and masks at each layer the prompt rows that the pruned prefill no longer had there."""
    model, _, _ = repo_hosts[host]
    kw = _kwargs(name, host)
    if name == "mustdrop":
        kw["decode"] = False  # its decode-time eviction is checked in test_mustdrop_decode_stage_evicts_visual_kv
    if name in ("transprune", "mustdrop", "todre", "fastv"):
        # this reference follows each row by its position id, which only the "original" policy keeps; the
        # "contiguous" policy (renumbering inside the decoder) runs the same engine code and is checked against a
        # renumbered no-cache reference on the transformers hosts (tests/test_llm_methods.py)
        kw["rope_positions"] = "original"
    inputs = _inputs(repo_hosts, host, n=1)
    n_new = 4
    text = model.get_model()
    rec = {}

    def capture_in(mod, args, kwargs):
        if "emb" not in rec:  # the prefill
            rec["emb"] = kwargs["inputs_embeds"].detach().clone()

    def capture_layer(i):
        def hook(mod, args, kwargs):
            if i not in rec:
                rec[i] = kwargs["position_ids"].detach().clone()
        return hook

    with vlprune.pruned(model, name, **{"keep": 40, **kw}):
        handles = [text.register_forward_pre_hook(capture_in, with_kwargs=True)]
        handles += [l.register_forward_pre_hook(capture_layer(i), with_kwargs=True) for i, l in enumerate(text.layers)]
        try:
            toks = _generate(model, inputs, n_new)
        finally:
            for h in handles:
                h.remove()
    assert toks.shape == (1, n_new)
    emb, pos0 = rec["emb"], rec[0][0]
    t = emb.shape[1]
    kept = [torch.isin(pos0, rec[i][0]) for i in range(len(text.layers))]  # frame rows present at each layer
    assert bool(kept[-1][-1])  # the last prompt token always reaches the last layer
    nxt = int(pos0.max()) + 1

    def layer_mask(i):
        def pre(mod, args, kwargs):
            L = args[0].shape[1]
            keys = torch.ones(L, dtype=torch.bool)
            keys[:t] = kept[i]
            m = torch.tril(torch.ones(L, L, dtype=torch.bool)) & keys[None, :]
            m |= torch.eye(L, dtype=torch.bool)
            kwargs["attention_mask"] = m[None, None]
            return args, kwargs
        return pre

    handles = [l.register_forward_pre_hook(layer_mask(i), with_kwargs=True) for i, l in enumerate(text.layers)]
    ref = []
    try:
        with torch.no_grad():
            for j in range(n_new):
                new = text.embed_tokens(torch.tensor([ref], dtype=torch.long)) if ref else emb[:, :0]
                pos = torch.cat([pos0, nxt + torch.arange(j)])[None]
                hs = text(inputs_embeds=torch.cat([emb, new], 1), position_ids=pos, use_cache=False).last_hidden_state
                ref.append(int(model.lm_head(hs[:, -1]).argmax(-1)))
    finally:
        for h in handles:
            h.remove()
    assert toks[0].tolist() == ref


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ["random", "fastv", "hired", "transprune"])
def test_left_padded_generate_batch_matches_batch_of_one(repo_hosts, host, name):
    """Batched generation in the codebase needs left padding (config.tokenizer_padding_side='left')."""
    model, _, _ = repo_hosts[host]
    model.config.tokenizer_padding_side = "left"
    try:
        batch = _inputs(repo_hosts, host, n=2, padding_side="left")
        with vlprune.pruned(model, name, **{"keep": 40, **_kwargs(name, host)}):
            toks = _generate(model, batch, 4)
            for b in range(2):
                n = int(batch["attention_mask"][b].sum())
                one = {"input_ids": batch["input_ids"][b:b + 1, -n:], "attention_mask": batch["attention_mask"][b:b + 1, -n:],
                       "images": batch["images"][b:b + 1], "image_sizes": batch["image_sizes"][b:b + 1]}
                assert _generate(model, one, 4)[0].tolist() == toks[b].tolist()
    finally:
        model.config.tokenizer_padding_side = "right"


@pytest.mark.parametrize("host", HOSTS)
def test_layout_matches_the_codebase_packing(repo_hosts, host):
    """Every image row the codebase spliced into inputs_embeds is the projected ViT feature (crop, patch) that the
    adapter's layout names, or the codebase's image_newline where the layout says newline."""
    model, _, _ = repo_hosts[host]
    inputs = _inputs(repo_hosts, host)
    with vlprune.pruned(model, "random", keep=10**6):
        state = model._vlprune
        with torch.no_grad():
            out = model.prepare_inputs_labels_for_multimodal(inputs["input_ids"], None, inputs["attention_mask"], None,
                                                             None, inputs["images"], inputs["image_sizes"])
        mask = state.pending["image_mask"]
        call = state.image_call
        layouts = state.adapter.layouts(call["n_images"], call["image_sizes"], call["crops"])
    emb = out[4]
    views = inputs["images"] if isinstance(inputs["images"], list) else list(inputs["images"])
    views = [v if v.ndim == 4 else v[None] for v in views]
    with torch.no_grad():
        feats = model.encode_images(torch.cat(views))  # (views, 576, D): CLS dropped, so patch p is vit_index p+1
    crop0 = 0
    for b, lay in enumerate(layouts):
        rows = emb[b][mask[b]]
        assert rows.shape[0] == lay.n
        patch = lay.kind == TOKEN_PATCH
        expect = feats[crop0 + lay.crop[patch], lay.vit_index[patch] - 1]
        torch.testing.assert_close(rows[patch], expect, rtol=0, atol=0)
        newline = lay.kind == TOKEN_NEWLINE
        if host.startswith("llava16"):
            assert int(newline.sum()) > 0
            torch.testing.assert_close(rows[newline], model.get_model().image_newline.expand(int(newline.sum()), -1))
        else:
            assert int(newline.sum()) == 0
        crop0 += len(views[b])


def test_prepare_inputs_returns_what_the_codebase_returns(repo_hosts):
    """The wrapper is invisible to callers: labels, a missing attention mask and position ids come back as the
    unwrapped method gives them."""
    from llava.constants import IGNORE_INDEX

    model, _, _ = repo_hosts["llava15"]
    inputs = _inputs(repo_hosts, "llava15")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    labels = labels.masked_fill(labels < 0, IGNORE_INDEX)
    for am in (inputs["attention_mask"], None):
        args = (inputs["input_ids"], None, am, None, labels, inputs["images"], inputs["image_sizes"])
        with torch.no_grad():
            ref = model.prepare_inputs_labels_for_multimodal(*args)
            with vlprune.pruned(model, "random", keep=40):
                got = model.prepare_inputs_labels_for_multimodal(*args)
        for r, g in zip(ref, got):
            assert (r is None) == (g is None)
            if r is not None:
                assert torch.equal(r, g)


@pytest.mark.parametrize("host", HOSTS)
def test_mustdrop_decode_stage_evicts_visual_kv(repo_hosts, host):
    model, _, _ = repo_hosts[host]
    inputs = _inputs(repo_hosts, host, n=1)
    with vlprune.pruned(model, "mustdrop", keep=40, merging=False):
        toks = _generate(model, inputs, 3)
        st = vlprune.stats(model)
    assert toks.shape == (1, 3)
    assert st["evicted"] and all(v[0] > 0 for v in st["evicted"].values())
    prefill, first = st["schedule"].llm[0], st["schedule"].llm[1]
    for layer, (n) in st["evicted"].items():  # each evicted layer decodes against its prefill cache minus what left
        assert first.kv_per_layer[layer] == prefill.kv_per_layer[layer] - n[0] + 1
    assert first.kv_per_layer[0] < prefill.kv_per_layer[0]


# ------------------------------------------------------------------------------------------------ the eval script
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "integrations", "llava", "vlprune_vqa_loader.py")


@pytest.fixture(scope="module")
def vqa_folder(tmp_path_factory):
    """A saved tiny LLaVA-1.5 checkpoint (fp16-exact weights, as load_pretrained_model loads in float16), a question
    file in the codebase's format and its images."""
    root = tmp_path_factory.mktemp("vqa")
    model, tok, ip = tiny_llava_repo(seed=0, anyres=False, folder=str(root / "clip"))
    model = model.half().float()
    ckpt = root / "llava-v1.5-tiny"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    (root / "images").mkdir()
    questions = []
    for i, q in enumerate(["What is shown in this image?", "How many objects are there?", "What color is it?"]):
        synthetic_image((336, 336), seed=i).save(root / "images" / f"{i}.png")
        questions.append({"question_id": i, "image": f"{i}.png", "text": q})
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root, model, tok, ip, questions


def _reference_answers(model, tok, ip, root, questions, method, kw, n_new):
    """Answers from the in-memory model: the codebase's vicuna_v1 prompt, greedy, built here without the script."""
    from llava.conversation import conv_templates

    out = []
    ctx = vlprune.pruned(model, method, **kw) if method != "none" else torch.no_grad()
    with ctx:
        for q in questions:
            conv = conv_templates["vicuna_v1"].copy()
            conv.append_message(conv.roles[0], "<image>\n" + q["text"])
            conv.append_message(conv.roles[1], None)
            from PIL import Image

            img = Image.open(root / "images" / q["image"]).convert("RGB")
            inp = llava_repo_inputs(model, tok, ip, [img], conv.get_prompt())
            ids = _generate(model, inp, n_new)
            out.append(tok.batch_decode(ids, skip_special_tokens=True)[0].strip())
    return out


@pytest.mark.parametrize("method, args", [("none", ""), ("random", "keep=40,seed=1"), ("hired", "keep_ratio=0.1")])
def test_vqa_loader_script_answers_as_the_model_does(vqa_folder, method, args, tmp_path):
    import subprocess
    import sys

    root, model, tok, ip, questions = vqa_folder
    answers, stats = tmp_path / "answers.jsonl", tmp_path / "stats.jsonl"
    cmd = [sys.executable, SCRIPT, "--method", method, "--method-args", args, "--device", "cpu", "--dtype", "float32",
           "--stats", str(stats), "--model-path", str(root / "llava-v1.5-tiny"), "--question-file", str(root / "q.jsonl"),
           "--image-folder", str(root / "images"), "--answers-file", str(answers), "--conv-mode", "vicuna_v1",
           "--temperature", "0", "--max_new_tokens", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert [x["question_id"] for x in rows] == [0, 1, 2]
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    kw = {}
    for part in filter(None, args.split(",")):
        k, v = part.split("=")
        kw[k] = float(v) if "." in v else int(v)
    from llava.model.builder import load_pretrained_model

    # the reference shares only the codebase's loader with the script (float16 load, then float32 as the script does)
    tok_l, model_l, ip_l, _ = load_pretrained_model(str(root / "llava-v1.5-tiny"), None, "llava-v1.5-tiny",
                                                    device_map="cpu", device="cpu")
    ref = _reference_answers(model_l.float().eval(), tok_l, ip_l, root, questions, method, kw, 5)
    assert [x["text"] for x in rows] == ref
    if method != "none":
        st = [json.loads(x) for x in stats.read_text().splitlines()]
        kept = 40 if method == "random" else 57  # HiRED on one partition keeps floor(576 * 0.1)
        assert [s["kept"] for s in st] == [[kept]] * 3 and all(s["visual_tokens"] == [576] for s in st)


def test_vqa_loader_script_rejects_a_bad_method_before_loading(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, SCRIPT, "--method", "hird", "--model-path", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "hird" in r.stderr and "hired" in r.stderr


# the official MQT-LLaVA projector (gordonhu608/MQT-LLaVA, llava/model/multimodal_projector/builder.py,
# ``Resampler``), set on ``LlavaMetaModel`` as ``self.query_abstractor``: its parameter names and shapes for
# kv_dim (vision) Dv, embed_dim (text) Dt and M queries
def _official_mqt_params(dv: int, dt: int, m: int) -> dict:
    shapes = {"pos_embed": (m, dv), "query": (m, dv), "attn.in_proj_weight": (3 * dv, dv), "attn.in_proj_bias": (3 * dv,),
              "attn.out_proj.weight": (dv, dv), "attn.out_proj.bias": (dv,), "ln_q.weight": (dv,), "ln_q.bias": (dv,),
              "ln_k.weight": (dv,), "ln_k.bias": (dv,), "ln_v.weight": (dv,), "ln_v.bias": (dv,), "proj": (dv, dt)}
    g = torch.Generator().manual_seed(7)
    return {"model.query_abstractor." + k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_mqt_converter_loads_the_codebase_layout(tmp_path, monkeypatch):
    """An MQT-LLaVA checkpoint in the layout the LLaVA codebase saves: the state dict of the codebase's own
    ``LlavaLlamaForCausalLM`` (built tiny here, not named by vlprune) plus the official projector's parameters.
    Converting into transformers' LlavaForConditionalGeneration loads every weight, none missing or unexpected,
    each into the module that holds it there; a copy of the converter's name map with any one entry broken is
    refused."""
    from safetensors.torch import save_file

    from vlprune.methods import mqt as mqt_mod
    from vlprune.testing import tiny_llava

    repo, _, _ = tiny_llava_repo(seed=0, anyres=False)
    sd = {k: v.clone() for k, v in repo.state_dict().items()}
    assert any(k.startswith("model.vision_tower.vision_tower.") for k in sd)
    official = _official_mqt_params(64, 128, 16)
    sd.update(official)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    # the same checkpoint as the codebase saves it under transformers 4.x, whose CLIPVisionModel keeps its
    # parameters under ``vision_model.`` (the released MQT-LLaVA was trained on 4.36)
    old = tmp_path / "tf4"
    old.mkdir()
    tower = "model.vision_tower.vision_tower."
    save_file({(tower + "vision_model." + k[len(tower):] if k.startswith(tower) else k): v.contiguous()
               for k, v in sd.items()}, str(old / "model.safetensors"))

    model, proc = tiny_llava(seed=5)  # other random weights: everything must come from the checkpoint
    old_model, _ = mqt_mod.convert_mqt_llava(old, tiny_llava(seed=5)[0], None, n_heads=4)
    model, proc = mqt_mod.convert_mqt_llava(tmp_path, model, proc, n_heads=4)
    a, b = model.state_dict(), old_model.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # module by module (not by the converter's names): the codebase's modules and transformers' hold the same tensors
    rm = repo.get_model()
    lm = {k: v for k, v in rm.state_dict().items() if not k.startswith(("vision_tower.", "mm_projector."))}
    got_lm = model.model.language_model.state_dict()
    assert sorted(got_lm) == sorted(lm)
    assert all(torch.equal(got_lm[k], lm[k]) for k in lm)
    got_vt, vt = model.model.vision_tower.state_dict(), rm.vision_tower.vision_tower.state_dict()
    assert sorted(got_vt) == sorted(vt) and all(torch.equal(got_vt[k], vt[k]) for k in vt)
    assert torch.equal(model.lm_head.weight, repo.lm_head.weight)
    got_q = model.model.multi_modal_projector.mqt.state_dict()
    assert sorted("model.query_abstractor." + k for k in got_q) == sorted(official)
    assert all(torch.equal(got_q[k].float(), official["model.query_abstractor." + k]) for k in got_q)

    for i, (src, dst) in enumerate(mqt_mod._NAME_MAP):
        variants = [(src[:-1] + "_x.", dst)] + ([] if dst is None else [(src, dst[:-1] + "_x.")])
        for entry in variants:
            broken = list(mqt_mod._NAME_MAP)
            broken[i] = entry
            monkeypatch.setattr(mqt_mod, "_NAME_MAP", tuple(broken))
            refused = 0
            for folder in (tmp_path, old):
                try:
                    mqt_mod.convert_mqt_llava(folder, tiny_llava(seed=5)[0], None, n_heads=4)
                except ValueError:
                    refused += 1
            assert refused, f"a name map with {entry} in place of {(src, dst)} was accepted"
    monkeypatch.undo()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the codebase's own entry (llava.eval.model_vqa_loader) "
                    "moves inputs to 'cuda' in float16; it runs on a GPU machine")
def test_vqa_loader_script_runs_the_codebase_entry_on_gpu(vqa_folder, tmp_path):
    import subprocess
    import sys

    root, *_ = vqa_folder
    base = ["--model-path", str(root / "llava-v1.5-tiny"), "--question-file", str(root / "q.jsonl"),
            "--image-folder", str(root / "images"), "--conv-mode", "vicuna_v1", "--temperature", "0",
            "--max_new_tokens", "5"]
    texts = {}
    for mode in ("entry", "loop"):
        ans = tmp_path / f"{mode}.jsonl"
        extra = ["--entry", "llava.eval.model_vqa_loader"] if mode == "entry" else ["--device", "cuda", "--dtype", "float16"]
        r = subprocess.run([sys.executable, SCRIPT, "--method", "random", "--method-args", "keep=40", *extra, *base,
                            "--answers-file", str(ans)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        texts[mode] = [json.loads(x)["text"] for x in ans.read_text().splitlines()]
    assert texts["entry"] == texts["loop"]
