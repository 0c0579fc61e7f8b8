"""Shared fixtures: tiny LLaVA-1.5 / LLaVA-NeXT models built from configs, and independent references.

The references never use vlprune: a no-cache greedy loop on the unpatched model, with an explicit attention mask
per decoder layer (dropped tokens masked) or with hand-built ``inputs_embeds`` (tokens removed before the decoder).
"""
from __future__ import annotations

import pytest
import torch

from vlprune.testing import synthetic_image, tiny_inputs, tiny_llava, tiny_llava_next

torch.set_num_threads(2)

HOSTS = ("llava", "llava_next")
# methods that need more than a budget to be built in the contract tests (every method runs with its defaults:
# a budget at or above an image's tokens prunes nothing, MustDrop's window merge included)
# ToDRE: tau 0 never drops in stage 2
METHOD_KWARGS = {"fastv": {"k": 2}, "todre": {"tau": 0.0}}
_MQT_DIR = []


# the tiny hosts of vlprune.hosts_tiny, each built once per session and run once (transformers adds its
# output-capturing hooks to the tower on the first call), and the two image sizes their tests batch together
NEW_HOST_SIZES = [(112, 84), (168, 112)]  # (width, height)
_NEW_HOSTS: dict = {}


def new_host(name: str):
    """(model, processor) of ``vlprune.hosts_tiny.tiny_<name>(seed=0)``, shared by the test files."""
    if name not in _NEW_HOSTS:
        from vlprune import hosts_tiny

        model, proc = getattr(hosts_tiny, f"tiny_{name}")(seed=0)
        with torch.no_grad():
            model(**hosts_tiny.tiny_host_inputs(proc, [synthetic_image(NEW_HOST_SIZES[0])]))
        _NEW_HOSTS[name] = model, proc
    return _NEW_HOSTS[name]


def new_host_images():
    """One image of each of ``NEW_HOST_SIZES``, different seeds."""
    return [synthetic_image(s, seed=i) for i, s in enumerate(NEW_HOST_SIZES)]


def tiny_mqt_folder(n_queries: int = 16) -> str:
    """A seeded random MQT projector for the tiny LLaVA-1.5 (vision 64 -> text 128), saved once per session."""
    if not _MQT_DIR:
        import tempfile

        from vlprune.methods.mqt import MQTProjector, save_mqt

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mqt = MQTProjector(64, 128, n_queries=n_queries, n_heads=4)
        folder = tempfile.mkdtemp(prefix="vlprune-mqt-")
        save_mqt(mqt, folder)
        _MQT_DIR.append(folder)
    return _MQT_DIR[0]


def contract_kwargs(name: str, host: str, full_budget: bool = False) -> dict:
    """Extra kwargs a method needs in the registry-wide contract tests, or a skip with the reason."""
    if name == "mqt":
        if host != "llava":
            pytest.skip("mqt: MQT-LLaVA is a LLaVA-1.5 model; on LLaVA-NeXT apply raises (tested in test_mqt.py)")
        if full_budget:
            pytest.skip("mqt: a learned projector replaces the MLP, so no budget gives the unpatched model back")
        return {"weights": tiny_mqt_folder()}
    return dict(METHOD_KWARGS.get(name, {}))


def build_host(host: str, attn: str = "sdpa", seed: int = 0):
    return tiny_llava(seed=seed, attn=attn) if host == "llava" else tiny_llava_next(seed=seed, attn=attn)


@pytest.fixture(scope="session")
def hosts():
    return {h: build_host(h) for h in HOSTS}


def image_for(host: str, seed: int = 0, size=None):
    if size is None:
        size = (336, 336) if host == "llava" else (640, 480)
    return synthetic_image(size, seed=seed)


def inputs_for(host, processor, n=1, padding_side="left", sizes=None):
    prompts = ["USER: <image>\nWhat is shown in this image? ASSISTANT:",
               "USER: <image>\nHow many objects are there? Describe the picture in detail. ASSISTANT:"][:n]
    if sizes is None:
        sizes = [None, (480, 360) if host == "llava_next" else None][:n]
    images = [image_for(host, seed=i, size=s) for i, s in zip(range(n), sizes)]
    return tiny_inputs(processor, images, prompts, padding_side=padding_side)


def renumbered(model, hs, present):
    """(position_ids, (cos, sin)) when the tokens marked ``present`` (B, L) are numbered 0, 1, ... without gaps (a
    token that is not present takes its predecessor's number; it must be masked as a key)."""
    pos = (present.long().cumsum(1) - 1).clamp(min=0)
    return pos, model.model.language_model.rotary_emb(hs, pos)


def _mask_layers(model, layer_mask, from_layer, layer_present=None):
    """Pre-hooks that substitute layer_mask(L) as the attention mask of decoder layers >= from_layer and, with
    layer_present(L) -> (B, L) bool, number the present tokens 0.. without gaps there (``renumbered``)."""
    if layer_mask is None:
        return []

    def pre(mod, args, kwargs):
        kwargs["attention_mask"] = layer_mask(args[0].shape[1])
        if layer_present is not None:
            kwargs["position_ids"], kwargs["position_embeddings"] = renumbered(
                model, args[0], layer_present(args[0].shape[1]))
        return args, kwargs

    layers = model.model.language_model.layers
    return [l.register_forward_pre_hook(pre, with_kwargs=True) for i, l in enumerate(layers) if i >= from_layer]


def greedy_reference(model, inputs, n_new, layer_mask=None, from_layer=0, layer_present=None):
    """Greedy decoding without a KV cache: every step runs the whole sequence again.

    layer_mask(L) -> (B, 1, L, L) bool mask (True = attend) substituted in decoder layers >= from_layer;
    layer_present(L) -> (B, L) bool: there, the present tokens are renumbered 0.. without gaps.
    """
    ids = inputs["input_ids"]
    am = inputs.get("attention_mask", torch.ones_like(ids))
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    handles = _mask_layers(model, layer_mask, from_layer, layer_present)
    out, logits = [], []
    try:
        with torch.no_grad():
            for _ in range(n_new):
                lg = model(input_ids=ids, attention_mask=am, use_cache=False, **extra).logits[:, -1]
                nxt = lg.argmax(-1)
                out.append(nxt)
                logits.append(lg)
                ids = torch.cat([ids, nxt[:, None]], 1)
                am = torch.cat([am, torch.ones_like(nxt[:, None])], 1)
                if "mm_token_type_ids" in extra:  # Qwen-VL: new tokens are text (type 0)
                    extra["mm_token_type_ids"] = torch.cat(
                        [extra["mm_token_type_ids"], torch.zeros_like(nxt[:, None])], 1)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(out, 1), torch.stack(logits, 1)


def drop_mask(am2d_fn, dropped: list[torch.Tensor]):
    """Mask builder for greedy_reference: causal, padding masked, dropped prompt positions masked (their own rows
    keep the diagonal). am2d_fn(L) -> (B, L) 2-D mask."""
    def build(L):
        am = am2d_fn(L).bool()
        b = am.shape[0]
        m = torch.tril(torch.ones(L, L, dtype=torch.bool))[None, None].repeat(b, 1, 1, 1)
        m &= am[:, None, None, :]
        for i, d in enumerate(dropped):
            m[i, 0][:, d] = False
        eye = torch.eye(L, dtype=torch.bool)[None, None]
        dead = ~m.any(-1, keepdim=True)
        return m | (dead & eye)
    return build


def embeds_reference(model, embeds, am, n_new, layer_mask=None, from_layer=0, layer_present=None):
    """Greedy decoding without a KV cache from hand-built input embeddings (padding-aware contiguous positions).

    layer_mask(L) -> (B, 1, L, L) bool mask substituted in decoder layers >= from_layer; layer_present as in
    ``greedy_reference``."""
    emb_layer = model.get_input_embeddings()
    handles = _mask_layers(model, layer_mask, from_layer, layer_present)
    out = []
    try:
        with torch.no_grad():
            for _ in range(n_new):
                pos = (am.cumsum(-1) - 1).clamp(min=0)
                lg = model(inputs_embeds=embeds, attention_mask=am, position_ids=pos, use_cache=False).logits[:, -1]
                nxt = lg.argmax(-1)
                out.append(nxt)
                embeds = torch.cat([embeds, emb_layer(nxt)[:, None]], 1)
                am = torch.cat([am, torch.ones_like(nxt[:, None])], 1)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(out, 1)


def merged_embeddings(model, inputs):
    """The decoder's input embeddings as the host builds them (image features scattered into placeholders)."""
    with torch.no_grad():
        kw = {"pixel_values": inputs["pixel_values"]}
        if "image_sizes" in inputs:
            kw["image_sizes"] = inputs["image_sizes"]
        feats = torch.cat(list(model.model.get_image_features(**kw).pooler_output), 0)
        emb = model.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == model.config.image_token_id)[..., None]
        return emb.masked_scatter(mask, feats)
