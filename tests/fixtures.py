"""The shared fixtures, each built once per test run (session scope): a seeded checkpoint and its encoder,
generated photos, an index built through the library, its copy whose first query made the ONNX export (in an
export cache of its own, then shared through the run's cache), and the page tests' index built through the
CLI. Per test: `own_cache` (an empty export cache) and `linked_cache` (one holding the first query's export).
PostgreSQL (marker `postgres`): `pg_server` starts a throwaway cluster once (tests/pg_cluster.py), `new_catalog`
makes an empty database per call, `built_pg_index` is `built_index` with its catalog in PostgreSQL, and
`any_catalog` runs a test once per backend (None: SQLite; else a new database's URL).

No network: the model is random-initialised, saved, and loaded back through `--pretrained PATH`, the same
path users take with their own checkpoints. Results are meaningless semantically; tests check mechanics
against oracles.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import TEST_MODEL, make_checkpoint, make_photo_folder, make_webui_photos, run_cli


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "vit-s-32-seed0.pt")


@pytest.fixture(scope="session")
def encoder(checkpoint: Path):  # noqa: ANN201 - a TorchEncoder (torch is imported lazily)
    from retrieval.model.spec import ModelSpec
    from retrieval.model.torch_encoder import load_encoder

    return load_encoder(ModelSpec(name=TEST_MODEL, pretrained=str(checkpoint), device="cpu", precision="fp32"))


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "library")


def _build_index(tmp_path_factory: pytest.TempPathFactory, encoder, photos, catalog: str | None  # noqa: ANN001
                 ) -> Path:
    from indexer.pipeline import index_paths
    from indexer.texts import add_corpus
    from retrieval.store import Store

    home = tmp_path_factory.mktemp("home")
    caps = tmp_path_factory.mktemp("caps")
    (caps / "a.txt").write_text("\n".join(f"caption number {i} about colours" for i in range(30)))
    (caps / "b.csv").write_text("id,caption\n" + "\n".join(f"{i},a second corpus line {i}" for i in range(20)))
    with Store.open(home, create=True, writable=True, catalog=catalog) as store:
        store.bind_model(encoder.fingerprint)
        index_paths(store, encoder, [str(photos["root"])], batch_size=4, workers=1)
        add_corpus(store, encoder, caps / "a.txt", corpus="alpha")
        add_corpus(store, encoder, caps / "b.csv", corpus="beta")
    return home


@pytest.fixture(scope="session")
def built_index(tmp_path_factory: pytest.TempPathFactory, encoder, photos) -> Path:  # noqa: ANN001
    """An index over `photos` with two caption corpora, built in-process (fast) through the library."""
    return _build_index(tmp_path_factory, encoder, photos, None)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (a free port, trust auth) for the whole run; the tests that
    use it skip, saying why, only where PostgreSQL or psycopg is not installed."""
    from tests import pg_cluster

    if pg_cluster.pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'crossmodal[cluster]')")
    cluster = pg_cluster.start()
    yield cluster
    cluster.stop()


_DB_NUMBERS = itertools.count()


@pytest.fixture
def new_catalog(pg_server) -> Callable[[], str]:  # noqa: ANN001
    """Makes an empty database per call and returns its catalog URL (postgresql+psycopg://...)."""
    return lambda: pg_server.createdb(f"t{os.getpid()}_{next(_DB_NUMBERS)}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_catalog(request: pytest.FixtureRequest) -> str | None:
    """A new store's catalog on each backend: None (SQLite in the home) or an empty PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("new_catalog")()


@pytest.fixture(scope="session")
def built_pg_index(tmp_path_factory: pytest.TempPathFactory, encoder, photos, pg_server) -> Path:  # noqa: ANN001
    """`built_index` with its catalog in PostgreSQL (the home's pointer file names it)."""
    url = pg_server.createdb(f"built_{os.getpid()}")
    return _build_index(tmp_path_factory, encoder, photos, url)


@pytest.fixture(scope="session")
def first_query_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export cache (CROSSMODAL_CACHE) of `first_query` alone: empty until that query exports into it."""
    return tmp_path_factory.mktemp("first-query-cache")


@pytest.fixture(scope="session")
def first_query(built_index: Path, first_query_cache: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[object, list[str]]]:
    """(searcher, notices) of the first query on a copy of `built_index`, with an empty export cache of its
    own (other tests' `crossmodal index` runs export the same model into the run's cache): that query makes
    the ONNX export (the real path), once per test run. The export is then linked into the run's cache, where
    every other test's query of this model finds it."""
    from retrieval.model.export_cache import CACHE_ENV, export_dir
    from retrieval.query.open import open_index

    home = tmp_path_factory.mktemp("onnx-query") / "home"
    # Without vocab/: a built-in vocabulary cached there by another test would answer the ONNX tests that
    # embed their own (order-dependent results otherwise).
    shutil.copytree(built_index, home, ignore=shutil.ignore_patterns("vocab"))
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(first_query_cache))
        searcher = open_index(home, device="cpu", notify=lines.append)
        made = export_dir(searcher.store.fingerprint)
    shared = export_dir(searcher.store.fingerprint)
    if made.is_dir() and not shared.is_dir():  # another test's `index` may have made it there already
        link_export(made, shared)
    yield searcher, lines
    searcher.store.close()


def link_export(src: Path, dst: Path) -> Path:
    """Install a copy of the export folder `src` at `dst` (an export cache's <key> folder): hard links for the
    big files, which are never written in place (damage tests replace them), and real copies of the small
    JSON files (tests rewrite export.json in place)."""

    def copy(a: str, b: str) -> None:
        (shutil.copy2 if a.endswith(".json") else os.link)(a, b)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    shutil.copytree(src, tmp, copy_function=copy)
    os.replace(tmp, dst)
    return dst


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty export cache for this test alone (CROSSMODAL_CACHE, inherited by CLI subprocesses): for a
    test that needs a fresh export, or writes markers (unsupported, failed) the run's cache must not keep."""
    from retrieval.model.export_cache import CACHE_ENV

    cache = tmp_path / "export-cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return cache


@pytest.fixture
def first_export(first_query, first_query_cache: Path, encoder) -> Path:  # noqa: ANN001
    """The export folder the first query made (in its own cache; nothing ever changes it)."""
    from retrieval.model.export_cache import export_key

    return first_query_cache / "onnx" / export_key(encoder.fingerprint)


@pytest.fixture
def linked_cache(first_export: Path, own_cache: Path, encoder) -> Path:  # noqa: ANN001
    """A cache for this test alone holding (linked) the first query's export: a test may damage it."""
    from retrieval.model.export_cache import export_dir

    link_export(first_export, export_dir(encoder.fingerprint))
    return own_cache


@pytest.fixture(scope="session")
def home(first_query: tuple[object, list[str]]) -> Path:
    """The index home (images + corpora alpha, beta); its model's ONNX export is in the run's cache."""
    return first_query[0].store.home  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def webui_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_webui_photos(tmp_path_factory.mktemp("webui") / "photos")


@pytest.fixture(scope="session")
def webui_home(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, webui_photos: Path) -> Path:
    """The page tests' index (10 images, 12 captions), built once with the real CLI."""
    home = tmp_path_factory.mktemp("webui-home") / "home"
    caps = home.parent / "webui-captions.txt"
    caps.write_text("\n".join(f"caption {i}: shapes and colours" for i in range(12)) + "\n")
    for args in (["index", str(webui_photos), "--model", TEST_MODEL, "--pretrained", str(checkpoint),
                  "--device", "cpu", "--workers", "0", "-q"],
                 ["add-texts", str(caps), "--corpus", "shapes", "--device", "cpu", "-q"]):
        r = run_cli(*args, home=home)
        assert r.returncode == 0, r.stderr
    return home


@pytest.fixture
def empty_home(tmp_path: Path) -> Path:
    """A catalog that exists but holds nothing (no model bound yet)."""
    from retrieval.store import Store

    Store.open(tmp_path / "empty", create=True, writable=True).close()
    return tmp_path / "empty"


@pytest.fixture
def missing_home(tmp_path: Path) -> Path:
    return tmp_path / "nothing-here"


@pytest.fixture
def cli_state() -> Iterator[None]:
    """The CLI's module state (--home, read-only) must not leak from one in-process run into the next."""
    from cli.common import state

    saved = dict(state)
    yield
    state.clear()
    state.update(saved)
