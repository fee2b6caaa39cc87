"""Small render functions: each draws one piece of the page and returns plain values (or nothing).

Buttons take callbacks (`on_open`, `on_more`, ...) so state changes happen before the rerun that shows
them, instead of drawing the page twice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date

import streamlit as st

from retrieval.config import DEFAULT_WEIGHT
from retrieval.errors import UserError
from retrieval.store.paths import display_path
from webui.limits import MAX_QUERY_CHARS, MAX_UPLOAD_MB
from webui.services import Cell, Detail, Options, Summary, human_bytes

log = logging.getLogger("crossmodal.webui")

MODES = ("Search", "Image", "Compose")
GRID_COLUMNS = 4
K_CHOICES = (4, 8, 12, 16, 24, 32, 48)


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Show failures as one message on the page, never a traceback (which goes to the server log)."""
    try:
        yield
    except UserError as e:
        st.error(_md(str(e)))
    except Exception as e:  # noqa: BLE001 - the page must keep working; the log keeps the traceback
        log.exception("webui: %s failed", what)
        first = str(e).splitlines()[0] if str(e) else ""
        st.error(f"Something went wrong while {what}: {type(e).__name__}: {_md(first)}")


_MD_SYNTAX = re.compile(r"([\\`*_{}\[\]<>()#+\-!|~:$&])")
_LINE_BREAKS = re.compile(r"[\r\n\t\f\v\x85\u2028\u2029]")
_WJ = "\u2060"  # WORD JOINER: invisible, and breaks a pattern without changing what people read


def _md(text: str) -> str:
    """Escape Markdown so catalog and upload text (file names, captions, corpus names) renders literally.

    Backslash escapes are not enough on their own: Streamlit's GitHub-flavoured Markdown links bare URLs,
    'www.' names and e-mail addresses after escapes are resolved (checked in Chromium: `[x](www.example.com)`
    escaped still made a live link). An invisible word joiner after every ':' (so 'https://'), after 'www'
    and after '@' breaks those patterns. Line breaks become spaces, so no block syntax (lists, headings,
    code) can start inside the text.
    """
    text = _LINE_BREAKS.sub(" ", text)
    out = _MD_SYNTAX.sub(r"\\\1", text)
    out = re.sub(r"^( *\d+)\.", r"\1\\.", out)  # '1. x' would start a list
    out = re.sub(r"^ +", lambda m: "&#32;" * len(m[0]), out)  # four leading spaces would start a code block
    out = re.sub(r"(?i)(www)(?=\.)", "\\1" + _WJ, out)
    return out.replace("\\:", "\\:" + _WJ).replace("@", "@" + _WJ)


def _code(text: str) -> str:
    """Text as an inline code span (shown verbatim), fenced by more backticks than it holds."""
    ticks = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{ticks} {_LINE_BREAKS.sub(' ', text)} {ticks}"


def _md_around(text: str, literal: str) -> str:
    """`_md(text)`, with each occurrence of `literal` (a folder path) as a code span: readable and copyable."""
    return _code(literal).join(_md(part) for part in text.split(literal)) if literal else _md(text)


def index_sidebar(s: Summary) -> None:
    """What is indexed: counts, corpora, model, size on disk."""
    st.sidebar.header("Index")
    a, b = st.sidebar.columns(2)
    a.metric("Images", f"{s.images:,}")
    b.metric("Captions", f"{s.texts:,}")
    lines = [f"**Model** {_code(s.model)}", f"**Size on disk** {human_bytes(s.size_bytes)}",
             f"**Home** {_code(s.home)}"]
    if s.corpora:
        lines.append("**Corpora** " + ", ".join(f"{_md(c)} ({n:,})" for c, n in s.corpora.items()))
    else:
        lines.append("**Corpora** none (captions come from the built-in ImageNet vocabulary)")
    if s.skipped:
        lines.append(f"**Skipped files** {s.skipped:,} (see `crossmodal skipped`)")
    st.sidebar.markdown("  \n".join(lines))


def no_index(home: str, problem: str, needs_index: bool, sidebar: bool = True) -> None:
    """Explain an empty, missing or unusable index and how to build one."""
    if sidebar:
        st.sidebar.header("Index")
        st.sidebar.write("Nothing indexed yet." if needs_index else "Unavailable.")
    if not needs_index:
        st.error(_md_around(problem, home))
        return
    st.warning(_md_around(problem, home))
    st.markdown("Build the index from a folder of photos, optionally add caption files, then reload this page:")
    st.code(f"crossmodal --home {home} index ~/Pictures\n"
            f"crossmodal --home {home} add-texts captions.txt", language="bash")


def options_sidebar(folders: Sequence[str], cameras: Sequence[str] = (), trained_reranker: bool = False) -> Options:
    """Filters and options (camera only when the catalog knows cameras)."""
    st.sidebar.header("Filters")
    under = st.sidebar.selectbox("Folder", ["All folders", *folders], key="folder", format_func=display_path,
                                 help="Only images in this folder and its subfolders.")
    after = st.sidebar.date_input("Taken from", value=None, key="after", help="EXIF date, else file date.")
    until = st.sidebar.date_input("Taken until", value=None, key="until", help="Inclusive.")
    camera = None
    if cameras:
        pick = st.sidebar.selectbox("Camera", ["All cameras", *cameras], key="camera",
                                    help="Camera make and model from EXIF.")
        camera = None if pick == "All cameras" else pick
    st.sidebar.header("Options")
    k = st.sidebar.select_slider("Results per page", K_CHOICES, value=12, key="k")
    hide = st.sidebar.toggle("Hide weaker matches", value=True, key="hide_weaker",
                             help="Text searches and captions: results whose calibrated relevance is below the "
                                  "threshold the quality lab fitted go under 'Show weaker matches'.")
    sort = st.sidebar.radio("Order", ("Best match", "Newest first"), key="sort", horizontal=True,
                            help="Newest first: the results kept, by capture date (EXIF, else file date).")
    rerank = st.sidebar.toggle("Rerank top results", value=trained_reranker, key="rerank",
                               help="Reorder the top 32 of text queries by co-attention between the words and "
                                    "image patches (same candidates, new order). On by default when the index "
                                    "records a trained reranker; otherwise the parameter-free scorer, which the "
                                    "quality lab measured below plain ranking.")
    return Options(k=int(k), under=None if under == "All folders" else under,
                   after=after if isinstance(after, date) else None,
                   until=until if isinstance(until, date) else None, rerank=bool(rerank), camera=camera,
                   hide_weaker=bool(hide), sort="date" if sort == "Newest first" else "score")


def mode_picker(on_change: Callable[[], None]) -> str:
    return st.radio("Mode", MODES, horizontal=True, key="mode", label_visibility="collapsed",
                    captions=("text → images", "image → captions and images", "image + text"), on_change=on_change)


def query_box() -> str:
    return st.text_input("Search your photos", key="query", placeholder="a dog running on a beach",
                         max_chars=MAX_QUERY_CHARS).strip()


def uploaded_file(key: str, label: str) -> tuple[str, bytes] | None:
    """The file dropped on an uploader as (name, bytes), in memory; None when there is none.

    A camera source (st.camera_input) would plug in here, returning the same pair.
    """
    f = st.file_uploader(label, key=key, max_upload_size=MAX_UPLOAD_MB,
                         help=f"JPEG, PNG, WebP, HEIC, ... up to {MAX_UPLOAD_MB} MB. Stays in memory.")
    return (f.name, f.getvalue()) if f is not None else None


@dataclass(frozen=True)
class ComposeText:
    text: str
    weight: float
    negatives: str


def compose_inputs() -> ComposeText:
    """Text modifier, its weight against the image, and the 'not' phrases."""
    a, b = st.columns([3, 1])
    text = a.text_input("Text modifier", key="compose_text", placeholder="at night", max_chars=MAX_QUERY_CHARS)
    weight = b.slider("Text weight", 0.0, 1.0, DEFAULT_WEIGHT, 0.05, key="compose_weight",
                      help="0 = only the image, 1 = only the text.")
    negatives = st.text_input("Not", key="compose_not", placeholder="people, cars", max_chars=MAX_QUERY_CHARS,
                              help="Steer away from these (comma-separated).")
    return ComposeText(text=text.strip(), weight=float(weight), negatives=negatives)


def result_grid(items: Sequence[Cell], scope: str, on_open: Callable[[int], None]) -> None:
    """Thumbnails with rank, score, name and date; 'Open' shows the detail view."""
    for start in range(0, len(items), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, c in zip(cols, items[start:start + GRID_COLUMNS], strict=False):
            with col.container(border=True):
                st.image(c.thumb, width="stretch")
                note = " · file missing" if c.missing else ""
                st.caption(f"#{c.rank} · {c.score:.3f}  \n{_md(c.name)}  \n{c.date}{note}")
                st.button("Open", key=f"open-{scope}-{c.id}", on_click=on_open, args=(c.id,))


def more_button(scope: str, shown: int, exhausted: bool, on_more: Callable[[str], None]) -> None:
    if exhausted:
        st.caption(f"{shown} result{'s' if shown != 1 else ''}, no more.")
    else:
        st.button("More results", key=f"more-{scope}", on_click=on_more, args=(scope,))


def caption_list(rows: Sequence[tuple[str, str, float]], weaker: Sequence[tuple[str, str, float]] = ()) -> None:
    """Best captions with their corpus and score; those below the relevance cutoff in an expander."""
    if not rows:
        st.caption("No captions above the relevance cutoff." if weaker else "No captions.")
    for text, corpus, score in rows:
        st.markdown(f"{_md(text)}  \n:gray[{_md(corpus)} · {score:.3f}]")
    if weaker:
        with st.expander(f"Show {len(weaker)} weaker match{'es' if len(weaker) > 1 else ''}"):
            for text, corpus, score in weaker:
                st.markdown(f"{_md(text)}  \n:gray[{_md(corpus)} · {score:.3f}]")


def weaker_grid(items: Sequence[Cell], scope: str, on_open: Callable[[int], None]) -> None:
    """Results below the relevance cutoff, folded away."""
    if items:
        with st.expander(f"Show {len(items)} weaker match{'es' if len(items) > 1 else ''}"):
            result_grid(items, f"weaker-{scope}", on_open)


def upload_preview(name: str, thumb: bytes) -> None:
    st.image(thumb, caption=_md(name), width=256)


def back_button(on_back: Callable[[], None]) -> None:
    st.button("← Back to results", key="detail-back", on_click=on_back)


def detail_header(d: Detail, on_compose: Callable[[int], None]) -> None:
    """The image, its path and metadata."""
    left, right = st.columns([3, 2])
    left.image(d.preview, width="stretch")
    with right:
        st.subheader(_md(d.name))
        st.code(display_path(d.path), language=None)
        if d.missing:
            st.warning("The file is missing or no longer decodes; results use its stored vector.")
        st.markdown("  \n".join(f"**{k}** {_md(v)}" for k, v in d.facts.items()))
        st.button("Use in Compose", key="detail-compose", on_click=on_compose, args=(d.id,))


def selected_image(thumb: bytes, name: str, on_clear: Callable[[], None]) -> None:
    """The indexed image Compose starts from, with a way to drop it."""
    a, b = st.columns([1, 3])
    a.image(thumb, width=160)
    b.markdown(f"Starting from **{_md(name)}**")
    b.button("Clear", key="compose-clear", on_click=on_clear)
