"""Kept visual tokens drawn on the image the model saw, and the per-method result cards (PIL + numpy only).

Geometry. LLaVA-1.5: the processor resizes the shortest edge to 336 and centre-crops 336x336; visual token t is
ViT patch ``vit_index[t] - 1`` of a 24x24 grid in raster order. LLaVA-NeXT (AnyRes): the base image is the whole
image squashed to 336x336; the crops tile the image resized into the best grid resolution (aspect kept, centred
padding), and the host drops the padding's tokens ("unpad"). Both come from ``ImageLayout`` (kind, crop,
vit_index, tiles), so the drawing follows whatever layout the adapter reports.

What is drawn. Each token gets the share of decoder layers it entered (1 = it reached the last layer, 0 = dropped
before the decoder): dropped tokens are dimmed in proportion, so a token pruned inside the decoder (FastV,
TransPrune) is half-dim and a token dropped before it (pool, HiRED) is dark. Tokens that reached the last layer
get a green border. Merging methods (``merged_into``) show each merged region tinted in its own colour with a
white outline, and the region's representative token decides its depth.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TOKEN_PATCH, TOKEN_NEWLINE, TOKEN_CLS = 0, 1, 2
KEPT_RGB = np.array([40, 230, 90], dtype=np.float32)
DARK_RGB = np.array([18, 18, 28], dtype=np.float32)
PAD_RGB = np.array([120, 120, 120], dtype=np.float32)


def font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


# ------------------------------------------------------------------------------------------------------- views
def _size_of(image_processor, key: str, default: int) -> int:
    v = getattr(image_processor, key, None)
    if isinstance(v, dict):
        return int(v.get("shortest_edge") or v.get("height") or default)
    if v is not None and hasattr(v, "get"):
        return int(v.get("shortest_edge") or v.get("height") or default)
    for attr in ("shortest_edge", "height"):
        if getattr(v, attr, None):
            return int(getattr(v, attr))
    return default


def llava_view(image: Image.Image, image_processor, side_px: int) -> Image.Image:
    """The square the LLaVA-1.5 vision tower sees: optional pad-to-square, shortest edge resized, centre crop."""
    img = image.convert("RGB")
    if getattr(image_processor, "do_pad", False):
        w, h = img.size
        s = max(w, h)
        mean = tuple(int(255 * m) for m in (getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)))
        sq = Image.new("RGB", (s, s), mean)
        sq.paste(img, ((s - w) // 2, (s - h) // 2))
        img = sq
    if getattr(image_processor, "do_resize", True):
        short = _size_of(image_processor, "size", side_px)
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    if getattr(image_processor, "do_center_crop", True):
        crop = _size_of(image_processor, "crop_size", side_px)
        w, h = img.size
        left, top = (w - crop) // 2, (h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
    if img.size != (side_px, side_px):
        img = img.resize((side_px, side_px), Image.BICUBIC)
    return img


def anyres_views(image: Image.Image, pinpoints, side_px: int):
    """LLaVA-NeXT: (base view side_px x side_px, padded hi-res canvas, (best_h, best_w))."""
    from transformers.image_processing_utils import select_best_resolution

    img = image.convert("RGB")
    w, h = img.size
    best_h, best_w = select_best_resolution((h, w), [tuple(p) for p in pinpoints])
    scale_w, scale_h = best_w / w, best_h / h
    if scale_w < scale_h:
        nw, nh = best_w, min(math.ceil(h * scale_w), best_h)
    else:
        nh, nw = best_h, min(math.ceil(w * scale_h), best_w)
    canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((best_w - nw) // 2, (best_h - nh) // 2))
    return img.resize((side_px, side_px), Image.BICUBIC), canvas, (best_h, best_w)


# ------------------------------------------------------------------------------------------------------- tokens
def token_depths(n: int, start: int, visual_positions: dict, n_layers: int, merged_into=None) -> np.ndarray:
    """(N,) share of decoder layers each of the image's N tokens entered (through its merge representative)."""
    if not visual_positions or n_layers <= 0:
        return np.ones(n, dtype=np.float32)
    keys = sorted(int(k) for k in visual_positions)
    present = np.zeros((n_layers, n), dtype=bool)
    for layer in range(n_layers):
        k = max([x for x in keys if x <= layer], default=keys[0])
        pos = visual_positions[k]
        pos = pos[0] if isinstance(pos, (list, tuple)) else pos
        idx = np.asarray(pos.tolist() if hasattr(pos, "tolist") else pos, dtype=np.int64) - start
        idx = idx[(idx >= 0) & (idx < n)]
        present[layer, idx] = True
    rep = np.arange(n)
    if merged_into is not None:
        m = np.asarray(merged_into.tolist() if hasattr(merged_into, "tolist") else merged_into, dtype=np.int64)
        rep = np.where(m >= 0, m, -1)
    depth = np.zeros(n, dtype=np.float32)
    ok = rep >= 0
    depth[ok] = present[:, rep[ok]].mean(0)
    return depth


def _palette(k: int) -> np.ndarray:
    """k distinct-ish colours (golden-angle hues)."""
    import colorsys

    return np.array([colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0) for i in range(max(k, 1))],
                    dtype=np.float32) * 255


def draw_grid(view: Image.Image, grid: tuple[int, int], depth: np.ndarray, region: np.ndarray | None,
              exists: np.ndarray | None = None, out_size: tuple[int, int] | None = None) -> Image.Image:
    """Draw one token grid over ``view``.

    grid (gh, gw); depth (gh, gw) in [0, 1]; region (gh, gw) merge representative per cell (-1 none) or None;
    exists (gh, gw) False where the host has no token (AnyRes padding)."""
    if out_size is not None and view.size != out_size:
        view = view.resize(out_size, Image.BICUBIC)
    W, H = view.size
    gh, gw = grid
    ry = np.minimum(np.arange(H) * gh // H, gh - 1)
    rx = np.minimum(np.arange(W) * gw // W, gw - 1)
    px = np.asarray(view, dtype=np.float32)
    d = depth[ry][:, rx][..., None]
    a = 0.18 + 0.82 * d
    cell = ry[:, None] * gw + rx[None, :]
    if region is not None:
        reg = region[ry][:, rx]
        uniq = np.unique(region[region >= 0])
        pal = _palette(len(uniq))
        tint = np.zeros_like(px)
        for i, r in enumerate(uniq):
            tint[reg == r] = pal[i]
        has = (reg >= 0)[..., None]
        px = np.where(has, px * 0.62 + tint * 0.38, px)
    out = px * a + DARK_RGB * (1 - a)
    if region is not None:
        edge = np.zeros((H, W), dtype=bool)
        edge[:, 1:] |= reg[:, 1:] != reg[:, :-1]
        edge[1:, :] |= reg[1:, :] != reg[:-1, :]
        out[edge] = 255.0 * a[edge] + DARK_RGB * (1 - a[edge])
    else:
        kept = (depth >= 0.999)[ry][:, rx]
        edge = np.zeros((H, W), dtype=bool)
        edge[:, 1:] |= cell[:, 1:] != cell[:, :-1]
        edge[1:, :] |= cell[1:, :] != cell[:-1, :]
        edge[:, -1] = edge[-1, :] = True
        edge[:, 0] = edge[0, :] = True
        grow = edge.copy()  # two-pixel border inside each kept cell
        grow[:, 1:] |= edge[:, :-1]
        grow[1:, :] |= edge[:-1, :]
        border = grow & kept
        if not bool(kept.all()):
            out[border] = KEPT_RGB
    if exists is not None:
        ex = exists[ry][:, rx]
        hatch = ((np.arange(H)[:, None] + np.arange(W)[None, :]) // 4) % 2 == 0
        out[~ex] = np.where(hatch[~ex][:, None], PAD_RGB, DARK_RGB)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def overlay(image: Image.Image, layout, model_config, image_processor, depth: np.ndarray,
            merged_into=None, display: int = 448) -> Image.Image:
    """The image as the model saw it with the kept tokens highlighted. ``layout``: the adapter's ImageLayout of
    this image; ``depth`` (N,) from ``token_depths``."""
    vcfg = model_config.vision_config
    side = vcfg.image_size // vcfg.patch_size
    kind = layout.kind.numpy()
    crop = layout.crop.numpy()
    vit = layout.vit_index.numpy()
    merged = None
    if merged_into is not None:
        merged = np.asarray(merged_into.tolist() if hasattr(merged_into, "tolist") else merged_into, dtype=np.int64)
    patch = (kind == TOKEN_PATCH) & (vit >= 1)

    def grid_of(rows, cols):
        g = np.zeros((rows, cols), dtype=np.float32)
        reg = np.full((rows, cols), -1, dtype=np.int64) if merged is not None else None
        ex = np.zeros((rows, cols), dtype=bool)
        return g, reg, ex

    tiles = getattr(layout, "tiles", None)
    if tiles is None and int(layout.n_crops) <= 1 and getattr(layout, "crop_grid", None) is None:
        view = llava_view(image, image_processor, vcfg.image_size)
        g, reg, _ = grid_of(side, side)
        t = np.nonzero(patch)[0]
        p = vit[t] - 1
        g[p // side, p % side] = depth[t]
        if reg is not None:
            reg[p // side, p % side] = merged[t]
        return draw_grid(view, (side, side), g, reg, out_size=(display, display))

    # LLaVA-NeXT: the base image and the crop grid, side by side
    pinpoints = model_config.image_grid_pinpoints
    base_view, canvas, (bh, bw) = anyres_views(image, pinpoints, vcfg.image_size)
    g, reg, _ = grid_of(side, side)
    t = np.nonzero(patch & (crop == 0))[0]
    p = vit[t] - 1
    g[p // side, p % side] = depth[t]
    if reg is not None:
        reg[p // side, p % side] = merged[t]
    panel_h = display
    base_img = draw_grid(base_view, (side, side), g, reg, out_size=(panel_h, panel_h))
    panels = [("base image (thumbnail)", base_img)]
    if tiles is not None:
        rows, cols = tiles
        gh, gw = rows * side, cols * side
        g2, reg2, ex2 = grid_of(gh, gw)
        t = np.nonzero(patch & (crop >= 1))[0]
        c = crop[t] - 1
        p = vit[t] - 1
        yy = (c // cols) * side + p // side
        xx = (c % cols) * side + p % side
        g2[yy, xx] = depth[t]
        ex2[yy, xx] = True
        if reg2 is not None:
            reg2[yy, xx] = merged[t]
        size = (max(1, round(bw * panel_h / max(bh, bw))), max(1, round(bh * panel_h / max(bh, bw))))
        hires = draw_grid(canvas, (gh, gw), g2, reg2, exists=ex2, out_size=size)
        panels.append((f"crops {rows}x{cols} (hatched: padding, no tokens)", hires))
    gap = 8
    W = sum(p.size[0] for _, p in panels) + gap * (len(panels) - 1)
    f = font(round(15 * max(1.0, W / 640)))  # the card's text scale (see card)
    head = round(f.size * 1.4)
    H = max(p.size[1] for _, p in panels) + head
    out = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(out)
    x = 0
    for label, p in panels:
        d.text((x + 2, 2), label, fill=(40, 40, 40), font=f)
        out.paste(p, (x, head))
        x += p.size[0] + gap
    return out


def note_picture(image: Image.Image, lines: list[str], display: int = 448) -> Image.Image:
    """The image (whole, undimmed) with a note under it, for visual tokens that have no place on the image (the
    learned queries of an MQT projector each look at the whole image)."""
    img = image.convert("RGB")
    scale = display / max(img.size)
    view = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BICUBIC)
    f = font(max(12, round(display * 17 / 448)))
    wrapped = [w for line in lines for w in wrap(line, f, display - 12)]
    step = round(f.size * 1.3)
    out = Image.new("RGB", (display, view.size[1] + 10 + step * len(wrapped)), (255, 248, 225))
    out.paste(view, ((display - view.size[0]) // 2, 0))
    d = ImageDraw.Draw(out)
    y = view.size[1] + 5
    for line in wrapped:
        d.text((6, y), line, fill=(90, 60, 0), font=f)
        y += step
    return out


# ------------------------------------------------------------------------------------------------------- cards
def wrap(text: str, f, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels in font ``f`` (at spaces; long words stay whole)."""
    words, lines, cur = text.split(" "), [], ""
    for w in words:
        trial = w if not cur else cur + " " + w
        if cur and f.getlength(trial) > width:
            lines.append(cur)
            cur = w
        else:
            cur = trial
    lines.append(cur)
    return lines


def layer_chart(per_layer, n_in: int, width: int, height: int | None = None, scale: float = 1.0) -> Image.Image:
    """Visual tokens entering each decoder layer as bars (grey outline: all ``n_in`` tokens), with the layer numbers
    under the bars. ``scale`` grows fonts and margins with the card."""
    f_head, f_tick = font(max(11, round(14 * scale))), font(max(10, round(12 * scale)))
    head_h, tick_h = round(f_head.size * 1.4), round(f_tick.size * 1.35)
    height = height or head_h + round(64 * scale) + tick_h + 4
    img = Image.new("RGB", (width, height), (250, 250, 252))
    d = ImageDraw.Draw(img)
    d.text((4, 2), f"visual tokens per decoder layer (of {n_in})", fill=(60, 60, 60), font=f_head)
    top, bottom, left, right = head_h + 2, height - tick_h - 2, 4, width - 4
    L = max(1, len(per_layer))
    bw = (right - left) / L
    every = 1
    while every < L and f_tick.getlength(str(L - 1)) + 4 > bw * every:  # label every k-th layer so labels fit
        every += 1
    for i, v in enumerate(per_layer):
        x0, x1 = left + i * bw + 1, left + (i + 1) * bw - 1
        d.rectangle([x0, top, x1, bottom], outline=(200, 200, 205))
        hgt = (bottom - top) * (min(float(v), n_in) / max(1, n_in))
        d.rectangle([x0, bottom - hgt, x1, bottom], fill=(60, 120, 220))
        if i % every == 0:
            label = str(i)
            d.text(((x0 + x1) / 2 - f_tick.getlength(label) / 2, bottom + 1), label, fill=(90, 90, 90), font=f_tick)
    return img


def card(title: str, lines: list[str], picture: Image.Image, per_layer, n_in: int, error: str | None = None,
         notes: tuple = ()) -> Image.Image:
    """One result: title, the overlay, a few text lines, notes (amber) and the per-layer chart, stacked.

    Fonts grow with a card wider than 640 px (17 px text up to that), so that the text stays readable when the
    gallery scales a wide AnyRes card down to its column."""
    width = max(336, picture.size[0])
    scale = max(1.0, width / 640)
    f_title, f_text = font(max(14, round(20 * scale))), font(max(12, round(17 * scale)))
    step = round(f_text.size * 1.3)
    body = [(line, (180, 20, 20) if error and i == 0 else (25, 25, 25)) for i, line in enumerate(lines)]
    body += [(line, (150, 80, 0)) for line in notes]
    wrapped = [(w, colour) for line, colour in body for w in wrap(line, f_text, width - 12)]
    text_h = 6 + step * len(wrapped)
    chart = layer_chart(per_layer, n_in, width, scale=scale) if per_layer else None
    title_h = round(f_title.size * 1.45)
    H = title_h + 2 + picture.size[1] + text_h + (chart.size[1] + 4 if chart else 0) + 4
    out = Image.new("RGB", (width, H), (255, 255, 255))
    d = ImageDraw.Draw(out)
    d.rectangle([0, 0, width, title_h], fill=(35, 45, 70))
    d.text((6, round(f_title.size * 0.2)), title, fill=(255, 255, 255), font=f_title)
    out.paste(picture, ((width - picture.size[0]) // 2, title_h + 2))
    y = title_h + 2 + picture.size[1] + 4
    for line, colour in wrapped:
        d.text((6, y), line, fill=colour, font=f_text)
        y += step
    if chart is not None:
        out.paste(chart, (0, y + 2))
    return out
