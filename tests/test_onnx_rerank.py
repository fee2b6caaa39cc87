"""Reranking on ONNX Runtime: token features like torch's, the numpy scorer like the torch module, the same
reranked results as the torch path, no torch in a reranked CLI query, and fallbacks that say why."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from retrieval.media.decode import decode_for_model  # noqa: E402
from retrieval.model.export_cache import export_dir, export_key, legacy_root  # noqa: E402
from retrieval.model.onnx_encoder import OnnxEncoder, older_exports  # noqa: E402
from retrieval.model.torch_encoder import TorchEncoder  # noqa: E402
from retrieval.query.open import open_index  # noqa: E402
from retrieval.rerank.params import load_scorer
from retrieval.rerank.reranker import Reranker
from retrieval.rerank.scorer import PARAMS, NumpyCoAttention  # noqa: E402
from tests.helpers import GOOD, run_cli  # noqa: E402
from training.torch_scorer import CoAttentionScorer, load_params, save_params

TEXTS = ["", "a dog", "a dog running on a beach at sunset with friends", "Café crème, 東京 🐶 &amp; more",
         " ".join(f"word{i}" for i in range(150)), "x"]
QUERIES = ["a dog running on a beach", "red circles", "caption number 3 about colours"]


def row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def onnx_encoder(encoder, home: Path) -> OnnxEncoder:
    enc = OnnxEncoder.open(home, encoder.fingerprint)
    assert enc is not None and enc.has_tokens
    return enc


# ---- token features -------------------------------------------------------------------------------
def test_export_has_checked_token_outputs(encoder, home: Path) -> None:
    meta = json.loads((export_dir(encoder.fingerprint) / "export.json").read_text())
    assert meta["version"] == 2 and meta["tokens"] == {"supported": True, "output": "token_features",
                                                       "reason": None}
    assert meta["check"]["min_cosine_text_tokens"] >= 0.9999
    assert meta["check"]["min_cosine_image_tokens"] >= 0.9999


def test_text_token_features_agree_with_torch(encoder, onnx_encoder) -> None:
    want, got = encoder.encode_text_tokens(TEXTS), onnx_encoder.encode_text_tokens(TEXTS)
    assert got.tokens.dtype == np.float32 and got.tokens.shape == want.tokens.shape
    assert got.mask.dtype == bool and np.array_equal(got.mask, want.mask)
    assert row_cos(got.tokens[got.mask], want.tokens[want.mask]).min() >= 0.999
    assert row_cos(got.pooled, want.pooled).min() >= 0.999
    np.testing.assert_allclose(got.tokens[got.mask], want.tokens[want.mask], atol=2e-3 * np.abs(want.tokens).max())
    vecs, toks = onnx_encoder.encode_texts_with_tokens(TEXTS, batch_size=4)
    ref_vecs, ref_toks = encoder.encode_texts_with_tokens(TEXTS, batch_size=4)
    assert [t.shape for t in toks] == [t.shape for t in ref_toks]
    assert min(row_cos(a, b).min() for a, b in zip(toks, ref_toks, strict=True)) >= 0.999
    assert row_cos(vecs, ref_vecs).min() >= 0.999
    np.testing.assert_allclose(vecs, onnx_encoder.encode_texts(TEXTS), atol=1e-6)  # same graph, same output


def test_image_token_features_agree_with_torch(encoder, onnx_encoder, photos) -> None:
    pixels = np.stack([decode_for_model(photos[f"img0{i}"].read_bytes(), encoder.preprocess).pixels
                       for i in range(4)])
    pooled, toks = onnx_encoder.encode_pixels_with_tokens(pixels)
    ref_pooled, ref_toks = encoder.encode_pixels_with_tokens(pixels)
    assert toks.dtype == np.float32 and toks.shape == ref_toks.shape == (4, 1 + 7 * 7, encoder.dim)
    assert row_cos(toks, ref_toks).min() >= 0.999
    assert row_cos(pooled, ref_pooled).min() >= 0.999
    np.testing.assert_allclose(pooled, onnx_encoder.encode_pixels(pixels), atol=1e-6)


# ---- the numpy scorer -----------------------------------------------------------------------------
def _case(rng: np.random.Generator, b: int = 5, lt: int = 7, li: int = 9, d: int = 16):
    text = rng.normal(size=(b, lt, d)).astype(np.float32)
    image = rng.normal(size=(b, li, d)).astype(np.float32)
    tmask = np.zeros((b, lt), bool)
    for r in range(b):
        tmask[r, 1:2 + r % lt] = True
    imask = np.ones((b, li), bool)
    imask[1, -3:] = False
    return rng.uniform(-1, 1, size=b).astype(np.float32), text, tmask, image, imask


@pytest.mark.parametrize("learned", [False, True])
def test_numpy_scorer_equals_the_torch_module(learned: bool, tmp_path) -> None:
    rng = np.random.default_rng(7 + learned)
    dense, text, tmask, image, imask = _case(rng)
    scorer = CoAttentionScorer(16, heads=4, lam=0.7)
    if learned:
        with torch.no_grad():
            for n in PARAMS:
                getattr(scorer, n).copy_(torch.from_numpy(rng.normal(scale=0.5, size=(16, 16)).astype(np.float32)))
        scorer.identity = False
    twins = [NumpyCoAttention.from_torch(scorer)]
    if learned:
        path = tmp_path / "r.safetensors"
        save_params(scorer, path, model="M", weights="sha256:x")
        twins.append(load_scorer(path, dim=16, weights="sha256:x"))
        scorer = load_params(path, dim=16, weights="sha256:x")
    t = torch.from_numpy
    cases = [(dense, text, tmask, image, imask),  # pairs
             (dense, text[:1], tmask[:1], image, imask),  # one text query, many images
             (dense, text, tmask, image[:1], imask[:1])]  # one image query, many captions
    for args in cases:
        with torch.inference_mode():
            want = scorer(*(t(a) for a in args)).numpy()
        for twin in twins:
            got = twin(*args)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-5)
            assert np.array_equal(np.argsort(-got, kind="stable"), np.argsort(-want, kind="stable"))


# ---- reranked results: ONNX equals torch ----------------------------------------------------------
def _reranked(searcher, text: str | None = None, image: bytes | None = None, corpus: str | None = None):
    rr = Reranker.open(searcher)
    if image is not None:
        hits = rr.caption(image, 10, corpus, rerank_k=10)
    else:
        hits = rr.search_images(searcher.embed_query(text=text, with_tokens=True), GOOD, rerank_k=GOOD)
    return rr, hits


@pytest.mark.parametrize("cache", ["token cache", "no token cache"])
def test_reranked_results_equal_the_torch_path(home: Path, tmp_path, photos, encoder, cache: str) -> None:
    """With the cache, only the query's tokens differ; without it, every candidate's come from the backend."""
    homes = {}
    for backend in ("onnx", "torch"):
        homes[backend] = tmp_path / backend
        shutil.copytree(home, homes[backend])
        if cache == "no token cache":
            shutil.rmtree(homes[backend] / "tokens")
    on = open_index(homes["onnx"], device="cpu", backend="onnx")
    tc = open_index(homes["torch"], device="cpu", precision="fp32", backend="torch")
    try:
        assert isinstance(on.encoder, OnnxEncoder) and isinstance(tc.encoder, TorchEncoder)
        changed = 0
        for i, text in enumerate(QUERIES):
            rr_o, a = _reranked(on, text=text)
            rr_t, b = _reranked(tc, text=text)
            assert rr_o.encoder is on.encoder and isinstance(rr_o.scorer, NumpyCoAttention)
            assert [h.id for h in a] == [h.id for h in b], text
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-4)
            assert rr_o.stats.recomputed == (GOOD if cache == "no token cache" and i == 0 else 0)  # then cached
            changed += [h.id for h in a] != [h.id for h in sorted(a, key=lambda h: h.dense_rank)]
        assert changed  # the reranker does reorder (else equal orders prove little)
        data = photos["img03"].read_bytes()
        for corpus in (None, "alpha", "beta"):
            _, a = _reranked(on, image=data, corpus=corpus)
            _, b = _reranked(tc, image=data, corpus=corpus)
            assert [h.id for h in a] == [h.id for h in b], corpus
    finally:
        on.store.close()
        tc.store.close()


# ---- the CLI: reranked queries import no torch ----------------------------------------------------
def _heavy(stderr: str) -> str:
    found = [ln for ln in stderr.splitlines() if "heavy imports:" in ln]
    assert len(found) == 1, stderr
    return found[0].split("heavy imports:", 1)[1].strip()


@pytest.mark.slow
@pytest.mark.subprocess
def test_reranked_cli_queries_import_no_torch(home: Path, photos, encoder) -> None:
    env = {"CROSSMODAL_DEBUG_IMPORTS": "1", "CROSSMODAL_BACKEND": "auto"}
    text = "a dog running on a beach"
    r = run_cli("search", text, "-k", str(GOOD), "--json", "--rerank", home=home, env=env)
    assert r.returncode == 0, r.stderr
    assert _heavy(r.stderr) == "none"
    got = json.loads(r.stdout)
    torch_cli = run_cli("search", text, "-k", str(GOOD), "--json", "--rerank", "--backend", "torch", home=home,
                        env=env)
    assert torch_cli.returncode == 0 and "torch" in _heavy(torch_cli.stderr), torch_cli.stderr
    assert [h["id"] for h in got] == [h["id"] for h in json.loads(torch_cli.stdout)]
    assert [h["rank"] for h in got] != [h["dense_rank"] for h in got]  # reranked, not the dense order

    r = run_cli("caption", str(photos["img02"]), "--corpus", "alpha", "-k", "8", "--json", "--rerank", home=home,
                env=env)
    assert r.returncode == 0 and _heavy(r.stderr) == "none", r.stderr
    tc = open_index(home, device="cpu", precision="fp32", backend="torch")
    try:
        rr = Reranker.open(tc)
        want = rr.caption(photos["img02"].read_bytes(), 8, "alpha")
    finally:
        tc.store.close()
    assert [h["id"] for h in json.loads(r.stdout)] == [h.id for h in want]


@pytest.mark.subprocess
def test_importtime_shows_no_torch(home: Path) -> None:
    """Independent of the CLI's own report: the interpreter's import log of a reranked query."""
    r = run_cli("search", "red circles", "-k", "5", "--json", home=home, python_flags=("-X", "importtime"),
                drop_env=("CROSSMODAL_BACKEND",))
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "numpy" in imported and "onnxruntime" in imported  # the log is real
    assert not {m for m in imported if m.split(".")[0] in ("torch", "torchvision", "open_clip")}


# ---- fallbacks --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_older_export_is_replaced_with_one_line_and_equal_results(home: Path, tmp_path, encoder, first_export,
                                                                  own_cache) -> None:
    """A version-1 export (no token outputs; version 1 exported into the home) is never read: the first query
    says so, runs on torch, and re-exports (into the shared cache); the old folder goes."""
    copy = tmp_path / "h"
    shutil.copytree(home, copy)
    fp = encoder.fingerprint
    old = legacy_root(copy) / export_key(fp, 1)
    shutil.copytree(first_export, old)
    meta = json.loads((old / "export.json").read_text())
    meta["version"] = 1
    del meta["tokens"]
    (old / "export.json").write_text(json.dumps(meta))
    assert older_exports(fp, copy) == [old]
    lines: list[str] = []
    s = open_index(copy, device="cpu", notify=lines.append)
    try:
        assert isinstance(s.encoder, TorchEncoder)
        assert len(lines) == 1 and "older" in lines[0] and "torch" in lines[0] and "re-export" in lines[0]
        assert not old.exists() and OnnxEncoder.open(copy, fp).has_tokens
        assert OnnxEncoder.open(copy, fp).folder == export_dir(fp) and export_dir(fp).parent.parent == own_cache
        _, first = _reranked(s, text=QUERIES[0])
    finally:
        s.store.close()
    s = open_index(copy, device="cpu", notify=lines.append)
    try:
        assert isinstance(s.encoder, OnnxEncoder) and len(lines) == 1
        _, again = _reranked(s, text=QUERIES[0])
    finally:
        s.store.close()
    assert [h.id for h in again] == [h.id for h in first]


def test_missing_onnxruntime_reranks_on_torch_with_one_line(home: Path, monkeypatch, photos) -> None:
    on = open_index(home, device="cpu", backend="onnx")
    try:
        want = [[h.id for h in _reranked(on, text=t)[1]] for t in QUERIES]
        want_caption = [h.id for h in _reranked(on, image=photos["img05"].read_bytes())[1]]
    finally:
        on.store.close()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    lines: list[str] = []
    s = open_index(home, device="cpu", notify=lines.append)
    try:
        assert isinstance(s.encoder, TorchEncoder)
        assert len(lines) == 1 and "onnxruntime is not available" in lines[0] and "torch" in lines[0]
        assert [[h.id for h in _reranked(s, text=t)[1]] for t in QUERIES] == want
        assert [h.id for h in _reranked(s, image=photos["img05"].read_bytes())[1]] == want_caption
    finally:
        s.store.close()


@pytest.mark.subprocess
def test_export_without_token_outputs_reranks_like_an_unsupported_model(home: Path, tmp_path, encoder,
                                                                        linked_cache) -> None:
    """An export whose model has no token features says why when reranking is asked for (one line, exit 2);
    the default (no trained reranker recorded) shows the dense results without a word."""
    copy = tmp_path / "h"
    shutil.copytree(home, copy)
    meta_path = export_dir(encoder.fingerprint) / "export.json"  # a copy in this test's cache (linked_cache)
    meta = json.loads(meta_path.read_text())
    meta["tokens"] = {"supported": False, "output": None, "reason": "reranking needs a ViT image tower (test)"}
    meta_path.write_text(json.dumps(meta))
    r = run_cli("search", "red circles", "-k", "4", "--json", home=copy, env={"CROSSMODAL_DEBUG_IMPORTS": "1"})
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if "heavy imports" not in ln]
    assert notes == [] and _heavy(r.stderr) == "none"
    dense = run_cli("search", "red circles", "-k", "4", "--json", "--no-rerank", home=copy)
    assert [h["id"] for h in json.loads(r.stdout)] == [h["id"] for h in json.loads(dense.stdout)]
    asked = run_cli("search", "red circles", "-k", "4", "--json", "--rerank", home=copy)
    lines = asked.stderr.strip().splitlines()
    assert asked.returncode == 2 and len(lines) == 1 and "ViT image tower (test)" in lines[0], asked.stderr
