"""Dense queries: text->image, image->image, fused text+image, negative text, and image->text (captions).

Every hit carries its dense rank and score; the reranker (retrieval/rerank/reranker.py) reorders the top of
these lists and keeps the dense values beside its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.errors import EmptyIndex, UserError
from retrieval.model.protocol import Encoder
from retrieval.query.vocab import BUILTIN_CORPUS, builtin_vocabulary
from retrieval.store import ImageFilter, ItemView, Store


@dataclass(frozen=True)
class Hit:
    """One ranked result; `item` carries the catalog facts (path and size, or text and corpus).

    `dense_rank` / `dense_score` are the rank and score of the dense search; a reranker changes `rank`
    and `score` and keeps these. `relevance` is the calibrated relevance the cutoff reads (cutoff.py), set
    only when a cutoff asked for it."""

    rank: int
    id: int
    score: float
    item: ItemView
    dense_rank: int
    dense_score: float
    relevance: float | None = None


@dataclass(frozen=True)
class QueryVector:
    """A query embedded: its unit vector, and the text part's token features when they were asked for."""

    vector: np.ndarray
    text: str | None = None
    text_tokens: np.ndarray | None = None


def unit(v: np.ndarray) -> np.ndarray:
    """L2-normalise a vector (a zero vector is a user error: the query cancelled itself out)."""
    n = float(np.linalg.norm(v))
    if n < 1e-6:
        raise UserError("the query is empty after combining its parts (e.g. --not cancels the text)")
    return (v / n).astype(np.float32)


def combine(text: np.ndarray | None, image: np.ndarray | None, weight: float,
            negatives: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Late fusion: unit(weight*text + (1-weight)*image), then each negative subtracted and renormalised."""
    if not 0.0 <= weight <= 1.0:
        raise UserError(f"--weight must be between 0 and 1, got {weight}")
    if text is None and image is None:
        raise UserError("give a text query, an --image, or both")
    if text is not None and image is not None:
        q = unit(weight * text + (1.0 - weight) * image)
    elif text is not None:
        q = unit(text)
    else:
        q = unit(image)  # type: ignore[arg-type]
    for n in negatives:
        q = unit(q - n)
    return q


def ranked(pairs: Iterable[tuple[float, int]], items: dict[int, ItemView], start: int = 1) -> list[Hit]:
    """(score, id) pairs in rank order -> hits for the ids the catalog still has."""
    return [Hit(rank=r, id=i, score=s, item=items[i], dense_rank=r, dense_score=s)
            for r, (s, i) in enumerate(((s, i) for s, i in pairs if i in items), start)]


class Searcher:
    """Answers dense queries against one opened Store with the Encoder its model fingerprint names."""

    def __init__(self, store: Store, encoder: Encoder) -> None:
        self.store = store
        self.encoder = encoder

    def embed_query(self, text: str | None = None, image: bytes | None = None, weight: float = 0.5,
                    negatives: Sequence[str] = (), image_raw: bool = False, image_vector: np.ndarray | None = None,
                    with_tokens: bool = False) -> QueryVector:
        """Embed and fuse the parts of a query into one unit vector.

        The image part is file bytes (`image`) or an indexed image's stored vector (`image_vector`). With
        `with_tokens`, the same text pass also returns the text's token features (for reranking)."""
        if text is not None and not text.strip():
            text = None
        negatives = [n for n in negatives if n.strip()]
        texts = ([text] if text is not None else []) + list(negatives)
        tokens = None
        if texts and with_tokens and text is not None:
            emb, toks = self.encoder.encode_texts_with_tokens(texts)
            tokens = toks[0]
        elif texts:
            emb = self.encoder.encode_texts(texts)
        else:
            emb = np.zeros((0, self.encoder.dim), np.float32)
        t = emb[0] if text is not None else None
        i = image_vector if image_vector is not None else (
            self.encoder.encode_image_bytes(image, raw=image_raw) if image is not None else None)
        q = combine(t, i, weight, list(emb[1:] if text is not None else emb))
        return QueryVector(q, text, tokens)

    def query_vector(self, text: str | None = None, image: bytes | None = None, weight: float = 0.5,
                     negatives: Sequence[str] = (), image_raw: bool = False) -> np.ndarray:
        """The unit vector of a query (see `embed_query`)."""
        return self.embed_query(text, image, weight, negatives, image_raw).vector

    def _hits(self, scores: np.ndarray, ids: np.ndarray, start: int = 1) -> list[Hit]:
        keep = [(float(s), int(i)) for s, i in zip(scores, ids, strict=True) if i >= 0]
        return ranked(keep, self.store.items(i for _, i in keep), start)

    def search_images(self, q: np.ndarray, k: int, flt: ImageFilter | None = None,
                      offset: int = 0) -> list[Hit]:
        """Top-k images for a query vector (ranks offset+1 .. offset+k), optionally filtered exactly."""
        if self.store.count("image") == 0:
            raise EmptyIndex(f"no images indexed in {self.store.home}; run `crossmodal index FOLDER`")
        restrict = self.store.image_ids(flt) if flt is not None and flt.active() else None
        scores, ids = self.store.search("image", q[None], k + offset, restrict=restrict)
        return self._hits(scores[0], ids[0])[offset:]

    def search_texts(self, q: np.ndarray, k: int, corpus: str | None = None) -> list[Hit]:
        """Top-k captions for a query vector; the built-in vocabulary answers when no corpus exists."""
        if self.store.count("text") == 0 or corpus == BUILTIN_CORPUS:
            return self._builtin(q, k)
        if corpus is None:
            scores, ids = self.store.search("text", q[None], k)
            return self._hits(scores[0], ids[0])
        corpora = self.store.corpora()
        if corpus not in corpora:
            raise UserError(f"no corpus named '{corpus}' (have: {', '.join(corpora) or 'none'})")
        scores, ids = self.store.search("text", q[None], k, restrict=self.store.text_ids(corpus))
        return self._hits(scores[0], ids[0])

    def _builtin(self, q: np.ndarray, k: int) -> list[Hit]:
        texts, vectors = builtin_vocabulary(self.encoder, self.store.home)
        scores = vectors @ q
        top = np.argsort(-scores, kind="stable")[:k]
        items = {int(i): ItemView(int(i), "text", None, BUILTIN_CORPUS, int(i), texts[i], None, None, None, None)
                 for i in top}
        return ranked(((float(scores[i]), int(i)) for i in top), items)

    def caption(self, image: bytes, k: int, corpus: str | None = None, raw: bool = False) -> list[Hit]:
        """Image -> best captions."""
        return self.search_texts(self.query_vector(image=image, image_raw=raw), k, corpus)

    def similar(self, image: bytes, k: int, flt: ImageFilter | None = None) -> list[Hit]:
        """Image -> most similar images."""
        return self.search_images(self.query_vector(image=image), k, flt)

    def more_like(self, item_id: int, k: int, flt: ImageFilter | None = None) -> list[Hit]:
        """Indexed image -> similar images, from its stored vector (no file is read); itself excluded."""
        hits = self.search_images(self.store.vector("image", item_id), k + 1, flt)
        others = [(h.score, h.id) for h in hits if h.id != item_id][:k]
        return ranked(others, {h.id: h.item for h in hits})
