"""The reranker from the command line, in subprocesses: dense by default without a trained reranker, --rerank
runs the parameter-free scorer, a recorded reranker turns it on by default, --no-rerank is the dense search, the set
never changes, set-reranker records a trained file, eval and train-reranker run end to end. (Caption reranking
is checked in-process in test_rerank_cache.py.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from retrieval.store import Store
from tests.helpers import GOOD, TEST_MODEL, run_cli

TORCH = {"CROSSMODAL_BACKEND": "torch"}  # no ONNX export inside these tests: they check the reranker


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout) if r.stdout.strip().startswith(("[", "{")) else r.stdout


@pytest.fixture(scope="module")
def home(built_index, tmp_path_factory):
    """A private copy of the shared index (set-reranker writes to it)."""
    dst = tmp_path_factory.mktemp("rerank-cli") / "home"
    shutil.copytree(built_index, dst)
    return dst


def _oracle(home, modality: str, q: np.ndarray, k: int) -> list[int]:
    with Store.open(home) as s:
        ids, vecs = s.vectors(modality)
    return ids[np.argsort(-(vecs @ q), kind="stable")[:k]].tolist()


@pytest.mark.slow
@pytest.mark.subprocess
def test_search_is_dense_by_default_and_rerank_reorders_the_same_set(home, encoder):
    text = "a dog running on a beach"
    reranked = ok(run_cli("search", text, "-k", str(GOOD), "--json", "--rerank", home=home, env=TORCH))
    dense = ok(run_cli("search", text, "-k", str(GOOD), "--json", "--no-rerank", home=home, env=TORCH))
    default = ok(run_cli("search", text, "-k", str(GOOD), "--json", home=home, env=TORCH))
    assert default == dense  # no trained reranker recorded: the parameter-free scorer is opt-in
    assert [h["id"] for h in dense] == _oracle(home, "image", encoder.encode_texts([text])[0], GOOD)
    assert all(h["dense_rank"] == h["rank"] and h["dense_score"] == h["score"] for h in dense)
    assert sorted(h["id"] for h in reranked) == sorted(h["id"] for h in dense)  # same set, new order
    assert [h["rank"] for h in reranked] == list(range(1, GOOD + 1))
    by_id = {h["id"]: h for h in dense}
    for h in reranked:
        assert h["dense_rank"] == by_id[h["id"]]["rank"]
        assert h["dense_score"] == pytest.approx(by_id[h["id"]]["score"], abs=1e-5)
    assert [h["score"] for h in reranked] == sorted((h["score"] for h in reranked), reverse=True)
    assert [h["id"] for h in reranked] != [h["id"] for h in dense]  # (seeded: the order does change)


@pytest.mark.subprocess
def test_set_reranker_records_file_and_refuses_other_models(home, encoder, tmp_path):
    from retrieval.rerank.params import recorded_reranker
    from training.torch_scorer import CoAttentionScorer, save_params

    torch.manual_seed(0)
    scorer = CoAttentionScorer(encoder.dim)
    with torch.no_grad():
        for p in scorer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    good = tmp_path / "r.safetensors"
    save_params(scorer, good, model=TEST_MODEL, weights=encoder.fingerprint.weights)
    r = ok(run_cli("set-reranker", str(good), "--json", home=home))
    assert r["reranker"]["path"] == str(good.resolve()) and len(r["reranker"]["sha256"]) == 64
    with Store.open(home) as s:
        assert recorded_reranker(s)["path"] == str(good.resolve())
    from retrieval.query.search import Searcher
    from retrieval.rerank.reranker import Reranker

    with Store.open(home) as store:  # queries now use the learned parameters
        rr = Reranker.open(Searcher(store, encoder))
        assert not rr.scorer.identity and np.array_equal(rr.scorer.w["w_q_text"], scorer.w_q_text.detach().numpy())
    text = "a dog running on a beach"  # and rerank by default
    default = ok(run_cli("search", text, "-k", str(GOOD), "--json", home=home, env=TORCH))
    dense = ok(run_cli("search", text, "-k", str(GOOD), "--json", "--no-rerank", home=home, env=TORCH))
    assert sorted(h["id"] for h in default) == sorted(h["id"] for h in dense)
    assert [h["score"] for h in default] != [h["score"] for h in dense]  # the learned scores, not the dense ones

    wrong = tmp_path / "wrong.safetensors"
    save_params(CoAttentionScorer(64, heads=4), wrong)
    r = run_cli("set-reranker", str(wrong), home=home)
    assert r.returncode == 2 and "64-d" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    good.write_bytes(good.read_bytes() + b" ")  # changed after it was recorded
    from retrieval.errors import UserError

    with Store.open(home) as store, pytest.raises(UserError, match="changed since it was recorded"):
        Reranker.open(Searcher(store, encoder))
    assert ok(run_cli("set-reranker", "--clear", "--json", home=home)) == {"reranker": None}
    with Store.open(home) as store:
        assert Reranker.open(Searcher(store, encoder)).scorer.identity


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_and_train_reranker_commands(checkpoint, photos, tmp_path):
    """A tiny Karpathy-layout set made of the test photos: the commands run and write what they say."""
    names = [f"img{i:02d}" for i in range(8)]
    entries = [{"filename": photos[n].name, "filepath": str(photos[n].parent), "split": s,
                "sentences": [{"raw": f"photo {n} variant {j}"} for j in range(2)]}
               for n, s in zip(names, ["train"] * 4 + ["val"] * 2 + ["test"] * 2, strict=True)]
    (tmp_path / "dataset_tiny.json").write_text(json.dumps({"images": entries}))
    model = ["--model", TEST_MODEL, "--pretrained", str(checkpoint)]
    nohome = tmp_path / "no-index"
    out = tmp_path / "eval.json"
    dense_only = ok(run_cli("eval", str(tmp_path), "--split", "test", "--json", *model, home=nohome))
    assert dense_only["reranked"] is None  # no trained reranker: dense unless --rerank asks
    doc = ok(run_cli("eval", str(tmp_path), "--split", "test", "--out", str(out), "--json", "--rerank", *model,
                     home=nohome))
    assert doc == json.loads(out.read_text()) and doc["dense"] == dense_only["dense"]
    assert doc["images"] == 2 and doc["captions"] == 4
    assert set(doc["dense"]) == {"t2i", "i2t"} and set(doc["reranked"]["i2t"]) == {"R@1", "R@5", "R@10"}
    assert doc["dense"]["t2i"]["R@10"] == 100.0  # two images: everything is in the top 10

    dst = tmp_path / "r.safetensors"
    r = run_cli("train-reranker", str(tmp_path), "--out", str(dst), "--epochs", "2", "--json", *model, home=nohome)
    doc = ok(r)
    assert dst.is_file() and len(doc["history"]) == 2 and "t2i_R@1" in doc["baseline"]
    best = doc["history"][doc["best_epoch"] - 1]["mean_R@1"]
    assert doc["beats_dense"] == (best > doc["baseline"]["mean_R@1"])
    assert ("does not beat dense ranking" in r.stderr) == (not doc["beats_dense"])
    from retrieval.rerank.params import read_params_meta
    from training.torch_scorer import load_params

    assert read_params_meta(dst)["model"] == TEST_MODEL
    assert not load_params(dst, dim=384).identity
