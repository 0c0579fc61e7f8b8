"""vlprune on bare vision towers: timm's and open_clip's VisionTransformer (vlprune/adapters/vision_towers.py).

Every expectation comes from an independent reference: the unpatched tower's own outputs, its attention computed
eagerly by the library itself (timm / open_clip with the fused kernel switched off, torch's MultiheadAttention with
need_weights=True) on a copy, and a by-hand window merge run through the tower's own blocks.
Towers are tiny, built from configs with random weights on the CPU (96x96 input, 16px patches: a 6x6 grid).
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

_REASON = ("timm needs torchvision, which cannot be installed beside the CPU torch 2.13.0 build; these tests run in "
           ".venv-vision (see .ci/run)")
timm = pytest.importorskip("timm", reason=_REASON)

import vlprune  # noqa: E402
from vlprune.adapters import vision_towers  # noqa: E402,F401  (registers the tower adapters)
from vlprune.adapters.base import find_adapter  # noqa: E402

torch.set_num_threads(2)

H = W = 6  # patch grid
N = H * W
TIMM_KINDS = ("timm", "timm_reg_qknorm", "timm_create")
# open_clip's scaled_cosine_attn tower cannot run unpatched in open_clip 3.3.0 (its Attention calls torch.bmm on
# 4-D q/k), so it is not among the kinds
OC_KINDS = ("openclip", "openclip_qknorm")
KINDS = TIMM_KINDS + OC_KINDS
# methods that run on a tower with a budget of K patch tokens (the decoder stages of todre are switched off)
SELECT = {
    "random": {},
    "pool": {},
    "cls_attn": {},
    "hired": {},
    "globalcom2": {},
    "todre": {"stage2": False},
}


def _open_clip():
    return pytest.importorskip("open_clip", reason=_REASON.replace("timm needs", "open_clip needs"))


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind.startswith("timm"):
        from timm.models.vision_transformer import VisionTransformer

        if kind == "timm_create":  # through timm's factory, as a user would (no download: pretrained=False)
            m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96, num_classes=0)
        else:
            m = VisionTransformer(img_size=96, patch_size=16, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                                  num_classes=0, reg_tokens=2 if kind == "timm_reg_qknorm" else 0,
                                  qk_norm=kind == "timm_reg_qknorm")
        with torch.no_grad():  # timm starts the CLS token near zero; give it a real embedding
            m.cls_token.normal_(std=0.5)
        return m.eval()
    _open_clip()
    from open_clip.transformer import VisionTransformer

    m = VisionTransformer(image_size=96, patch_size=16, width=64, layers=4, heads=4, mlp_ratio=2.0, output_dim=32,
                          output_tokens=True, qk_norm=kind == "openclip_qknorm")
    return m.eval()


def prefix_of(kind: str, tower) -> int:
    return int(tower.num_prefix_tokens) if kind.startswith("timm") else 1


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 96, 96, generator=g)


def run(kind: str, tower, x):
    """(head, tokens): timm: (the model's pooled output, forward_features' whole sequence);
    open_clip: (pooled, the patch tokens it returns with output_tokens=True, CLS excluded)."""
    with torch.no_grad():
        if kind.startswith("timm"):
            return tower(x), tower.forward_features(x)
        pooled, tokens = tower(x)
        return pooled, tokens


def patch_rows(kind: str, tower, tokens):
    """The patch-token part of ``run``'s tokens."""
    return tokens[:, prefix_of(kind, tower):] if kind.startswith("timm") else tokens


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {}))
               + len(getattr(m, "_forward_pre_hooks_with_kwargs", {})) for m in model.modules())


def blocks(kind: str, tower):
    return list(tower.blocks) if kind.startswith("timm") else list(tower.transformer.resblocks)


def _open_clip_attention_probs(attn, x) -> torch.Tensor:
    """open_clip's Attention written out eagerly (its own eager branch fails on 4-D q/k in open_clip 3.3.0):
    x (B, S, D) -> (B, H, S, S) softmax probabilities, with its qk-norm layers."""
    b, s, d = x.shape
    q, k, _ = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = attn.ln_q(q.reshape(b, s, attn.num_heads, -1).transpose(1, 2))
    k = attn.ln_k(k.reshape(b, s, attn.num_heads, -1).transpose(1, 2))
    return torch.softmax((q * attn.scale) @ k.transpose(-1, -2), dim=-1)


def eager_cls_probs(kind: str, tower, x) -> dict:
    """Softmax attention of each block, CLS row, computed eagerly on a copy: {layer: (B, H, S)}. timm: its own
    eager branch (fused_attn off); nn.MultiheadAttention: torch's need_weights=True; open_clip's Attention: by
    hand from its in_proj weights and norms."""
    ref = copy.deepcopy(tower)
    probs, inputs, handles = {}, {}, []
    for i, blk in enumerate(blocks(kind, ref)):
        attn = blk.attn
        if hasattr(attn, "fused_attn"):
            attn.fused_attn = False  # timm: the eager branch
            handles.append(attn.attn_drop.register_forward_hook(
                lambda mod, args, out, i=i: probs.__setitem__(i, args[0][:, :, 0].detach().clone())))
        else:
            handles.append(attn.register_forward_pre_hook(
                lambda mod, args, i=i: inputs.__setitem__(i, args[0])))
    run(kind, ref, x)
    with torch.no_grad():
        for i, xin in inputs.items():
            attn = blocks(kind, ref)[i].attn
            if isinstance(attn, torch.nn.MultiheadAttention):
                _, w = attn(xin, xin, xin, need_weights=True, average_attn_weights=False)  # (B, H, S, S)
            else:
                w = _open_clip_attention_probs(attn, xin)
            probs[i] = w[:, :, 0]
    for h in handles:
        h.remove()
    return probs


def block0_output(kind: str, tower, x):
    out = {}
    h = blocks(kind, tower)[0].register_forward_hook(lambda mod, args, o: out.__setitem__("x", o))
    run(kind, tower, x)
    h.remove()
    return out["x"]


def window_sims(x: torch.Tensor, p: int) -> torch.Tensor:
    """Mean cosine similarity over the distinct pairs of each 3x3 window of one image's patch grid, written out
    pair by pair in float64. x: (S, D). Returns (2, 2) for the 6x6 grid."""
    g = x[p:].double().reshape(H, W, -1)
    out = torch.zeros(H // 3, W // 3, dtype=torch.float64)
    for a in range(H // 3):
        for b in range(W // 3):
            toks = [g[a * 3 + r, b * 3 + c] for r in range(3) for c in range(3)]
            sims = [F.cosine_similarity(toks[i], toks[j], dim=0) for i in range(9) for j in range(9) if i != j]
            out[a, b] = torch.stack(sims).mean()
    return out


def merged_reference(kind: str, tower, x0: torch.Tensor, merged: list) -> torch.Tensor:
    """The tower's later blocks and final norm run by hand on one image's block-0 output x0 (S, D) with the given
    3x3 windows averaged into their bottom-right token's place. Returns the patch tokens (N', D)."""
    p = prefix_of(kind, tower)
    g = x0[p:].reshape(H, W, -1)
    drop = set()
    rows = []
    rep_of = {}
    for a, b in merged:
        cells = [(a * 3 + r, b * 3 + c) for r in range(3) for c in range(3)]
        rep_of[cells[-1]] = torch.stack([g[i, j] for i, j in cells]).float().mean(0).to(x0.dtype)
        drop.update(cells[:-1])
    for i in range(H):
        for j in range(W):
            if (i, j) in drop:
                continue
            rows.append(rep_of.get((i, j), g[i, j]))
    seq = torch.cat([x0[:p], torch.stack(rows)], 0)[None]  # (1, S', D)
    with torch.no_grad():
        for blk in blocks(kind, tower)[1:]:
            seq = blk(seq)
        seq = tower.norm(seq) if kind.startswith("timm") else tower.ln_post(seq)
    return seq[0, p:]


@pytest.fixture(scope="module")
def towers():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = build(kind)
        return cache[kind]

    return get


# --------------------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("kind", KINDS)
def test_full_budget_is_bit_identical_and_remove_restores(kind, towers):
    tower = towers(kind)
    x = images()
    head0, tok0 = run(kind, tower, x)
    hooks0 = hook_count(tower)
    attrs0 = {id(m): set(vars(m)) for m in tower.modules()}
    assert isinstance(find_adapter(tower), (vision_towers.TimmViTAdapter, vision_towers.OpenClipViTAdapter))
    methods = [(n, dict(kw, keep=N)) for n, kw in SELECT.items()]
    methods.append(("mustdrop", {"prefill": False, "decode": False, "threshold": 1.0}))  # no window reaches 1.0
    for name, kw in methods:
        vlprune.apply(tower, name, **kw)
        assert hook_count(tower) > hooks0
        head, tok = run(kind, tower, x)
        assert torch.equal(head, head0), name
        assert torch.equal(tok, tok0), name
        st = vlprune.stats(tower)
        assert [i["kept"] for i in st["images"]] == [N, N], name
        assert [i["visual_tokens"] for i in st["images"]] == [N, N]
    # a second apply replaces the first, then remove takes everything off
    vlprune.apply(tower, "cls_attn", keep=5)
    n_hooks = hook_count(tower)
    vlprune.apply(tower, "cls_attn", keep=5)
    assert hook_count(tower) == n_hooks
    run(kind, tower, x)
    vlprune.remove(tower)
    assert hook_count(tower) == hooks0
    assert not hasattr(tower, "_vlprune")
    assert {id(m): set(vars(m)) for m in tower.modules()} == attrs0
    head, tok = run(kind, tower, x)
    assert torch.equal(head, head0) and torch.equal(tok, tok0)


# --------------------------------------------------------------------------------------------------------- VISION


@pytest.mark.parametrize("kind", KINDS)
def test_cls_rows_equal_library_eager_attention(kind, towers):
    tower = towers(kind)
    x = images()
    nv = len(blocks(kind, tower))
    ref = eager_cls_probs(kind, tower, x)
    # hired reads two layers (allocation and selection); a full budget keeps the output unchanged
    vlprune.apply(tower, "hired", keep=N, allocation_layer=0, selection_layer=nv - 2)
    try:
        run(kind, tower, x)
        logits = tower._vlprune.vision_logits
        assert sorted(logits) == [0, nv - 2]
        for layer in (0, nv - 2):
            got = torch.softmax(logits[layer], dim=-1)  # (B, H, S)
            assert got.shape == ref[layer].shape
            torch.testing.assert_close(got, ref[layer].float(), atol=2e-5, rtol=1e-4)
    finally:
        vlprune.remove(tower)


# --------------------------------------------------------------------------------------------------------- PRE_LLM


def _ref_scores(kind, tower, x, name):
    """Per image (N,) the score a CLS-attention method ranks patches by, from the eager reference of the last
    layer: mean over heads of the probabilities, or for globalcom2 (pre-softmax logits, head mean) of their logs,
    which differ from the logits by one constant per head."""
    p = prefix_of(kind, tower)
    probs = eager_cls_probs(kind, tower, x)[len(blocks(kind, tower)) - 1].double()  # (B, H, S)
    if name == "globalcom2":
        return probs.log().mean(1)[:, p:]
    return probs.mean(1)[:, p:]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["cls_attn", "hired", "globalcom2", "random", "todre"])
def test_select_keeps_exactly_the_picked_rows(kind, name, towers):
    tower = towers(kind)
    x = images()
    k = 8
    head0, tok0 = run(kind, tower, x)
    vlprune.apply(tower, name, keep=k, **SELECT[name])
    try:
        head, tok = run(kind, tower, x)
        st = vlprune.stats(tower)
    finally:
        vlprune.remove(tower)
    p = prefix_of(kind, tower)
    assert torch.equal(head, head0)  # the CLS-pooled feature does not depend on which patches are emitted
    kept = [i["kept_indices"] for i in st["images"]]
    for b in range(2):
        idx = kept[b]
        assert idx.numel() == k and bool((idx[1:] > idx[:-1]).all())
        # the emitted rows are the unpatched tower's rows at those indices, prefix first
        assert torch.equal(patch_rows(kind, tower, tok)[b], patch_rows(kind, tower, tok0)[b, idx])
        if kind.startswith("timm"):
            assert torch.equal(tok[b, :p], tok0[b, :p])
    assert tok.shape[1] == (p + k if kind.startswith("timm") else k)
    if name in ("cls_attn", "hired", "globalcom2"):
        scores = _ref_scores(kind, tower, x, name)
        for b in range(2):
            chosen = torch.zeros(N, dtype=torch.bool)
            chosen[kept[b]] = True
            # the top-k set of the reference scores (tolerant only to near-ties between SDPA and eager arithmetic)
            assert float(scores[b][chosen].min()) >= float(scores[b][~chosen].max()) - 1e-6
    assert st["schedule"].llm == [] and st["cost"] is None
    assert st["schedule"].vision[-1].tokens_per_layer == [p + N] * len(blocks(kind, tower))


@pytest.mark.parametrize("kind", ["timm", "openclip"])
def test_pool_emits_grid_averages(kind, towers):
    tower = towers(kind)
    x = images()
    _, tok0 = run(kind, tower, x)
    vlprune.apply(tower, "pool", keep=9)
    try:
        _, tok = run(kind, tower, x)
    finally:
        vlprune.remove(tower)
    grid = patch_rows(kind, tower, tok0).reshape(2, H, W, -1).permute(0, 3, 1, 2)
    ref = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (B, 9, D): 2x2 cells of the 6x6 grid
    torch.testing.assert_close(patch_rows(kind, tower, tok), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["cls_attn", "hired", "globalcom2", "random", "pool", "todre"])
def test_batch_equals_each_image_alone(kind, name, towers):
    tower = towers(kind)
    x = images()
    vlprune.apply(tower, name, keep=8, **SELECT[name])
    try:
        _, tok = run(kind, tower, x)
        kept = [i["kept_indices"] for i in vlprune.stats(tower)["images"]]
        for b in range(2):
            _, alone = run(kind, tower, x[b: b + 1])
            assert torch.equal(vlprune.stats(tower)["images"][0]["kept_indices"], kept[b])
            torch.testing.assert_close(tok[b], alone[0], atol=1e-5, rtol=1e-5)
    finally:
        vlprune.remove(tower)


# --------------------------------------------------------------------------------------------------------- merging


def _merge_setup(kind, tower):
    """Two images whose block-0 outputs have different best 3x3 windows, and a threshold between them, so that
    exactly the windows above it merge (one image merges more than the other)."""
    x = images()
    x[0, :, :48, :48] = 0.3  # a flat corner: the first image's top-left window is more uniform
    p = prefix_of(kind, tower)
    x0 = block0_output(kind, tower, x)
    sims = [window_sims(x0[b], p) for b in range(2)]
    flat = torch.cat([s.reshape(-1) for s in sims]).sort().values
    # midway between the two most similar windows overall: exactly one window merges
    thr = float((flat[-1] + flat[-2]) / 2)
    merged = [[(a, c) for a in range(2) for c in range(2) if float(sims[b][a, c]) >= thr] for b in range(2)]
    return x, x0, thr, merged


@pytest.mark.parametrize("kind", KINDS)
def test_mustdrop_vision_merge_counts_and_values(kind, towers):
    tower = towers(kind)
    p = prefix_of(kind, tower)
    nv = len(blocks(kind, tower))
    x, x0, thr, merged = _merge_setup(kind, tower)
    counts = [N - 8 * len(m) for m in merged]
    assert sorted(counts) == [N - 8, N]  # one image merges one window, the other none
    refs = [merged_reference(kind, tower, x0[b], merged[b]) for b in range(2)]  # before any hook is on the tower
    vlprune.apply(tower, "mustdrop", prefill=False, decode=False, threshold=thr)
    try:
        _, tok = run(kind, tower, x)
        st = vlprune.stats(tower)
        # the batch: layers after the merge run on the longer image's length, the shorter one padded and masked
        assert st["schedule"].vision[-1].tokens_per_layer == [p + N] + [p + max(counts)] * (nv - 1)
        assert [i["kept"] for i in st["images"]] == counts
        rep = st["reports"]["tower_output"]
        assert rep["tokens"] == [p + c for c in counts] and rep["padded"] is True
        assert rep["mask"].sum(1).tolist() == [p + c for c in counts]
        rows = patch_rows(kind, tower, tok)
        for b in range(2):
            # the merged window's members point at its bottom-right token, which alone stays
            mi = st["images"][b]["merged_into"]
            for a, c in merged[b]:
                cells = [(a * 3 + r) * W + c * 3 + q for r in range(3) for q in range(3)]
                assert mi[cells[:-1]].tolist() == [cells[-1]] * 8 and int(mi[cells[-1]]) == -1
                assert not bool(torch.isin(torch.tensor(cells[:-1]), st["images"][b]["kept_indices"]).any())
            # values: the later blocks run by hand on the hand-merged sequence
            torch.testing.assert_close(rows[b, : counts[b]], refs[b], atol=2e-5, rtol=1e-4)
            assert bool((rows[b, counts[b]:] == 0).all())  # padding rows
            # each image alone gives the same tokens and a schedule of its own length
            _, alone = run(kind, tower, x[b: b + 1])
            s1 = vlprune.stats(tower)
            assert s1["schedule"].vision[-1].tokens_per_layer == [p + N] + [p + counts[b]] * (nv - 1)
            torch.testing.assert_close(patch_rows(kind, tower, alone)[0], rows[b, : counts[b]], atol=2e-5, rtol=1e-4)
    finally:
        vlprune.remove(tower)


# --------------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kind", ["timm", "openclip"])
@pytest.mark.parametrize("name,kw,stage", [
    ("fastv", {}, "llm_layer"),
    ("transprune", {}, "llm_layer"),
    ("mustdrop", {}, "llm_layer"),
    ("mustdrop", {"prefill": False}, "kv_cache"),
    ("todre", {}, "llm_layer"),
    ("mqt", {"keep": 4}, "projector"),
])
def test_decoder_stages_raise_a_clear_error(kind, name, kw, stage, towers):
    tower = towers(kind)
    hooks0 = hook_count(tower)
    with pytest.raises(ValueError) as e:
        vlprune.apply(tower, name, **kw)
    msg = str(e.value)
    assert msg.startswith(f"{name}:") and f"stage {stage}" in msg and "LLaVA" in msg and "Fix" in msg
    assert hook_count(tower) == hooks0 and not hasattr(tower, "_vlprune")


def test_tower_without_class_token():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(img_size=96, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=0,
                              class_token=False, global_pool="avg").eval()
    x = images()
    _, tok0 = run("timm", tower, x)
    with pytest.raises(ValueError, match="no class token"):
        vlprune.apply(tower, "cls_attn", keep=8)
    vlprune.apply(tower, "random", keep=8)
    try:
        _, tok = run("timm", tower, x)
        idx = vlprune.stats(tower)["images"][0]["kept_indices"]
    finally:
        vlprune.remove(tower)
    assert tok.shape == (2, 8, 64) and torch.equal(tok[0], tok0[0, idx])


def test_matches_imports_neither_library():
    code = ("import sys, torch\n"
            "from vlprune.adapters.vision_towers import TimmViTAdapter, OpenClipViTAdapter\n"
            "m = torch.nn.Linear(2, 2)\n"
            "assert not TimmViTAdapter.matches(m) and not OpenClipViTAdapter.matches(m)\n"
            "assert 'timm' not in sys.modules and 'open_clip' not in sys.modules, 'imported a tower library'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_timm_dynamic_image_size_reads_the_grid_of_each_call():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(img_size=96, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=0,
                              dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 96, 64)  # a 6x4 grid, not the configured 6x6
    _, tok0 = run("timm", tower, x)
    vlprune.apply(tower, "cls_attn", keep=6)
    try:
        _, tok = run("timm", tower, x)
        st = vlprune.stats(tower)
    finally:
        vlprune.remove(tower)
    assert st["images"][0]["visual_tokens"] == 24 and st["schedule"].vision[-1].tokens_per_layer == [25, 25]
    for b in range(2):
        idx = st["images"][b]["kept_indices"]
        assert torch.equal(tok[b], torch.cat([tok0[b, :1], tok0[b, 1 + idx]]))
