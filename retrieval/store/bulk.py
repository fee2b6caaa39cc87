"""Bulk merges: many commits, one ANN build.

Why: a run that adds more images than the index holds (a first `index --ray` over an archive, shards
merged one after another) would otherwise walk the ANN index through every stage on the way up (HNSW past
100k vectors, IVF past 2M, an IVF retrained at each 4x growth), re-adding everything each time. Held, the
commits only write rows and exact vectors; at the end the ANN index `auto` wants for the final size is built
once, trained once on a sample and filled chunk by chunk (ann.build), and tuned (ann.tune).

The commit protocol is unchanged: each commit is whole. While held, the recorded ANN index (if any) lacks
the new vectors, so readers notice and search exactly; a run killed meanwhile leaves exactly that state,
and the next commit rebuilds the ANN index (ann_upkeep: an index lacking vectors is unhealthy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from retrieval.store.ann_upkeep import Log

if TYPE_CHECKING:
    from retrieval.store.store import Store


@contextmanager
def ann_built_once(store: Store, modality: str = "image", log: Log | None = None) -> Iterator[None]:
    """Hold `modality`'s ANN upkeep for the commits inside; on success, build it once for the final size.

    On an exception nothing is built (a long build after Ctrl-C would only delay the exit): readers search
    exactly until the next commit rebuilds it."""
    upkeep = store._ann  # this package's own bookkeeping
    upkeep.held.add(modality)
    try:
        yield
    finally:
        upkeep.held.discard(modality)
    if modality in upkeep.behind:
        state = upkeep.state_of(modality)
        store.set_index_type(state.requested, state.budget, rebuild=True, log=log)
