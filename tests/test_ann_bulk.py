"""Bulk merges (retrieval/store/bulk.py): held commits build the ANN index once, for the final size; a run
killed while held leaves readers searching exactly, and the next commit rebuilds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.model.spec import Fingerprint
from retrieval.store import Store, ann
from retrieval.store.bulk import ann_built_once
from tests.test_ann import DIM, clustered, records


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    made: list[str] = []
    real = ann.build

    def counting(factory: str, *a: object, **k: object):  # noqa: ANN202
        made.append(factory)
        return real(factory, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(ann, "build", counting)
    return made


def _store(home: Path) -> Store:
    st = Store.open(home, create=True, writable=True)
    st.bind_model(Fingerprint("test", "test", "sha256:test", DIM))
    st.set_index_type("ivfsq", rebuild=False)
    return st


def test_held_commits_build_the_ann_index_once(tmp_path: Path, builds: list[str]) -> None:
    both = clustered(6050)
    x, q = both[:6000], both[6000:]  # queries from the same distribution, not stored
    with _store(tmp_path / "bulk") as st, ann_built_once(st):
        for start in range(0, 6000, 1000):
            st.add_images(records(start, 1000), x[start:start + 1000])
        assert builds == []  # nothing built while held
    assert len(builds) == 1 and builds[0].endswith(",SQ8")
    with Store.open(tmp_path / "bulk") as st:
        info = st.ann_info("image")
        assert "problem" not in info and info["factory"] == builds[0] and info["recall_at_10"] >= 0.9
        _, found = st.search("image", q, 10)
        ids, vecs = st.vectors("image")
        truth = ids[np.argsort(-(q @ vecs.T), axis=1, kind="stable")[:, :10]]
        assert ann.recall_at(found, truth) >= 0.9
    builds.clear()
    with _store(tmp_path / "plain") as st:  # the same commits, not held: built on the way up
        for start in range(0, 6000, 1000):
            st.add_images(records(start, 1000), x[start:start + 1000])
    assert len(builds) >= 2


def test_a_run_killed_while_held_searches_exactly_until_the_next_commit(tmp_path: Path, builds: list[str]) -> None:
    x = clustered(3000)
    home = tmp_path / "home"
    with _store(home) as st:
        st.add_images(records(0, 1000), x[:1000])  # an ANN index serves these
        assert len(builds) == 1
        with pytest.raises(KeyboardInterrupt), ann_built_once(st):
            st.add_images(records(1000, 1000), x[1000:2000])
            raise KeyboardInterrupt
        assert len(builds) == 1  # nothing built after the interruption
    with Store.open(home) as st:
        assert st.count("image") == 2000  # the held commit is whole
        assert "lacks 1000 vectors" in str(st.ann_info("image").get("problem"))
    with Store.open(home, writable=True) as st:
        st.add_images(records(2000, 1000), x[2000:])
    assert len(builds) == 2
    with Store.open(home) as st:
        assert "problem" not in st.ann_info("image")
