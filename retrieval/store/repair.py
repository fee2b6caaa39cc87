"""`Store.repair`: make the catalog and the vector files agree again, and say exactly what was lost.

Why a mixin of its own: repair is the one place that distrusts what is stored. Per modality it reads the
vector file the catalog names straight from its layout (so a header faiss rejects does not lose the rest),
checks every block against the checksums the commit recorded and every vector for NaN/inf, keeps only the
intact (id, vector) pairs, then drops rows without a vector and vectors without a row, writes a new
generation with fresh checksums, and rebuilds the ANN index from what remains. Everything dropped is
counted, and the image paths are listed: the next `crossmodal index` re-embeds them from their files.
A catalog SQLite cannot read is rebuilt before this runs (salvage.py, from Store.open(salvage=True)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexMismatch
from retrieval.model.spec import Fingerprint
from retrieval.store import checksums, exact, exact_segments
from retrieval.store import vectors as vec
from retrieval.store.ann_upkeep import AnnUpkeep
from retrieval.store.reader import CatalogReader
from retrieval.store.records import MODALITIES

SHOWN = 5  # lost paths named in the notes (the JSON report lists them all)


@dataclass
class RepairReport:
    """What repair did: counts, one note per thing lost or rebuilt, and the image paths whose rows went."""

    rows_dropped: int = 0
    vectors_dropped: int = 0
    notes: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"rows_dropped": self.rows_dropped, "vectors_dropped": self.vectors_dropped}

    def to_json(self) -> dict[str, object]:
        return {**self.counts(), "notes": self.notes, "lost": self.lost}


class StoreRepair:
    """Repair of a writable Store (mixed into it): the attributes below are the Store's."""

    home: Path
    fingerprint: Fingerprint | None
    meta: dict[str, str]
    indexes: dict[str, Any]
    generations: dict[str, int]
    salvaged: list[str]
    _ann: AnnUpkeep

    @property
    def engine(self) -> Any:
        raise NotImplementedError

    def _require_writable(self) -> None:
        raise NotImplementedError

    def _load(self, check: bool, attempts: int = 3) -> None:
        raise NotImplementedError

    def _vector_path(self, modality: str, gen: int) -> Path:
        raise NotImplementedError

    def _check_agreement(self, catalog: CatalogReader) -> None:
        """Opening's check: every row has a vector and every vector a row, else name `repair`."""
        for m in MODALITIES:
            rows = catalog.ids(m)
            index = self.indexes.get(m)
            held = vec.ids_of(index) if index is not None else np.zeros(0, dtype=np.int64)
            if len(rows) == len(held) and np.array_equal(np.sort(rows), np.sort(held)):
                continue
            no_vec = len(np.setdiff1d(rows, held))
            no_row = len(np.setdiff1d(held, rows))
            raise IndexMismatch(
                f"catalog and {m} vectors disagree in {self.home} ({no_vec} rows without a vector, "
                f"{no_row} vectors without a row); run `crossmodal repair`, then `crossmodal index` "
                f"to re-embed what it dropped")

    def repair(self) -> dict[str, int]:
        """Make catalog and vectors agree (see `repair_report`); returns the two counts."""
        return self.repair_report().counts()

    def repair_report(self) -> RepairReport:
        """Drop damaged vectors, rows without vectors and vectors without rows, in one write transaction
        (nothing slips in between), and rebuild the ANN indexes; the report says what was lost."""
        self._require_writable()
        report = RepairReport(notes=list(self.salvaged))
        from retrieval.store import writes

        with writes.transaction(self.engine) as s:
            for m in MODALITIES:
                rows = writes.ids(s, m)
                if self.indexes.get(m) is None:
                    if len(rows):
                        report.lost += writes.paths_of(s, rows.tolist())
                        writes.delete_modality(s, m)
                        report.rows_dropped += len(rows)
                        report.notes.append(f"{m}: no usable vectors; its {len(rows)} rows are dropped")
                    continue
                index = self._intact(m, report)
                held = vec.ids_of(index)
                no_vec = np.setdiff1d(rows, held)
                no_row = np.setdiff1d(held, rows)
                report.lost += writes.paths_of(s, no_vec.tolist())
                writes.delete_ids(s, no_vec.tolist())
                report.rows_dropped += len(no_vec)
                report.vectors_dropped += len(no_row)
                gen = max(self.generations.get(m, 0), int(self.meta.get(f"maxgen.{m}", "0"))) + 1
                fresh, sums = exact_segments.compact(index, no_row, gen, self._vector_path(m, gen))
                writes.set_meta(s, exact_segments.meta_after(self.meta, m, self.indexes[m], fresh, {gen: sums}, gen),
                                self.meta)
                self.indexes[m] = fresh
                self.generations[m] = gen
                if self.fingerprint is not None:  # ANN: derived, rebuilt from the rest
                    self._ann.problem.pop(m, None)
                    self._ann.follow(s, m, np.zeros(0, np.int64), np.zeros((0, index.d), np.float32),
                                     self.meta, self.fingerprint.dim, force=self._ann.state_of(m).active)
        if report.lost:
            shown = ", ".join(report.lost[:SHOWN]) + (f" and {len(report.lost) - SHOWN} more"
                                                      if len(report.lost) > SHOWN else "")
            report.notes.append(f"images to re-embed with `crossmodal index`: {shown}")
        self._load(check=True)
        return report

    def _intact(self, modality: str, report: RepairReport) -> exact_segments.ExactStore:
        """The modality's exact store holding only entries whose bytes pass their checksums and whose
        vectors are finite, segment by segment (in memory when anything was dropped: repair reads every
        segment anyway); what was loaded when nothing was."""
        index: exact_segments.ExactStore = self.indexes[modality]
        d = int(index.d)
        ids_kept: list[np.ndarray] = []
        vectors_kept: list[np.ndarray] = []
        changed = False
        for gen in exact_segments.named(self.meta, modality):
            path = self._vector_path(modality, gen)
            if not path.is_file():
                report.notes.append(f"{path.name} is missing: the rows it held vectors for are dropped")
                changed = True
                continue
            flat = checksums.read_flat(path, d)
            if flat is None:
                report.notes.append(f"{path.name} is unreadable (not the size of a vector file): its vectors "
                                    f"are lost and the rows they belonged to are dropped")
                changed = True
                continue
            ids, vectors, at_vectors, at_ids = flat
            bad = self._damaged(path, gen, modality, flat, report)
            if gen not in index.gens:
                report.notes.append(f"{path.name}: its header is damaged; {int((~bad).sum())} of {len(ids)} "
                                    f"vectors recovered from the file's layout")
            changed |= bool(bad.any()) or gen not in index.gens
            ids_kept.append(ids[~bad])
            vectors_kept.append(vectors[~bad])
        all_ids = np.concatenate(ids_kept) if ids_kept else np.zeros(0, np.int64)
        repeated = (all_ids < 0) | _repeated(all_ids)
        if not changed and not repeated.any():
            return index
        if repeated.any():
            report.vectors_dropped += int(repeated.sum())
            report.notes.append(f"{int(repeated.sum())} vectors with bad or repeated ids dropped; their rows go "
                                f"with them")
        all_vectors = np.concatenate(vectors_kept) if vectors_kept else np.zeros((0, d), np.float32)
        fresh = exact.ExactVectors(d, np.ascontiguousarray(all_ids[~repeated]),
                                   np.ascontiguousarray(all_vectors[~repeated]))
        store = exact_segments.ExactStore(d, [0], [fresh])
        self.indexes[modality] = store
        return store

    def _damaged(self, path: Path, gen: int, modality: str, flat: tuple[np.ndarray, np.ndarray, int, int],
                 report: RepairReport) -> np.ndarray:
        """Which entries of one segment cannot be trusted: in blocks failing their checksums, or not finite."""
        ids, vectors, at_vectors, at_ids = flat
        d = int(vectors.shape[1])
        bad = ~np.isfinite(vectors).all(axis=1) if len(vectors) else np.zeros(0, bool)
        non_finite = int(bad.sum())
        sums = exact_segments.sums_of(self.meta, modality, gen)
        damaged = 0
        if sums is not None:
            spans = checksums.damaged_spans(path, sums)
            if spans is None:  # yet the layout read it: keep what reads, the rows agree or go
                report.notes.append(f"{path.name} is not the size that was written: its checksums cannot "
                                    f"place damage, so only NaN/inf vectors are dropped")
            elif spans:
                hit = _rows_hit(spans, len(ids), d, at_vectors, at_ids)
                damaged = int((hit & ~bad).sum())
                bad |= hit
        dropped = int(bad.sum())
        report.vectors_dropped += dropped
        if dropped:
            what = [f"{damaged} in blocks that fail their checksum"] if damaged else []
            what += [f"{non_finite} not finite (NaN/inf)"] if non_finite else []
            report.notes.append(f"{path.name}: {dropped} damaged vectors dropped ({', '.join(what)}); "
                                f"their rows go with them")
        return bad


def _rows_hit(spans: list[tuple[int, int]], n: int, d: int, at_vectors: int, at_ids: int) -> np.ndarray:
    """Which entries a damaged byte span touches: their vector bytes, or their id bytes."""
    hit = np.zeros(n, bool)
    row = 4 * d
    for start, end in spans:
        lo, hi = max(start, at_vectors), min(end, at_vectors + n * row)
        if lo < hi:
            hit[(lo - at_vectors) // row:(hi - at_vectors - 1) // row + 1] = True
        lo, hi = max(start, at_ids), min(end, at_ids + 8 * n)
        if lo < hi:
            hit[(lo - at_ids) // 8:(hi - at_ids - 1) // 8 + 1] = True
    return hit


def _repeated(ids: np.ndarray) -> np.ndarray:
    """Entries whose id occurs more than once (a damaged id block can repeat one): none can be trusted."""
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return np.asarray(counts[inverse] > 1, bool)
