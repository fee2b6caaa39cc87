"""The scene generator (training/scenes.py): seeded, true captions, false hard negatives, loadable, photo-sized.

Small pictures keep it fast; one run at the default sizes checks the 0.3-2 MP range.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT
from training.evaluate import load_pairs
from training.scene_captions import binding_probes, captions, render
from training.scene_graph import SHAPES, desc, satisfies
from training.scenes import BINDING, DATASET, assign_splits, generate, main, plan

TEAL = (20, 190, 180)
SMALL = (160, 240)


def _doc(out: Path, name: str = DATASET) -> dict[str, Any]:
    return json.loads((out / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def textures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "out"
    generate(out, 40, seed=5, size_range=SMALL)
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two teal 'photos' (so their pixels are recognisable) and one damaged file, and a dataset made on them."""
    bg = tmp_path_factory.mktemp("bg") / "bg"
    (bg / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in (("a.jpg", (800, 600)), ("sub/b.png", (500, 900))):
        px = np.clip(np.array(TEAL) + rng.integers(-6, 7, (h, w, 1)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(bg / name)
    (bg / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (bg / "notes.txt").write_text("not a photo")
    out = tmp_path_factory.mktemp("scenes") / "out"
    generate(out, 30, seed=2, backgrounds=[bg], size_range=SMALL)
    return bg, out


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 9), (b, 9), (c, 10)):
        generate(out, 12, seed=seed, size_range=(96, 160))
    assert (a / DATASET).read_bytes() == (b / DATASET).read_bytes()
    assert (a / BINDING).read_bytes() == (b / BINDING).read_bytes()
    names = sorted(p.name for p in (a / "images").iterdir())
    assert len(names) == 12
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in names)
    assert (a / DATASET).read_bytes() != (c / DATASET).read_bytes()
    assert (a / "images" / names[0]).read_bytes() != (c / "images" / names[0]).read_bytes()


def test_satisfies_reads_the_scene() -> None:
    def obj(shape: str, colour: str, size: str, box: list[int]) -> dict[str, Any]:
        return {"shape": shape, "colour": colour, "size": size, "box": box}

    scene = {"objects": [obj("circle", "red", "small", [0, 40, 20, 60]),
                         obj("square", "blue", "large", [30, 0, 70, 40]),
                         obj("star", "green", "small", [80, 45, 100, 65]),
                         obj("star", "green", "large", [80, 0, 110, 30])]}
    red, blue, star = desc("circle", "red"), desc("square", "blue"), desc("star")
    assert satisfies(scene, {"type": "relation", "a": red, "rel": "left of", "b": blue})
    assert not satisfies(scene, {"type": "relation", "a": blue, "rel": "left of", "b": red})
    assert satisfies(scene, {"type": "relation", "a": red, "rel": "below", "b": blue})
    assert not satisfies(scene, {"type": "relation", "a": red, "rel": "above", "b": blue})
    # the two stars overlap on the x axis; the small one (y from 45) is below the large one (y to 30)
    assert satisfies(scene, {"type": "relation", "a": star, "rel": "below", "b": star})
    assert not satisfies(scene, {"type": "relation", "a": desc("star", "green", "small"), "rel": "above", "b": star})
    assert satisfies(scene, {"type": "count", "n": 2, "object": star})
    assert not satisfies(scene, {"type": "count", "n": 1, "object": star})  # exactly, not at least
    assert satisfies(scene, {"type": "count", "n": 1, "object": desc("star", size="large")})
    assert satisfies(scene, {"type": "count", "n": 4, "object": None})
    assert satisfies(scene, {"type": "exists", "object": desc("square", "blue", "large")})
    assert not satisfies(scene, {"type": "exists", "object": desc("square", "blue", "small")})
    assert satisfies(scene, {"type": "and", "objects": [star, star]})
    assert not satisfies(scene, {"type": "and", "objects": [red, red]})  # one red circle cannot be both
    assert not satisfies(scene, {"type": "and", "objects": [desc("circle", "blue"), desc("square", "red")]})
    with pytest.raises(ValueError):
        satisfies(scene, {"type": "most"})


def test_captions_are_true_of_their_own_image(textures: Path) -> None:
    doc = _doc(textures)
    scenes = [e["scene"] for e in doc["images"]]
    kinds: Counter[str] = Counter()
    for e in doc["images"]:
        assert len(e["sentences"]) == 5 and len({s["raw"] for s in e["sentences"]}) == 5
        for s in e["sentences"]:
            assert satisfies(e["scene"], s["spec"]), (e["filename"], s["raw"])
            assert s["tokens"] == s["raw"].replace(",", "").split()
            kinds[s["spec"]["type"]] += 1
    assert set(kinds) == {"exists", "count", "relation", "and"}
    # relevance is the scene's: some captions are true of other images too, most are false of most images
    true_of = [sum(satisfies(sc, s["spec"]) for sc in scenes) for e in doc["images"] for s in e["sentences"]]
    assert max(true_of) > 1 and float(np.median(true_of)) < len(scenes) / 4


def test_caption_wording_follows_the_spec() -> None:
    a, b = desc("circle", "orange", "small"), desc("square", "blue")
    spec = {"type": "relation", "a": a, "rel": "left of", "b": b}
    assert render(spec, 0) == "a small orange circle to the left of a blue square"
    assert render(spec, 2) == "a blue square with a small orange circle on its left"
    assert render({"type": "count", "n": 2, "object": desc("star", "green", "small")}, 0) == "two small green stars"
    assert render({"type": "count", "n": 1, "object": None}, 2) == "there is one shape"
    assert render({"type": "and", "objects": [a, b, desc("star")]}, 1) == \
        "a photo of a small orange circle, a blue square and a star"
    assert render({"type": "exists", "object": desc("cross", "orange")}, 0) == "an orange cross"


def test_binding_negatives_are_false_and_positives_true(textures: Path) -> None:
    doc, binding = _doc(textures), _doc(textures, BINDING)
    by_id = {e["imgid"]: e for e in doc["images"]}
    assert binding["images"] and all(by_id[d["imgid"]]["split"] == "test" for d in binding["images"])
    cases = []
    for d in binding["images"]:
        assert d["probes"] and d["filename"] == by_id[d["imgid"]]["filename"]
        cases += [(by_id[d["imgid"]]["scene"], p) for p in d["probes"]]
    for i in range(400):  # and many more scenes than the fixture has, without pixels (plans and probes are cheap)
        scene = plan(11, i, (640, 960), [])["scene"]
        cases += [(scene, p) for p in binding_probes(scene, np.random.default_rng(i))]
    seen: Counter[str] = Counter()
    for scene, p in cases:
        assert satisfies(scene, p["positive"]["spec"]), p["positive"]["raw"]
        assert p["negatives"]
        texts = {p["positive"]["raw"]} | {n["raw"] for n in p["negatives"]}
        assert len(texts) == 1 + len(p["negatives"])
        for n in p["negatives"]:
            assert not satisfies(scene, n["spec"]), (n["kind"], n["raw"], p["positive"]["raw"])
            _check_swap(p["positive"]["spec"], n["spec"], n["kind"])
            seen[n["kind"]] += 1
    assert set(seen) == {"swap_colour", "swap_shape", "swap_size", "swap_relation", "opposite_relation", "count"}


def _check_swap(pos: dict[str, Any], neg: dict[str, Any], kind: str) -> None:
    """The negative differs from the positive by exactly the swap it is labelled with."""
    if kind == "count":
        assert {**neg, "n": pos["n"]} == pos and abs(neg["n"] - pos["n"]) == 1
    elif kind == "swap_relation":
        assert neg == {**pos, "a": pos["b"], "b": pos["a"]}
    elif kind == "opposite_relation":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        assert neg == {**pos, "rel": flip[pos["rel"]]}
    else:
        key = kind.removeprefix("swap_")
        a, b = (pos["a"], pos["b"]) if pos["type"] == "relation" else pos["objects"]
        na, nb = (neg["a"], neg["b"]) if neg["type"] == "relation" else neg["objects"]
        assert (na[key], nb[key]) == (b[key], a[key]) and a[key] != b[key]
        assert {k: v for k, v in na.items() if k != key} == {k: v for k, v in a.items() if k != key}


def test_splits_are_disjoint_and_sized(textures: Path) -> None:
    doc = _doc(textures)
    by_split = Counter(e["split"] for e in doc["images"])
    assert by_split == {"train": 32, "val": 4, "test": 4}
    assert len({e["filename"] for e in doc["images"]}) == 40
    big = assign_splits(2000, 0)
    assert Counter(big) == {"train": 1600, "val": 200, "test": 200}
    assert big != assign_splits(2000, 1) and big == assign_splits(2000, 0)


def test_loads_through_the_karpathy_loader(textures: Path) -> None:
    pairs = load_pairs(textures)  # the folder: it must pick dataset_scenes.json, not binding_test.json
    assert len(pairs.images) == 40 and len(pairs.captions) == 200 and all(p.is_file() for p in pairs.images)
    assert pairs.images[0] == textures / "images" / "000000.jpg"
    test = pairs.split("test")
    assert len(test.images) == 4 and test.caption_image.tolist() == [i for i in range(4) for _ in range(5)]
    assert len(pairs.split(("train", "restval")).images) == 32 and len(pairs.split("val").images) == 4
    doc = _doc(textures)
    assert pairs.captions[:5] == [s["raw"] for s in doc["images"][0]["sentences"]]


def test_jpegs_at_the_asked_sizes(textures: Path, tmp_path: Path) -> None:
    for e in _doc(textures)["images"]:
        with Image.open(textures / "images" / e["filename"]) as im:
            assert im.format == "JPEG" and im.size == (e["width"], e["height"])
            assert SMALL[0] <= max(im.size) <= SMALL[1]
    generate(tmp_path / "big", 6, seed=1)
    for p in (tmp_path / "big" / "images").iterdir():
        with Image.open(p) as im:
            assert 736 <= max(im.size) <= 1408 and 0.3e6 <= im.width * im.height <= 2e6


def test_objects_are_drawn_where_the_scene_says(textures: Path) -> None:
    """Each object's centre has its colour, it is at least 1/8 of the shorter side, inside the central square."""
    for e in _doc(textures)["images"]:
        px = np.asarray(Image.open(textures / "images" / e["filename"]).convert("RGB"), dtype=np.float32)
        w, h = e["width"], e["height"]
        s = min(w, h)
        for o in e["scene"]["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert min(x1 - x0, y1 - y0) >= s / 8 * 0.8 and o["extent"] >= s * 0.15
            assert (w - s) / 2 <= x0 and x1 <= (w + s) / 2 + 1 and (h - s) / 2 <= y0 and y1 <= (h + s) / 2 + 1
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            patch = px[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            assert np.abs(patch - np.array(o["rgb"])).max() < 40, (e["filename"], o)


def test_photo_backgrounds_are_used(photos: tuple[Path, Path]) -> None:
    bg, out = photos
    doc = _doc(out)
    kinds = Counter(e["background"]["kind"] for e in doc["images"])
    assert kinds["photo"] >= 8 and kinds["texture"] >= 1  # 80% photos, a third of them the broken one
    used = {e["background"]["photo"] for e in doc["images"] if e["background"]["kind"] == "photo"}
    assert used == {"bg/a.jpg", "bg/sub/b.png"}
    assert any(e["background"].get("unreadable") == "bg/broken.jpg" for e in doc["images"])
    # backgrounds draw from a random stream of their own: without photos, the scenes stay the same
    i = next(e["imgid"] for e in doc["images"] if e["background"]["kind"] == "photo")
    plain = plan(2, i, SMALL, [])
    assert plain["scene"] == doc["images"][i]["scene"] and plain["background"]["kind"] == "texture"
    for e in doc["images"]:
        if e["background"]["kind"] != "photo":
            continue
        px = np.asarray(Image.open(out / "images" / e["filename"]).convert("RGB"), dtype=np.float32)
        free = np.ones(px.shape[:2], dtype=bool)
        for o in e["scene"]["objects"]:
            x0, y0, x1, y1 = o["box"]
            free[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = False
        assert np.abs(px[free].mean(0) - np.array(TEAL)).max() < 12


def test_rerun_replaces_an_earlier_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(out, 8, seed=0, size_range=(64, 96))
    generate(out, 3, seed=0, size_range=(64, 96))
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert len(_doc(out)["images"]) == 3 and not (out / ".partial").exists()


def test_small_images_for_training(tmp_path: Path) -> None:
    assert main([str(tmp_path / "s"), "--n", "10", "--size-range", "64,96", "--captions", "3"]) == 0
    doc = _doc(tmp_path / "s")
    assert all(64 <= max(e["width"], e["height"]) <= 96 and len(e["sentences"]) == 3 for e in doc["images"])
    scene = plan(0, 0, (64, 96), [])["scene"]
    assert all(satisfies(scene, spec) for _, spec in captions(scene, np.random.default_rng(0), 8))
    assert {o["shape"] for i in range(60) for o in plan(0, i, (64, 96), [])["scene"]["objects"]} == set(SHAPES)


@pytest.mark.parametrize("args, says", [
    (["--n", "0"], "n >= 1"),
    (["--n", "x"], "invalid int"),
    (["--size-range", "10"], "MIN,MAX"),
    (["--size-range", "8,20"], "16 <= MIN"),
    (["--size-range", "300,200"], "MIN <= MAX"),
    (["--backgrounds", "/no/such/folder"], "no such folder"),
    (["--seed", "-1"], "seed >= 0"),
    (["--bogus"], "unrecognized"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                            says: str) -> None:
    assert main([str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scenes: error:") and says in err
    assert not (tmp_path / "out" / DATASET).exists()


def test_refuses_a_foreign_folder_and_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep me")
    (tmp_path / "afile").write_text("x")
    for out, says in ((tmp_path / "mine", "not empty"), (tmp_path / "afile", "is a file")):
        assert main([str(out), "--n", "2"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "keep me" and len(list((tmp_path / "mine").iterdir())) == 1


def test_empty_backgrounds_folder_falls_back_to_textures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "out"), "--n", "4", "--size-range", "64,96", "--backgrounds",
                 str(tmp_path / "empty")]) == 0
    out, err = capsys.readouterr()
    assert "no photos under" in err and err.count("\n") == 1 and out.startswith("wrote 4 images")
    assert {e["background"]["kind"] for e in _doc(tmp_path / "out")["images"]} == {"texture"}


@pytest.mark.subprocess
def test_command_line_entry_without_torch(tmp_path: Path) -> None:
    code = ("import sys, runpy; sys.argv = ['scenes', sys.argv[1], '--n', '0']\n"
            "try:\n    runpy.run_module('training.scenes', run_name='__main__')\n"
            "except SystemExit as e:\n    assert 'torch' not in sys.modules; raise")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "n >= 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "training.scenes", str(tmp_path / "o"), "--n", "3", "--size-range",
                        "64,80"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("wrote 3 images") and r.stderr == ""
