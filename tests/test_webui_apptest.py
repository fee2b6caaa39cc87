"""The page through Streamlit's AppTest: every interaction, checked against the search API as oracle.

The model is random, so only mechanics are checked: how many results, which ranks, which files pass a
filter, that uploads show captions and images, and that bad input becomes a message.
"""

from __future__ import annotations

import re
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.helpers import APP, K, corrupt_jpeg, jpeg_bytes


@pytest.fixture(scope="module")
def oracle(webui_home: Path):
    """The same index opened through the library, independently of the page's caches."""
    from retrieval.query.open import open_index

    s = open_index(webui_home, device="cpu")
    yield s
    s.store.close()


def page(home: Path, monkeypatch: pytest.MonkeyPatch, k: int | None = K, rerank: bool = False,
         hide_weaker: bool = False) -> AppTest:
    """The page, with reranking and the relevance cutoff off unless asked (most tests compare with the dense
    oracle)."""
    monkeypatch.setenv("CROSSMODAL_HOME", str(home))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    if at.toggle and at.toggle(key="rerank").value != rerank:
        at.toggle(key="rerank").set_value(rerank).run()
    if at.toggle and at.toggle(key="hide_weaker").value != hide_weaker:
        at.toggle(key="hide_weaker").set_value(hide_weaker).run()
    if k is not None:
        at.select_slider(key="k").set_value(k).run()
    return at


def opened_ids(at: AppTest, scope: str) -> list[int]:
    """Result ids in grid order, read from the 'Open' buttons."""
    return [int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith(f"open-{scope}-")]


def ranks(at: AppTest) -> list[int]:
    return [int(m.group(1)) for c in at.caption if (m := re.match(r"#(\d+) · ", c.value))]


def grid_names(at: AppTest) -> list[str]:
    """File names under the thumbnails (Markdown escapes removed)."""
    return [c.value.split("\n")[1].strip().replace("\\", "") for c in at.caption if c.value.startswith("#")]


def ok(at: AppTest) -> None:
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


@pytest.mark.slow
@pytest.mark.subprocess
def test_sidebar_describes_the_index(webui_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page(webui_home, monkeypatch, k=None)
    ok(at)
    assert [m.value for m in at.sidebar.metric] == ["10", "12"]
    text = " ".join(m.value for m in at.sidebar.markdown)
    assert "ViT-S-32" in text and "shapes (12)" in text and "Size on disk" in text


@pytest.mark.slow
@pytest.mark.subprocess
def test_query_shows_a_grid_of_thumbnails(webui_home: Path, monkeypatch: pytest.MonkeyPatch, oracle) -> None:
    at = page(webui_home, monkeypatch)
    at.text_input(key="query").input("red circles").run()
    ok(at)
    expected = [h.id for h in oracle.search_images(oracle.query_vector("red circles"), K)]
    assert opened_ids(at, "Search") == expected
    assert ranks(at) == [1, 2, 3, 4]
    assert len(at.image) == K
    assert all(u.startswith("/mock/media/") or u.startswith("/media/") for im in at.image for u in im.value)
    hits = oracle.search_images(oracle.query_vector("red circles"), K)
    assert grid_names(at) == [Path(h.item.path).name for h in hits]
    assert all(re.search(r"\n\d{4}-\d{2}-\d{2}$", c.value) for c in at.caption if c.value.startswith("#"))


@pytest.mark.slow
@pytest.mark.subprocess
def test_more_results_gives_the_next_ranks(webui_home: Path, monkeypatch: pytest.MonkeyPatch, oracle) -> None:
    at = page(webui_home, monkeypatch)
    at.text_input(key="query").input("a dog").run()
    first = opened_ids(at, "Search")
    at.button(key="more-Search").click().run()
    ok(at)
    ids = opened_ids(at, "Search")
    assert ids[:K] == first
    assert ids == [h.id for h in oracle.search_images(oracle.query_vector("a dog"), 2 * K)]
    assert ranks(at) == list(range(1, 2 * K + 1))
    at.button(key="more-Search").click().run()
    assert len(opened_ids(at, "Search")) == 10  # the whole index
    assert not [b for b in at.button if b.key == "more-Search"]
    assert any("no more" in c.value for c in at.caption)
    at.text_input(key="query").input("a cat").run()  # a new query starts again at page 1
    assert len(opened_ids(at, "Search")) == K


@pytest.mark.slow
@pytest.mark.subprocess
def test_detail_view_more_like_this_and_captions(webui_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                 oracle) -> None:
    at = page(webui_home, monkeypatch)
    at.text_input(key="query").input("shapes").run()
    target = opened_ids(at, "Search")[1]
    at.button(key=f"open-Search-{target}").click().run()
    ok(at)
    item = oracle.store.items([target])[target]
    assert [c.value for c in at.code][0] == item.path
    assert [h.value for h in at.subheader][:3] == [Path(item.path).name, "Best captions", "More like this"]
    assert opened_ids(at, "like") == [h.id for h in oracle.more_like(target, K)]
    assert target not in opened_ids(at, "like")
    expected = [h.item.text for h in oracle.search_texts(oracle.store.vector("image", target), 5)]
    shown = [m.value for m in at.markdown if "shapes ·" in m.value]
    assert len(shown) == 5 and all(t.split(":")[0] + "\\:" in s for t, s in zip(expected, shown, strict=True))
    assert at.text_input(key="query").value == "shapes"  # the inputs survive the detail view
    nxt = opened_ids(at, "like")[0]
    at.button(key=f"open-like-{nxt}").click().run()
    assert at.code[0].value == oracle.store.items([nxt])[nxt].path
    at.button(key="detail-back").click().run()
    ok(at)
    assert len(opened_ids(at, "Search")) == K and not opened_ids(at, "like")


@pytest.mark.slow
@pytest.mark.subprocess
def test_upload_shows_captions_and_similar_images(webui_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                  oracle) -> None:
    at = page(webui_home, monkeypatch)
    at.radio(key="mode").set_value("Image").run()
    data = jpeg_bytes(7)
    at.file_uploader(key="upload").set_value(("query.jpg", data, "image/jpeg")).run()
    ok(at)
    assert [h.value for h in at.subheader] == ["Best captions", "Most similar images"]
    q = oracle.query_vector(image=data)
    assert opened_ids(at, "Image") == [h.id for h in oracle.search_images(q, K)]
    assert len([m for m in at.markdown if "shapes ·" in m.value]) == 5
    assert at.image[0].captions == ["query.jpg"]  # the upload's own preview comes first


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("name,data,message", [
    ("notes.jpg", b"this is not an image\n", "not an image crossmodal can read"),
    ("broken.jpg", corrupt_jpeg(), "corrupt or truncated"),
    ("empty.png", b"", "is empty"),
    ("huge.jpg", b"\xff" * (50 * 2**20 + 1), "the limit is 50 MB"),
])
def test_bad_upload_is_a_message(webui_home: Path, monkeypatch: pytest.MonkeyPatch, name: str, data: bytes,
                                 message: str) -> None:
    at = page(webui_home, monkeypatch)
    at.radio(key="mode").set_value("Image").run()
    at.file_uploader(key="upload").set_value((name, data, "image/jpeg")).run()
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value and name in at.error[0].value
    assert not opened_ids(at, "Image")


@pytest.mark.slow
@pytest.mark.subprocess
def test_compose_upload_text_weight_not(webui_home: Path, monkeypatch: pytest.MonkeyPatch, oracle) -> None:
    at = page(webui_home, monkeypatch)
    at.radio(key="mode").set_value("Compose").run()
    data = jpeg_bytes(11)
    at.file_uploader(key="compose_upload").set_value(("start.jpg", data, "image/jpeg"))
    at.text_input(key="compose_text").input("at night")
    at.slider(key="compose_weight").set_value(0.3)
    at.text_input(key="compose_not").input("people, cars").run()
    ok(at)
    q = oracle.query_vector("at night", data, 0.3, ["people", "cars"])
    assert opened_ids(at, "Compose") == [h.id for h in oracle.search_images(q, K)]
    at.slider(key="compose_weight").set_value(1.0).run()  # text only: the image no longer counts
    q = oracle.query_vector("at night", None, 1.0, ["people", "cars"])
    assert opened_ids(at, "Compose") == [h.id for h in oracle.search_images(q, K)]


@pytest.mark.slow
@pytest.mark.subprocess
def test_compose_from_a_selected_result(webui_home: Path, monkeypatch: pytest.MonkeyPatch, oracle) -> None:
    from retrieval.query.search import combine

    at = page(webui_home, monkeypatch)
    at.text_input(key="query").input("anything").run()
    target = opened_ids(at, "Search")[0]
    at.button(key=f"open-Search-{target}").click().run()
    at.button(key="detail-compose").click().run()
    ok(at)
    assert at.radio(key="mode").value == "Compose"
    at.text_input(key="compose_text").input("blue").run()
    t, n = oracle.encoder.encode_texts(["blue", "green"])
    at.text_input(key="compose_not").input("green").run()
    q = combine(t, oracle.store.vector("image", target), 0.5, [n])
    assert opened_ids(at, "Compose") == [h.id for h in oracle.search_images(q, K)]
    at.button(key="compose-clear").click().run()
    assert at.file_uploader(key="compose_upload")  # back to uploading


@pytest.mark.slow
@pytest.mark.subprocess
def test_folder_filter(webui_home: Path, webui_photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page(webui_home, monkeypatch)
    folders = at.selectbox(key="folder").options
    assert str(webui_photos) in folders and str(webui_photos / "sub") in folders
    at.selectbox(key="folder").set_value(str(webui_photos / "sub"))
    at.text_input(key="query").input("shapes").run()
    ok(at)
    names = grid_names(at)
    assert sorted(names) == ["pic06.jpg", "pic07.jpg", "pic08.jpg"]
    assert any("no more" in c.value for c in at.caption)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("after,until,expected", [
    (date(2023, 1, 1), None, ["pic06.jpg", "pic07.jpg", "pic08.jpg"]),  # file time, EXIF date wins
    (date(2021, 6, 15), date(2021, 6, 15), ["dated.jpg"]),  # 'until' includes its day
    (None, date(2019, 3, 1), ["pic00.jpg", "pic01.png", "pic02.jpg", "pic03.png", "pic04.jpg", "pic05.png"]),
    (date(2030, 1, 1), None, []),
])
def test_date_filter(webui_home: Path, monkeypatch: pytest.MonkeyPatch, after, until, expected) -> None:
    at = page(webui_home, monkeypatch, k=48)
    if after:
        at.date_input(key="after").set_value(after)
    if until:
        at.date_input(key="until").set_value(until)
    at.text_input(key="query").input("shapes").run()
    ok(at)
    names = grid_names(at)
    assert sorted(names) == expected
    if not expected:
        assert "No images match these filters." in [i.value for i in at.info]


@pytest.mark.slow
@pytest.mark.subprocess
def test_rerank_is_opt_in_without_a_trained_reranker_and_reorders_the_same_candidates(
        webui_home: Path, monkeypatch: pytest.MonkeyPatch, oracle) -> None:
    from retrieval.rerank.reranker import Reranker

    monkeypatch.setenv("CROSSMODAL_HOME", str(webui_home))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert at.toggle(key="rerank").value is False  # no trained reranker recorded in this index
    at.toggle(key="rerank").set_value(True).run()
    at.toggle(key="hide_weaker").set_value(False).run()
    at.select_slider(key="k").set_value(48).run()
    at.text_input(key="query").input("shapes").run()
    ok(at)
    got = opened_ids(at, "Search")
    q = oracle.embed_query(text="shapes", with_tokens=True)
    want = [h.id for h in Reranker.open(oracle).search_images(q, 48)]
    dense = [h.id for h in oracle.search_images(q.vector, 48)]
    assert got == want and sorted(got) == sorted(dense)


@pytest.mark.slow
@pytest.mark.subprocess
def test_weaker_matches_fold_away_and_newest_first_sorts_the_rest(webui_home: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, oracle) -> None:
    """"Hide weaker matches" (on by default) shows the hits whose calibrated relevance reaches the cutoff, the
    rest under "Show N weaker matches"; "Newest first" orders the kept ones by date (oracle: cutoff.py)."""
    from retrieval.query.cutoff import Relevance, sort_hits, split_by

    hits = oracle.search_images(oracle.embed_query(text="shapes").vector, 48)
    z = sorted(h.relevance for h in Relevance(oracle).images(hits))
    cut = (z[len(z) // 3] + z[len(z) // 3 + 1]) / 2  # random weights: a threshold that splits these hits
    monkeypatch.setattr("webui.services.AUTO_MIN_SCORE", cut)
    kept, weaker = split_by(Relevance(oracle).images(hits), cut)
    assert kept and weaker
    at = page(webui_home, monkeypatch, k=48, hide_weaker=True)
    assert at.toggle(key="hide_weaker").value is True
    at.text_input(key="query").input("shapes").run()
    ok(at)
    assert opened_ids(at, "Search") == [h.id for h in kept]
    assert opened_ids(at, "weaker-Search") == [h.id for h in weaker]
    assert f"Show {len(weaker)} weaker matches" in [e.label for e in at.expander]
    at.radio(key="sort").set_value("Newest first").run()
    ok(at)
    assert opened_ids(at, "Search") == [h.id for h in sort_hits(kept, "date")]
    assert opened_ids(at, "weaker-Search") == [h.id for h in weaker]


@pytest.mark.slow
@pytest.mark.subprocess
def test_camera_filter(webui_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page(webui_home, monkeypatch, k=48)
    assert at.selectbox(key="camera").options == ["All cameras", "Google Pixel 8"]
    at.selectbox(key="camera").set_value("Google Pixel 8")
    at.text_input(key="query").input("shapes").run()
    ok(at)
    assert grid_names(at) == ["dated.jpg"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_grid_prefers_the_indexers_stored_thumbnail(webui_home: Path, oracle, tmp_path: Path) -> None:
    import io

    from PIL import Image

    from retrieval.media.thumbnails import thumb_path
    from webui import services

    hit = oracle.search_images(oracle.query_vector(text="shapes"), 1)[0]
    stored = thumb_path(webui_home, hit.item.sha256)
    assert stored.is_file()
    fake_home = tmp_path / "home"
    fake = thumb_path(fake_home, hit.item.sha256)
    fake.parent.mkdir(parents=True)
    Image.new("RGB", (300, 256), (250, 0, 250)).save(fake, "JPEG")  # a magenta stand-in
    data, missing = services.grid_thumb(hit.item.path, hit.item.sha256, fake_home)
    with Image.open(io.BytesIO(data)) as img:
        assert not missing and img.size == (256, 256)
        r, g, b = img.convert("RGB").getpixel((128, 128))
        assert r > 200 and g < 60 and b > 200
    data, missing = services.grid_thumb(hit.item.path, "0" * 64, fake_home)  # none stored: made afresh
    assert not missing and data


def test_empty_index_explains_how_to_build(empty_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page(empty_home, monkeypatch, k=None)
    assert not at.exception and not at.error
    assert "is empty" in at.warning[0].value
    assert f"crossmodal --home {empty_home} index" in at.code[0].value
    assert not at.text_input  # nothing to search yet


def test_missing_index_explains_how_to_build(missing_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page(missing_home, monkeypatch, k=None)
    assert not at.exception and not at.error
    assert "No index in" in at.warning[0].value
    assert f"crossmodal --home {missing_home} index" in at.code[0].value
    assert not missing_home.exists()  # looking never creates an index


def test_unreadable_index_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "broken"
    home.mkdir()
    (home / "catalog.sqlite").write_bytes(b"this is not a database" * 100)
    at = page(home, monkeypatch, k=None)
    assert not at.exception
    assert len(at.error) == 1 and str(home) in at.error[0].value


@pytest.mark.slow
@pytest.mark.subprocess
def test_page_reloads_the_index_after_a_commit(webui_home: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.store import Store, TextRecord
    from webui import services

    home = tmp_path / "home"
    shutil.copytree(webui_home, home, ignore=shutil.ignore_patterns("index.lock", "vocab", "*-shm"))
    at = page(home, monkeypatch, k=None)
    assert [m.value for m in at.sidebar.metric] == ["10", "12"]
    before = services.index_signature(home)
    with Store.open(home, writable=True) as store:
        v = np.random.default_rng(0).normal(size=(3, store.fingerprint.dim)).astype(np.float32)
        store.add_texts([TextRecord("extra", i, f"extra {i}", f"{i:064x}") for i in range(3)],
                        v / np.linalg.norm(v, axis=1, keepdims=True))
    assert services.index_signature(home) != before
    at.run()
    ok(at)
    assert [m.value for m in at.sidebar.metric] == ["10", "15"]
    assert "extra (3)" in " ".join(m.value for m in at.sidebar.markdown)


def test_thumbnails_are_small_and_cached_per_file_version(tmp_path: Path) -> None:
    import io
    import os

    from PIL import Image

    from tests.helpers import picture
    from webui import services, thumbs

    p = tmp_path / "big.jpg"
    picture(3, (2000, 1500)).save(p, "JPEG")
    data, missing = services.rendition(str(p))
    assert not missing and Image.open(io.BytesIO(data)).size == (256, 256)  # grid: square crop
    data, _ = services.rendition(str(p), thumbs.PREVIEW_PX, square=False)
    assert Image.open(io.BytesIO(data)).size == (1024, 768)  # detail view: the whole picture, bounded
    picture(4, (300, 900)).save(p, "JPEG")
    os.utime(p, (1, 1))  # a new version of the file gets a new rendition
    data, _ = services.rendition(str(p), square=False)
    assert Image.open(io.BytesIO(data)).size == (85, 256)
    p.unlink()
    data, missing = services.rendition(str(p))
    assert missing and data == thumbs.placeholder()


# ---- hostile names and texts (issue 13): shown literally, never as Markdown ---------------------------------
HOSTILE_FILE = "[x](www.example.com) me@example.com.jpg"
HOSTILE_CORPUS = "[c](www.example.com)"
HOSTILE_CAPTION = "see [here](https://evil.example) **now** :red[alert] :smile:"


def literal(md: str) -> bool:
    """No Markdown a name or caption could carry survives in `md`: no unescaped link, emphasis or colour
    syntax, and no bare URL, 'www.' or e-mail address that GFM would turn into a live link."""
    return (not re.search(r"(?<!\\)[\[\]*]", md) and "www." not in md and "://" not in md
            and not re.search(r"@\w", md) and not re.search(r":\w", md))


@pytest.fixture(scope="module")
def hostile_home(tmp_path_factory: pytest.TempPathFactory, encoder) -> Path:
    """An index whose file names, corpus name and captions are Markdown (and one skipped file)."""
    from indexer.pipeline import index_paths
    from indexer.texts import add_corpus
    from retrieval.store import Store
    from tests.helpers import picture

    root = tmp_path_factory.mktemp("hostile") / "photos"
    root.mkdir()
    for i, name in enumerate([HOSTILE_FILE, "**bold** _it_ :red[x].png", "plain.jpg"]):
        picture(100 + i).save(root / name)
    (root / "empty.jpg").write_bytes(b"")
    caps = root.parent / "caps.txt"
    caps.write_text(HOSTILE_CAPTION + "\nmail me@example.com now\n")
    home = root.parent / "home"
    with Store.open(home, create=True, writable=True) as store:
        store.bind_model(encoder.fingerprint)
        index_paths(store, encoder, [str(root)], batch_size=4, workers=0)
        add_corpus(store, encoder, caps, corpus=HOSTILE_CORPUS)
    return home


@pytest.mark.slow
def test_hostile_names_and_captions_render_literally(hostile_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page(hostile_home, monkeypatch, k=None)
    ok(at)
    side = " ".join(m.value for m in at.sidebar.markdown)
    assert "crossmodal skipped" in side and "crossmodal status" not in side  # a command that exists
    corpora = side.split("**Corpora** ")[1].split("  \n")[0]
    assert "c" in corpora and "(2)" in corpora and literal(corpora), corpora
    assert at.text_input(key="query").max_chars == 1000
    at.text_input(key="query").input("shapes").run()
    ok(at)
    grid = [c.value for c in at.caption if c.value.startswith("#")]
    assert len(grid) == 3 and all(literal(c.split("\n", 1)[1]) for c in grid), grid
    opens = [b.key for b in at.button if b.key and b.key.startswith("open-Search-")]
    assert len(opens) == 3
    for key in opens:  # each image's detail view: its name as the heading, and the best captions
        at.button(key=key).click().run()
        ok(at)
        assert literal(at.subheader[0].value), at.subheader[0].value
        shown = [m.value for m in at.markdown if "·" in m.value]
        assert shown and all(literal(m.split("\n")[0]) and literal(m.split(":gray[")[1][:-1].split(" · ")[0])
                             for m in shown), shown
        at.button(key="detail-back").click().run()
    at.radio(key="mode").set_value("Compose").run()
    assert at.text_input(key="compose_text").max_chars == 1000 and at.text_input(key="compose_not").max_chars == 1000


@pytest.mark.slow
def test_hostile_upload_names_render_literally(hostile_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page(hostile_home, monkeypatch, k=None)
    at.radio(key="mode").set_value("Image").run()
    at.file_uploader(key="upload").set_value((HOSTILE_FILE, jpeg_bytes(7), "image/jpeg")).run()
    ok(at)
    assert literal(at.image[0].captions[0]), at.image[0].captions
    at.file_uploader(key="upload").set_value(("[y](www.bad.example).jpg", b"not an image", "image/jpeg")).run()
    assert not at.exception and len(at.error) == 1
    assert "not an image crossmodal can read" in at.error[0].value and literal(at.error[0].value), at.error[0].value
