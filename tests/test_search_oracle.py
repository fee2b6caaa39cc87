"""Search results equal a numpy brute-force search over the stored vectors, in every direction."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.query.search import Searcher, combine
from retrieval.query.vocab import BUILTIN_CORPUS, builtin_vocabulary
from retrieval.store import ImageFilter, Store
from tests.helpers import GOOD


@pytest.fixture(scope="module")
def searcher(built_index, encoder):
    store = Store.open(built_index)
    yield Searcher(store, encoder)
    store.close()


def brute(store: Store, modality: str, q: np.ndarray, k: int, allowed: np.ndarray | None = None):
    ids, vecs = store.vectors(modality)
    if allowed is not None:
        keep = np.isin(ids, allowed)
        ids, vecs = ids[keep], vecs[keep]
    scores = vecs @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order].tolist(), scores[order]


def check(hits, want_ids, want_scores):
    assert [h.id for h in hits] == want_ids
    assert np.allclose([h.score for h in hits], want_scores, atol=1e-5)
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))


def test_index_holds_the_good_images(searcher):
    assert searcher.store.count("image") == GOOD
    assert searcher.store.corpora() == {"alpha": 30, "beta": 20}


def test_text_to_image(searcher, encoder):
    for text in ["a dog on a beach", "red", "city at night"]:
        q = searcher.query_vector(text=text)
        assert np.allclose(q, encoder.encode_texts([text])[0], atol=1e-6)
        check(searcher.search_images(q, 5), *brute(searcher.store, "image", q, 5))


def test_image_to_image(searcher, encoder, photos):
    data = photos["img03"].read_bytes()
    q = searcher.query_vector(image=data)
    hits = searcher.search_images(q, 4)
    check(hits, *brute(searcher.store, "image", q, 4))
    assert hits[0].item.path == str(photos["img03"]) and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_fused_and_negative_queries(searcher, encoder, photos):
    t = encoder.encode_texts(["at night"])[0]
    n1, n2 = encoder.encode_texts(["people", "cars"])
    i = encoder.encode_image_bytes(photos["img05"].read_bytes())
    for w in [0.0, 0.3, 0.5, 1.0]:
        want = w * t + (1 - w) * i
        want /= np.linalg.norm(want)
        for neg in ([], [n1], [n1, n2]):
            expect = want
            for n in neg:
                expect = expect - n
                expect = expect / np.linalg.norm(expect)
            q = searcher.query_vector(text="at night", image=photos["img05"].read_bytes(), weight=w,
                                      negatives=["people", "cars"][:len(neg)])
            assert np.allclose(q, expect, atol=1e-5)
            check(searcher.search_images(q, 6), *brute(searcher.store, "image", expect, 6))


def test_image_to_text(searcher, photos):
    data = photos["img01"].read_bytes()
    q = searcher.query_vector(image=data)
    check(searcher.caption(data, 7), *brute(searcher.store, "text", q, 7))
    beta = searcher.store.text_ids("beta")
    hits = searcher.caption(data, 5, corpus="beta")
    check(hits, *brute(searcher.store, "text", q, 5, beta))
    assert {h.item.corpus for h in hits} == {"beta"}
    with pytest.raises(UserError, match="no corpus named"):
        searcher.caption(data, 5, corpus="gamma")


@pytest.mark.slow
def test_builtin_vocabulary_when_asked(searcher, photos):
    data = photos["img02"].read_bytes()
    q = searcher.query_vector(image=data)
    texts, vecs = builtin_vocabulary(searcher.encoder, searcher.store.home)
    assert len(texts) == 1000 and vecs.shape == (1000, searcher.encoder.dim)
    scores = vecs @ q
    order = np.argsort(-scores, kind="stable")[:5]
    hits = searcher.caption(data, 5, corpus=BUILTIN_CORPUS)
    assert [h.id for h in hits] == order.tolist()
    assert [h.item.text for h in hits] == [texts[i] for i in order]


def test_filters_are_exact(searcher, photos):
    q = searcher.query_vector(text="anything")
    sub = str(photos["img00"].parent)
    flt = ImageFilter(under=sub)
    allowed = searcher.store.image_ids(flt)
    assert len(allowed) == 4  # img00, img03, img06, img09 live in sub/
    check(searcher.search_images(q, 10, flt), *brute(searcher.store, "image", q, 10, allowed))
    dated = searcher.store.image_ids(ImageFilter(after="2021-06-01", before="2021-07-01"))
    paths = [v.path for v in searcher.store.items(dated).values()]
    assert paths == [str(photos["rotated"])]


def test_paging_continues_ranks(searcher):
    q = searcher.query_vector(text="page")
    full = searcher.search_images(q, 9)
    page2 = searcher.search_images(q, 3, offset=3)
    assert [(h.rank, h.id) for h in page2] == [(h.rank, h.id) for h in full[3:6]]


def test_more_like_this_excludes_itself(searcher):
    some_id = int(searcher.store.vectors("image")[0][0])
    q = searcher.store.vector("image", some_id)
    hits = searcher.more_like(some_id, 4)
    ids, _ = brute(searcher.store, "image", q, 5)
    assert [h.id for h in hits] == [i for i in ids if i != some_id][:4]


def test_combine_rejects_nonsense():
    v = np.ones(4, dtype=np.float32) / 2
    with pytest.raises(UserError):
        combine(None, None, 0.5)
    with pytest.raises(UserError):
        combine(v, None, 1.5)
    with pytest.raises(UserError, match="cancels"):
        combine(v, None, 0.5, [v])
