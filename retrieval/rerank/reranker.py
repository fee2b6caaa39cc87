"""Rerank the dense top-k with co-attention over token features (the scorer: scorer.py), like
sentence-transformers' `CrossEncoder.rank` applied to the top of a dense list.

`Reranker.search_images` and `Reranker.caption` run the whole query themselves: embed (one pass gives the
query vector and its token features), dense search through the Searcher, rerank the first `rerank_k`,
keep the dense order for the rest. Token features of the candidates come from the index's token cache
(token_cache.py), written at index time; a missing entry is computed once and added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from retrieval.errors import CrossmodalError, TokensUnsupported, UserError
from retrieval.fsutil import read_bytes
from retrieval.media.decode import decode_for_model, is_raw_name
from retrieval.media.thumbnails import thumb_path
from retrieval.model.weights import file_sha256
from retrieval.query.search import Hit, QueryVector, Searcher, unit
from retrieval.rerank.params import load_scorer, recorded_reranker
from retrieval.rerank.scorer import NumpyCoAttention
from retrieval.rerank.token_cache import TokenCache, text_key
from retrieval.store import ImageFilter
from retrieval.store.paths import from_catalog

DEFAULT_RERANK_K = 32


@dataclass
class RerankStats:
    """How the last rerank went: candidates, token-cache hits, items encoded on demand, items unavailable."""

    candidates: int = 0
    cached: int = 0
    recomputed: int = 0
    unavailable: int = 0


def pad(tokens: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(n_i, d) arrays -> (B, max n, d) float32 and a (B, max n) mask."""
    length = max(1, max(len(t) for t in tokens))
    out = np.zeros((len(tokens), length, tokens[0].shape[-1]), np.float32)
    mask = np.zeros((len(tokens), length), bool)
    for i, t in enumerate(tokens):
        out[i, :len(t)] = t
        mask[i, :len(t)] = True
    return out, mask


class Reranker:
    """Dense search, then co-attention over the top `rerank_k`; the candidate set never changes, only its order.

    Candidate tokens come from the index's token cache (written by `index` and `add-texts`); an entry that
    is missing (an index built before the cache existed, the built-in vocabulary) is computed once from the
    image's thumbnail (else its file) or the caption text, and added to the cache.
    """

    def __init__(self, searcher: Searcher, scorer: NumpyCoAttention, images: TokenCache | None = None,
                 texts: TokenCache | None = None) -> None:
        self.searcher = searcher
        self.encoder = searcher.encoder
        self.scorer = scorer
        self.images = images
        self.texts = texts
        self.stats = RerankStats()

    @classmethod
    def open(cls, searcher: Searcher, notify: Callable[[str], None] | None = None) -> Reranker:
        """The index's recorded reranker (or the parameter-free one); TokensUnsupported for non-ViT models.

        `notify` hears of token-cache segments found damaged (they are dropped and their entries recomputed)."""
        searcher.encoder.check_tokens()
        store = searcher.store
        fp = searcher.encoder.fingerprint
        rec = recorded_reranker(store)
        if rec:
            path = rec["path"]
            if not Path(path).is_file():
                raise UserError(f"the reranker this index records is gone from {path}; "
                                f"`crossmodal set-reranker FILE` (or --no-rerank)")
            if file_sha256(path) != rec["sha256"]:
                raise UserError(f"the reranker file {path} changed since it was recorded; "
                                f"record it again with `crossmodal set-reranker {path}`")
            scorer = load_scorer(path, dim=fp.dim, weights=fp.weights)
        else:
            scorer = NumpyCoAttention(fp.dim)
        return cls(searcher, scorer, TokenCache.open(store.home, fp, "image", notify),
                   TokenCache.open(store.home, fp, "text", notify))

    # whole queries ----------------------------------------------------------------------------------
    def search_images(self, query: QueryVector, k: int, flt: ImageFilter | None = None,
                      rerank_k: int = DEFAULT_RERANK_K) -> list[Hit]:
        """Dense top-max(k, rerank_k); its first rerank_k reordered by co-attention with the query's text.

        Without a text (image-only queries have no words to attend to) it is the dense top-k. The query's
        text tokens are those `Searcher.embed_query(..., with_tokens=True)` kept, else computed here."""
        if not (query.text and query.text.strip()) or rerank_k <= 1:
            return self.searcher.search_images(query.vector, k, flt)
        hits = self.searcher.search_images(query.vector, max(k, rerank_k), flt)
        tokens = query.text_tokens
        if tokens is None:
            tokens = self.encoder.encode_texts_with_tokens([query.text])[1][0]
        return (self.rerank_images(tokens, hits[:rerank_k]) + hits[rerank_k:])[:k]

    def caption(self, image: bytes, k: int, corpus: str | None = None, rerank_k: int = DEFAULT_RERANK_K,
                raw: bool = False) -> list[Hit]:
        """Image -> captions; one vision pass gives the query vector and its tokens."""
        if rerank_k <= 1:
            return self.searcher.caption(image, k, corpus, raw=raw)
        decoded = decode_for_model(image, self.encoder.preprocess, raw=raw)
        pooled, tokens = self.encoder.encode_pixels_with_tokens(decoded.pixels[None])
        hits = self.searcher.search_texts(unit(pooled[0]), max(k, rerank_k), corpus)
        return (self.rerank_texts(tokens[0], hits[:rerank_k]) + hits[rerank_k:])[:k]

    # candidates -----------------------------------------------------------------------------------
    def image_tokens(self, hits: Sequence[Hit]) -> np.ndarray | None:
        """(n, L, d) float32 tokens of image hits; None when some image can be had no way (keep dense order)."""
        shas: list[str | None] = [h.item.sha256 for h in hits]
        if any(s is None for s in shas):
            known = self.searcher.store.image_shas([h.id for h in hits])
            shas = [known.get(h.id) for h in hits]
        found: list[np.ndarray | None] = self.images.get(shas) if self.images is not None else [None] * len(hits)
        missing = [i for i, f in enumerate(found) if f is None]
        self.stats.cached += len(hits) - len(missing)
        if missing:
            pixels = []
            for i in missing:
                sha = shas[i]
                thumb = thumb_path(self.searcher.store.home, sha) if sha else None
                path = (str(thumb) if thumb is not None and thumb.is_file()
                        else from_catalog(hits[i].item.path or ""))  # the original's exact name bytes
                try:
                    pixels.append(decode_for_model(read_bytes(Path(path)), self.encoder.preprocess,
                                                   raw=is_raw_name(path)).pixels)
                except CrossmodalError:
                    self.stats.unavailable += 1
            if self.stats.unavailable:
                return None
            _, toks = self.encoder.encode_pixels_with_tokens(np.stack(pixels))
            for j, i in enumerate(missing):
                found[i] = toks[j]
            self.stats.recomputed += len(missing)
            if self.images is not None:
                fresh = [(sha, toks[j]) for j, i in enumerate(missing) if (sha := shas[i])]
                self.images.put([k for k, _ in fresh], [t for _, t in fresh])
        return np.stack([f for f in found if f is not None]).astype(np.float32, copy=False)

    def text_tokens(self, hits: Sequence[Hit]) -> list[np.ndarray]:
        """Valid tokens (n_i, d) of caption hits, from the cache or encoded now (and cached)."""
        keys = [text_key(h.item.text or "") for h in hits]
        found: list[np.ndarray | None] = self.texts.get(keys) if self.texts is not None else [None] * len(hits)
        missing = [i for i, f in enumerate(found) if f is None]
        self.stats.cached += len(hits) - len(missing)
        if missing:
            _, toks = self.encoder.encode_texts_with_tokens([hits[i].item.text or "" for i in missing])
            for j, i in enumerate(missing):
                found[i] = toks[j]
            self.stats.recomputed += len(missing)
            if self.texts is not None:
                self.texts.put([keys[i] for i in missing], toks)
        return [f for f in found if f is not None]  # every entry is filled by now

    # scoring --------------------------------------------------------------------------------------
    @staticmethod
    def _reorder(hits: Sequence[Hit], scores: np.ndarray) -> list[Hit]:
        order = np.argsort(-scores, kind="stable")  # ties keep the dense order
        return [replace(hits[i], rank=r, score=float(scores[i])) for r, i in enumerate(order, 1)]

    def rerank_images(self, text_tokens: np.ndarray, hits: Sequence[Hit]) -> list[Hit]:
        """A text query (its valid tokens, (L, d)) -> its image hits reordered (same set)."""
        self.stats = RerankStats(candidates=len(hits))
        if not hits:
            return []
        image = self.image_tokens(hits)
        if image is None:
            return list(hits)
        text, text_mask = pad([text_tokens])
        dense = np.asarray([h.dense_score for h in hits], np.float32)
        return self._reorder(hits, self.scorer(dense, text, text_mask, image, np.ones(image.shape[:2], bool)))

    def rerank_texts(self, image_tokens: np.ndarray, hits: Sequence[Hit]) -> list[Hit]:
        """An image query (its tokens, (L, d)) -> its caption hits reordered (same set)."""
        self.stats = RerankStats(candidates=len(hits))
        if not hits:
            return []
        text, text_mask = pad(self.text_tokens(hits))
        image = np.asarray(image_tokens, np.float32)[None]
        dense = np.asarray([h.dense_score for h in hits], np.float32)
        return self._reorder(hits, self.scorer(dense, text, text_mask, image, np.ones(image.shape[:2], bool)))


def open_reranker(searcher: Searcher, want: bool | None = None,
                  notify: Callable[[str], None] | None = None) -> Reranker | None:
    """The index's reranker for `searcher`, or None for dense results.

    `want` None (the default) reranks only when the index records a trained reranker: the quality lab
    measured the parameter-free scorer below dense ranking (README "Quality"), so it runs only when asked for
    (`want` True). Under the default a model without token features gives dense results and one note through
    `notify`; `want` True raises TokensUnsupported instead."""
    if want is False or (want is None and not recorded_reranker(searcher.store)):
        return None
    try:
        return Reranker.open(searcher, notify)
    except TokensUnsupported as e:
        if want:
            raise
        if notify is not None:
            notify(f"note: {e}; showing dense results (--no-rerank silences this)")
        return None
