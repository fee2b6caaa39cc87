"""Captioned synthetic scenes for a relevance lab: seeded pictures of shapes with their scene graphs.

Pretrained CLIP weights cannot reach this machine, so relevance cannot be measured on real data; a small
CLIP trained on these scenes can be, because every picture carries the truth about itself. Each image holds
one to four objects (shape, colour, size) on a crop of a real photo or a texture, all inside the central
square (a center-cropping model input sees every object), is written as a JPEG at photo sizes (so the
indexer's draft decode is exercised), and gets several captions made from structured specs
(`training/scene_captions.py`). Relevance is `satisfies(scene, spec)` (`training/scene_graph.py`): a
retrieved image is right for a caption when its scene makes the caption true, whichever image the caption was
written for.

Output (OUT): `images/NNNNNN.jpg`; `dataset_scenes.json` in the Karpathy layout `crossmodal eval` and
`train-reranker` read (images[].filename, filepath, split, sentences[].raw, plus scene and specs); and
`binding_test.json`, hard negatives for the test images. Same seed and options -> byte-identical output.

    python -m training.scenes OUT --n 2000 --seed 0 --backgrounds /tmp/photos/medium --backgrounds /tmp/photos/large
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval.errors import UserError
from training.scene_captions import binding_probes, captions, tokens
from training.scene_graph import COLOURS, RELATIONS, SHAPES, SIZES, counts, relations, satisfies
from training.scene_render import draw_objects, list_photos, load_photo, photo_crop, plan_texture, shape_box, texture

__all__ = ["generate", "satisfies", "Summary", "main"]

VERSION = 1
DATASET, BINDING = "dataset_scenes.json", "binding_test.json"
SIZE_RANGE = (736, 1408)  # longer side in px: 0.3-2 MP for every aspect ratio below
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)
PHOTO_SHARE = 0.8  # with photos given, this share of images gets a photo crop, the rest a texture
EXTENT = {"small": (0.15, 0.19), "large": (0.27, 0.33)}  # object extent as a share of the shorter side
SPLITS = (("test", 0.1), ("val", 0.1))  # the rest is train


@dataclass
class Summary:
    """What `generate` wrote: counts per split and background kind, captions, and binding probes."""

    images: int
    splits: dict[str, int]
    captions: int
    probes: int
    negatives: int
    photos: int = 0  # photos found under the background folders
    backgrounds: dict[str, int] = field(default_factory=dict)


# ---- planning: everything random is drawn here, from (seed, image number) ------------------------
def _size(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
    long = int(rng.integers(size_range[0], size_range[1] + 1))
    short = max(8, round(long / ASPECTS[int(rng.integers(len(ASPECTS)))]))
    return (short, long) if rng.random() < 0.3 else (long, short)


def _attributes(rng: np.random.Generator) -> list[dict[str, Any]]:
    """1-4 objects' shape, colour and size; often a group sharing a shape, so counts ("two stars") occur."""
    n = 1 + int(rng.choice(4, p=[0.2, 0.3, 0.3, 0.2]))

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    objs = [{"shape": pick(SHAPES), "colour": pick(tuple(COLOURS)), "size": "large" if rng.random() < 0.4
             else "small"} for _ in range(n)]
    if n > 1 and rng.random() < 0.4:
        k = int(rng.integers(2, n + 1))
        same_colour, same_size = rng.random() < 0.5, rng.random() < 0.5
        for o in objs[1:k]:
            o["shape"] = objs[0]["shape"]
            o["colour"] = objs[0]["colour"] if same_colour else o["colour"]
            o["size"] = objs[0]["size"] if same_size else o["size"]
    return objs


def _place(rng: np.random.Generator, extents: list[float], w: int, h: int) -> list[tuple[float, float]] | None:
    """Centres for squares of these extents inside the picture's central square (what a center-cropping model
    input keeps), every two apart by a clear gap on some axis."""
    s = min(w, h)
    margin, gap = 0.03 * s, max(2, round(0.04 * s)) + 2
    ox, oy = (w - s) / 2, (h - s) / 2
    order = sorted(range(len(extents)), key=lambda k: -extents[k])
    for _ in range(40):
        placed: dict[int, tuple[float, float]] = {}
        for k in order:
            e = extents[k]
            for _ in range(60):
                c = (float(ox + rng.uniform(margin + e / 2, s - margin - e / 2)),
                     float(oy + rng.uniform(margin + e / 2, s - margin - e / 2)))
                if all(abs(c[0] - q[0]) >= (e + extents[j]) / 2 + gap or abs(c[1] - q[1]) >= (e + extents[j]) / 2 + gap
                       for j, q in placed.items()):
                    placed[k] = c
                    break
            else:
                break
        if len(placed) == len(extents):
            return [placed[k] for k in range(len(extents))]
    return None


def _objects(rng: np.random.Generator, w: int, h: int) -> list[dict[str, Any]]:
    objs = _attributes(rng)
    s = min(w, h)
    extents = [float(rng.uniform(*EXTENT[o["size"]])) * s for o in objs]
    while (centres := _place(rng, extents, w, h)) is None:  # too crowded: the largest large one becomes small
        k = max((i for i, o in enumerate(objs) if o["size"] == "large"), key=lambda i: extents[i])
        objs[k]["size"], extents[k] = "small", float(rng.uniform(*EXTENT["small"])) * s
    out = []
    for i, (o, e, (cx, cy)) in enumerate(zip(objs, extents, centres, strict=True)):
        base = np.asarray(COLOURS[o["colour"]])
        shade = base + int(rng.integers(-10, 11)) + rng.integers(-5, 6, 3)  # brightness, then a little hue
        rgb = [int(v) for v in np.clip(shade, 0, 255)]
        cx, cy, e = round(cx, 1), round(cy, 1), round(e, 1)
        out.append({"id": i, **o, "rgb": rgb, "center": [cx, cy], "extent": e,
                    "box": shape_box(o["shape"], cx, cy, e)})
    return out


def plan(seed: int, i: int, size_range: tuple[int, int], photos: Sequence[str]) -> dict[str, Any]:
    """Image i's size, background and scene graph: a function of (seed, i, size range, photo names) only.
    The background has a random stream of its own, so photos or not, a seed gives the same scenes."""
    rng, brng = np.random.default_rng([seed, i, 0]), np.random.default_rng([seed, i, 4])
    w, h = _size(rng, size_range)
    if photos and brng.random() < PHOTO_SHARE:
        bg: dict[str, Any] = {"kind": "photo", "photo": photos[int(brng.integers(len(photos)))],
                              "scale": round(float(brng.uniform(0.5, 1.0)), 4), "x": round(float(brng.random()), 4),
                              "y": round(float(brng.random()), 4), "flip": bool(brng.random() < 0.5)}
    else:
        bg = plan_texture(brng)
    objs = _objects(rng, w, h)
    scene = {"width": w, "height": h, "objects": objs, "counts": counts(objs), "relations": relations(objs)}
    return {"width": w, "height": h, "background": bg, "scene": scene}


def assign_splits(n: int, seed: int) -> list[str]:
    """80/10/10 train/val/test by a seeded permutation (n // 10 each for val and test)."""
    out = ["train"] * n
    perm = np.random.default_rng([seed, 1 << 30]).permutation(n)
    start = 0
    for name, share in SPLITS:
        for k in perm[start:start + int(n * share)]:
            out[int(k)] = name
        start += int(n * share)
    return out


# ---- writing ---------------------------------------------------------------------------------------
def _prepare(out: Path) -> Path:
    """The staging folder inside OUT; OUT must be absent, empty, or an earlier output of this generator."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    if out.is_dir() and not (out / DATASET).is_file() and any(p.name != ".partial" for p in out.iterdir()):
        raise UserError(f"{out} is not empty and holds no {DATASET}; give an empty or new folder")
    tmp = out / ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    return tmp


def _render(entries: list[dict[str, Any]], photos: dict[str, Path], tmp: Path, seed: int,
            size_range: tuple[int, int], quality: int) -> None:
    """Write every JPEG, visiting images grouped by photo so each photo is decoded once."""
    order = sorted(range(len(entries)), key=lambda i: (entries[i]["background"].get("photo", ""), i))
    loaded: tuple[str, Image.Image | None] = ("", None)
    for i in order:
        e = entries[i]
        bg, size = e["background"], (e["width"], e["height"])
        img = None
        if bg["kind"] == "photo":
            if loaded[0] != bg["photo"]:
                try:
                    loaded = (bg["photo"], load_photo(photos[bg["photo"]], size_range[1]))
                except (OSError, ValueError, Image.DecompressionBombError):
                    loaded = (bg["photo"], None)
            if loaded[1] is not None:
                img = photo_crop(loaded[1], bg, size)
            else:  # an unreadable photo: this image gets a texture, and the JSON says so
                e["background"] = {**plan_texture(np.random.default_rng([seed, i, 3])), "unreadable": bg["photo"]}
        if img is None:
            img = texture(e["background"], size)
        draw_objects(img, e["scene"]["objects"]).save(tmp / "images" / e["filename"], "JPEG", quality=quality)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")


def generate(out: str | Path, n: int, seed: int = 0, backgrounds: Sequence[str | Path] = (),
             size_range: tuple[int, int] = SIZE_RANGE, n_captions: int = 5, quality: int = 90) -> Summary:
    """Write n captioned scenes, their Karpathy JSON and the binding test set under `out` (replacing an
    earlier output there). Backgrounds are photos found under the folders given, else textures."""
    if n < 1 or seed < 0 or n_captions < 1 or not 1 <= quality <= 100:
        raise UserError("need n >= 1, seed >= 0, captions >= 1 and quality in 1..100")
    if not 16 <= size_range[0] <= size_range[1] <= 8192:
        raise UserError(f"size range {size_range[0]},{size_range[1]}: need 16 <= MIN <= MAX <= 8192 px")
    folders = [Path(b).expanduser() for b in backgrounds]
    for f in folders:
        if not f.is_dir():
            raise UserError(f"--backgrounds {f}: no such folder")
    photos = dict(list_photos(folders))
    out = Path(out).expanduser()
    tmp = _prepare(out)
    names = sorted(photos)
    splits = assign_splits(n, seed)
    entries, probes_doc, sentid = [], [], 0
    for i in range(n):
        p = plan(seed, i, size_range, names)
        caps = captions(p["scene"], np.random.default_rng([seed, i, 1]), n_captions)
        sents = [{"raw": raw, "tokens": tokens(raw), "imgid": i, "sentid": sentid + k, "spec": spec}
                 for k, (raw, spec) in enumerate(caps)]
        e = {"filename": f"{i:06d}.jpg", "filepath": "images", "split": splits[i], "imgid": i,
             "sentids": [s["sentid"] for s in sents], **p, "sentences": sents}
        sentid += len(sents)
        entries.append(e)
        if splits[i] == "test":
            probes = binding_probes(p["scene"], np.random.default_rng([seed, i, 2]))
            if probes:
                probes_doc.append({"imgid": i, "filename": e["filename"], "filepath": "images", "probes": probes})
    _render(entries, photos, tmp, seed, size_range, quality)
    vocab = {"shapes": list(SHAPES), "colours": {k: list(v) for k, v in COLOURS.items()}, "sizes": list(SIZES),
             "relations": list(RELATIONS)}
    gen = {"version": VERSION, "seed": seed, "n": n, "size_range": list(size_range), "captions": n_captions,
           "quality": quality, "photos": len(names)}
    _write_json(tmp / DATASET, {"dataset": "scenes", "generator": gen, "vocabulary": vocab, "images": entries})
    _write_json(tmp / BINDING, {"dataset": "scenes-binding", "generator": gen, "source": DATASET,
                                "images": probes_doc})
    for name in ("images", DATASET, BINDING):
        old = out / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        (tmp / name).rename(old)
    tmp.rmdir()
    probes_all = [p for d in probes_doc for p in d["probes"]]
    return Summary(n, dict(Counter(splits)), sentid, len(probes_all), sum(len(p["negatives"]) for p in probes_all),
                   len(names), dict(Counter(e["background"]["kind"] for e in entries)))


# ---- command line ----------------------------------------------------------------------------------
class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage block
        raise _ArgError(message)


def _size_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX in pixels, got {text!r}") from None
    return lo, hi


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training.scenes OUT ...`: generate, print one summary line; user errors -> one line, exit 2."""
    ap = _Parser(prog="python -m training.scenes", description="Write captioned synthetic scenes (see the "
                 "module docstring of training/scenes.py).")
    ap.add_argument("out", help="output folder (new, empty, or an earlier output, which is replaced)")
    ap.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0); same seed, same bytes")
    ap.add_argument("--backgrounds", action="append", default=[], metavar="DIR",
                    help="folder of photos to crop backgrounds from (repeatable); textures without")
    ap.add_argument("--size-range", type=_size_range, default=SIZE_RANGE, metavar="MIN,MAX",
                    help=f"longer side in px (default {SIZE_RANGE[0]},{SIZE_RANGE[1]}: 0.3-2 MP)")
    ap.add_argument("--captions", type=int, default=5, help="captions per image (default 5)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    t0 = time.perf_counter()
    try:
        a = ap.parse_args(argv)
        s = generate(a.out, a.n, a.seed, a.backgrounds, a.size_range, a.captions, a.quality)
    except (_ArgError, UserError) as e:
        print(f"scenes: error: {e}", file=sys.stderr)
        return 2
    if a.backgrounds and not s.photos:
        print(f"scenes: no photos under {', '.join(a.backgrounds)}; used textures", file=sys.stderr)
    splits = ", ".join(f"{s.splits.get(k, 0)} {k}" for k in ("train", "val", "test"))
    print(f"wrote {s.images} images ({splits}), {s.captions} captions, {s.probes} binding probes with "
          f"{s.negatives} negatives to {a.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
