"""Shared by the ONNX tests: one index copy whose first query made the ONNX export (the real path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

__all__ = ["first_query", "home"]


@pytest.fixture(scope="session")
def first_query(built_index: Path, tmp_path_factory: pytest.TempPathFactory):
    """(searcher, notices) of the first query on a copy of `built_index`, which has no export yet."""
    from retrieval.session import open_searcher

    home = tmp_path_factory.mktemp("onnx-query") / "home"
    # Without vocab/: a built-in vocabulary cached there by an earlier module (test_search_oracle) would
    # answer the ONNX tests that embed their own (order-dependent results otherwise).
    shutil.copytree(built_index, home, ignore=shutil.ignore_patterns("vocab"))
    lines: list[str] = []
    searcher = open_searcher(home, device="cpu", notify=lines.append)
    yield searcher, lines
    searcher.store.close()


@pytest.fixture(scope="session")
def home(first_query) -> Path:
    """The index home (images + corpora alpha, beta) with its ONNX export."""
    return first_query[0].store.home
