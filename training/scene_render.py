"""Pixels for generated scenes: backgrounds (random crops of real photos, or textures) and the shapes on them.

Everything here is a pure function of a plan that `training/scenes.py` draws from the seed, so the same
plan gives the same pixels. Drawing uses PIL's C primitives and numpy on whole arrays (no per-pixel Python);
pictures under 400 px are drawn at 4x and box-reduced so that small training images get smooth edges, which
leaves the background's pixels exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PHOTO_EXTS = (".jpg", ".jpeg", ".png")
TEXTURES = ("gradient", "blotches", "noise", "stripes")
SUPERSAMPLE_BELOW = 400  # longer side in px under which shapes are drawn at 4x
OUTLINE = 0.04  # outline width as a share of the object's extent: a darker rim that keeps it off the background


# ---- shapes ----------------------------------------------------------------------------------------
def _normalised(points: Sequence[tuple[float, float]], extent: float = 1.0) -> list[tuple[float, float]]:
    """Points moved so their bounding box is centred on 0 and scaled so its longer side is `extent`."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    k = extent / max(max(xs) - min(xs), max(ys) - min(ys))
    return [((x - cx) * k, (y - cy) * k) for x, y in points]


def _star() -> list[tuple[float, float]]:
    return [(r * math.cos(a), r * math.sin(a)) for k in range(10)
            for r, a in [(1.0 if k % 2 == 0 else 0.45, -math.pi / 2 + k * math.pi / 5)]]


def _heart() -> list[tuple[float, float]]:
    ts = [2 * math.pi * k / 64 for k in range(64)]
    return [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
            for t in ts]


_T = 0.18  # the cross's half arm width
UNIT: dict[str, list[tuple[float, float]]] = {
    "square": _normalised([(-1, -1), (1, -1), (1, 1), (-1, 1)], 0.84),
    "triangle": _normalised([(0, -0.866), (0.5, 0.0), (-0.5, 0.0)]),
    "star": _normalised(_star()),
    "diamond": _normalised([(0, -1), (1, 0), (0, 1), (-1, 0)]),
    "cross": _normalised([(-_T, -0.5), (_T, -0.5), (_T, -_T), (0.5, -_T), (0.5, _T), (_T, _T), (_T, 0.5),
                          (-_T, 0.5), (-_T, _T), (-0.5, _T), (-0.5, -_T), (-_T, -_T)]),
    "heart": _normalised(_heart()),
}


def shape_points(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """The polygon of `shape` drawn in the extent x extent square centred on (cx, cy); a circle is a 64-gon."""
    unit = UNIT.get(shape) or [(0.5 * math.cos(a), 0.5 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 64)]
    return [(cx + x * extent, cy + y * extent) for x, y in unit]


def shape_box(shape: str, cx: float, cy: float, extent: float) -> list[int]:
    """The pixels the shape covers, as [x0, y0, x1, y1] with x1, y1 exclusive (what relations are read from)."""
    pts = shape_points(shape, cx, cy, extent)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)) + 1, math.ceil(max(ys)) + 1]


def _rim(rgb: Sequence[int]) -> tuple[int, int, int]:
    """The outline colour: a darker shade of the fill, or light grey around black (which cannot get darker)."""
    if sum(rgb) < 150:
        return (200, 200, 200)
    return (int(rgb[0] * 0.55), int(rgb[1] * 0.55), int(rgb[2] * 0.55))


def draw_objects(img: Image.Image, objects: Sequence[Mapping[str, Any]]) -> Image.Image:
    """The image with each object drawn: its outline colour, then its fill shrunk inside by the rim width."""
    ss = 4 if max(img.size) < SUPERSAMPLE_BELOW else 1
    canvas = img.resize((img.width * ss, img.height * ss), Image.Resampling.NEAREST) if ss > 1 else img.copy()
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        cx, cy = o["center"]
        extent = o["extent"]
        rim = max(1.0, OUTLINE * extent)
        for colour, e in ((_rim(o["rgb"]), extent), (tuple(o["rgb"]), extent - 2 * rim)):
            if o["shape"] == "circle":
                r = e / 2
                draw.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=colour)
            else:
                draw.polygon([(x * ss, y * ss) for x, y in shape_points(o["shape"], cx, cy, e)], fill=colour)
    return canvas.reduce(ss) if ss > 1 else canvas


# ---- backgrounds -----------------------------------------------------------------------------------
def list_photos(folders: Sequence[Path]) -> list[tuple[str, Path]]:
    """(name, path) of every photo under the folders, sorted; the name is '<folder name>/<path inside it>'."""
    out = []
    for folder in folders:
        for p in folder.rglob("*"):
            if p.suffix.lower() in PHOTO_EXTS and p.is_file():
                out.append((f"{folder.name}/{p.relative_to(folder).as_posix()}", p))
    return sorted(out)


def load_photo(path: Path, longest: int) -> Image.Image:
    """The photo as RGB, JPEGs decoded at the smallest DCT scale still >= `longest` on both sides (fast)."""
    with Image.open(path) as im:
        im.draft("RGB", (longest, longest))
        return im.convert("RGB")


def photo_crop(photo: Image.Image, bg: Mapping[str, Any], size: tuple[int, int]) -> Image.Image:
    """A crop of `photo` with the target's aspect ratio (`scale` of the largest such crop, placed at `x`, `y`
    as shares of the room left), resized to `size` and mirrored when `flip`."""
    w, h = size
    pw, ph = photo.size
    cw, ch = (ph * w / h, float(ph)) if pw / ph > w / h else (float(pw), pw * h / w)
    cw, ch = cw * bg["scale"], ch * bg["scale"]
    x0, y0 = bg["x"] * (pw - cw), bg["y"] * (ph - ch)
    img = photo.resize(size, Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if bg["flip"] else img


def muted(rng: np.random.Generator) -> list[int]:
    """A random colour pulled towards grey, so a texture seldom looks like one of the named colours."""
    c = rng.uniform(30, 225, 3)
    grey = c.mean()
    return [int(v) for v in np.clip(grey + rng.uniform(0.15, 0.5) * (c - grey), 0, 255)]


def plan_texture(rng: np.random.Generator) -> dict[str, Any]:
    """The parameters of one texture background, all drawn here so that rendering draws nothing."""
    return {"kind": "texture", "texture": TEXTURES[int(rng.integers(len(TEXTURES)))],
            "colours": [muted(rng), muted(rng)], "angle": round(float(rng.uniform(0, 180)), 2),
            "period": round(float(rng.uniform(0.03, 0.15)), 4), "cells": [int(v) for v in rng.integers(2, 7, 2)],
            "seed": int(rng.integers(1 << 31))}


def texture(bg: Mapping[str, Any], size: tuple[int, int]) -> Image.Image:
    """A gradient, smooth blotches, grain on a flat colour, or stripes, from `plan_texture`'s parameters."""
    w, h = size
    c0, c1 = (np.asarray(c, dtype=np.float32) for c in bg["colours"])
    rng = np.random.default_rng(bg["seed"])
    kind = bg["texture"]
    if kind == "gradient":
        a = math.radians(bg["angle"])
        lw, lh = max(2, w // 8), max(2, h // 8)
        t = (np.arange(lw, dtype=np.float32)[None, :] * math.cos(a) / lw
             + np.arange(lh, dtype=np.float32)[:, None] * math.sin(a) / lh)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        small = c0 + t[..., None] * (c1 - c0)
        return Image.fromarray(small.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    if kind == "blotches":
        gw, gh = bg["cells"]
        mix = rng.random((gh, gw, 1), dtype=np.float32)
        small = c0 + mix * (c1 - c0)
        return Image.fromarray(small.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    if kind == "noise":
        hw, hh = max(1, w // 2), max(1, h // 2)
        grain = rng.integers(-40, 41, (hh, hw, 1), dtype=np.int16)
        small = np.clip(c0.astype(np.int16) + grain, 0, 255).astype(np.uint8)
        return Image.fromarray(small).resize(size, Image.Resampling.NEAREST)
    if kind == "stripes":
        a = math.radians(bg["angle"])
        period = max(2.0, bg["period"] * min(w, h))
        u = (np.arange(w, dtype=np.float32)[None, :] * (math.cos(a) / period)
             + np.arange(h, dtype=np.float32)[:, None] * (math.sin(a) / period))
        band = (np.floor(u).astype(np.int32) & 1).astype(bool)
        return Image.fromarray(np.where(band[..., None], c0.astype(np.uint8), c1.astype(np.uint8)))
    raise ValueError(f"unknown texture {kind!r}")
