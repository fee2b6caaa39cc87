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
from retrieval.store import checksums, exact
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
                sums = exact.write_next(index, self._vector_path(m, gen), gen, np.zeros(0, np.int64),
                                        np.zeros((0, index.d), np.float32), no_row)
                for key, value in ((f"gen.{m}", str(gen)), (f"maxgen.{m}", str(gen)), (f"sums.{m}", sums.to_json())):
                    writes.put_meta(s, key, value)
                    self.meta[key] = value
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

    def _intact(self, modality: str, report: RepairReport) -> exact.ExactVectors:
        """The modality's exact store holding only entries whose bytes pass their checksums and whose
        vectors are finite (in memory when anything was dropped: repair reads the whole file anyway)."""
        index: exact.ExactVectors = self.indexes[modality]
        gen = self.generations.get(modality, 0)
        path = self._vector_path(modality, gen)
        if gen == 0:
            return index
        if not path.is_file():
            report.notes.append(f"{path.name} is missing: the rows it held vectors for are dropped")
            return index
        d = int(index.d)
        flat = checksums.read_flat(path, d)
        if flat is None:  # the store opened only files of the right layout: this one holds nothing usable
            report.notes.append(f"{path.name} is unreadable (not the size of a vector file): its vectors "
                                f"are lost and the rows they belonged to are dropped")
            return exact.ExactVectors.empty(d)
        ids, vectors, at_vectors, at_ids = flat
        bad = ~np.isfinite(vectors).all(axis=1) if len(vectors) else np.zeros(0, bool)
        non_finite = int(bad.sum())
        sums = checksums.FileSums.from_json(self.meta.get(f"sums.{modality}"))
        damaged = 0
        if sums is not None and sums.gen == gen:
            spans = checksums.damaged_spans(path, sums)
            if spans is None:  # yet faiss or the layout read it: keep what reads, the rows agree or go
                report.notes.append(f"{path.name} is not the size that was written: its checksums cannot "
                                    f"place damage, so only NaN/inf vectors are dropped")
            elif spans:
                hit = _rows_hit(spans, len(ids), d, at_vectors, at_ids)
                damaged = int((hit & ~bad).sum())
                bad |= hit
        bad |= (ids < 0) | _repeated(ids)
        if not bad.any() and flat is not None and len(ids) == index.ntotal:
            return index
        fresh = exact.ExactVectors(d, np.ascontiguousarray(ids[~bad]), np.ascontiguousarray(vectors[~bad]))
        self.indexes[modality] = fresh
        if int(index.ntotal) != len(ids):
            report.notes.append(f"{path.name}: its header is damaged; {int((~bad).sum())} of {len(ids)} vectors "
                                f"recovered from the file's layout")
        dropped = int(bad.sum())
        report.vectors_dropped += dropped
        if dropped:
            what = [f"{damaged} in blocks that fail their checksum"] if damaged else []
            what += [f"{non_finite} not finite (NaN/inf)"] if non_finite else []
            report.notes.append(f"{path.name}: {dropped} damaged vectors dropped ({', '.join(what) or 'bad ids'}); "
                                f"their rows go with them")
        return fresh


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
