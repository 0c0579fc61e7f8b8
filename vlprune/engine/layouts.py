"""Builders for the image-token layouts that LLaVA-style hosts pack: where each visual token of an image comes from.

A host description's ``layouts`` picks one per image; each returns an :class:`~vlprune.methods.base.ImageLayout`.
Legend: s patches per side of one ViT view, N visual tokens of one image.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..methods.base import TOKEN_CLS, TOKEN_NEWLINE, TOKEN_PATCH, ImageLayout, Partition


def queries_layout(n_proj: int) -> ImageLayout:
    """A learned projector (MQT) emits its own number of tokens, with no patch grid behind them."""
    kind = torch.full((n_proj,), TOKEN_PATCH)
    g = int(round(n_proj ** 0.5))
    grid = (g, g) if g * g == n_proj else (-1, -1)  # MQT's queries sit on a square grid of positions
    return ImageLayout(kind=kind, crop=torch.zeros_like(kind), vit_index=torch.full((n_proj,), -1),
                       partitions=[Partition("queries", torch.arange(n_proj), grid)], n_crops=1)


def grid_layout(s: int, cls: bool, offset: int = 1) -> ImageLayout:
    """One view of s x s patches in raster order (LLaVA-1.5), preceded by the CLS token where ``cls``. ``offset``:
    the ViT sequence index of the first patch (1 behind a CLS token, 0 in a tower without one)."""
    if cls:
        kind = torch.cat([torch.tensor([TOKEN_CLS]), torch.full((s * s,), TOKEN_PATCH)])
        vit = torch.arange(s * s + 1)
        grid_tokens = torch.arange(1, s * s + 1)
    else:
        kind = torch.full((s * s,), TOKEN_PATCH)
        vit = torch.arange(offset, s * s + offset)
        grid_tokens = torch.arange(s * s)
    return ImageLayout(kind=kind, crop=torch.zeros_like(kind), vit_index=vit,
                       partitions=[Partition("image", grid_tokens, (s, s))], n_crops=1)


def single_view_layouts(n_images: int, s: int, cls: bool, projector) -> list[ImageLayout]:
    """Layouts of ``n_images`` single-view images: the projector's queries where it emits its own count of tokens
    (``projector.n_visual_tokens``), else the s x s grid. The same object repeats."""
    n_proj = getattr(projector, "n_visual_tokens", None)
    if n_proj is not None and n_proj != s * s:
        return [queries_layout(n_proj)] * n_images
    return [grid_layout(s, cls)] * n_images


def base_newline_layout(s: int) -> ImageLayout:
    """One view with ``spatial_unpad`` packing: the base grid and one newline (LLaVA-1.6 with a single view)."""
    kind = torch.cat([torch.full((s * s,), TOKEN_PATCH), torch.tensor([TOKEN_NEWLINE])])
    crop = torch.cat([torch.zeros(s * s, dtype=torch.long), torch.tensor([-1])])
    vit = torch.cat([torch.arange(1, s * s + 1), torch.tensor([-1])])
    return ImageLayout(kind=kind, crop=crop, vit_index=vit, partitions=[Partition("base", torch.arange(s * s), (s, s))],
                       n_crops=1, crop_grid=torch.full((kind.numel(), 2), -1, dtype=torch.long), tiles=None)


def anyres_layout(s: int, n_crops: int, tiles: tuple[int, int] | None,
                  unpad: Callable[[torch.Tensor], torch.Tensor], offset: int = 1) -> ImageLayout:
    """LLaVA-NeXT AnyRes packing: the base view (s x s, no newline), then the crops as one (rows*s, cols*s) grid,
    unpadded by the host's own ``unpad`` of a (C, H, W) grid, with a newline after each row; a single view (``tiles``
    None) is the base view and one newline. ``offset``: the ViT sequence index of each view's first patch (1 behind a
    CLS token, 0 in a tower without one)."""
    base_vit = torch.arange(offset, s * s + offset)
    kinds, crops, vits, grids = [torch.full((s * s,), TOKEN_PATCH)], [torch.zeros(s * s, dtype=torch.long)], [base_vit], []
    parts = [Partition("base", torch.arange(s * s), (s, s))]
    if n_crops > 1:
        nph, npw = tiles
        r = torch.arange(nph * s)[:, None].expand(nph * s, npw * s)
        c = torch.arange(npw * s)[None, :].expand(nph * s, npw * s)
        crop = 1 + (r // s) * npw + (c // s)
        vit = offset + (r % s) * s + (c % s)
        idx = torch.stack([crop, vit, r // s, c // s]).float()  # (4, H, W), unpadded exactly as the host does
        idx = unpad(idx).long()
        hh, ww = idx.shape[1:]
        full = torch.full((4, hh, ww + 1), -1, dtype=torch.long)
        full[:, :, :ww] = idx
        kind = torch.full((hh, ww + 1), TOKEN_PATCH)
        kind[:, ww] = TOKEN_NEWLINE
        kinds.append(kind.reshape(-1))
        crops.append(full[0].reshape(-1))
        vits.append(full[1].reshape(-1))
        cg = full[2:].reshape(2, -1).T
        grids.append(cg)
        pos = torch.arange(hh * (ww + 1)).reshape(hh, ww + 1)[:, :ww].reshape(-1) + s * s
        parts.append(Partition("grid", pos, (hh, ww)))
    else:  # a single view: the base image and one newline
        kinds.append(torch.tensor([TOKEN_NEWLINE]))
        crops.append(torch.tensor([-1]))
        vits.append(torch.tensor([-1]))
    kind = torch.cat(kinds)
    crop_grid = torch.full((kind.numel(), 2), -1, dtype=torch.long)
    if grids:
        crop_grid[s * s :] = grids[0]
    return ImageLayout(kind=kind, crop=torch.cat(crops), vit_index=torch.cat(vits), partitions=parts,
                       n_crops=n_crops, crop_grid=crop_grid, tiles=tiles)
