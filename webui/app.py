"""The crossmodal page: wiring only. Widgets live in components.py, cached index access in services.py.

Run it with `crossmodal ui` (sets CROSSMODAL_HOME and the upload cap). Every input widget stays rendered
while the detail view is open, so Streamlit keeps its value for the way back.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

if importlib.util.find_spec("webui") is None:  # `streamlit run webui/app.py` from an uninstalled checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402

from retrieval.config import DEFAULT_WEIGHT, default_home  # noqa: E402
from retrieval.errors import UserError  # noqa: E402
from retrieval.query.search import Searcher  # noqa: E402
from webui import components as ui  # noqa: E402
from webui import services  # noqa: E402
from webui.services import Options, Upload  # noqa: E402


@dataclass(frozen=True)
class Query:
    """What the inputs of one mode ask for, as plain values."""

    text: str = ""
    upload: Upload | None = None
    item_id: int | None = None
    weight: float = DEFAULT_WEIGHT
    negatives: tuple[str, ...] = ()

    def ident(self) -> str:
        return repr((self.text, self.upload.sha if self.upload else None, self.item_id, self.weight,
                     self.negatives))


# ---- page state (callbacks run before the rerun that shows their effect) -------------------------
def open_detail(item_id: int) -> None:
    st.session_state["detail"] = item_id


def close_detail() -> None:
    st.session_state["detail"] = None


def more(scope: str) -> None:
    st.session_state[f"pages:{scope}"] = st.session_state.get(f"pages:{scope}", 1) + 1


def use_in_compose(item_id: int) -> None:
    st.session_state["compose_item"] = item_id
    st.session_state["mode"] = "Compose"
    st.session_state["detail"] = None


def clear_compose_item() -> None:
    st.session_state["compose_item"] = None


def pages_for(scope: str, query: Query, opts: Options) -> int:
    """Pages shown for this query; a new query closes the detail view, any change starts at page 1."""
    ss = st.session_state
    if ss.get(f"query:{scope}") != query.ident():
        ss[f"query:{scope}"] = query.ident()
        ss["detail"] = None
        ss[f"pages:{scope}"] = 1
    if ss.get(f"opts:{scope}") != opts:
        ss[f"opts:{scope}"] = opts
        ss[f"pages:{scope}"] = 1
    return ss.get(f"pages:{scope}", 1)


# ---- inputs per mode ------------------------------------------------------------------------------
def read_upload(key: str, label: str) -> Upload | None:
    """The uploader's bytes, checked (size cap, decodes); raises a UserError the page shows."""
    got = ui.uploaded_file(key, label)
    if got is None:
        return None
    upload = services.read_upload(*got)
    services.upload_preview(upload.sha, upload.data, upload.name)
    return upload


def search_inputs(s: Searcher, sig: str) -> Query | None:
    text = ui.query_box()
    if not text:
        st.caption("Describe a photo in words; results are ranked by meaning.")
        return None
    return Query(text=text)


def image_inputs(s: Searcher, sig: str) -> Query | None:
    upload = read_upload("upload", "Drop an image: see its best captions and the most similar photos")
    if upload is None:
        return None
    ui.upload_preview(upload.name, services.upload_preview(upload.sha, upload.data, upload.name))
    return Query(upload=upload)


def compose_inputs(s: Searcher, sig: str) -> Query | None:
    item_id = st.session_state.get("compose_item")
    upload = None
    if item_id is not None:
        try:
            d = services.detail(s, item_id)
        except UserError:
            st.warning("The image picked for Compose is no longer in the index.")
            item_id = st.session_state["compose_item"] = None
        else:
            ui.selected_image(services.rendition(d.path)[0], d.name, on_clear=clear_compose_item)
    if item_id is None:
        upload = read_upload("compose_upload", "Start from an image (or open a result and use it in Compose)")
        if upload is not None:
            ui.upload_preview(upload.name, services.upload_preview(upload.sha, upload.data, upload.name))
    t = ui.compose_inputs()
    if item_id is None and upload is None and not t.text:
        st.caption("Give an image, a text modifier, or both.")
        return None
    return Query(text=t.text, upload=upload, item_id=item_id, weight=t.weight,
                 negatives=services.split_negatives(t.negatives))


INPUTS = {"Search": search_inputs, "Image": image_inputs, "Compose": compose_inputs}


# ---- results --------------------------------------------------------------------------------------
def vector(s: Searcher, sig: str, q: Query) -> np.ndarray:
    return services.query_vector(s, sig, text=q.text, upload_sha=q.upload.sha if q.upload else None,
                                 item_id=q.item_id, weight=q.weight, negatives=q.negatives,
                                 _upload=q.upload.data if q.upload else None)


def image_results(scope: str, s: Searcher, opts: Options, q: np.ndarray, pages: int, text: str = "",
                  sig: str = "") -> None:
    flt = opts.image_filter()
    rr = services.reranker(s, sig) if opts.rerank and text.strip() else None
    if rr is not None:
        hits = services.reranked_pages(rr, q, text, opts.k, flt, pages)
    else:
        hits = services.image_pages(s, q, opts.k, flt, pages)
    if not hits:
        st.info("No images match these filters." if flt else "No images found.")
        return
    # The cutoff calibrates words against photos: text searches only (not image or composed queries).
    kept, weaker = services.cut_images(s, sig, hits, opts.hide_weaker and scope == "Search" and bool(text.strip()),
                                       opts.sort)
    if kept:
        ui.result_grid(services.cells(kept, s.store.home), scope, on_open=open_detail)
    else:
        st.info("No result passes the relevance cutoff; the weaker matches are below.")
    ui.weaker_grid(services.cells(weaker, s.store.home), scope, on_open=open_detail)
    ui.more_button(scope, len(hits), exhausted=len(hits) < pages * opts.k, on_more=more)


def show_results(mode: str, s: Searcher, sig: str, opts: Options, query: Query) -> None:
    pages = pages_for(mode, query, opts)
    if st.session_state.get("detail") is not None:
        return show_detail(s, sig, opts, st.session_state["detail"])
    q = vector(s, sig, query)
    if mode == "Image":
        left, right = st.columns([1, 2])
        with left:
            st.subheader("Best captions")
            ui.caption_list(*services.captions(s, q, signature=sig, hide_weaker=opts.hide_weaker))
        with right:
            st.subheader("Most similar images")
            image_results(mode, s, opts, q, pages)
    else:
        image_results(mode, s, opts, q, pages, text=query.text or "", sig=sig)


def show_detail(s: Searcher, sig: str, opts: Options, item_id: int) -> None:
    ui.back_button(close_detail)
    ui.detail_header(services.detail(s, item_id), on_compose=use_in_compose)
    stored = s.store.vector("image", item_id)
    left, right = st.columns([1, 2])
    with left:
        st.subheader("Best captions")
        ui.caption_list(*services.captions(s, stored, signature=sig, hide_weaker=opts.hide_weaker))
    with right:
        st.subheader("More like this")
        hits = s.more_like(item_id, opts.k, opts.image_filter())
        if hits:
            ui.result_grid(services.cells(hits, s.store.home), "like", on_open=open_detail)
        else:
            st.info("No other images match these filters.")


def main() -> None:
    st.set_page_config(page_title="crossmodal", page_icon="🔎", layout="wide")
    home = default_home()
    index = services.open_index(home)
    s, sig = index.searcher, index.signature
    if s is not None:
        ui.index_sidebar(services.summary(s, sig))
    if s is None or index.problem:
        ui.no_index(str(home), index.problem or "", index.needs_index, sidebar=s is None)
        return
    summary = services.summary(s, sig)
    opts = ui.options_sidebar(services.folders(s, sig), services.cameras(s, sig), summary.trained_reranker)
    mode = ui.mode_picker(on_change=close_detail)
    with ui.guard("searching"):
        query = INPUTS[mode](s, sig)
        if query is None:
            close_detail()
        else:
            show_results(mode, s, sig, opts, query)


main()
