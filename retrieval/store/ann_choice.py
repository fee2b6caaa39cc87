"""Which ANN index a modality gets: the state the catalog records, the memory each type needs, the
`auto` choice by collection size and budget, and when an index must be rebuilt.

Why apart from ann.py (which builds, searches and tunes indexes): these are the decisions, cheap and pure
(faiss is imported only to validate a user's factory string), read by the CLI and by the store's upkeep.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from retrieval.errors import UserError
from retrieval.store.vectors import memory_total

TYPES = ("auto", "flat", "hnsw", "ivfsq", "ivfpq")
FLAT = "Flat"
FLAT_MAX = 100_000  # auto: exact search below this many vectors (a few ms per query at 512-d)
HNSW_MAX = 2_000_000  # auto: HNSW up to this many when its graph fits the memory budget
MIN_TRAIN = 1_000  # IVF types wait for this many vectors; exact search serves until then
TARGET_RECALL = 0.95
DEAD_REBUILD = 0.10  # rebuild once a tenth of the ANN entries are tombstones
REGROW = 4  # IVF types are retrained once the collection is this many times larger than at build
HNSW_M = 32


def _faiss() -> Any:
    import faiss

    return faiss


@dataclass(frozen=True)
class AnnState:
    """What the catalog records about a modality's ANN index (meta key `ann.<modality>`)."""

    requested: str = "auto"  # what the user asked for
    budget: int | None = None  # memory budget in bytes the choice respected (None: the default)
    factory: str = FLAT  # what is built; Flat means exact search only
    gen: int = 0  # the ANN file's generation (0: none)
    built_n: int = 0  # vectors in the store when it was built
    param: str | None = None  # "nprobe" or "efSearch"
    value: int | None = None  # the tuned search-time setting
    refine: int = 1  # candidates per result re-scored exactly (1: none)
    recall: float | None = None  # recall@10 against exact search at the tuned setting (the worst kind's)
    query_ms: float | None = None  # mean single-query time at the tuned setting, measured while tuning
    recalls: dict[str, float] | None = None  # recall@10 per kind of query tuned for ("image", "text")
    fallback: str | None = None  # auto: the IVF kind built because HNSW missed the target for some queries
    on_disk: bool = False  # IVF lists merged on disk and mapped, commits since in a delta (ann_disk.py)
    delta: int = 0  # the delta file's generation (on_disk only)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> AnnState:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    @property
    def active(self) -> bool:
        return self.factory != FLAT and self.gen > 0

    def describe(self) -> str:
        if self.factory == FLAT:
            waiting = self.requested not in ("auto", "flat")
            need = min_vectors(self.requested) if waiting else 0
            fallback = (f"; auto waits for {MIN_TRAIN:,} vectors to build {self.fallback}"
                        if self.fallback and self.requested == "auto" else "")
            return "flat (exact)" + (f"; {self.requested} waits for {need:,} vectors" if waiting else "") + fallback
        knob = f", {self.param}={self.value}" if self.param else ""
        refine = f", refine x{self.refine}" if self.refine > 1 else ""
        recall = ""
        if self.recalls:
            recall = ", recall@10 " + ", ".join(f"{kind} queries {r:.3f}" for kind, r in sorted(self.recalls.items()))
        elif self.recall is not None:
            recall = f", recall@10 {self.recall:.3f}"
        if self.recall is not None and self.recall < TARGET_RECALL:
            recall += f" (best reached; below the {TARGET_RECALL} target)"
        why = (f" (auto: {self.fallback}, as HNSW missed the recall target)"
               if self.fallback and self.requested == "auto" else "")
        disk = ", lists on disk (memory-mapped)" if self.on_disk else ""
        return f"{self.factory}{knob}{refine}{disk}{recall}{why}"


def parse_budget(text: str | None) -> int | None:
    """'4G', '512M', '1.5GB' or a byte count -> bytes; None or 'auto' -> None (the default)."""
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise UserError(f"--memory-budget '{text}' is not a size (e.g. 512M, 4G)")
    value = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")
    if value < 1024 ** 2:
        raise UserError(f"--memory-budget {text} is below 1 MB")
    return int(value)


def default_budget() -> int:
    """Half of physical memory: the rest is for the model, decoding and the page cache."""
    return memory_total() // 2


def nlist_for(n: int) -> int:
    """Inverted lists: a power of two near 2*sqrt(n), with >= 39 training points per list."""
    target = 2 * math.sqrt(max(n, 1))
    nlist: int = 2 ** max(4, round(math.log2(target)))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    return min(nlist, 65536)


def pq_bytes(dim: int, n: int, budget: int) -> int:
    """PQ code size: the largest of dim/8, 64, 32, 16, 8 bytes that divides dim and fits the budget."""
    for m in sorted({dim // 8, 64, 32, 16, 8}, reverse=True):
        if 0 < m <= dim and dim % m == 0 and n * (m + 8) <= budget * 0.8:
            return m
    return 8 if dim % 8 == 0 else 1


def sq8_bytes(dim: int, n: int) -> int:
    """IVF with 8-bit scalar codes: a byte per dimension and an id per vector."""
    return n * (dim + 8)


def lists_bytes(factory: str, dim: int, n: int) -> int:
    """An IVF index's inverted lists: codes and an 8-byte id per vector (SQ8: a byte per dimension, PQ<m>:
    m bytes, Flat: the float32 vector)."""
    code = codes(factory)
    m = re.match(r"PQ(\d+)", code)
    per = int(m.group(1)) if m else 4 * dim if code.startswith("FLAT") else dim
    return n * (per + 8)


def lists_on_disk(factory: str, n: int, dim: int, budget: int | None) -> bool:
    """Whether an IVF index's lists go on disk (ann_disk.py): they would take over 80% of the budget."""
    return family(factory) == "ivf" and lists_bytes(factory, dim, n) > (budget or default_budget()) * 0.8


def hnsw_bytes(dim: int, n: int) -> int:
    """An HNSW32 graph with float vectors: the vectors, about 2*M links per node, and its id map."""
    return n * (4 * dim + 2 * HNSW_M * 4 + 8 + 16)


def family(factory: str) -> str:
    """flat / hnsw / ivf / other: which rebuild rules and search knobs apply."""
    f = factory.upper()
    if f == FLAT.upper():
        return "flat"
    if f.startswith("IVF") or ",IVF" in f:
        return "ivf"
    if f.startswith("HNSW"):
        return "hnsw"
    return "other"


def codes(factory: str) -> str:
    """The encoding part of a factory string ("SQ8" in IVF4096_HNSW32,SQ8): when auto's choice of codes
    changes with the collection (the budget no longer holds 8-bit codes), the index is rebuilt."""
    return factory.split(",", 1)[1].upper() if "," in factory else ""


def min_vectors(requested: str) -> int:
    """Vectors an index type needs before it is built (exact search serves until then): MIN_TRAIN, or for a
    factory string with a fixed IVF list count, that many (k-means cannot make more lists than points)."""
    m = re.search(r"IVF(\d+)", requested.upper()) if requested.lower() not in TYPES else None
    return max(MIN_TRAIN, int(m.group(1)) if m else 0)


def resolve(requested: str, n: int, dim: int, budget: int | None) -> str:
    """The faiss factory string a request means for a collection of n vectors (Flat: exact search)."""
    budget = budget or default_budget()
    req = requested.strip()
    kind = req.lower()
    if kind == "flat" or n < min_vectors(req) and kind != "auto":
        if kind not in TYPES:
            check_factory(req, dim)
        return FLAT  # below MIN_TRAIN vectors exact search is as fast and always right
    if kind == "hnsw":
        return f"HNSW{HNSW_M}"
    if kind == "ivfpq":
        return f"IVF{nlist_for(n)}_HNSW{HNSW_M},PQ{pq_bytes(dim, n, budget)}np"
    if kind == "ivfsq":
        return f"IVF{nlist_for(n)}_HNSW{HNSW_M},SQ8"
    if kind == "auto":
        if n <= FLAT_MAX and n * dim * 4 <= budget:
            return FLAT
        if n <= HNSW_MAX and hnsw_bytes(dim, n) <= budget:
            return f"HNSW{HNSW_M}"
        # The most faithful codes that fit: 8-bit scalar codes need 4x fewer exact re-scores than PQ.
        return resolve("ivfsq" if sq8_bytes(dim, n) <= budget * 0.8 else "ivfpq", n, dim, budget)
    check_factory(req, dim)
    return req


def check_buildable(requested: str, n: int, dim: int) -> None:
    """Refuse, before anything is recorded, a type this collection cannot have: a factory string faiss cannot
    build at this width, or one whose IVF lists outnumber the vectors of a collection big enough to build
    now (a smaller one records it and waits, see `min_vectors`)."""
    if requested.strip().lower() in TYPES:
        return
    check_factory(requested, dim)
    need = min_vectors(requested)
    if MIN_TRAIN <= n < need:
        raise UserError(f"--index-type '{requested}' needs at least {need:,} vectors to train its lists; this "
                        f"index has {n:,} (use ivfsq or ivfpq, which size their lists to the collection, or "
                        f"fewer lists)")


def check_factory(factory: str, dim: int) -> None:
    """A user's faiss factory string must build an inner-product index of this width."""
    faiss = _faiss()
    if factory.upper().startswith("IDMAP"):
        raise UserError(f"--index-type '{factory}': leave out IDMap, crossmodal maps ids itself")
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise UserError(f"--index-type '{factory}' is neither {', '.join(TYPES)} nor a faiss factory "
                        f"string faiss can build (e.g. IVF4096_HNSW32,PQ64np or HNSW32)") from None


def auto_target(state: AnnState, n: int, dim: int) -> str:
    """What `state.requested` means now, keeping auto's recorded fallback from HNSW to IVF (else every
    commit would rebuild the HNSW index that missed the target)."""
    target = resolve(state.requested, n, dim, state.budget)
    if state.requested.strip().lower() == "auto" and state.fallback and family(target) == "hnsw":
        return resolve(state.fallback, n, dim, state.budget)
    return target


def ivf_instead(n: int, dim: int, budget: int | None) -> str:
    """The IVF kind auto would pick at this size if HNSW were out: SQ8 codes when they fit, else PQ."""
    return "ivfsq" if sq8_bytes(dim, n) <= (budget or default_budget()) * 0.8 else "ivfpq"


def needs_rebuild(state: AnnState, target: str, n: int, dead: int, healthy: bool) -> bool:
    """Rebuild when the type changes, tombstones pile up, or an IVF index has outgrown its training."""
    if target == FLAT:
        return state.factory != FLAT
    if not state.active or not healthy:
        return True
    if target != state.factory and (family(target) != family(state.factory)
                                    or family(target) in ("hnsw", "other") or codes(target) != codes(state.factory)):
        return True  # an IVF whose list count drifts with n is only retrained on growth (below)
    if dead > DEAD_REBUILD * max(n + dead, 1):
        return True
    return family(target) == "ivf" and n > REGROW * max(state.built_n, 1)
