"""A small CLIP trained here on generated scenes (training/train_clip.py, issue 15): it learns (a seeded margin
over chance with relevance by scene), it is deterministic, its hard negatives are false of their scenes, its
loss is open_clip's, and what it saves runs through the whole CLI (index, search on ONNX, eval).

One small run (300 steps of a 48 px model on 800 pictures of 64-96 px, tests/lab_fixtures.py) is shared by the
slow tests here and in tests/test_quality_lab.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import ROOT, run_cli
from tests.lab_fixtures import N_IMAGES, SMALL_CFG
from training.clip_data import load_scenes, shift_batch
from training.clip_metrics import chance_at_k, recall
from training.scene_captions import caption_negatives
from training.scene_graph import satisfies
from training.train_clip import Batches, TrainConfig, main, train


# ---- pieces ----------------------------------------------------------------------------------------
def test_hard_negatives_are_false_of_their_scene_and_worded_alike(scenes: Path) -> None:
    doc = json.loads((scenes / "dataset_scenes.json").read_text())
    kinds: dict[str, int] = {}
    for e in doc["images"][:120]:
        for s in e["sentences"]:
            for kind, text in caption_negatives(e["scene"], s["spec"], s["raw"]):
                kinds[kind] = kinds.get(kind, 0) + 1
                assert text != s["raw"] and len(text.split()) == len(s["raw"].split())  # the same template
    assert {"swap_colour", "swap_relation", "opposite_relation", "count"} <= set(kinds), kinds


def test_negative_specs_are_checked_by_satisfies() -> None:
    a = {"shape": "circle", "colour": "red", "size": "small", "box": [0, 0, 10, 10]}
    b = {"shape": "square", "colour": "blue", "size": "small", "box": [20, 0, 30, 10]}
    scene = {"objects": [a, b], "width": 40, "height": 40}
    spec = {"type": "relation", "a": {"shape": "circle", "colour": "red", "size": None}, "rel": "left of",
            "b": {"shape": "square", "colour": "blue", "size": None}}
    assert satisfies(scene, spec)
    negs = dict((t, k) for k, t in caption_negatives(scene, spec, "a red circle to the left of a blue square"))
    assert negs == {"a blue circle to the left of a red square": "swap_colour",
                    "a red square to the left of a blue circle": "swap_shape",
                    "a blue square to the left of a red circle": "swap_relation",
                    "a red circle to the right of a blue square": "opposite_relation"}


def test_chance_matches_its_definition() -> None:
    assert chance_at_k(np.array([1]), 10, 1) == pytest.approx(0.1)
    assert chance_at_k(np.array([1]), 10, 5) == pytest.approx(0.5)
    assert chance_at_k(np.array([3]), 10, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert chance_at_k(np.array([10, 0]), 10, 3) == pytest.approx(0.5)
    rng = np.random.default_rng(0)  # and against random rankings
    rel = rng.random((200, 30)) < rng.uniform(0.01, 0.3, (200, 1))
    got = np.mean([recall(rng.random(rel.shape), rel)["R@5"] for _ in range(200)])
    assert got == pytest.approx(chance_at_k(rel.sum(1), 30, 5), abs=0.01)


def test_recall_counts_any_relevant_in_the_top_k() -> None:
    sim = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.3]])
    rel = np.array([[False, True, False], [True, False, False]])
    assert recall(sim, rel, ks=(1, 2, 3)) == {"R@1": 0.0, "R@2": 0.5, "R@3": 1.0}


def test_the_loss_is_open_clips_and_negatives_extend_it() -> None:
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from training.clip_model import make_loss

    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    ours = make_loss()
    assert torch.equal(ours(img, txt[:4], scale), ClipLoss()(img, txt[:4], scale))
    logits = scale * img @ txt.T
    labels = torch.arange(4)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :4].T, labels)) / 2
    assert torch.allclose(ours(img, txt, scale), want)
    assert ours(img, txt, scale) > ours(img, txt[:4], scale)  # negatives only add competition


def test_shift_keeps_pictures_whole_and_is_seeded() -> None:
    px = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    assert shift_batch(px, np.random.default_rng(1), 0) is px
    a, b = shift_batch(px, np.random.default_rng(1), 2), shift_batch(px, np.random.default_rng(1), 2)
    assert a.shape == px.shape and np.array_equal(a, b) and not np.array_equal(a, px)
    assert any(np.array_equal(a[0, 2:-2, 2:-2], px[0, 2 + dy:14 + dy, 2 + dx:14 + dx])
               for dy in range(-2, 3) for dx in range(-2, 3))  # a translation, not a flip or a crop


def test_batches_bring_hard_negatives_only_when_asked(scenes: Path) -> None:
    from retrieval.media.decode import Preprocess

    train_split = load_scenes(scenes, Preprocess(size=16), splits=("train",)).splits["train"]
    on = Batches(train_split, 48, 0, True, 0.5, 1)  # 640 images: the first epoch ends inside batch 14
    off = Batches(train_split, 48, 0, False, 0.5, 1)
    got = [on.next() for _ in range(16)]
    assert all(len(extra) > 8 for _, _, extra in got) and all(not off.next()[2] for _ in range(4))
    for _, caps, extra in got:
        assert not set(extra) & {train_split.captions[c] for c in caps}
        assert len(set(train_split.caption_image[caps].tolist())) == len(caps) == 48  # no image twice in a batch
    again = Batches(train_split, 48, 0, True, 0.5, 1)
    for px, caps, extra in got:
        px2, caps2, extra2 = again.next()
        assert np.array_equal(px, px2) and caps == caps2 and extra == extra2


# ---- runs ------------------------------------------------------------------------------------------
def test_same_seed_same_weights(scenes: Path, small_cfg: Path, tmp_path: Path) -> None:
    import torch

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(scenes, tmp_path / name, TrainConfig(steps=3, batch=16, log_every=1, seed=seed, threads=1), small_cfg)
    a, b, c = (torch.load(tmp_path / n / "model.pt") for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    logs = [json.loads((tmp_path / n / "train_log.json").read_text()) for n in "abc"]
    untimed = [[{k: v for k, v in h.items() if not k.endswith("_s")} for h in lg["history"]] for lg in logs]
    assert len(untimed[0]) == 3 and untimed[0] == untimed[1] != untimed[2]
    assert logs[0]["data_digest"] == logs[2]["data_digest"] and len(logs[0]["data_digest"]) == 64
    assert logs[0]["final"] == logs[1]["final"]


@pytest.mark.parametrize("args,needle", [
    (["{data}", "{out}", "--steps", "0"], "--steps must be at least 1"),
    (["{data}", "{out}", "--batch", "1"], "--batch must be at least 2"),
    (["{data}", "{out}", "--minutes", "-1"], "--minutes must be positive"),
    (["{data}", "{out}", "--lr", "0"], "--lr must be positive"),
    (["{data}", "{out}", "--steps", "many"], "invalid int value"),
    (["{data}", "{out}", "--frobnicate"], "unrecognized arguments"),
    (["{data}"], "required: out"),
    (["{tmp}/nowhere", "{out}"], "no such folder"),
    (["{tmp}", "{out}"], "holds no dataset_scenes.json"),
    (["{data}", "{data}"], "holds other files than model.json"),
    (["{data}", "{data}/dataset_scenes.json"], "is a file, not a folder"),
    (["{data}", "{out}", "--config", "{tmp}/none.json"], "cannot read model config"),
    (["{data}", "{out}", "--config", "{tmp}/odd.json"], "lacks vision_cfg, text_cfg"),
    (["{data}", "{out}", "--image-size", "50"], "multiple of the config's vision_cfg.patch_size (8)"),
])
def test_bad_arguments_are_one_line_and_exit_2(scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               args: list[str], needle: str) -> None:
    (tmp_path / "odd.json").write_text('{"embed_dim": 8}')
    argv = [a.format(data=scenes, out=tmp_path / "out", tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("train_clip: error: ") and needle in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
def test_the_module_entry_point(scenes: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "training.train_clip", str(scenes), str(tmp_path / "o"), "--batch",
                        "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == "train_clip: error: --batch must be at least 2 (contrastive loss needs "\
        "negatives), not 0\n" and not r.stdout
    (tmp_path / "notes.txt").write_text("not a trainer's output")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "training.train_clip", str(scenes), str(tmp_path),
                        "--steps", "5"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith("give an empty or new folder")
    assert "| torch\n" not in r.stderr and "open_clip" not in r.stderr  # refused before the heavy imports


@pytest.mark.slow
def test_a_time_budget_plans_the_steps(scenes: Path, small_cfg: Path, tmp_path: Path) -> None:
    log = train(scenes, tmp_path / "o", TrainConfig(minutes=0.12, batch=16, eval_every=1000, threads=1), small_cfg)
    assert log["stopped"] in ("steps", "time") and log["steps_done"] > 20 and log["steps_planned"] >= 21
    assert log["train_s"] + log["eval_s"] < 0.12 * 60 + 5 and log["train_config"]["steps"] is None


@pytest.mark.slow
def test_a_small_run_learns_far_above_chance(trained: tuple[Path, dict[str, Any]]) -> None:
    out, log = trained
    assert {p.name for p in out.iterdir()} == {"model.json", "model.pt", "train_log.json"}
    assert json.loads((out / "model.json").read_text()) == SMALL_CFG
    assert log["steps_done"] == 300 and log["stopped"] == "steps" and log["images"] == N_IMAGES
    first, last = log["history"][0]["loss"], log["history"][-1]["loss"]
    assert last < 0.8 * first, (first, last)
    for split in ("val", "test"):  # 80 images, 400 captions each; seeded, so these margins are not luck
        scene, own = log["final"][split]["scene"], log["final"][split]["own"]
        got, chance = scene["t2i"]["R@5"], scene["chance"]["t2i"]["R@5"]  # chance about 0.2: "one circle" is common
        assert got >= chance + 0.2, (split, got, chance)
        assert scene["t2i"]["R@1"] >= 1.8 * scene["chance"]["t2i"]["R@1"], (split, scene)
        assert own["t2i"]["R@5"] >= 3.5 * own["chance"]["t2i"]["R@5"] == pytest.approx(3.5 * 5 / 80), (split, own)
        assert own["i2t"]["R@5"] >= 3.5 * own["chance"]["i2t"]["R@5"], (split, own)
    assert [e["step"] for e in log["evals"]] == [0, 100, 200, 300]
    assert log["evals"][-1]["val"]["scene"]["t2i"]["R@5"] > log["evals"][0]["val"]["scene"]["t2i"]["R@5"] + 0.2
    b = log["final"]["binding"]
    assert b["probes"] > 100 and 0 <= b["accuracy"] <= 1 and set(b["by_type"]) <= {"relation", "and", "count"}
    assert 0.2 < b["chance"] < 0.5 and set(b["pairwise_by_kind"]) >= {"swap_colour", "count"}


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_trained_model_runs_through_the_cli(trained: tuple[Path, dict[str, Any]], scenes: Path,
                                                tmp_path: Path) -> None:
    """Index with the saved pair, search on its ONNX export, eval: each answers as the training code's own
    embeddings say, so index-time decoding and tokenizing are the training ones."""
    import torch

    from retrieval.model.custom_config import read_config
    from training.clip_model import build_model, embed, tokenize

    out, log = trained
    home = tmp_path / "home"

    def ok(*args: str) -> Any:
        r = run_cli(*args, home=home)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    report = ok("index", str(scenes / "images"), "--model", str(out / "model.json"), "--pretrained",
                str(out / "model.pt"), "--precision", "fp32", "--json")
    assert report["added"] == sum(N_IMAGES.values())
    query = "a photo of a red circle to the left of a blue square"
    hits = ok("search", query, "-k", "5", "--backend", "onnx", "--no-rerank", "--json")
    model, tokenizer, pre = build_model(read_config(out / "model.json"), seed=99)
    model.load_state_dict(torch.load(out / "model.pt"))
    data = load_scenes(scenes, pre)
    files = [f for s in data.splits.values() for f in s.files]
    img, txt = embed(model, pre, np.concatenate([s.pixels for s in data.splits.values()]), tokenize(tokenizer, [query]))
    sim = img @ txt[0]
    top = np.argsort(-sim, kind="stable")[:5]
    assert [h["path"] for h in hits] == [files[i] for i in top]
    assert [h["score"] for h in hits] == pytest.approx([float(sim[i]) for i in top], abs=2e-3)
    ev = ok("eval", str(scenes), "--split", "test", "--no-rerank", "--precision", "fp32", "--json")
    own = log["final"]["test"]["own"]
    assert ev["images"] == N_IMAGES["test"] and ev["captions"] == 5 * N_IMAGES["test"]
    for d in ("t2i", "i2t"):  # the same recall as the training code measured
        for k in ("R@1", "R@5", "R@10"):
            assert ev["dense"][d][k] == pytest.approx(100 * own[d][k], abs=0.51), (d, k, ev["dense"], own)
