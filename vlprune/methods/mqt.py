"""MQT (arXiv 2405.19315): the Matryoshka Query Transformer, a learned projector that emits any number m of visual
tokens from one model.

    from vlprune.methods.mqt import MQTProjector, attach_mqt, load_mqt, convert_mqt_llava
    model, processor = convert_mqt_llava("path/to/MQT-LLaVA-checkpoint", model, processor)  # official layout
    vlprune.apply(model, "mqt", keep=16)       # 16 visual tokens per image; any m in 1..M
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_method
from .base import HostInfo, ImageSelection, ImageTokens, Method, Stage

KEY_MODES = ("position", "features")
WEIGHTS_FILE, CONFIG_FILE = "mqt_projector.safetensors", "mqt_projector.json"


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding of a grid x grid raster, (grid*grid, dim): the first half encodes
    the column, the second half the row, each as [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim / 4))."""
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4; got {dim}")
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def one(pos):
        angle = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

    return np.concatenate([one(cols), one(rows)], axis=1).astype(np.float32)


def check_m(m, n_queries: int) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= int(m) <= n_queries:
        raise ValueError(f"mqt: the number of visual tokens m must be an integer in 1..{n_queries} (the projector's "
                         f"queries); got {m!r}. Example: vlprune.apply(model, 'mqt', keep=16)")
    return int(m)


class MQTProjector(nn.Module):
    """Matryoshka Query Transformer (MQT-LLaVA's ``Resampler``), written for this project.

    M learnable queries (default 256, a 16x16 grid), a frozen 2-D sin-cos position embedding of that grid, one
    ``nn.MultiheadAttention`` over the vision width with LayerNorms (eps 1e-6) on queries, keys and values, and an
    output matrix ``proj`` (vision width -> LLM width, no bias). ``forward(x, m)`` uses the first m queries:
    Q = ln_q(query[:m] + pos[:m]), V = ln_v(x), and K = ln_k(pos interpolated bicubically to the patch grid)
    with ``keys="position"`` (the released code: keys carry no image content, so the attention pattern is the same
    for every image), or K = ln_k(x + interpolated pos) with ``keys="features"`` (a standard resampler; released
    checkpoints do not use it). The queries do not attend to each other, so the output for m is exactly the first
    m rows of the output for M. Parameter names follow the released code (query, pos_embed, attn, ln_q, ln_k,
    ln_v, proj) so that its checkpoints load without renaming.
    Shapes: x (B, N, Dv), N = h*w patches -> (B, m, Dt).
    """

    def __init__(self, vision_dim: int, text_dim: int, n_queries: int = 256, n_heads: int = 16,
                 keys: str = "position"):
        super().__init__()
        grid = int(round(math.sqrt(n_queries)))
        if grid * grid != n_queries:
            raise ValueError(f"mqt: n_queries must be a square (a grid of queries); got {n_queries}")
        if keys not in KEY_MODES:
            raise ValueError(f"mqt: keys must be one of {KEY_MODES}; got {keys!r}")
        self.vision_dim, self.text_dim, self.n_queries, self.n_heads, self.keys = vision_dim, text_dim, n_queries, n_heads, keys
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(vision_dim, grid)), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(n_queries, vision_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(vision_dim, n_heads)
        self.ln_q = nn.LayerNorm(vision_dim, eps=1e-6)
        self.ln_k = nn.LayerNorm(vision_dim, eps=1e-6)
        self.ln_v = nn.LayerNorm(vision_dim, eps=1e-6)
        self.proj = nn.Parameter(text_dim ** -0.5 * torch.randn(vision_dim, text_dim))
        nn.init.trunc_normal_(self.attn.in_proj_weight, std=0.02)
        nn.init.zeros_(self.attn.in_proj_bias)
        nn.init.trunc_normal_(self.attn.out_proj.weight, std=0.02)
        nn.init.zeros_(self.attn.out_proj.bias)

    @property
    def config(self) -> dict:
        return dict(vision_dim=self.vision_dim, text_dim=self.text_dim, n_queries=self.n_queries,
                    n_heads=self.n_heads, keys=self.keys)

    def key_positions(self, h: int, w: int) -> torch.Tensor:
        """The position grid interpolated (bicubic, align_corners=False) to h x w patches: (h*w, Dv)."""
        g = self.grid
        pos = self.pos_embed.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        return F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(h * w, -1)

    def forward(self, x: torch.Tensor, m: int | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        m = self.n_queries if m is None else check_m(m, self.n_queries)
        b, n, _ = x.shape
        if grid is None:
            side = int(round(math.sqrt(n)))
            if side * side != n:
                raise ValueError(f"mqt: {n} patch features are not a square grid; pass grid=(h, w)")
            grid = (side, side)
        dtype = self.query.dtype
        kpos = self.key_positions(*grid).to(dtype)  # (N, Dv)
        q = self.ln_q(self.query[:m] + self.pos_embed[:m].to(dtype))[:, None].expand(m, b, -1)  # (m, B, Dv)
        v = self.ln_v(x.to(dtype)).transpose(0, 1)  # (N, B, Dv)
        k = self.ln_k(kpos[None] + x.to(dtype) if self.keys == "features" else kpos[None].expand(b, -1, -1))
        out = self.attn(q, k.transpose(0, 1), v, need_weights=False)[0]  # (m, B, Dv)
        return out.transpose(0, 1) @ self.proj.to(dtype)  # (B, m, Dt)

    def flops(self, n_images: int, n_in: int, m: int) -> float:
        """FLOPs (2 x MACs) for ``n_images`` images of ``n_in`` patches and m queries."""
        d, t = self.vision_dim, self.text_dim
        macs = n_in * d * d * 2 + m * d * d * 2 + 2 * m * n_in * d + m * d * t  # k, v; q, out; attention; proj
        return 2.0 * n_images * macs


class MQTHost(nn.Module):
    """The MQT projector in a LLaVA model's ``multi_modal_projector`` slot: (B, N, Dv) -> (B, n_out, Dt) with the
    first m rows from ``mqt`` and zeros after them (``n_out`` = the placeholder tokens the processor inserts per
    image: M for an MQT-LLaVA model, the patch count when MQT replaces a 2-layer MLP)."""

    def __init__(self, mqt: MQTProjector, m: int, n_out: int | None = None):
        super().__init__()
        self.mqt = mqt
        self.m = check_m(m, mqt.n_queries)
        self.n_out = mqt.n_queries if n_out is None else int(n_out)
        if self.m > self.n_out:
            raise ValueError(f"mqt: m={self.m} is above the {self.n_out} visual-token placeholders per image")

    @property
    def n_visual_tokens(self) -> int:
        return self.n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mqt(x, self.m)  # (B, m, Dt)
        if self.m == self.n_out:
            return y
        return torch.cat([y, y.new_zeros(y.shape[0], self.n_out - self.m, y.shape[2])], 1)


# --------------------------------------------------------------------------------------------------------- I/O
def save_mqt(mqt: MQTProjector, folder) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in mqt.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(mqt.config, indent=1) + "\n")


def load_mqt(folder, dtype=None) -> MQTProjector:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}; save an MQT projector there with save_mqt")
    mqt = MQTProjector(**json.loads((folder / CONFIG_FILE).read_text()))
    mqt.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return mqt.to(dtype) if dtype is not None else mqt


def attach_mqt(model, processor, mqt: MQTProjector, m: int | None = None):
    """Make ``model`` an MQT-LLaVA model: its projector becomes ``mqt`` emitting m tokens (default M), and the
    processor inserts M placeholder tokens per image. LLaVA-1.5 (``LlavaForConditionalGeneration``) only."""
    from transformers import LlavaForConditionalGeneration

    if not isinstance(model, LlavaForConditionalGeneration) or type(model).__name__ != "LlavaForConditionalGeneration":
        raise ValueError(f"MQT-LLaVA is a LLaVA-1.5 model; got {type(model).__name__}")
    ref = next(model.parameters())
    model.model.multi_modal_projector = MQTHost(mqt.to(device=ref.device, dtype=ref.dtype), m or mqt.n_queries)
    if processor is not None:
        size = model.config.vision_config.image_size
        if size % mqt.grid:
            raise ValueError(f"mqt: the processor cannot insert {mqt.n_queries} placeholders for a {size}-px image "
                             f"(needs image_size divisible by {mqt.grid})")
        processor.patch_size = size // mqt.grid  # (size / patch)^2 = M placeholders per image
        # the processor adds num_additional_image_tokens and removes one for the "default" strategy (the CLS)
        processor.num_additional_image_tokens = 1 if processor.vision_feature_select_strategy == "default" else 0
    return model, processor


_NAME_MAP = (  # official LLaVA-codebase prefixes -> transformers 5.x LlavaForConditionalGeneration
    ("model.query_abstractor.", None),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),  # saved with transformers 4.x
    ("model.vision_tower.vision_tower.", "model.vision_tower."),  # saved with transformers 5.x (no vision_model.)
    ("model.mm_projector.", None),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)


def _read_checkpoint(path) -> dict:
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {path}")
    out = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            out.update(load_file(str(f)))
        else:  # pickled: tensors only, never arbitrary objects
            out.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return out


def convert_mqt_llava(checkpoint, model, processor=None, n_heads: int = 16, m: int | None = None):
    """Load an MQT-LLaVA checkpoint as the official code saves it (``model.query_abstractor.*``, ``model.layers.*``,
    ``lm_head.*``, optionally ``model.vision_tower.vision_tower.vision_model.*``) into a transformers
    ``LlavaForConditionalGeneration`` of the same sizes, with the MQT projector attached (``attach_mqt``).
    Safetensors are read directly; ``.bin`` files only with ``torch.load(weights_only=True)``. A checkpoint without
    vision-tower weights keeps the model's (LLaVA loads CLIP separately). Every other weight of the model must come
    from the checkpoint and every checkpoint weight must find its place: a missing or unexpected key raises
    ValueError naming it. Returns (model, processor)."""
    state = _read_checkpoint(checkpoint)
    qa = {k[len("model.query_abstractor."):]: v for k, v in state.items() if k.startswith("model.query_abstractor.")}
    if not qa:
        raise ValueError(f"{checkpoint} has no model.query_abstractor.* weights; is it an MQT-LLaVA checkpoint?")
    vision_dim, text_dim = qa["proj"].shape
    mqt = MQTProjector(int(vision_dim), int(text_dim), n_queries=int(qa["query"].shape[0]), n_heads=n_heads)
    mqt.load_state_dict({k: v.float() for k, v in qa.items()})
    target = model.state_dict()
    mapped, unused = {}, []
    for k, v in state.items():
        for src, dst in _NAME_MAP:
            if k.startswith(src):
                if dst is not None:
                    mapped[dst + k[len(src):]] = v
                break
        else:
            unused.append(k)
    if unused:
        raise ValueError(f"{len(unused)} checkpoint weights match no known MQT-LLaVA name (first: {unused[0]}); "
                         f"expected model.query_abstractor.*, model.*, lm_head.*")
    has_vision = any(k.startswith("model.vision_tower.") for k in mapped)
    missing = [k for k in target if k not in mapped and not k.startswith("model.multi_modal_projector.")
               and (has_vision or not k.startswith("model.vision_tower."))]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weights of {type(model).__name__} (first: {missing[0]})")
    bad = [k for k in mapped if k not in target]
    if bad:
        raise ValueError(f"checkpoint weights with no place in {type(model).__name__}: {bad[:3]} ...")
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)}")
    model.load_state_dict(mapped, strict=False)
    return attach_mqt(model, processor, mqt, m)


# --------------------------------------------------------------------------------------------------------- method
@register_method
@dataclass
class MQT(Method):
    """MQT: feed m visual tokens per image through a Matryoshka Query Transformer projector (Hu et al., NeurIPS
    2024, arXiv 2405.19315). ``keep`` is m (1..M, required: never taken from a training-time config).

    On an MQT-LLaVA model (one whose projector is an ``MQTHost``: ``attach_mqt``, ``convert_mqt_llava`` or the
    shipped ``evals.proxy.load("mqt")``), the model's own projector emits m tokens. On a plain LLaVA model,
    ``weights=<folder saved by save_mqt>`` puts that projector in place of the MLP while the method is applied
    (useful only with a decoder trained with it). The first m of the image's placeholder tokens carry the m
    tokens; the others are removed before the decoder. ``keep_ratio`` is not accepted: the paper counts tokens.
    Shapes: patch features (B, N, Dv) -> (B, m, Dt).
    """

    name = "mqt"
    stages = (Stage.PROJECTOR, Stage.PRE_LLM)
    paper = "arXiv 2405.19315"
    keep: int | None = None
    weights: str | None = None

    def __post_init__(self):
        if self.keep is None:
            raise ValueError("mqt needs m, the number of visual tokens per image: vlprune.apply(model, 'mqt', keep=16)")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"mqt: keep (m) must be a positive integer number of visual tokens; got {self.keep!r}")

    @property
    def positions(self) -> str:
        return "contiguous"

    def check(self, info: HostInfo) -> None:
        if info.anyres:
            host = f" ({info.host})" if info.host else ""
            raise ValueError(f"mqt: MQT-LLaVA is a LLaVA-1.5 model; AnyRes hosts{host} such as LLaVA-NeXT are not "
                             f"supported")

    def build_projector(self, model, original):
        if isinstance(original, MQTHost):
            mqt, n_out = original.mqt, original.n_out
        elif self.weights is not None:
            ref = next(model.parameters())
            mqt = load_mqt(self.weights).to(device=ref.device, dtype=ref.dtype)
            vc = getattr(model.config, "vision_config", None)
            if vc is None:  # the LLaVA codebase: the tower's own CLIP config
                vc = model.get_vision_tower().config
            side = vc.image_size // vc.patch_size
            n_out = side * side
        else:
            raise ValueError("mqt: this model has no MQT projector; load an MQT-LLaVA model (convert_mqt_llava, "
                             "attach_mqt) or pass weights=<folder with mqt_projector.safetensors>")
        if self.keep > mqt.n_queries:
            check_m(self.keep, mqt.n_queries)
        return MQTHost(mqt, self.keep, n_out)

    def select(self, image: ImageTokens) -> ImageSelection | None:
        if self.keep >= image.n:
            return None
        return ImageSelection(keep=torch.arange(self.keep))
