"""The scene lab's vocabulary and its meaning: what a scene graph holds and when a caption is true of it.

Relevance in the relevance lab is defined here, not by which image a caption came from: an image is right
for a caption when `satisfies(scene, spec)` holds for the image's scene graph and the caption's structured
spec. Both are plain JSON values, so a lab that only reads `dataset_scenes.json` can judge any ranking.

A scene is `{"objects": [{"id", "shape", "colour", "size", "rgb", "box", "center"}, ...], "counts", "relations"}`;
boxes are `[x0, y0, x1, y1]` in pixels of the written image (x1, y1 exclusive, y grows downwards). A spec is
one of:

- `{"type": "exists", "object": D}`: at least one object matches D ("a red circle").
- `{"type": "count", "n": N, "object": D | None}`: exactly N objects match D ("two small green stars"); None
  matches every object ("three shapes").
- `{"type": "relation", "a": D, "rel": R, "b": D}`: two different objects match a and b and stand in R
  ("a red circle to the left of a blue square").
- `{"type": "and", "objects": [D, ...]}`: as many different objects match them, one each ("a red circle and a
  blue square").

A description D is `{"shape": S, "colour": C | None, "size": Z | None}`; None leaves that attribute open.
Relations are strict: `a` is left of `b` when a's box ends at or before b's box begins on the x axis (so
"left of" and "above" can both hold, and "a left of b" and "b left of a" never do).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import permutations
from typing import Any

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "cross": "crosses", "heart": "hearts"}
# Eight named colours far apart in RGB and in name; drawn with a small per-object jitter.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35), "orange": (250, 135, 10), "yellow": (250, 220, 30), "green": (40, 165, 60),
    "blue": (35, 75, 225), "purple": (135, 50, 180), "white": (245, 245, 245), "black": (22, 22, 22),
}
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
SPEC_TYPES = ("exists", "count", "relation", "and")

Obj = Mapping[str, Any]
Desc = Mapping[str, Any]
Spec = Mapping[str, Any]
Scene = Mapping[str, Any]


def desc(shape: str, colour: str | None = None, size: str | None = None) -> dict[str, str | None]:
    """A description in the spec's shape (every key present, so equal meanings are equal dicts)."""
    return {"shape": shape, "colour": colour, "size": size}


def describe(obj: Obj, colour: bool = True, size: bool = False) -> dict[str, str | None]:
    """The description of `obj` naming its shape and, as asked, its colour and size."""
    return desc(obj["shape"], obj["colour"] if colour else None, obj["size"] if size else None)


def matches(obj: Obj, d: Desc | None) -> bool:
    """Whether `obj` fits description `d` (None fits everything; an open attribute fits any value)."""
    if d is None:
        return True
    return all(d.get(k) is None or d.get(k) == obj[k] for k in ("shape", "colour", "size"))


def holds(a: Obj, rel: str, b: Obj) -> bool:
    """Whether object `a` stands in relation `rel` to object `b`, read from their boxes (strict separation)."""
    ax0, ay0, ax1, ay1 = a["box"]
    bx0, by0, bx1, by1 = b["box"]
    if rel == "left of":
        return bool(ax1 <= bx0)
    if rel == "right of":
        return bool(bx1 <= ax0)
    if rel == "above":
        return bool(ay1 <= by0)
    if rel == "below":
        return bool(by1 <= ay0)
    raise ValueError(f"unknown relation {rel!r}; expected one of {', '.join(RELATIONS)}")


def gap(a: Obj, rel: str, b: Obj) -> int:
    """How many pixels separate a from b along `rel`'s axis (negative when the relation does not hold)."""
    ax0, ay0, ax1, ay1 = a["box"]
    bx0, by0, bx1, by1 = b["box"]
    return int({"left of": bx0 - ax1, "right of": ax0 - bx1, "above": by0 - ay1, "below": ay0 - by1}[rel])


def relations(objects: Sequence[Obj]) -> list[dict[str, Any]]:
    """Every ordered pair's relations, as stored in the scene graph (the boxes stay the source of truth)."""
    return [{"a": i, "rel": r, "b": j} for i, a in enumerate(objects) for j, b in enumerate(objects)
            if i != j for r in RELATIONS if holds(a, r, b)]


def counts(objects: Sequence[Obj]) -> dict[str, dict[str, int]]:
    """Objects per shape and per "colour shape", the counts a caption like "two stars" talks about."""
    return {"shape": dict(sorted(Counter(o["shape"] for o in objects).items())),
            "colour_shape": dict(sorted(Counter(f"{o['colour']} {o['shape']}" for o in objects).items()))}


def satisfies(scene: Scene, spec: Spec) -> bool:
    """Whether the scene makes the caption's structured meaning true (see the module docstring)."""
    objs = list(scene["objects"])
    kind = spec.get("type")
    if kind == "exists":
        return any(matches(o, spec["object"]) for o in objs)
    if kind == "count":
        return sum(matches(o, spec["object"]) for o in objs) == int(spec["n"])
    if kind == "relation":
        return any(i != j and matches(a, spec["a"]) and matches(b, spec["b"]) and holds(a, spec["rel"], b)
                   for i, a in enumerate(objs) for j, b in enumerate(objs))
    if kind == "and":
        wanted = list(spec["objects"])
        return any(all(matches(o, d) for o, d in zip(pick, wanted, strict=True))
                   for pick in permutations(objs, len(wanted)))
    raise ValueError(f"unknown caption spec type {kind!r}; expected one of {', '.join(SPEC_TYPES)}")
