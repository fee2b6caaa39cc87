"""Captions for generated scenes: true captions from templates and paraphrases, and the binding test's probes.

Every caption is made from a structured spec (see `training/scene_graph.py`) read off the scene, so it is true
by construction and `satisfies` can check it. The binding probes pair a true caption with captions that
differ from it only by a swap (colours, shapes or sizes between two objects, the two objects of a relation,
the relation itself, a count off by one), written with the same template so the words differ only where the
meaning does; a negative the scene happens to satisfy anyway (two red circles, one on each side) is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from training.scene_graph import NUMBERS, OPPOSITE, PLURALS, Desc, Obj, Scene, Spec, describe, gap, matches, satisfies

EXISTS = ("a {a}", "a photo of a {a}", "there is a {a} in the picture", "an image with a {a}", "a picture of a {a}")
COUNT = ("{n} {d}", "a photo of {n} {d}", "there {be} {n} {d}", "exactly {n} {d}", "a picture with {n} {d}")
# Index-aligned across relations: template k of "left of" and of "right of" differ only in the relation
# words, so a probe's "opposite relation" negative keeps the positive's wording.
RELATION = {
    "left of": ("a {a} to the left of a {b}", "a {a} left of a {b}", "a {b} with a {a} on its left",
                "a {b} to the right of a {a}", "a photo of a {a} to the left of a {b}"),
    "right of": ("a {a} to the right of a {b}", "a {a} right of a {b}", "a {b} with a {a} on its right",
                 "a {b} to the left of a {a}", "a photo of a {a} to the right of a {b}"),
    "above": ("a {a} above a {b}", "a {a} over a {b}", "a {b} with a {a} above it", "a {b} below a {a}",
              "a photo of a {a} above a {b}"),
    "below": ("a {a} below a {b}", "a {a} under a {b}", "a {b} with a {a} below it", "a {b} above a {a}",
              "a photo of a {a} below a {b}"),
}
AND = ("{list}", "a photo of {list}", "a picture showing {list}")
Negatives = list[tuple[str, dict[str, Any]]]  # (kind of swap, spec)
CLEAR = 0.03  # a relation is captioned only when its gap is at least this share of the shorter side


def phrase(d: Desc | None, plural: bool = False) -> str:
    """ "small red circle", "green stars", "shapes": the words of a description, without an article."""
    if d is None:
        return "shapes" if plural else "shape"
    noun = PLURALS[d["shape"]] if plural else d["shape"]
    return " ".join(w for w in (d.get("size"), d.get("colour"), noun) if w)


def _article(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def render(spec: Spec, style: int) -> str:
    """The caption text of `spec` in paraphrase number `style` (any int; taken modulo the templates)."""
    kind = spec["type"]
    if kind == "exists":
        text = EXISTS[style % len(EXISTS)].format(a=phrase(spec["object"]))
    elif kind == "count":
        n = int(spec["n"])
        text = COUNT[style % len(COUNT)].format(n=NUMBERS[n], d=phrase(spec["object"], plural=n != 1),
                                                be="is" if n == 1 else "are")
    elif kind == "relation":
        tpl = RELATION[spec["rel"]]
        text = tpl[style % len(tpl)].format(a=phrase(spec["a"]), b=phrase(spec["b"]))
    elif kind == "and":
        items = [f"a {phrase(d)}" for d in spec["objects"]]
        text = AND[style % len(AND)].format(list=", ".join(items[:-1]) + " and " + items[-1])
    else:
        raise ValueError(f"unknown caption spec type {kind!r}")
    return _article(text)


def tokens(text: str) -> list[str]:
    """Karpathy-style tokens: lowercase words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", text.lower())


def clear_relations(scene: Scene) -> list[tuple[int, str, int]]:
    """(i, rel, j) for pairs whose relation is visibly true: strict, with a gap of CLEAR x the shorter side."""
    objs = scene["objects"]
    need = max(2, round(CLEAR * min(scene["width"], scene["height"])))
    return [(i, rel, j) for i, a in enumerate(objs) for j, b in enumerate(objs) if i != j
            for rel in RELATION if gap(a, rel, b) >= need]


def _flip(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _count_spec(objs: Sequence[Obj], d: Desc | None) -> dict[str, Any]:
    return {"type": "count", "n": sum(matches(o, d) for o in objs), "object": d}


def sample_spec(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """One true caption spec for the scene, of a kind and detail drawn at random (weights favour relations)."""
    objs = scene["objects"]
    rels = clear_relations(scene)
    kinds = ["exists", "count"] + (["relation", "and"] if len(objs) > 1 else [])
    weights = np.array([0.15, 0.25, 0.4, 0.2][: len(kinds)])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    if kind == "relation" and rels:
        i, rel, j = rels[int(rng.integers(len(rels)))]
        return {"type": "relation", "a": describe(objs[i], _flip(rng, 0.85), _flip(rng, 0.25)), "rel": rel,
                "b": describe(objs[j], _flip(rng, 0.85), _flip(rng, 0.25))}
    if kind == "and":
        m = int(rng.integers(2, min(len(objs), 3) + 1))
        picked = rng.choice(len(objs), size=m, replace=False)
        return {"type": "and", "objects": [describe(objs[int(k)], _flip(rng, 0.9), _flip(rng, 0.2)) for k in picked]}
    if kind == "count":
        if _flip(rng, 0.2):
            return _count_spec(objs, None)
        o = objs[int(rng.integers(len(objs)))]
        return _count_spec(objs, describe(o, _flip(rng, 0.6), _flip(rng, 0.25)))
    o = objs[int(rng.integers(len(objs)))]
    return {"type": "exists", "object": describe(o, _flip(rng, 0.85), _flip(rng, 0.3))}


def captions(scene: Scene, rng: np.random.Generator, k: int = 5) -> list[tuple[str, dict[str, Any]]]:
    """`k` true captions (text, spec) for the scene, different texts as far as 100 draws find them."""
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for _ in range(100):
        if len(out) == k:
            break
        spec = sample_spec(scene, rng)
        if spec["type"] == "and" and len({tuple(d.values()) for d in spec["objects"]}) < len(spec["objects"]):
            continue  # "a red circle and a red circle" is what a count caption says better
        text = render(spec, int(rng.integers(1 << 16)))
        if text not in seen:
            seen.add(text)
            out.append((text, spec))
    while len(out) < k:  # a tiny scene can run out of different wordings; repeat rather than fall short
        out.append(out[len(out) % max(1, len(seen))])
    return out


# ---- the binding test ------------------------------------------------------------------------------
def _swap(da: Desc, db: Desc, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    a, b = dict(da), dict(db)
    a[key], b[key] = db[key], da[key]
    return a, b


def _probe(scene: Scene, kind: str, positive: dict[str, Any], negatives: Negatives,
           style: int) -> dict[str, Any] | None:
    """A probe with the negatives the scene does not satisfy and whose text differs; None when none is left."""
    raw = render(positive, style)
    kept, texts = [], {raw}
    for swap, spec in negatives:
        text = render(spec, style)
        if text not in texts and not satisfies(scene, spec):
            texts.add(text)
            kept.append({"raw": text, "spec": spec, "kind": swap})
    if not kept:
        return None
    return {"type": kind, "positive": {"raw": raw, "spec": positive}, "negatives": kept}


def _best_pair(objs: Sequence[Obj], pairs: Sequence[tuple[int, int]], rng: np.random.Generator
               ) -> tuple[int, int] | None:
    """A pair that differs in as many attributes as possible (so that every swap changes the meaning)."""
    if not pairs:
        return None

    def score(p: tuple[int, int]) -> int:
        a, b = objs[p[0]], objs[p[1]]
        return int(2 * (a["colour"] != b["colour"]) + 2 * (a["shape"] != b["shape"]) + (a["size"] != b["size"]))

    top = max(score(p) for p in pairs)
    best = [p for p in pairs if score(p) == top]
    return best[int(rng.integers(len(best)))]


def _relation_probe(scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """ "a red circle left of a blue square" against its swapped colours, shapes, sizes, objects, relation."""
    objs, rels = scene["objects"], clear_relations(scene)
    pick = _best_pair(objs, [(i, j) for i, _, j in rels], rng)
    if pick is None:
        return None
    i, j = pick
    rel = max((r for a, r, b in rels if (a, b) == pick), key=lambda r: gap(objs[i], r, objs[j]))
    sized = objs[i]["size"] != objs[j]["size"]
    da, db = describe(objs[i], True, sized), describe(objs[j], True, sized)
    negs: Negatives = [(f"swap_{key}", {"type": "relation", "a": sa, "rel": rel, "b": sb})
                       for key in ("colour", "shape", "size") for sa, sb in [_swap(da, db, key)]]
    negs += [("swap_relation", {"type": "relation", "a": db, "rel": rel, "b": da}),
             ("opposite_relation", {"type": "relation", "a": da, "rel": OPPOSITE[rel], "b": db})]
    pos = {"type": "relation", "a": da, "rel": rel, "b": db}
    return _probe(scene, "relation", pos, negs, int(rng.integers(1 << 16)))


def _and_probe(scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """ "a red circle and a blue square" against "a blue circle and a red square" (and swapped sizes)."""
    objs = scene["objects"]
    pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
             if objs[i]["colour"] != objs[j]["colour"] and objs[i]["shape"] != objs[j]["shape"]]
    pick = _best_pair(objs, pairs, rng)
    if pick is None:
        return None
    i, j = pick
    sized = objs[i]["size"] != objs[j]["size"]
    da, db = describe(objs[i], True, sized), describe(objs[j], True, sized)
    negs: Negatives = [(f"swap_{key}", {"type": "and", "objects": list(_swap(da, db, key))})
                       for key in ("colour", "size")]
    return _probe(scene, "and", {"type": "and", "objects": [da, db]}, negs, int(rng.integers(1 << 16)))


def _count_probe(scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """ "two stars" against "three stars" and "one star", preferring a description objects share."""
    objs = scene["objects"]
    cands = [describe(o, colour) for o in objs for colour in (False, True)]
    pool = [d for d in cands if _count_spec(objs, d)["n"] > 1] or cands
    pos = _count_spec(objs, pool[int(rng.integers(len(pool)))])
    n = int(pos["n"])
    negs: Negatives = [("count", {**pos, "n": m}) for m in (n + 1, n - 1) if m >= 1]
    return _probe(scene, "count", pos, negs, int(rng.integers(1 << 16)))


def binding_probes(scene: Scene, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Probes for one test image: a relation, a conjunction and a count, each with its hard negatives
    (a probe is left out when the scene has no such pair, or satisfies every one of its negatives)."""
    probes = [make(scene, rng) for make in (_relation_probe, _and_probe, _count_probe)]
    return [p for p in probes if p is not None]


# ---- hard negatives for training -------------------------------------------------------------------
def _style_of(spec: Spec, raw: str) -> int:
    """The paraphrase number that renders `spec` as `raw` (so a negative keeps the caption's wording)."""
    n = {"exists": len(EXISTS), "count": len(COUNT), "and": len(AND)}.get(spec["type"], 5)
    return next((s for s in range(n) if render(spec, s) == raw), 0)


def _swaps(scene: Scene, spec: Spec) -> Negatives:
    """Every binding-style edit of `spec`, true or not of the scene (the caller keeps the false ones)."""
    kind, negs = spec["type"], []
    if kind == "relation":
        da, db, rel = spec["a"], spec["b"], spec["rel"]
        negs = [(f"swap_{key}", {"type": "relation", "a": sa, "rel": rel, "b": sb})
                for key in ("colour", "shape", "size") for sa, sb in [_swap(da, db, key)]]
        negs += [("swap_relation", {"type": "relation", "a": db, "rel": rel, "b": da}),
                 ("opposite_relation", {"type": "relation", "a": da, "rel": OPPOSITE[rel], "b": db})]
    elif kind == "and":
        ds = list(spec["objects"])
        for i in range(len(ds)):
            for j in range(i + 1, len(ds)):
                for key in ("colour", "shape", "size"):
                    sa, sb = _swap(ds[i], ds[j], key)
                    negs.append((f"swap_{key}", {"type": "and", "objects": ds[:i] + [sa] + ds[i + 1:j] + [sb]
                                                 + ds[j + 1:]}))
    elif kind == "count":
        negs = [("count", {**spec, "n": m}) for m in (int(spec["n"]) + 1, int(spec["n"]) - 1) if m in NUMBERS]
    elif kind == "exists":  # an attribute of another object bound to this one: "a blue circle" for a blue square
        d = spec["object"]
        for o in scene["objects"]:
            for key in ("colour", "shape"):
                if d.get(key) is not None and o[key] != d[key]:
                    negs.append((f"swap_{key}", {"type": "exists", "object": {**d, key: o[key]}}))
    return negs


def caption_negatives(scene: Scene, spec: Spec, raw: str) -> list[tuple[str, str]]:
    """(kind, text) hard negatives of one true caption, for contrastive training: the caption with colours,
    shapes or sizes swapped between its objects, its objects or relation swapped, its count off by one, or
    (for "a red circle") another object's colour or shape. Worded like `raw`; the scene satisfies none."""
    style = _style_of(spec, raw)
    out: list[tuple[str, str]] = []
    seen = {raw}
    for kind, neg in _swaps(scene, spec):
        text = render(neg, style)
        if text not in seen and not satisfies(scene, neg):
            seen.add(text)
            out.append((kind, text))
    return out
