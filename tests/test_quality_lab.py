"""The quality lab's claims on the small shared run (tests/lab_fixtures.py): a reranker trained on its train
split is not worse than dense ranking on the binding set, and the relevance cutoff at `auto` hides scenes that
share nothing with the query while keeping exact matches. The full lab (bench/quality_lab.py) measures the
same things at size; these margins were set from the seeds tried (see each test).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import run_cli


@pytest.fixture(scope="session")
def lab(trained: tuple[Path, dict[str, Any]], scenes: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> dict[str, Any]:
    """The small run's encoder (fp32), its test split features, and a reranker trained through the CLI."""
    from retrieval.model.recorded import NO_INDEX, open_model
    from training.evaluate import extract_features, load_pairs

    out, _ = trained
    model = ["--model", str(out / "model.json"), "--pretrained", str(out / "model.pt")]
    reranker = tmp_path_factory.mktemp("lab-reranker") / "r.safetensors"
    r = run_cli("train-reranker", str(scenes), "--out", str(reranker), *model, "--precision", "fp32", "--json",
                "--epochs", "2", "--max-images", "320", home=tmp_path_factory.mktemp("lab-home") / "none", timeout=900)
    assert r.returncode == 0, r.stderr
    encoder = open_model(NO_INDEX, str(out / "model.json"), str(out / "model.pt"), "cpu", "fp32")
    pairs = load_pairs(scenes).split("test")
    return {"encoder": encoder, "pairs": pairs, "feats": extract_features(encoder, pairs), "reranker": reranker,
            "train": json.loads(r.stdout)}


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_trained_reranker_is_not_worse_than_dense_on_the_binding_set(lab: dict[str, Any], scenes: Path) -> None:
    """Non-inferiority, margin 4 points of probe accuracy and 3 of pairwise accuracy (seen on this run: +2.2
    and -0.4 points with the trainer before equal captions stopped being negatives, +2.2 and 0.0 after; the
    full lab reports whether the reranker is better)."""
    from training.lab_rerank import binding_accuracy
    from training.torch_scorer import load_params

    fp = lab["encoder"].fingerprint
    trained = load_params(lab["reranker"], fp.dim, fp.weights).eval()
    got = binding_accuracy(lab["encoder"], scenes, lab["pairs"], lab["feats"], {"dense": None, "trained": trained})
    dense, rr = got["dense"], got["trained"]
    print("binding", json.dumps(got))
    assert dense["probes"] == rr["probes"] > 60
    assert rr["accuracy"] >= dense["accuracy"] - 0.04, got
    assert rr["pairwise"] >= dense["pairwise"] - 0.03, got


@pytest.mark.slow
def test_the_cutoff_hides_unrelated_scenes_and_keeps_exact_matches(lab: dict[str, Any], scenes: Path,
                                                                   tmp_path: Path) -> None:
    """At `auto`, over the test split's caption x photo pairs: most (caption, its own photo) pairs are kept,
    most pairs whose photo shares no shape and no colour with the caption are hidden (this run: 73% kept,
    70% hidden; the lab's model, 4x larger, fitted the threshold)."""
    from retrieval.query.cutoff import AUTO_MIN_SCORE, vocab_z
    from retrieval.query.vocab import prompt_vocabulary
    from training.scenes import DATASET

    enc, pairs, feats = lab["encoder"], lab["pairs"], lab["feats"]
    vocab = prompt_vocabulary(enc, tmp_path)
    doc = {e["filename"]: e for e in json.loads((scenes / DATASET).read_text())["images"]}
    entries = [doc[p.name] for p in pairs.images]
    specs = {s["raw"]: s["spec"] for e in entries for s in e["sentences"]}

    def words(spec: Any) -> set[str]:  # the shapes and colours a caption names
        if isinstance(spec, dict):
            return {str(v) for k, v in spec.items() if k in ("shape", "colour") and v} | {
                w for v in spec.values() for w in words(v)}
        return {w for v in spec for w in words(v)} if isinstance(spec, list) else set()

    sim = feats.text_pooled @ feats.image_pooled.T
    z = np.stack([vocab_z(sim[:, i], np.repeat(feats.image_pooled[i][None], len(sim), 0), vocab)
                  for i in range(sim.shape[1])], axis=1)
    exact = z[np.arange(len(sim)), feats.caption_image]
    seen = [{o["shape"] for o in e["scene"]["objects"]} | {o["colour"] for o in e["scene"]["objects"]}
            for e in entries]
    unrelated = np.asarray([[not (words(specs[c]) & seen[i]) for i in range(len(entries))] for c in pairs.captions])
    kept_exact = float((exact >= AUTO_MIN_SCORE).mean())
    hidden_unrelated = float((z[unrelated] < AUTO_MIN_SCORE).mean())
    print(f"cutoff auto {AUTO_MIN_SCORE}: exact kept {kept_exact:.3f}, unrelated hidden {hidden_unrelated:.3f} "
          f"({int(unrelated.sum())} unrelated pairs)")
    assert unrelated.sum() > 1000
    assert kept_exact >= 0.6 and hidden_unrelated >= 0.6


def test_recall_of_result_lists_and_the_cutoff_figures() -> None:
    from training.lab_metrics import cutoff_quality, fit_threshold, recall_lists

    found = [["a", "b", "c"], ["x", "y"], []]
    right = {(0, "c"), (1, "x")}
    got = recall_lists(found, lambda q, key: (q, key) in right, ks=(1, 2, 3))
    assert got == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(1 / 3), "R@3": pytest.approx(2 / 3)}
    z = np.asarray([3.0, 2.0, 1.0, 0.0])
    rel = np.asarray([True, False, True, False])
    q = cutoff_quality(z, rel, 1.5)
    assert (q["precision"], q["recall"], q["kept"]) == (0.5, 0.5, 0.5)
    best = fit_threshold(z, rel, grid=[0.5, 1.5, 2.5, 3.5])
    assert best["threshold"] == 0.5 and best["recall"] == 1.0 and best["precision"] == pytest.approx(2 / 3)


def test_scene_truth_by_scene_and_by_own_item() -> None:
    from training.lab_metrics import SceneTruth

    red = {"objects": [{"shape": "circle", "colour": "red", "size": "small", "box": [0, 0, 10, 10]}],
           "counts": {}, "relations": []}
    blue = {"objects": [{"shape": "square", "colour": "blue", "size": "large", "box": [0, 0, 10, 10]}],
            "counts": {}, "relations": []}
    spec = {"type": "exists", "object": {"shape": "circle", "colour": "red", "size": None}}
    truth = SceneTruth({"r.jpg": red, "b.jpg": blue, "r2.jpg": red}, {"a red circle": spec})
    t2i = truth.text_to_image(["a red circle"], [["b.jpg", "r2.jpg"]], ["r.jpg"])
    assert t2i["scene"] == {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0}  # r2.jpg is as right as its own picture
    assert t2i["own"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0}
    i2t = truth.image_to_text(["r2.jpg"], [["a red circle"]], [set()])
    assert i2t["scene"]["R@1"] == 1.0 and i2t["own"]["R@1"] == 0.0
