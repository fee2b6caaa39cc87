"""Keeping each modality's ANN index in step with the exact vectors, commit by commit.

Why a class of its own: the ANN index is derived data (ann.py builds and tunes it); what the Store needs
is the bookkeeping around it: which file the catalog names, loading it (or noting why it cannot serve),
adding a commit's vectors or rebuilding when due, recording the new state in the commit's transaction,
and removing files no reader can still hold. The new ANN file is always written before the transaction
that names it commits, and the file before the current one is kept one commit longer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import IndexMismatch, UserError
from retrieval.store import ann, ann_disk
from retrieval.store import vectors as vec
from retrieval.store.records import QueryOptions

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

Log = Callable[[str], None]
QuerySource = Callable[[str], "np.ndarray | None"]  # kind ("text") -> query vectors of that kind, or None
MIN_CROSS = 100  # stored vectors of the other modality needed to tune with them; fewer: ask the query source


class AnnUpkeep:
    """The ANN side of one Store: per modality the serving ANN index (None: exact search), its recorded
    state, its tombstones (ids deleted from the exact store but still in the ANN index) and any problem."""

    def __init__(self, folder: Path, flats: dict[str, Any]) -> None:
        self.folder = folder
        self.flats = flats  # the Store's exact indexes, by modality (the same dict, never rebound)
        self.index: dict[str, Any | None] = {}
        self.state: dict[str, ann.AnnState] = {}
        self.dead: dict[str, np.ndarray] = {}
        self.problem: dict[str, str] = {}
        # Query vectors of a kind the store holds too few of (e.g. text for an index without captions):
        # set by whoever can embed them (the CLI gives the built-in vocabulary); None: tune without them.
        self.query_source: QuerySource | None = None
        # Bulk merges (bulk.py): held modalities skip upkeep at each commit and are built once at the end;
        # `behind` are those that missed a commit meanwhile.
        self.held: set[str] = set()
        self.behind: set[str] = set()

    def path(self, modality: str, gen: int) -> Path:
        return self.folder / f"{modality}-ann-{gen}.faiss"

    def state_of(self, modality: str) -> ann.AnnState:
        return self.state.get(modality) or ann.AnnState()

    # ---- loading --------------------------------------------------------------------------------
    def load(self, modality: str, meta: dict[str, str], should_map: Callable[[Path, bool], bool],
             last_attempt: bool) -> None:
        """Open the modality's ANN index named by the catalog; an unusable one means exact search.

        A missing file raises FileNotFoundError unless `last_attempt`: a writer may have rotated files
        since the catalog was read, so the caller reads the catalog again.
        """
        state = ann.AnnState.from_json(meta.get(f"ann.{modality}"))
        self.state[modality] = state
        self.index[modality] = None
        self.dead[modality] = np.zeros(0, np.int64)
        self.problem.pop(modality, None)
        flat = self.flats.get(modality)
        if not state.active or flat is None:
            return
        path = self.path(modality, state.gen)
        if not path.is_file():
            if not last_attempt:
                raise FileNotFoundError(path)
            self.problem[modality] = f"ANN file {path.name} is missing"
            return
        try:
            if state.on_disk:
                if not ann_disk.delta_path(path, state.delta).is_file() and not last_attempt:
                    raise FileNotFoundError(ann_disk.delta_path(path, state.delta))
                index: Any = ann_disk.open_split(path, state.delta)
            else:
                index = vec.read_index(path, mmap=should_map(path, True), ivf=ann.family(state.factory) == "ivf")
        except (IndexMismatch, RuntimeError):  # RuntimeError: faiss cannot open the on-disk lists
            self.problem[modality] = f"ANN file {path.name} (or its lists) is unreadable"
            return
        self.index[modality] = index
        if int(index.ntotal) == int(flat.ntotal):
            return  # the commit protocol keeps every live id in the ANN index: equal counts, no tombstones
        held, live = ann_disk.held_ids(index), vec.ids_of(flat)
        missing = len(np.setdiff1d(live, held, assume_unique=True))
        if missing:
            self.index[modality] = None
            self.problem[modality] = f"ANN index lacks {missing} vectors"
            return
        self.dead[modality] = np.setdiff1d(held, live, assume_unique=True)

    # ---- following commits ----------------------------------------------------------------------
    def follow(self, s: Session, modality: str, ids: np.ndarray, vectors: np.ndarray, meta: dict[str, str],
               dim: int, force: bool = False, log: Log | None = None) -> None:
        """Keep the ANN index in step with a commit: add the new vectors, or rebuild when due.

        Runs inside the commit's transaction (`s`); the new ANN file is written before SQLite commits,
        and `meta` (the Store's copy) is updated with what the transaction records.
        """
        from retrieval.store import writes

        if modality in self.held and not force:
            self.behind.add(modality)  # its ANN index (if any) now lacks this commit: readers search exactly
            return

        def record(key: str, value: str) -> None:
            writes.put_meta(s, key, value)
            meta[key] = value

        state = self.state_of(modality)
        flat = self.flats[modality]
        n = int(flat.ntotal)
        target = ann.auto_target(state, n, dim)
        current: Any = self.index.get(modality)
        dead = 0
        if current is not None and state.active:
            dead = int(current.ntotal) + len(ids) - n  # every entry beyond the live count is a tombstone
        healthy = modality not in self.problem and (current is not None or not state.active)
        disk = ann.lists_on_disk(target, n, dim, state.budget)
        split = current if isinstance(current, ann_disk.SplitIndex) else None
        regrown = split is not None and split.delta.ntotal + len(ids) > ann_disk.DELTA_REMERGE * split.base.ntotal
        gen = max(state.gen, int(meta.get(f"annmax.{modality}", "0"))) + 1
        rebuilt = force or ann.needs_rebuild(state, target, n, dead, healthy) or regrown or (
            state.active and disk != state.on_disk)
        if rebuilt:
            try:
                new_index, state = self._build(modality, target, state, log, self.path(modality, gen) if disk else None)
            except (RuntimeError, ValueError, MemoryError) as e:  # faiss refuses: the commit still goes ahead
                why = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
                self.problem[modality] = f"cannot build {target} ({why})"
                if log:
                    log(f"{modality}: {self.problem[modality]}; exact search serves")
                return
        elif state.active and len(ids):
            current.add_with_ids(vectors, ids)
            new_index = current
        elif state.active:
            # Only deletions: the ANN file stays as it is; tombstones follow from the exact store.
            self.dead[modality] = np.setdiff1d(ann_disk.held_ids(current), vec.ids_of(flat), assume_unique=True)
            return
        else:
            if meta.get(f"ann.{modality}") != state.to_json():
                record(f"ann.{modality}", state.to_json())
            return
        if isinstance(new_index, ann_disk.SplitIndex):  # the merged lists stay; the delta is written anew
            if rebuilt:
                state = replace(state, gen=gen, delta=0)
                record(f"annmax.{modality}", str(gen))
            state = replace(state, delta=state.delta + 1)
            vec.write_atomic(new_index.delta, ann_disk.delta_path(self.path(modality, state.gen), state.delta))
        elif new_index is not None:
            vec.write_atomic(new_index, self.path(modality, gen))
            state = replace(state, gen=gen)
            record(f"annmax.{modality}", str(gen))
        record(f"ann.{modality}", state.to_json())
        self.index[modality] = new_index
        self.state[modality] = state
        self.problem.pop(modality, None)
        self.dead[modality] = (np.zeros(0, np.int64) if new_index is None or int(new_index.ntotal) == n else
                               np.setdiff1d(ann_disk.held_ids(new_index), vec.ids_of(flat), assume_unique=True))

    def _build(self, modality: str, target: str, state: ann.AnnState, log: Log | None, disk: Path | None = None
               ) -> tuple[Any | None, ann.AnnState]:
        """Build `target` from the stored vectors and tune its knob; Flat means no ANN index. With `disk`, an
        IVF's lists are merged on disk there (ann_disk.py), built a shard at a time."""
        flat = self.flats[modality]
        n = int(flat.ntotal)
        auto = state.requested.strip().lower() == "auto"
        base = replace(state, factory=target, gen=0, built_n=n, param=None, value=None, refine=1,
                       recall=None, query_ms=None, fallback=state.fallback if auto else None, on_disk=False, delta=0)
        if target == ann.FLAT:
            return None, base
        ids, vectors = vec.vectors_of(flat)
        cross = self._cross(modality)
        if disk is not None:
            rows = ann_disk.shard_rows(ann.lists_bytes(target, int(vectors.shape[1]), 1),
                                       state.budget or ann.default_budget())
            split, tuned = ann_disk.build(target, ids, vectors, base, disk, rows,
                                          lambda q, k: flat.search(q, min(k, n)), flat.reconstruct_batch,
                                          log=log, kind=modality, cross=cross)
            if log:
                log(f"{modality}: built {target} over {n} vectors: {tuned.describe()}")
            return split, tuned

        def build(factory: str, start: ann.AnnState) -> tuple[Any, ann.AnnState]:
            index, tuned = ann.build(factory, ids, vectors, start, lambda q, k: flat.search(q, min(k, n)),
                                     flat.reconstruct_batch, log=log, kind=modality, cross=cross)
            if log:
                log(f"{modality}: built {factory} over {n} vectors: {tuned.describe()}")
            return index, tuned

        # a fallback stays recorded while its IVF serves
        index, tuned = build(target, replace(base, fallback=base.fallback if ann.family(target) != "hnsw" else None))
        if (auto and ann.family(target) == "hnsw"
                and tuned.recall is not None and tuned.recall < ann.TARGET_RECALL):
            # The quality lab saw HNSW give photo queries 0.65 recall@10 on 237k captions at any efSearch; an
            # IVF index with exact re-scoring reached 0.97. Auto keeps whichever serves every query kind better.
            kind = ann.ivf_instead(n, int(vectors.shape[1]), state.budget)
            factory = ann.resolve(kind, n, int(vectors.shape[1]), state.budget)
            if factory == ann.FLAT:  # too few vectors to train IVF: exact search until there are
                return None, replace(base, fallback=kind)
            alt, alt_tuned = build(factory, replace(base, fallback=kind))
            if alt_tuned.recall is not None and alt_tuned.recall > tuned.recall:
                return alt, alt_tuned
        return index, tuned

    def _cross(self, modality: str) -> dict[str, np.ndarray]:
        """Queries of the other modality to tune `modality`'s index for: a sample of the other store's own
        vectors when it holds enough (captions for the image index, photos for the caption index), else
        what the query source gives (the built-in vocabulary's text vectors), else none."""
        other = "text" if modality == "image" else "image"
        flat = self.flats.get(other)
        if flat is not None and int(flat.ntotal) >= MIN_CROSS:
            ids = vec.ids_of(flat)  # only the sample's vectors are read: the store may be 20 GB, mapped
            pick = np.sort(np.random.default_rng(1).permutation(len(ids))[:ann.TUNE_QUERIES])
            return {other: np.ascontiguousarray(flat.reconstruct_batch(ids[pick]), dtype=np.float32)}
        found = self.query_source(other) if self.query_source is not None else None
        if found is None or not len(found):
            return {}
        rows = np.random.default_rng(1).permutation(len(found))[:ann.TUNE_QUERIES]
        return {other: np.ascontiguousarray(np.asarray(found)[np.sort(rows)], dtype=np.float32)}

    def set_type(self, s: Session, modalities: tuple[str, ...], requested: str, budget: int | None,
                 meta: dict[str, str], dim: int, rebuild: bool, force: bool, log: Log | None
                 ) -> dict[str, str]:
        """Record the index type to keep and, with `rebuild`, build it now from the stored vectors, inside
        the caller's transaction. Returns modality -> description."""
        req = requested.strip()
        if req.lower() in ann.TYPES:
            req = req.lower()
        for m in modalities:  # every modality it applies to must be able to take it, before anything is recorded
            flat = self.flats.get(m)
            ann.check_buildable(req, int(flat.ntotal) if flat is not None else 0, dim)
        out: dict[str, str] = {}
        for m in modalities:
            old = self.state_of(m)
            state = replace(old, requested=req, budget=budget)
            self.state[m] = state
            if rebuild and self.flats.get(m) is not None:
                changed = (old.requested, old.budget) != (req, budget)
                self.problem.pop(m, None)
                self.follow(s, m, np.zeros(0, np.int64), np.zeros((0, dim), np.float32), meta, dim,
                            force=force or changed and state.active or m in self.behind, log=log)
                self.behind.discard(m)
                if self.problem.get(m, "").startswith("cannot build"):  # the caller's transaction rolls back
                    raise UserError(f"{m} vectors: {self.problem[m]}; nothing was changed")
            else:
                from retrieval.store import writes

                writes.put_meta(s, f"ann.{m}", state.to_json())
                meta[f"ann.{m}"] = state.to_json()
            out[m] = self.state_of(m).describe()
        return out

    def cleanup(self, modality: str) -> None:
        """Drop ANN files other than the current one and the one before it (readers may hold it): the
        index file, its on-disk lists and delta (ann_disk.py), shards left by a build, temp files."""
        state = self.state_of(modality)
        current = state.gen
        pattern = re.compile(rf"^{modality}-ann-(\d+)(?:\.delta-(\d+)|(\.part-\d+))?\.faiss(\.ivfdata)?(\.tmp)?$")
        files = []
        for p in self.folder.glob(f"{modality}-ann-*.faiss*"):
            m = pattern.match(p.name)
            if m:
                delta = int(m.group(2)) if m.group(2) else None
                files.append((int(m.group(1)), delta, bool(m.group(3) or m.group(5)), p))
        older = sorted({g for g, d, junk, _ in files if g < current and not junk and d is None})
        # The generation before is kept one commit longer; an on-disk index's commits write deltas (its
        # delta 1 comes with the build), so from delta 2 on no reader can still be about to open the one before.
        keep = {current} | ({older[-1]} if older and not (state.on_disk and state.delta >= 2) else set())
        last_delta = {g: max((d for g2, d, junk, _ in files if g2 == g and d is not None and not junk), default=0)
                      for g in keep}
        for g, d, junk, p in files:
            if junk or g not in keep:
                p.unlink(missing_ok=True)
            elif d is not None and (d < state.delta - 1 if g == current else d != last_delta[g]):
                p.unlink(missing_ok=True)  # a reader holds at most the delta before the current one

    # ---- serving --------------------------------------------------------------------------------
    def plan(self, modality: str, opts: QueryOptions) -> tuple[str | None, int | None, int] | None:
        """(knob, value, refine) when the ANN index answers an unfiltered query; None for exact search."""
        state = self.state_of(modality)
        knob = ("nprobe", opts.nprobe) if opts.nprobe else ("efSearch", opts.ef_search) if opts.ef_search else None
        if opts.exact or self.index.get(modality) is None:
            if knob and not opts.exact:
                raise UserError(f"--{'nprobe' if knob[0] == 'nprobe' else 'ef-search'} needs an ANN index; "
                                f"this one searches exactly ({state.describe()})")
            return None
        if knob:
            if knob[0] != state.param:
                flag = "--nprobe" if knob[0] == "nprobe" else "--ef-search"
                raise UserError(f"{flag} does not apply to {state.factory} "
                                f"(its knob is {state.param or 'none'})")
            return knob[0], knob[1], state.refine
        return state.param, state.value, state.refine

    def info(self, modality: str, mapped: bool) -> dict[str, object]:
        """How a modality is searched: the recorded ANN state, any problem, and whether files are mapped."""
        state = self.state_of(modality)
        info: dict[str, object] = {"requested": state.requested, "factory": state.factory,
                                   "describe": state.describe(), "param": state.param, "value": state.value,
                                   "refine": state.refine, "recall_at_10": state.recall,
                                   "recall_at_10_by_query": state.recalls,
                                   "tombstones": int(len(self.dead.get(modality, ()))),
                                   "memory_mapped": mapped}
        if state.active:
            p = self.path(modality, state.gen)
            files = [p] + ([ann_disk.lists_path(p), ann_disk.delta_path(p, state.delta)] if state.on_disk else [])
            info["ann_bytes"] = sum(f.stat().st_size for f in files) if all(f.is_file() for f in files) else None
            if state.on_disk:
                info["ann_lists_on_disk"] = str(ann_disk.lists_path(p))
        if modality in self.problem:
            info["problem"] = self.problem[modality] + "; exact search serves until `crossmodal reindex`"
        return info
