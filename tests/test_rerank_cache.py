"""The token cache (int8, content-addressed, crash-safe segments) and the in-process reranker over an index."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from retrieval.model.spec import Fingerprint
from retrieval.query.search import QueryVector, Searcher
from retrieval.rerank.reranker import Reranker
from retrieval.rerank.token_cache import (
    TokenCache,
    TokenCacheWriter,
    cache_dir,
    compact,
    dequantize,
    quantize,
    text_key,
)
from retrieval.store import Store
from tests.helpers import GOOD

FP = Fingerprint(model="M", pretrained="p", weights="sha256:x", dim=8)


def _key(i: int) -> str:
    return f"{i:064x}"


def test_quantisation_keeps_token_directions():
    x = np.random.default_rng(0).normal(size=(5, 50, 512)).astype(np.float32) * 7
    back = dequantize(*quantize(x))
    cos = (x * back).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(back, axis=-1))
    assert cos.min() > 0.9999


def test_writer_reader_segments_and_compaction(tmp_path):
    rng = np.random.default_rng(1)
    w = TokenCacheWriter(tmp_path, FP, "text", flush_every=3)
    arrays = [rng.normal(size=(n, 8)).astype(np.float32) for n in (2, 5, 1, 4)]
    w.add([_key(0), _key(1)], arrays[:2])
    assert len(TokenCache.open(tmp_path, FP, "text")) == 0  # buffered
    w.add([_key(2), _key(3), _key(0)], arrays[2:] + [arrays[0] * 0])  # a known key is skipped
    assert len(TokenCache.open(tmp_path, FP, "text")) == 4  # flush_every reached: one segment
    w.flush()
    cache = TokenCache.open(tmp_path, FP, "text")
    got = cache.get([_key(i) for i in range(4)] + [_key(9), None])
    assert got[4] is None and got[5] is None
    for a, b in zip(arrays, got[:4], strict=True):
        assert b.shape == a.shape and np.allclose(a, b, atol=np.abs(a).max() / 100)
    # a data file without its keys file (a crash mid-write) is invisible
    folder = cache_dir(tmp_path, FP, "text")
    (folder / "seg-1-1.data.npy").write_bytes(b"garbage")
    assert len(TokenCache.open(tmp_path, FP, "text")) == 4
    assert compact(tmp_path, FP, "text", [_key(1), _key(3)]) == 2
    cache = TokenCache.open(tmp_path, FP, "text")
    assert len(cache) == 2 and _key(1) in cache and _key(0) not in cache
    assert np.allclose(cache.get([_key(3)])[0], got[3])


def test_index_writes_the_token_cache(built_index, encoder, photos):
    from retrieval.media.decode import decode_for_model

    with Store.open(built_index) as store:
        shas = store.image_shas([i for i, *_ in store.image_files().values()])
        texts = [v.text for v in store.items(store.text_ids("alpha")).values()]
    images = TokenCache.open(built_index, encoder.fingerprint, "image")
    assert len(images) == GOOD and all(s in images for s in shas.values())
    path = photos["img04"]
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    _, want = encoder.encode_pixels_with_tokens(decode_for_model(path.read_bytes(), encoder.preprocess).pixels[None])
    got = images.get([sha])[0]
    cos = (got * want[0]).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want[0], axis=-1))
    assert got.shape == want[0].shape and cos.min() > 0.999
    captions = TokenCache.open(built_index, encoder.fingerprint, "text")
    assert len(captions) == 50 and all(text_key(t) in captions for t in texts)
    _, toks = encoder.encode_texts_with_tokens([texts[0]])
    assert np.allclose(captions.get([text_key(texts[0])])[0], toks[0], atol=np.abs(toks[0]).max() / 100)


def _searcher(home, encoder):
    return Searcher(Store.open(home), encoder)


def test_reranker_reorders_by_the_fused_score_and_keeps_the_set(built_index, encoder):
    searcher = _searcher(built_index, encoder)
    rr = Reranker.open(searcher)
    q = searcher.embed_query(text="a dog on a beach", with_tokens=True)
    np.testing.assert_allclose(q.vector, searcher.query_vector(text="a dog on a beach"), atol=1e-6)
    dense = searcher.search_images(q.vector, GOOD)
    hits = rr.search_images(q, GOOD, rerank_k=32)
    assert rr.stats.cached == GOOD and rr.stats.recomputed == 0
    assert sorted(h.id for h in hits) == sorted(h.id for h in dense)
    assert [h.rank for h in hits] == list(range(1, GOOD + 1))
    by_id = {h.id: h for h in dense}
    assert all(h.dense_rank == by_id[h.id].rank and h.dense_score == by_id[h.id].score for h in hits)
    # the oracle: s = dense + lambda * coatt, computed straight from the scorer
    tt = encoder.encode_text_tokens(["a dog on a beach"])
    cache = TokenCache.open(built_index, encoder.fingerprint, "image")
    toks = np.stack(cache.get([h.item.sha256 for h in dense]))
    co = rr.scorer.coattention(tt.tokens, tt.mask, toks, np.ones(toks.shape[:2], bool))  # the numpy scorer
    fused = np.array([h.score for h in dense]) + float(rr.scorer.lam) * co
    assert [h.id for h in hits] == [dense[i].id for i in np.argsort(-fused, kind="stable")]
    assert [h.score for h in hits] == pytest.approx(sorted(fused, reverse=True), abs=1e-5)
    # rerank_k smaller than k: only the head is reordered, the tail keeps its dense order
    part = rr.search_images(q, GOOD, rerank_k=4)
    assert sorted(h.id for h in part[:4]) == sorted(h.id for h in dense[:4])
    assert [h.id for h in part[4:]] == [h.id for h in dense[4:]]
    assert dense[0].dense_rank == 1 and dense[0].dense_score == dense[0].score
    searcher.store.close()


def test_missing_tokens_come_from_thumbnails_once(built_index, encoder, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(built_index, home)
    shutil.rmtree(home / "tokens")
    searcher = _searcher(home, encoder)
    rr = Reranker.open(searcher)
    q = QueryVector(searcher.query_vector(text="red"), "red")
    first = rr.search_images(q, 5, rerank_k=5)
    assert rr.stats.recomputed == 5 and rr.stats.cached == 0
    again = Reranker.open(searcher).search_images(q, 5, rerank_k=5)
    assert [h.id for h in again] == [h.id for h in first]
    assert len(TokenCache.open(home, encoder.fingerprint, "image")) == 5
    searcher.store.close()


def test_caption_rerank_keeps_the_set(built_index, encoder, photos):
    searcher = _searcher(built_index, encoder)
    rr = Reranker.open(searcher)
    data = photos["img02"].read_bytes()
    dense = searcher.caption(data, 8)
    hits = rr.caption(data, 8, rerank_k=8)
    assert rr.stats.cached == 8 and rr.stats.recomputed == 0
    assert sorted(h.id for h in hits) == sorted(h.id for h in dense)
    assert {h.id: h.dense_score for h in hits} == pytest.approx({h.id: h.score for h in dense}, abs=1e-6)
    searcher.store.close()
