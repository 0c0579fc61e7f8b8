"""Cost model: FLOPs, MACs and KV-cache bytes that follow the real per-layer token schedule.

Everything here is arithmetic over config objects (a transformers config, or anything with the same
attributes). FLOPs = 2 x MACs of the matrix multiplications; elementwise ops, norms, softmax and RoPE are
not counted. This is what ``torch.utils.flop_counter.FlopCounterMode`` counts, once the CPU SDPA kernel
has a formula (``register_sdpa_cpu_flop_formula``). Attention is counted as the full q x kv product
(no causal halving), as SDPA kernels and FlopCounterMode count it.

Notation: d = hidden size, d_q = heads * head_dim, d_kv = kv_heads * head_dim, m = MLP intermediate size,
V = vocabulary size, n / q / kv = token counts.

Vision towers: batched CLIP/SigLIP ViTs (LLaVA, LLaVA-NeXT, LLaVA-OneVision) and the packed Qwen2-VL /
Qwen2.5-VL / Qwen3-VL towers, whose images share one sequence and attend within the groups of ``cu_seqlens``
(``VisionCall.groups``). For the Qwen hosts the patch merger is the projector (``projector_flops``, rows = ViT
patch rows); Qwen3-VL's DeepStack mergers are part of ``vision_flops``. Decoders: Llama-style, GQA-aware, with an
explicit ``head_dim`` where the config has one (Qwen3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

__all__ = [
    "CONVENTIONS",
    "CostReport",
    "LLMCall",
    "Schedule",
    "VisionCall",
    "decode_flops",
    "equivalent_tokens",
    "kv_cache_bytes",
    "llm_layer_flops",
    "llm_prefill_flops",
    "lm_head_flops",
    "projector_flops",
    "register_sdpa_cpu_flop_formula",
    "schedule_cost",
    "vision_flops",
]

CONVENTIONS = ("flops", "macs", "paper")

# Dense decoder families whose MLP is gated (gate, up, down: 3 matrices) whatever their activation.
# Mixture-of-experts MLPs are not modelled.
_GATED_MLP_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text",
    "gemma", "gemma2", "gemma3_text", "phi3", "internlm2", "cohere", "olmo", "olmo2", "granite",
})
_GATED_ACTIVATIONS = frozenset({"silu", "swish", "swiglu", "geglu"})


# --------------------------------------------------------------------------------------------------------
# What ran (filled by the engine's hooks)
# --------------------------------------------------------------------------------------------------------
@dataclass
class VisionCall:
    """One forward of the vision tower.

    Batched towers (CLIP, SigLIP: ``(B, N, D)``): ``batch`` is the number of views in the vision batch (AnyRes:
    base + crops of every image) and ``tokens_per_layer[l]`` the sequence length per view (CLS included) entering
    encoder layer l; ``groups`` stays None.

    Packed towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: one ``(sum t*h*w, D)`` sequence for all images): ``batch`` is
    the number of images (rows of ``image_grid_thw``), ``tokens_per_layer[l]`` the packed length (all images)
    entering vision block l, and ``groups[l]`` the lengths of the attention groups block l saw, i.e.
    ``diff(cu_seqlens)`` of the ``cu_seqlens`` argument that block received: one entry per image frame in a
    full-attention block, one per window in a Qwen2.5-VL windowed block. ``sum(groups[l]) ==
    tokens_per_layer[l]``. The patch embedding is counted on ``tokens_per_layer[0]`` rows (the packed patch rows
    when nothing is dropped before block 0). Without ``groups`` a packed tower is counted as ``batch`` equal images (wrong for
    images of different sizes; refused for Qwen2.5-VL, whose windowed blocks cannot be inferred).
    """

    batch: int  # batched towers: views in the vision batch; packed towers: images
    tokens_per_layer: list[int]  # batched: length per view (incl. CLS); packed: packed length, per layer that ran
    groups: list[list[int]] | None = None  # packed towers: attention group lengths (diff(cu_seqlens)) per block


@dataclass
class LLMCall:
    """One forward of the decoder stack."""

    batch: int
    q_per_layer: list[int]  # query length each decoder layer processed (tensor length, padding included)
    kv_per_layer: list[int]  # key length each layer attended over (= q in a no-cache prefill; cache+q otherwise)
    lm_head_rows: int  # rows per sample that went through lm_head (generate: 1; forward: all)


@dataclass
class Schedule:
    """Everything one request ran: vision tower calls, projector rows, decoder calls, scoring work."""

    vision: list[VisionCall]
    projector_rows: int  # rows of the projector's input: LLaVA rows (all images, all crops); Qwen merger: ViT patch rows
    llm: list[LLMCall]  # prefill first, then each decode step / continuation
    scoring_flops: float = 0.0  # the method's own scoring work, counted by the engine (FLOPs = 2*MACs)
    visual_per_layer: list[float] = field(default_factory=list)  # mean visual tokens per sample entering each decoder layer in prefill
    projector_flops: float = 0.0  # FLOPs of a projector that is not LLaVA's MLP (counted by itself), added


@dataclass
class CostReport:
    """FLOPs (2 x MACs) per stage of one request, plus KV-cache bytes and equivalent visual tokens."""

    vision: float
    projector: float
    llm: float
    lm_head: float
    scoring: float
    total: float
    kv_bytes: float | None = None  # bytes of the cache after the last decoder call; None without decoder calls
    equivalent_tokens: float | None = None  # mean visual tokens per decoder layer in prefill; None if not recorded

    @property
    def macs(self) -> float:
        return self.total / 2

    @property
    def tflops(self) -> float:
        return self.total / 1e12

    def as_dict(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {k: (None if v is None else float(v)) for k, v in asdict(self).items()}
        out["macs"] = float(self.macs)
        out["tflops"] = float(self.tflops)
        return out


# --------------------------------------------------------------------------------------------------------
# Config readers and validation
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TextDims:
    d: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    mlp_matrices: int  # 3: gated (SwiGLU / GeGLU), 2: up + down

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim


def _text_config(config: Any) -> Any:
    sub = getattr(config, "text_config", None)
    return sub if sub is not None else config


def _vision_config(config: Any) -> Any:
    sub = getattr(config, "vision_config", None)
    return sub if sub is not None else config


def _require(config: Any, name: str, what: str) -> Any:
    value = getattr(config, name, None)
    if value is None:
        raise ValueError(
            f"{type(config).__name__} has no `{name}`; the cost model needs it for {what}. "
            f"Pass a {what} config (e.g. `model.config.text_config` / `model.config.vision_config`) "
            f"or set `{name}` on it."
        )
    return value


def _mlp_matrices(config: Any) -> int:
    """3 for a gated MLP (gate, up, down), 2 for up + down. `config.mlp_matrices`, if set, wins."""
    explicit = getattr(config, "mlp_matrices", None)
    if explicit is not None:
        if explicit not in (2, 3):
            raise ValueError(f"mlp_matrices={explicit!r} is not supported; use 2 (up, down) or 3 (gate, up, down).")
        return int(explicit)
    if getattr(config, "model_type", None) in _GATED_MLP_MODEL_TYPES:
        return 3
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    return 3 if isinstance(act, str) and act.lower() in _GATED_ACTIVATIONS else 2


def _text_dims(config: Any) -> _TextDims:
    tc = _text_config(config)
    d = int(_require(tc, "hidden_size", "language-model"))
    heads = int(_require(tc, "num_attention_heads", "language-model"))
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or d // heads
    inter = getattr(tc, "intermediate_size", None) or getattr(tc, "ffn_dim", None)
    if inter is None:
        raise ValueError(
            f"{type(tc).__name__} has neither `intermediate_size` nor `ffn_dim`; set one to the MLP width."
        )
    return _TextDims(
        d=d,
        layers=int(_require(tc, "num_hidden_layers", "language-model")),
        heads=heads,
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        inter=int(inter),
        vocab=int(getattr(tc, "vocab_size", 0) or 0),
        mlp_matrices=_mlp_matrices(tc),
    )


def _check_count(name: str, value: Any) -> float:
    if isinstance(value, bool) or (not isinstance(value, (int, float)) and not hasattr(value, "__index__")):
        raise ValueError(f"{name}={value!r} is not a number; pass a token/row count (int >= 0).")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}={value!r} is invalid; counts must be finite and >= 0 (pass the number of tokens/rows processed).")
    return v


def _check_batch(batch: Any) -> int:
    if isinstance(batch, bool) or not hasattr(batch, "__index__") or int(batch) < 1:
        raise ValueError(f"batch={batch!r} is invalid; batch must be an int >= 1 (samples in the forward).")
    return int(batch)


def _check_per_layer(name: str, values: Any, n_layers: int, exact: bool = True) -> list[float]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        raise ValueError(f"{name}={values!r} must be a list with one count per layer.")
    values = list(values)
    if exact and len(values) != n_layers:
        raise ValueError(
            f"{name} has {len(values)} entries but the model has num_hidden_layers={n_layers}; "
            f"give exactly one count per layer."
        )
    if not exact and len(values) > n_layers:
        raise ValueError(
            f"{name} has {len(values)} entries but the model has only num_hidden_layers={n_layers}; "
            f"give at most one count per layer that ran."
        )
    return [_check_count(f"{name}[{i}]", v) for i, v in enumerate(values)]


def _check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is unknown; use one of {', '.join(map(repr, CONVENTIONS))}.")
    return convention


def _bytes_per_element(dtype: Any) -> int:
    if isinstance(dtype, bool):
        raise ValueError(f"dtype={dtype!r} is invalid; pass a torch dtype or bytes per element (int >= 1).")
    if isinstance(dtype, int):
        if dtype < 1:
            raise ValueError(f"dtype={dtype!r} bytes per element is invalid; pass an int >= 1 or a torch dtype.")
        return dtype
    if isinstance(dtype, str):
        import torch

        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype name; use e.g. 'float16', 'bfloat16', 'float32'.")
        dtype = resolved
    size = getattr(dtype, "itemsize", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"dtype={dtype!r} has no element size; pass a torch dtype or bytes per element (int >= 1).")
    return size


# --------------------------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------------------------
def _layer_coeffs(dims: _TextDims) -> tuple[float, float]:
    """(a, b) with FLOPs of one decoder layer, one sample = a*q + b*q*kv."""
    a = (
        4 * dims.d * dims.d_q  # q_proj (d -> d_q) + o_proj (d_q -> d)
        + 4 * dims.d * dims.d_kv  # k_proj + v_proj (d -> d_kv), GQA-aware
        + 2 * dims.mlp_matrices * dims.d * dims.inter  # gate/up/down (or up/down)
    )
    b = 4 * dims.d_q  # QK^T (q x kv x d_q) + AV (q x kv x d_q), full q x kv
    return float(a), float(b)


def llm_layer_flops(text_config: Any, q: float, kv: float | None = None, batch: int = 1) -> float:
    """FLOPs (2 x MACs) of one Llama-style decoder layer.

    ``q`` query rows attend over ``kv`` keys (default ``kv = q``, a no-cache prefill):
    ``4*q*d*d_q + 4*q*d*d_kv + 4*q*kv*d_q + 2*k*q*d*m`` per sample, with k = 3 MLP matrices for gated
    (SwiGLU) models and 2 otherwise. GQA shrinks only the k/v projections.
    """
    dims = _text_dims(text_config)
    qv = _check_count("q", q)
    kvv = qv if kv is None else _check_count("kv", kv)
    a, b = _layer_coeffs(dims)
    return _check_batch(batch) * (a * qv + b * qv * kvv)


def _paper_layer_macs(dims: _TextDims, n: float) -> float:
    # n * (4d^2 + 2nd + k*d*m), MHA assumed (k = 3 SwiGLU: PDrop/TransPrune; k = 2: FastV)
    return n * (4 * dims.d**2 + 2 * n * dims.d + dims.mlp_matrices * dims.d * dims.inter)


def llm_prefill_flops(
    text_config: Any, tokens_per_layer: Sequence[float] | int, convention: str = "flops", batch: int = 1
) -> float:
    """Decoder-stack prefill cost with ``tokens_per_layer[l]`` tokens in layer l (no lm_head).

    Conventions:

    * ``"flops"``: 2 x MACs of every matmul, GQA-aware, full n x n attention (what FlopCounterMode counts).
    * ``"macs"``: half of ``"flops"``.
    * ``"paper"``: the MACs the token-pruning papers report (and call "FLOPs"), per layer
      ``n*(4*d**2 + 2*n*d + 3*d*m)`` for SwiGLU (PDrop, SparseVLM, TransPrune) or ``n*(4*d**2 + 2*n*d + 2*d*m)``
      for a 2-matrix MLP (FastV). MHA is assumed, as in the papers; vision tower, projector and lm_head are
      left out. LLaVA-1.5-7B at 576 tokens in all 32 layers gives 3.82e12.

    An int ``tokens_per_layer`` means the same count in every layer.
    """
    dims = _text_dims(text_config)
    _check_convention(convention)
    if not hasattr(tokens_per_layer, "__len__") and hasattr(tokens_per_layer, "__index__"):
        tokens_per_layer = [int(tokens_per_layer)] * dims.layers
    counts = _check_per_layer("tokens_per_layer", tokens_per_layer, dims.layers)
    b = _check_batch(batch)
    if convention == "paper":
        return b * sum(_paper_layer_macs(dims, n) for n in counts)
    a, c = _layer_coeffs(dims)
    flops = b * sum(a * n + c * n * n for n in counts)
    return flops / 2 if convention == "macs" else flops


def lm_head_flops(text_config: Any, rows: float, batch: int = 1) -> float:
    """FLOPs (2 x MACs) of lm_head on ``rows`` rows per sample: ``2*rows*d*V``."""
    dims = _text_dims(text_config)
    if dims.vocab < 1:
        raise ValueError(f"{type(_text_config(text_config)).__name__} has vocab_size={dims.vocab}; set vocab_size >= 1.")
    return _check_batch(batch) * 2.0 * _check_count("rows", rows) * dims.d * dims.vocab


def decode_flops(text_config: Any, prompt_kv_per_layer: Sequence[float], n_new: int, batch: int = 1) -> float:
    """FLOPs (2 x MACs) of ``n_new`` single-token decoder forwards plus lm_head on each.

    Step s (0-based) runs layer l with q = 1 and kv = ``prompt_kv_per_layer[l] + s + 1`` (the cache holds the
    prompt as kept by that layer, plus the tokens decoded so far, plus the new one).
    """
    dims = _text_dims(text_config)
    prompt = _check_per_layer("prompt_kv_per_layer", prompt_kv_per_layer, dims.layers)
    if isinstance(n_new, bool) or not hasattr(n_new, "__index__") or int(n_new) < 0:
        raise ValueError(f"n_new={n_new!r} is invalid; pass the number of decoded tokens (int >= 0).")
    n = int(n_new)
    bsz = _check_batch(batch)
    a, c = _layer_coeffs(dims)
    # sum_{s<n} (a + c*(P + s + 1)) = n*a + c*(n*P + n(n+1)/2)
    layers = sum(n * a + c * (n * p + n * (n + 1) / 2) for p in prompt)
    head = lm_head_flops(text_config, n) if n else 0.0  # one row per step
    return bsz * (layers + head)


def kv_cache_bytes(text_config: Any, kv_per_layer: Sequence[float], batch: int = 1, dtype: Any = None) -> float:
    """KV-cache size in bytes: ``2 * batch * sum(kv) * kv_heads * head_dim * bytes_per_element``.

    ``dtype`` is a torch dtype (or its name) or bytes per element; default float16 (2 bytes).
    """
    dims = _text_dims(text_config)
    kv = _check_per_layer("kv_per_layer", kv_per_layer, dims.layers)
    size = 2 if dtype is None else _bytes_per_element(dtype)
    return 2.0 * _check_batch(batch) * sum(kv) * dims.d_kv * size


def equivalent_tokens(visual_per_layer: Sequence[float]) -> float:
    """Mean visual tokens per decoder layer (SparseVLM's "equivalent tokens")."""
    if isinstance(visual_per_layer, (str, bytes)) or not hasattr(visual_per_layer, "__len__") or not len(visual_per_layer):
        raise ValueError(
            f"visual_per_layer={visual_per_layer!r} must be a non-empty list with one visual-token count per decoder layer."
        )
    counts = [_check_count(f"visual_per_layer[{i}]", v) for i, v in enumerate(list(visual_per_layer))]
    return sum(counts) / len(counts)


# --------------------------------------------------------------------------------------------------------
# Vision tower and projector
# --------------------------------------------------------------------------------------------------------
def vision_flops(vision_config: Any, call: VisionCall) -> float:
    """FLOPs (2 x MACs) of one vision-tower forward; dispatches on the vision config's ``model_type``.

    CLIP/SigLIP-style ViT (the default): patch conv ``2 * n_patches * (C*p*p) * d`` per image
    (``n_patches = (image_size/p)**2``), plus per encoder layer that ran ``8*n*d**2 + 4*n**2*d + 4*n*d*m``
    (q/k/v/o, full n x n attention, 2-matrix MLP), times the batch. A tower without CLS token (SigLIP) records
    n = n_patches; ``post_layernorm`` and pooling heads are not counted.

    Qwen2-VL, Qwen2.5-VL, Qwen3-VL (``qwen2_vl_vision``, ``qwen2_5_vl_vision``, ``qwen3_vl_vision``,
    ``qwen3_vl_moe_vision``): see ``_packed_vision_flops``. The patch merger is the projector
    (``projector_flops``), not counted here; Qwen3-VL's DeepStack mergers are.
    """
    vc = _vision_config(vision_config)
    kind = _packed_tower_kind(vc)
    if kind is not None:
        return _packed_vision_flops(vc, call, kind)
    d = int(_require(vc, "hidden_size", "vision-tower"))
    m = int(_require(vc, "intermediate_size", "vision-tower"))
    n_layers = int(_require(vc, "num_hidden_layers", "vision-tower"))
    patch = int(_require(vc, "patch_size", "vision-tower"))
    image = int(_require(vc, "image_size", "vision-tower"))
    channels = int(getattr(vc, "num_channels", 3) or 3)
    batch = _check_batch(call.batch)
    tokens = _check_per_layer("VisionCall.tokens_per_layer", call.tokens_per_layer, n_layers, exact=False)
    n_patches = (image // patch) ** 2
    conv = 2.0 * n_patches * channels * patch * patch * d
    layers = sum(8 * n * d * d + 4 * n * n * d + 4 * n * d * m for n in tokens)
    return batch * (conv + layers)


# Vision configs of the packed (cu_seqlens) towers, by model_type; the full configs' types are accepted too.
_PACKED_TOWERS = {
    "qwen2_vl_vision": "qwen2_vl", "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl_vision": "qwen2_5_vl", "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl_vision": "qwen3_vl", "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe_vision": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl",
}


def _packed_tower_kind(vc: Any) -> str | None:
    return _PACKED_TOWERS.get(getattr(vc, "model_type", None))


def _int_size(config: Any, name: str, default: int | None = None) -> int:
    value = getattr(config, name, None)
    if value is None:
        value = default
    if value is None:
        _require(config, name, "vision-tower")
    if isinstance(value, (list, tuple)):  # patch sizes may be given per axis; these towers use square patches
        value = value[0]
    return int(value)


@dataclass(frozen=True)
class _PackedDims:
    kind: str
    d: int  # ViT width
    layers: int
    inter: int  # MLP width
    mlp_matrices: int  # 2 (fc1, fc2) or 3 (Qwen2.5-VL: gate, up, down)
    patch_in: int  # C * temporal_patch * p * p, the Conv3d fan-in
    merge_unit: int  # spatial_merge_size**2 patches per merged token
    out: int  # merger output width (the LLM hidden size)
    deepstack: tuple[int, ...]  # blocks after which a DeepStack merger runs (Qwen3-VL)
    full_blocks: tuple[int, ...] | None  # Qwen2.5-VL: blocks with full attention (the others are windowed)


def _packed_dims(vc: Any, kind: str) -> _PackedDims:
    layers = _int_size(vc, "depth", getattr(vc, "num_hidden_layers", None))
    merge = _int_size(vc, "spatial_merge_size", 2)
    patch_in = (
        _int_size(vc, "in_channels", getattr(vc, "num_channels", 3))
        * _int_size(vc, "temporal_patch_size", 2)
        * _int_size(vc, "patch_size") ** 2
    )
    if kind == "qwen2_vl":  # embed_dim is the ViT width; hidden_size is the merger's output (the LLM width)
        d = _int_size(vc, "embed_dim")
        inter = int(d * float(getattr(vc, "mlp_ratio", 4)))
        return _PackedDims(kind, d, layers, inter, 2, patch_in, merge * merge, _int_size(vc, "hidden_size"), (), None)
    d = _int_size(vc, "hidden_size")
    inter = _int_size(vc, "intermediate_size")
    out = _int_size(vc, "out_hidden_size")
    if kind == "qwen2_5_vl":
        full = tuple(int(i) for i in (getattr(vc, "fullatt_block_indexes", None) or ()))
        return _PackedDims(kind, d, layers, inter, 3, patch_in, merge * merge, out, (), full)
    taps = tuple(int(i) for i in (getattr(vc, "deepstack_visual_indexes", None) or ()))
    return _PackedDims(kind, d, layers, inter, 2, patch_in, merge * merge, out, taps, None)


def _merger_flops(d: int, unit: int, out: int, rows: float) -> float:
    """A 2x2 patch merger on ``rows`` ViT patch rows: ``rows/u`` merged rows through Linear(u*d -> u*d) and
    Linear(u*d -> out), i.e. ``2 * rows * d * (u*d + out)`` (u = spatial_merge_size**2)."""
    return 2.0 * rows * d * (unit * d + out)


def _packed_groups(call: VisionCall, dims: _PackedDims, tokens: list[float]) -> list[list[float]]:
    if call.groups is None:
        windowed = dims.full_blocks is not None and any(i not in dims.full_blocks for i in range(len(tokens)))
        if windowed:
            raise ValueError(
                f"VisionCall.groups is None, but Qwen2.5-VL blocks {[i for i in range(len(tokens)) if i not in dims.full_blocks]} "
                f"attend in windows the cost model cannot infer; record groups = diff(cu_seqlens) per block."
            )
        return [[n / call.batch] * call.batch for n in tokens]  # `batch` equal images
    groups = call.groups
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__len__") or len(groups) != len(tokens):
        raise ValueError(
            f"VisionCall.groups has {len(groups) if hasattr(groups, '__len__') else groups!r} entries but "
            f"tokens_per_layer has {len(tokens)}; give one list of group lengths per block that ran."
        )
    out = []
    for i, (g, n) in enumerate(zip(groups, tokens)):
        if isinstance(g, (str, bytes)) or not hasattr(g, "__iter__"):
            raise ValueError(f"VisionCall.groups[{i}]={g!r} must be a list of attention group lengths (diff(cu_seqlens)).")
        lengths = [_check_count(f"VisionCall.groups[{i}][{j}]", v) for j, v in enumerate(list(g))]
        if sum(lengths) != n:
            raise ValueError(
                f"VisionCall.groups[{i}] sums to {sum(lengths):g} but tokens_per_layer[{i}] is {n:g}; the groups of a "
                f"block (diff(cu_seqlens)) must cover its packed sequence exactly."
            )
        out.append(lengths)
    return out


def _packed_vision_flops(vc: Any, call: VisionCall, kind: str) -> float:
    """FLOPs of a packed Qwen-VL tower forward (all images in one sequence, attention within groups).

    With d = ViT width, m = MLP width, n_l = ``tokens_per_layer[l]``, g = ``groups[l]``:

    * patch embedding, a Conv3d with kernel (temporal 2, p, p) over C = 3 channels, on the packed patch rows
      entering block 0: ``2 * n_0 * (C*2*p*p) * d``;
    * per block l that ran: fused qkv + proj ``8*n_l*d**2``, attention ``4*d*sum(g**2)`` (each image frame, or
      each Qwen2.5-VL window, attends within itself), MLP ``2*k*n_l*d*m`` with k = 2 (Qwen2-VL fc1/fc2,
      m = embed_dim * mlp_ratio; Qwen3-VL linear_fc1/fc2) or k = 3 (Qwen2.5-VL gate/up/down);
    * Qwen3-VL: the DeepStack merger after each tapped block l that ran, ``2*n_l*d*(u*d + out)`` (u = 4 patches
      per merged token, out = ``out_hidden_size``); the learned position embedding is a lookup, not counted.

    ``batch`` (images) is used only when ``groups`` is None. The final merger is the projector.
    """
    dims = _packed_dims(vc, kind)
    _check_batch(call.batch)
    tokens = _check_per_layer("VisionCall.tokens_per_layer", call.tokens_per_layer, dims.layers, exact=False)
    if not tokens:
        return 0.0
    groups = _packed_groups(call, dims, tokens)
    d = dims.d
    flops = 2.0 * tokens[0] * dims.patch_in * d
    for i, (n, g) in enumerate(zip(tokens, groups)):
        flops += 8 * n * d * d + 4 * d * sum(x * x for x in g) + 2 * dims.mlp_matrices * n * d * dims.inter
        if i in dims.deepstack:
            flops += _merger_flops(d, dims.merge_unit, dims.out, n)
    return float(flops)


def projector_flops(config: Any, rows: float) -> float:
    """FLOPs (2 x MACs) of the multimodal projector on ``rows`` rows of its input (all images, all crops).

    LLaVA's ``multi_modal_projector``: linear_1: d_v * n_feature_layers -> d_t, GELU, linear_2: d_t -> d_t, i.e.
    ``2*rows*(d_v*d_t + d_t*d_t)``. A config with ``projector_linears`` ((in, out) per Linear, e.g. the LLaVA
    codebase's ``mlp2x_gelu`` or ``linear`` mm_projector) is counted from those instead.

    Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the vision tower's ``merger`` (norm, view(-1, u*d), Linear(u*d -> u*d), GELU,
    Linear(u*d -> out)). ``rows`` are the merger's input rows, i.e. ViT patch rows (``sum t*h*w``, before merging;
    u = spatial_merge_size**2 = 4 of them make one LLM token): ``2 * rows * d * (u*d + out)`` with d the ViT width
    and out the LLM hidden size (Qwen2-VL ``vision_config.hidden_size``, the others ``out_hidden_size``).
    Qwen3-VL's DeepStack mergers are counted in ``vision_flops``.

    ``config`` is the full multimodal config (``vision_config``, ``text_config``; LLaVA: ``vision_feature_layer``).
    """
    if getattr(config, "vision_config", None) is None or getattr(config, "text_config", None) is None:
        raise ValueError(
            f"projector_flops needs the full multimodal config (with vision_config and text_config), "
            f"got {type(config).__name__}; pass `model.config`."
        )
    linears = getattr(config, "projector_linears", None)
    if linears is not None:  # a host that reports its projector's Linear layers as (in, out) pairs
        return 2.0 * _check_count("projector rows", rows) * sum(int(i) * int(o) for i, o in linears)
    kind = _packed_tower_kind(config.vision_config)
    if kind is not None:
        dims = _packed_dims(config.vision_config, kind)
        return _merger_flops(dims.d, dims.merge_unit, dims.out, _check_count("projector rows", rows))
    layer = getattr(config, "vision_feature_layer", -2)
    n_feature_layers = 1 if isinstance(layer, int) else len(layer)
    d_v = int(_require(config.vision_config, "hidden_size", "vision-tower")) * n_feature_layers
    d_t = int(_require(config.text_config, "hidden_size", "language-model"))
    return 2.0 * _check_count("projector rows", rows) * (d_v * d_t + d_t * d_t)


# --------------------------------------------------------------------------------------------------------
# A whole request
# --------------------------------------------------------------------------------------------------------
def _llm_call_flops(config: Any, call: LLMCall, index: int) -> tuple[float, float]:
    dims = _text_dims(config)
    q = _check_per_layer(f"llm[{index}].q_per_layer", call.q_per_layer, dims.layers)
    kv = _check_per_layer(f"llm[{index}].kv_per_layer", call.kv_per_layer, dims.layers)
    batch = _check_batch(call.batch)
    a, c = _layer_coeffs(dims)
    layers = batch * sum(a * ql + c * ql * kvl for ql, kvl in zip(q, kv))
    return layers, lm_head_flops(config, call.lm_head_rows, batch)


def schedule_cost(config: Any, schedule: Schedule, kv_dtype: Any = None) -> CostReport:
    """Cost of one request from the schedule that actually ran, FLOPs = 2 x MACs.

    ``config`` is the full multimodal config (``model.config``): LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL. ``projector_rows`` are the projector's input rows (for the Qwen hosts the merger's,
    i.e. ViT patch rows, see ``projector_flops``). ``kv_bytes`` is the cache left by the last decoder
    call, in ``kv_dtype`` (default: the text config's ``dtype`` if set, else float16).
    """
    text = _text_config(config)
    vision = sum(vision_flops(_vision_config(config), call) for call in schedule.vision)
    projector = projector_flops(config, schedule.projector_rows) if schedule.projector_rows else 0.0
    projector += schedule.projector_flops
    llm = lm_head = 0.0
    for i, call in enumerate(schedule.llm):
        layers, head = _llm_call_flops(text, call, i)
        llm += layers
        lm_head += head
    scoring = _check_count("scoring_flops", schedule.scoring_flops)
    kv_bytes = None
    if schedule.llm:
        last = schedule.llm[-1]
        dtype = kv_dtype if kv_dtype is not None else getattr(text, "dtype", None)
        kv_bytes = kv_cache_bytes(text, last.kv_per_layer, last.batch, dtype)
    eq = equivalent_tokens(schedule.visual_per_layer) if schedule.visual_per_layer else None
    return CostReport(
        vision=float(vision),
        projector=float(projector),
        llm=float(llm),
        lm_head=float(lm_head),
        scoring=scoring,
        total=float(vision + projector + llm + lm_head + scoring),
        kv_bytes=kv_bytes,
        equivalent_tokens=eq,
    )


# --------------------------------------------------------------------------------------------------------
# FlopCounterMode support
# --------------------------------------------------------------------------------------------------------
def register_sdpa_cpu_flop_formula() -> bool:
    """Give ``aten._scaled_dot_product_flash_attention_for_cpu`` a FlopCounterMode formula.

    Without it FlopCounterMode counts no attention for SDPA on CPU. The formula is the one torch uses for
    the CUDA SDPA kernels: ``2*b*h*sq*sk*dq + 2*b*h*sq*sk*dv`` (full sq x sk, GQA-aware). Safe to call
    repeatedly; returns True if this call registered it. Call it before constructing ``FlopCounterMode``.
    """
    import torch
    from torch.utils import flop_counter as fc

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in fc.flop_registry:
        return False

    @fc.register_flop_formula(op)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    return True
