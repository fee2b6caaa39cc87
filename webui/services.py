"""What the page asks of the index, cached once per server process. No widgets here.

The index is opened with `retrieval.query.open.open_index`, as the CLI opens it, and held as an
`st.cache_resource` shared by every browser session. It is keyed on the index signature (the recorded model
plus each modality's vector generation, which every commit bumps), so a page reloads the index after
`crossmodal index` / `add-texts` and otherwise never. The encoder is handed on to the next opening of the
same home, so a re-index does not reload a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import streamlit as st

from retrieval.config import DEFAULT_WEIGHT
from retrieval.errors import DecodeError, IndexMissing, UserError
from retrieval.media.thumbnails import thumb_path
from retrieval.model.protocol import Encoder
from retrieval.query import open as query_open
from retrieval.query.cutoff import AUTO_MIN_SCORE, Relevance, sort_hits, split_by
from retrieval.query.search import Hit, QueryVector, Searcher
from retrieval.rerank.params import recorded_reranker
from retrieval.rerank.reranker import DEFAULT_RERANK_K, Reranker, open_reranker
from retrieval.store import CATALOG, ImageFilter
from retrieval.store.location import resolve
from retrieval.store.paths import display_path, from_catalog
from webui import thumbs
from webui.limits import MAX_UPLOAD_MB

log = logging.getLogger("crossmodal.webui")

MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
CAPTIONS_K = 5
SIGNATURE_KEYS = ("schema_version", "model", "gen.image", "gen.text")


# ---- plain values the widgets exchange ----------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """Sidebar choices."""

    k: int = 12
    under: str | None = None
    after: date | None = None
    until: date | None = None  # inclusive, as people read a date range
    rerank: bool = False
    camera: str | None = None
    hide_weaker: bool = True  # text queries: results below the relevance cutoff go behind "show weaker matches"
    sort: str = "score"  # or "date": the kept results newest first

    def image_filter(self) -> ImageFilter | None:
        before = (self.until + timedelta(days=1)).isoformat() if self.until else None
        flt = ImageFilter(under=self.under or None, after=self.after.isoformat() if self.after else None,
                          before=before, camera=self.camera or None)
        return flt if flt.active() else None


@dataclass(frozen=True)
class Upload:
    """An uploaded image, held in memory only; `sha` keys every cache that depends on it."""

    name: str
    data: bytes
    sha: str


@dataclass(frozen=True)
class Summary:
    """What the sidebar says about the index."""

    home: str
    images: int
    texts: int
    corpora: dict[str, int]
    model: str
    size_bytes: int
    skipped: int
    trained_reranker: bool = False  # reranking is on by default only with one recorded


@dataclass(frozen=True)
class Cell:
    """One grid result as plain values: the thumbnail is already small JPEG bytes."""

    id: int
    rank: int
    score: float
    name: str
    date: str
    thumb: bytes
    missing: bool


@dataclass(frozen=True)
class Detail:
    """The detail view of one indexed image; `path` is its catalog path (what `rendition` takes: show it with
    retrieval.store.paths.display_path)."""

    id: int
    path: str
    name: str
    preview: bytes
    missing: bool
    facts: dict[str, str]


@dataclass(frozen=True)
class Index:
    """An opened index, or the reason there is none (`problem`) and whether building one is the fix."""

    searcher: Searcher | None
    signature: str | None
    problem: str | None = None
    needs_index: bool = False


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# ---- opening the index ----------------------------------------------------------------------------
def index_signature(home: Path) -> str | None:
    """A string that changes whenever a writer commits; None when there is no catalog at all.

    Read through the catalog reader, only when the home has a catalog (so none is ever created empty): its
    catalog.sqlite, or the PostgreSQL database its pointer file (or CROSSMODAL_CATALOG) names.
    """
    try:
        where = resolve(home)
        if not where.exists():
            return None
        with contextlib.closing(where.reader()) as reader:
            meta = reader.meta()
    except Exception as e:  # noqa: BLE001 - sqlite3's, psycopg's or ours: any catalog we cannot read
        # Not a catalog we can read: let Store.open produce the real message on each run.
        sqlite = home / CATALOG
        return f"unreadable:{e}:{sqlite.stat().st_mtime_ns if sqlite.is_file() else 0}"
    rows = {k: meta[k] for k in SIGNATURE_KEYS if k in meta}
    # The home is part of it: the cached sidebar, folders and cameras are keyed on the signature alone, and two
    # homes with the same model and generations must not share them.
    return hashlib.sha256(repr((str(home), sorted(rows.items()))).encode()).hexdigest()[:16]


@st.cache_resource(show_spinner=False)
def _encoders() -> dict[str, Encoder]:
    """The encoder last opened per home, shared by every session: a re-index reuses it (no weights reload)."""
    return {}


@st.cache_resource(max_entries=2, show_spinner="Opening the index…")
def _searcher(home: str, signature: str) -> Searcher:
    """The index at one signature with its query encoder, opened the way the CLI opens it (open_index).
    Failures are not cached."""
    held = _encoders()
    searcher = query_open.open_index(home, notify=log.info, reuse=held.get(home))
    held[home] = searcher.encoder
    return searcher


def open_index(home: Path) -> Index:
    """The searcher for `home`, or why there is none; never raises a UserError."""
    signature = index_signature(home)
    if signature is None:
        return Index(None, None, f"No index in {home} yet.", needs_index=True)
    try:
        searcher = _searcher(str(home), signature)
    except IndexMissing:
        return Index(None, signature, f"The index in {home} is empty.", needs_index=True)
    except UserError as e:
        return Index(None, signature, str(e))
    except Exception as e:  # noqa: BLE001 - a damaged index is a message on the page, not a traceback
        log.exception("webui: cannot open the index in %s", home)
        return Index(None, signature, f"cannot open the index in {home}: {type(e).__name__}: {e}")
    if searcher.store.count("image") == 0:
        return Index(searcher, signature, f"The index in {home} holds no images yet.", needs_index=True)
    return Index(searcher, signature)


@st.cache_data(max_entries=8, show_spinner=False)
def summary(_searcher: Searcher, signature: str) -> Summary:
    store = _searcher.store
    fp = store.fingerprint
    return Summary(home=str(store.home), images=store.count("image"), texts=store.count("text"),
                   corpora=store.corpora(), model=fp.describe() if fp else "none",
                   size_bytes=store.size_on_disk(), skipped=len(store.skipped()),
                   trained_reranker=recorded_reranker(store) is not None)


@st.cache_data(max_entries=8, show_spinner=False)
def cameras(_searcher: Searcher, signature: str) -> list[str]:
    """Cameras seen in EXIF, for the camera filter (empty when the catalog has none)."""
    return _searcher.store.cameras()


@st.cache_data(max_entries=8, show_spinner=False)
def folders(_searcher: Searcher, signature: str, limit: int = 500) -> list[str]:
    """Folders holding indexed images and their ancestors below the common root, for the folder filter
    (cached per index signature: it reads every image's path)."""
    parents = set(_searcher.store.image_folders())
    if not parents:
        return []
    root = os.path.commonpath(list(parents))
    out = set()
    for d in parents:
        while d.startswith(root) and d not in out:
            out.add(d)
            if d == root:
                break
            d = os.path.dirname(d)
    return sorted(out)[:limit]


# ---- uploads --------------------------------------------------------------------------------------
def read_upload(name: str, data: bytes) -> Upload:
    """Check an upload before anything decodes it: size cap, non-empty. Raises DecodeError with the why."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise DecodeError(f"'{name}' is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB")
    if not data:
        raise DecodeError(f"'{name}' is empty")
    return Upload(name=name, data=data, sha=hashlib.sha256(data).hexdigest())


@st.cache_data(max_entries=32, show_spinner=False)
def upload_preview(sha: str, _data: bytes, name: str) -> bytes:
    """A small rendition of the upload; a non-image or corrupt file raises DecodeError naming it."""
    try:
        return thumbs.render(_data, thumbs.THUMB_PX)
    except DecodeError as e:
        raise DecodeError(f"'{name}' is not an image crossmodal can read ({e})") from None


# ---- queries --------------------------------------------------------------------------------------
def split_negatives(text: str) -> tuple[str, ...]:
    """The 'not' box holds comma-separated phrases."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


@st.cache_data(max_entries=256, show_spinner=False)
def query_vector(_searcher: Searcher, signature: str, text: str = "", upload_sha: str | None = None,
                 item_id: int | None = None, weight: float = DEFAULT_WEIGHT, negatives: tuple[str, ...] = (),
                 _upload: bytes | None = None) -> np.ndarray:
    """One fused unit vector for text, an uploaded image (by sha) or an indexed image (by id, stored vector)."""
    stored = _searcher.store.vector("image", item_id) if item_id is not None else None
    return _searcher.embed_query(text=text or None, image=_upload if upload_sha and stored is None else None,
                                 weight=weight, negatives=list(negatives), image_vector=stored).vector


@st.cache_resource(max_entries=2, show_spinner="Loading the reranker…")
def reranker(_searcher: Searcher, signature: str) -> Reranker | None:
    """The index's co-attention reranker (recorded file, else parameter-free: the toggle asked for it), or None
    where the model has no token features."""
    from retrieval.errors import TokensUnsupported

    try:
        return open_reranker(_searcher, True, notify=log.info)
    except TokensUnsupported as e:
        log.info("%s; showing dense results", e)
        return None


def reranked_pages(rr: Reranker, q: np.ndarray, text: str, k: int, flt: ImageFilter | None,
                   pages: int, rerank_k: int = DEFAULT_RERANK_K) -> list[Hit]:
    """Ranks 1 .. pages*k with the dense top `rerank_k` reordered by co-attention (same candidates)."""
    return rr.search_images(QueryVector(q, text), pages * k, flt, rerank_k)


def image_pages(searcher: Searcher, q: np.ndarray, k: int, flt: ImageFilter | None, pages: int) -> list[Hit]:
    """Ranks 1 .. pages*k, fetched page by page with `offset` as the API pages."""
    hits: list[Hit] = []
    for page in range(pages):
        got = searcher.search_images(q, k, flt, offset=page * k)
        hits.extend(got)
        if len(got) < k:
            break
    return hits


def captions(searcher: Searcher, q: np.ndarray, signature: str, k: int = CAPTIONS_K,
             hide_weaker: bool = False) -> tuple[list[tuple[str, str, float]], list[tuple[str, str, float]]]:
    """((text, corpus, score) of the best captions for an image vector, those below the relevance cutoff)."""
    hits = searcher.search_texts(q, k)
    weaker: list[Hit] = []
    if hide_weaker:
        hits, weaker = split_by(relevance(searcher, signature).captions(q, hits), AUTO_MIN_SCORE)

    def rows(hs: Sequence[Hit]) -> list[tuple[str, str, float]]:
        return [(h.item.text or "", h.item.corpus or "", h.score) for h in hs]

    return rows(hits), rows(weaker)


@st.cache_resource(max_entries=2, show_spinner="Calibrating relevance…")
def relevance(_searcher: Searcher, signature: str) -> Relevance:
    """The cutoff's calibration for this index (its vocabulary vectors are embedded once, then cached)."""
    return Relevance(_searcher)


def cut_images(searcher: Searcher, signature: str, hits: Sequence[Hit], hide_weaker: bool,
               sort: str) -> tuple[list[Hit], list[Hit]]:
    """(kept hits in the chosen order, weaker hits) of a text query; nothing is hidden when not asked."""
    kept, weaker = (split_by(relevance(searcher, signature).images(hits), AUTO_MIN_SCORE) if hide_weaker
                    else (list(hits), []))
    return sort_hits(kept, sort), weaker


# ---- thumbnails -----------------------------------------------------------------------------------
@st.cache_data(max_entries=4000, show_spinner=False)
def _rendition(path: str, key: tuple[int, int], px: int, square: bool) -> bytes | None:
    """Cached per (path, mtime, size, px); `path` always comes from the catalog, never from the browser.
    Catalog paths are valid text (cache keys hash them); the file is opened by its exact bytes."""
    return thumbs.render_file(from_catalog(path), px, square)


def rendition(path: str, px: int = thumbs.THUMB_PX, square: bool = True) -> tuple[bytes, bool]:
    """(JPEG bytes, missing) for an indexed file: a placeholder when it is gone or broken.

    Grid thumbnails are square crops (an even grid); the detail view asks for the whole picture. `path` is a
    catalog path (retrieval.store.paths).
    """
    key = thumbs.file_key(from_catalog(path))
    data = _rendition(path, key, px, square) if key else None
    return (data, False) if data else (thumbs.placeholder(px), True)


def _date(taken_at: str | None, path: str) -> str:
    if taken_at:
        return taken_at[:10]
    key = thumbs.file_key(from_catalog(path))
    return datetime.fromtimestamp(key[0] / 1e9).date().isoformat() if key else ""


@st.cache_data(max_entries=4000, show_spinner=False)
def _stored_square(thumb_file: str, key: tuple[int, int], px: int) -> bytes | None:
    """A square crop of the thumbnail the indexer wrote (a 256 px JPEG: far cheaper than the original)."""
    return thumbs.render_file(thumb_file, px, square=True)


def grid_thumb(path: str, sha: str | None, home: Path | None) -> tuple[bytes, bool]:
    """The indexer's stored thumbnail when there is one and the original still exists, else a fresh one."""
    if sha and home is not None and thumbs.file_key(from_catalog(path)):
        stored = str(thumb_path(home, sha))
        key = thumbs.file_key(stored)
        data = _stored_square(stored, key, thumbs.THUMB_PX) if key else None
        if data:
            return data, False
    return rendition(path)


def cells(hits: Sequence[Hit], home: Path | None = None) -> list[Cell]:
    """Grid cells for image hits: small thumbnails plus name, score and date."""
    out = []
    for h in hits:
        path = h.item.path or ""
        thumb, missing = grid_thumb(path, h.item.sha256, home)
        out.append(Cell(id=h.id, rank=h.rank, score=h.score, name=os.path.basename(display_path(path)),
                        date=_date(h.item.taken_at, path), thumb=thumb, missing=missing))
    return out


def detail(searcher: Searcher, item_id: int) -> Detail:
    """The detail view's facts for an indexed image (UserError if the id is not in the catalog)."""
    item = searcher.store.items([item_id]).get(item_id)
    if item is None or item.modality != "image" or not item.path:
        raise UserError(f"image {item_id} is no longer in the index")
    preview, missing = rendition(item.path, thumbs.PREVIEW_PX, square=False)
    shown = display_path(item.path)  # U+FFFD for bytes that are not UTF-8; rendition opens the exact name
    facts = {"folder": os.path.dirname(shown),
             "size": f"{item.width} x {item.height} px" if item.width else "",
             "file size": human_bytes(item.bytes) if item.bytes else "",
             "taken": item.taken_at or "",
             "camera": item.camera or "",
             "GPS": f"{item.gps_lat:.5f}, {item.gps_lon:.5f}" if item.gps_lat is not None
             and item.gps_lon is not None else "",
             "file date": "" if item.taken_at else _date(None, item.path),
             "id": str(item.id)}
    return Detail(id=item.id, path=item.path, name=os.path.basename(shown), preview=preview, missing=missing,
                  facts={k: v for k, v in facts.items() if v})
