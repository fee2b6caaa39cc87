"""Approximate nearest-neighbour indexes layered over the exact vector store.

The exact store (`vectors.py`, one IndexIDMap2 of float32 vectors per modality) stays the source of
truth: an ANN index is derived data, built from it, tuned against it, and rebuilt from it when the type
changes or too many of its entries were deleted. Deleted ids are not removed from an ANN index (HNSW
cannot remove); they are tombstones excluded at search time until the next rebuild.

Types (`--index-type`): `flat` (exact, no ANN), `hnsw` (HNSW32), `ivfsq` (IVF with an HNSW coarse
quantizer and 8-bit scalar codes, a byte per dimension), `ivfpq` (the same with PQ codes, 8-16x
smaller), both re-scored exactly from the store; `auto` (by collection size and memory budget, the way
autofaiss chooses), or any faiss factory string.

This module builds, searches and tunes ANN indexes; which type a collection gets, and when to rebuild, is
decided in ann_choice.py (its names are re-exported here, so callers read every ANN name from `ann`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from retrieval.store.ann_choice import (
    DEAD_REBUILD,
    FLAT,
    FLAT_MAX,
    HNSW_M,
    HNSW_MAX,
    MIN_TRAIN,
    REGROW,
    TARGET_RECALL,
    TYPES,
    AnnState,
    auto_target,
    check_buildable,
    check_factory,
    codes,
    default_budget,
    family,
    hnsw_bytes,
    ivf_instead,
    lists_bytes,
    lists_on_disk,
    min_vectors,
    needs_rebuild,
    nlist_for,
    parse_budget,
    pq_bytes,
    resolve,
    sq8_bytes,
)

__all__ = ["TYPES", "FLAT", "FLAT_MAX", "HNSW_MAX", "MIN_TRAIN", "TARGET_RECALL", "DEAD_REBUILD", "REGROW",
           "HNSW_M", "AnnState", "parse_budget", "default_budget", "nlist_for", "pq_bytes", "sq8_bytes",
           "hnsw_bytes", "lists_bytes", "lists_on_disk", "family", "codes", "resolve", "check_factory",
           "check_buildable", "min_vectors",
           "needs_rebuild", "auto_target", "ivf_instead", "CONFIDENCE_Z",
           "TUNE_QUERIES", "EF_LADDER", "REFINE_LADDER", "ADD_CHUNK", "build", "knob_of", "hnsw_quantizer",
           "search_params", "ann_search", "recall_rows", "recall_at", "recall_lower_bound", "tune"]

CONFIDENCE_Z = 1.645  # tuning accepts a setting when recall's one-sided 95% lower bound clears the target
TUNE_QUERIES = 400
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
REFINE_LADDER = (1, 4, 16, 64)  # candidates fetched per wanted result, re-scored with exact vectors
ADD_CHUNK = 100_000


def _faiss() -> Any:
    import faiss

    return faiss


def _prepare_training(index: Any) -> None:
    """Skip polysemous PQ training (10x the training time, for a search mode never used here), and
    faiss's warnings when a small collection gives fewer points per centroid than it likes."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    ivf = faiss.downcast_index(ivf)
    ivf.cp.min_points_per_centroid = 1
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    pq = getattr(ivf, "pq", None)
    if pq is not None:
        pq.cp.min_points_per_centroid = 1


def _add(index: Any, ids: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> None:
    for start in range(0, len(rows), ADD_CHUNK):
        part = rows[start:start + ADD_CHUNK]
        index.add_with_ids(np.ascontiguousarray(vectors[part], dtype=np.float32),
                           np.ascontiguousarray(ids[part], dtype=np.int64))


def build(factory: str, ids: np.ndarray, vectors: np.ndarray, state: AnnState,
          exact_search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
          exact_vectors: Callable[[np.ndarray], np.ndarray], seed: int = 0, train_limit: int = 200_000,
          log: Callable[[str], None] | None = None, kind: str = "same",
          cross: dict[str, np.ndarray] | None = None) -> tuple[Any, AnnState]:
    """Build an id-mapped `factory` index over (ids, vectors) and tune its search-time knob.

    A sample of vectors is held out of training and of the index while tuning, so the tuning queries
    are as new to the index as a user's query; they are added once tuned. `cross` holds query vectors
    of the other modality, tuned for too (see `tune`). Returns (index, state).
    """
    faiss = _faiss()
    n, dim = vectors.shape
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    tune_rows = np.sort(order[:min(TUNE_QUERIES, n // 10)])
    rest = order[len(tune_rows):]
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not inner.is_trained:
        _prepare_training(inner)
        train_rows = np.sort(rest[:train_limit])
        t0 = time.perf_counter()
        inner.train(np.ascontiguousarray(vectors[train_rows], dtype=np.float32))
        if log:
            log(f"trained {factory} on {len(train_rows)} vectors in {time.perf_counter() - t0:.1f} s")
    index = faiss.IndexIDMap(inner)
    t0 = time.perf_counter()
    _add(index, ids, vectors, np.sort(rest))
    t1 = time.perf_counter()
    tuned = tune(index, replace(state, factory=factory, built_n=n), ids[tune_rows],
                 np.ascontiguousarray(vectors[tune_rows], dtype=np.float32), exact_search, exact_vectors,
                 kind=kind, cross=cross)
    if log:
        log(f"added {len(rest)} vectors in {t1 - t0:.1f} s; tuned in {time.perf_counter() - t1:.1f} s")
    _add(index, ids, vectors, tune_rows)
    return index, tuned


def _inner(index: Any) -> Any:
    """The index inside an id map (or the index itself; an on-disk split index's merged part), as its
    concrete faiss class."""
    faiss = _faiss()
    if hasattr(index, "base"):  # ann_disk.SplitIndex
        index = index.base
    return faiss.downcast_index(index.index) if hasattr(index, "id_map") else index


def _ivf_of(index: Any) -> Any:
    """The IVF part of an (id-mapped) index, or None."""
    return _faiss().try_extract_index_ivf(_inner(index))


def knob_of(index: Any) -> tuple[str | None, tuple[int, ...]]:
    """The search-time setting an index has, and the values tuning tries (cheapest first)."""
    faiss = _faiss()
    ivf = _ivf_of(index)
    if ivf is not None:
        # Powers of two and the 1.5x steps between them: a tuned nprobe overshoots by at most 1.5x.
        steps = sorted({v for i in range(int(math.log2(ivf.nlist)) + 1) for v in (2 ** i, 3 * 2 ** i // 2)})
        ladder = tuple(v for v in steps if v < ivf.nlist) + (ivf.nlist,)
        return "nprobe", ladder
    if isinstance(_inner(index), faiss.IndexHNSW):
        return "efSearch", EF_LADDER
    return None, ()


def hnsw_quantizer(index: Any) -> bool:
    """Whether an (id-mapped) IVF index assigns lists with an HNSW graph (IVF<n>_HNSW<m>,...)."""
    faiss = _faiss()
    ivf = _ivf_of(index)
    return ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)


def search_params(param: str | None, value: int | None, exclude: np.ndarray | None,
                  hnsw_lists: bool = False) -> Any:
    """faiss SearchParameters carrying the knob and a selector that hides tombstones.

    With an HNSW coarse quantizer, its efSearch follows nprobe: left at faiss's 16 the graph search
    misses some of the nearest lists, and recall@10 stalled near 0.93-0.95 at any nprobe (1M and 10M
    benchmark vectors); with efSearch = nprobe it matches an exact quantizer (0.998 at nprobe 256/2048).
    """
    faiss = _faiss()
    kwargs: dict[str, Any] = {}
    if exclude is not None and len(exclude):
        # faiss's Python constructors keep a reference to the selector for as long as the params live
        kwargs["sel"] = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64)))
    if param == "nprobe":
        if hnsw_lists:
            kwargs["quantizer_params"] = faiss.SearchParametersHNSW(efSearch=max(16, int(value or 1)))
        return faiss.SearchParametersIVF(nprobe=int(value or 1), **kwargs)
    if param == "efSearch":
        return faiss.SearchParametersHNSW(efSearch=int(value or 16), **kwargs)
    return faiss.SearchParameters(**kwargs)


def ann_search(index: Any, queries: np.ndarray, k: int, param: str | None, value: int | None, refine: int,
               exclude: np.ndarray | None, exact_vectors: Callable[[np.ndarray], np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by the ANN index; with refine > 1, k*refine candidates are re-scored with exact vectors."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    fetch = max(k, k * refine)
    if param == "efSearch":
        value = max(int(value or 16), fetch)  # HNSW returns at most efSearch results
    params = search_params(param, value, exclude, param == "nprobe" and hnsw_quantizer(index))
    scores, ids = index.search(q, fetch, params=params)
    if refine <= 1:
        return scores[:, :k], ids[:, :k]
    out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    for row in range(len(q)):
        cand = ids[row][ids[row] >= 0]
        if not len(cand):
            continue
        exact = exact_vectors(cand) @ q[row]
        order = np.argsort(-exact, kind="stable")[:k]
        out_s[row, :len(order)] = exact[order]
        out_i[row, :len(order)] = cand[order]
    return out_s, out_i


def recall_rows(found: np.ndarray, truth: np.ndarray, k: int = 10) -> np.ndarray:
    """Per query, the share of the true top-k that the approximate top-k holds (rows of ids, -1 ignored)."""
    return np.asarray([len(set(f[:k].tolist()) & set(t[:k].tolist()) - {-1})
                       / max(1, min(k, int((t[:k] >= 0).sum()))) for f, t in zip(found, truth, strict=True)],
                      dtype=np.float64)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean recall@k over queries (1.0 for no queries)."""
    hits = recall_rows(found, truth, k)
    return float(hits.mean()) if len(hits) else 1.0


def recall_lower_bound(hits: np.ndarray) -> float:
    """One-sided 95% lower bound on the recall of queries not yet seen, from a sample's per-query recalls.

    A setting tuned to a sample mean of exactly 0.95 gives about 0.95 only half the time on new queries;
    requiring the bound to clear the target makes the recorded promise hold for new ones.
    """
    if len(hits) < 2:
        return float(hits.mean()) if len(hits) else 1.0
    return float(hits.mean() - CONFIDENCE_Z * hits.std(ddof=1) / math.sqrt(len(hits)))


def _without(rows: np.ndarray, drop: np.ndarray, k: int) -> np.ndarray:
    """Result rows with the ids in `drop` taken out, cut to k columns (-1 padded)."""
    out = np.full((len(rows), k), -1, dtype=np.int64)
    mask = ~np.isin(rows, drop) & (rows >= 0)
    for r in range(len(rows)):
        kept = rows[r][mask[r]][:k]
        out[r, :len(kept)] = kept
    return out


def tune(index: Any, state: AnnState, qids: np.ndarray, q: np.ndarray,
         exact_search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
         exact_vectors: Callable[[np.ndarray], np.ndarray], k: int = 10,
         target: float = TARGET_RECALL, kind: str = "same",
         cross: dict[str, np.ndarray] | None = None) -> AnnState:
    """Pick the fastest knob and re-score factor whose recall@k reaches the target against exact search,
    for every kind of query the index will get.

    `q` are stored vectors (ids `qids`) that the ANN index does not hold yet, named `kind`; the exact
    top-k leaves them out too, so both answer "the k nearest of the indexed items" for queries new to
    the index. `cross` adds query sets of the other modality (caption vectors against the image index,
    image vectors against the caption index): CLIP puts the two modalities in different regions of the
    space, so such queries are out of distribution for the index and can need a much wider search than
    its own vectors do. A setting passes when every set's recall clears the target with 95% confidence.

    For each re-score factor the knob climbs until it passes (or recall stops improving); a larger
    factor only tries knob values below the smallest that already passed, and the fastest measured pair
    wins; a search already slower than a passing one ends its factor (and, at the smallest knob, the
    larger factors). With none passing, the setting with the best worst-kind recall is kept.
    """
    param, ladder = knob_of(index)
    sets = {kind: q} if len(qids) else {}
    sets.update({name: v for name, v in (cross or {}).items() if len(v)})
    if not sets or param is None:
        return replace(state, param=None, value=None, refine=1, recall=None, recalls=None, query_ms=None)
    # Held-out ids are dropped from the exact answers; a margin covers them (few fall in any top-k).
    margin = min(len(qids), 32)
    truths = {name: _without(exact_search(v, k + margin)[1], qids, k) for name, v in sets.items()}
    total = sum(len(v) for v in sets.values())

    def measure(value: int, refine: int) -> tuple[float, dict[str, float], bool]:
        """(ms per query, mean recall per kind, whether every kind's lower bound clears the target)."""
        t0 = time.perf_counter()
        found = {name: ann_search(index, v, k, param, value, refine, None, exact_vectors)[1]
                 for name, v in sets.items()}
        ms = (time.perf_counter() - t0) * 1000 / total
        hits = {name: recall_rows(found[name], truths[name], k) for name in sets}
        ok = all(recall_lower_bound(h) >= target for h in hits.values())  # the bound never exceeds the mean
        return ms, {name: float(h.mean()) for name, h in hits.items()}, ok

    refines = REFINE_LADDER if family(state.factory) == "ivf" or "PQ" in state.factory.upper() else (1,)
    best: tuple[float, int, int, float, dict[str, float]] | None = None  # highest worst-kind recall
    passed: list[tuple[float, int, int, float, dict[str, float]]] = []  # (ms, value, refine, min recall, ...)
    limit = len(ladder)
    for refine in refines:
        previous = -1.0
        for i, value in enumerate(ladder[:limit]):
            ms, recalls, ok = measure(value, refine)
            r = min(recalls.values())
            if best is None or r > best[0]:
                best = (r, value, refine, ms, recalls)
            if ok:
                passed.append((ms, value, refine, r, recalls))
                limit = i
                break
            if passed and ms >= min(p[0] for p in passed):
                limit = 0 if i == 0 else limit  # already slower than a passing setting; so is all beyond
                break
            if r - previous < 0.002 and (passed or refine != refines[-1]):
                break  # a wider search no longer helps at this refine factor: re-score more candidates
            previous = r
        if limit == 0:
            break
    if passed:
        ms, value, refine, r, recalls = min(passed, key=lambda p: (p[0], p[1], p[2]))
    else:
        r, value, refine, ms, recalls = best  # type: ignore[misc]
    return replace(state, param=param, value=value, refine=refine, recall=round(r, 4),
                   recalls={name: round(v, 4) for name, v in recalls.items()}, query_ms=round(ms, 3))
