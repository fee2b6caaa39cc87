"""What a one-shot query process imports: no pydantic (plain option values, indexer/light_params.py) and no
rich for --json output, while bad values still get Typer's own messages."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from tests.helpers import run_cli  # noqa: E402


def _imported(*args: str, home: Path) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    r = run_cli(*args, home=home, python_flags=("-X", "importtime"), drop_env=("CROSSMODAL_BACKEND",))
    assert r.returncode == 0, r.stderr[-2000:]
    return {ln.rsplit("|", 1)[1].strip().split(".")[0] for ln in r.stderr.splitlines()
            if ln.startswith("import time:")}, r


@pytest.mark.subprocess
def test_json_queries_import_neither_pydantic_nor_rich(home: Path, photos) -> None:
    for args in (["search", "red circles", "-k", "3", "--weight", "0.3", "--not", "blue", "--not", "green",
                  "--rerank-k", "5", "--json"],
                 ["search", "--image", str(photos["img01"]), "-k", "2", "--under", str(photos["root"]), "--json"],
                 ["caption", str(photos["img01"]), "-k", "2", "--json"],
                 ["info", "--json"]):
        mods, r = _imported(*args, home=home)
        assert "typer" in mods and "numpy" in mods  # the log is real
        assert not mods & {"pydantic", "pydantic_core", "rich", "torch", "open_clip"}, (args, mods)
        assert json.loads(r.stdout) or args[0] == "search"


@pytest.mark.subprocess
def test_onnx_queries_import_no_sqlalchemy(home: Path, photos) -> None:
    """A read-only store reads its catalog with the stdlib sqlite3 (retrieval/store/reader.py): importing
    SQLAlchemy alone would cost 0.3-0.4 s of the 1 s `search --no-rerank` budget."""
    onnx = ("--backend", "onnx")
    for args in (["search", "red circles", "-k", "3", "--no-rerank", *onnx],
                 ["search", "red circles", "-k", "3", "--json", "--rerank", *onnx],  # reranked
                 ["search", "red circles", "-k", "3", "--after", "2000-01-01", "--under", str(photos["root"]),
                  "--camera", "x", "--no-rerank", "--json", *onnx],
                 ["caption", str(photos["img01"]), "-k", "2", "--corpus", "alpha", "--rerank", *onnx],
                 ["caption", str(photos["img01"]), "-k", "2", "--no-rerank", "--json", *onnx],
                 ["info"], ["info", "--json"]):
        mods, r = _imported(*args, home=home)
        assert "numpy" in mods and ("onnxruntime" in mods or args[0] == "info"), (args, mods)  # the log is real
        assert "sqlalchemy" not in mods, (args, r.stderr[-1000:])
        assert r.stdout.strip() or args[0] == "search", args


@pytest.mark.subprocess
def test_bad_values_get_typers_messages(home: Path) -> None:
    for args, message in ((["-k", "0"], "greater than or equal to 1"), (["-k", "2x"], "valid integer"),
                          (["--weight", "1.5"], "less than or equal to 1"), (["--weight", "nan"], "--weight"),
                          (["--rerank-k", "1001"], "less than or equal to 1000")):
        r = run_cli("search", "red", *args, home=home)
        assert r.returncode == 2 and "Invalid value" in r.stderr and message in r.stderr, (args, r.stderr)


@pytest.mark.subprocess
def test_values_convert_like_typer(home: Path) -> None:
    """Edge forms that are valid for Typer stay valid, with the same results."""
    a = run_cli("search", "red circles", "-k", "+3", "--weight", "1e-1", "--json", "--no-rerank", home=home)
    b = run_cli("search", "red circles", "-k", "3", "--weight", "0.1", "--json", "--no-rerank", home=home)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert [h["id"] for h in json.loads(a.stdout)] == [h["id"] for h in json.loads(b.stdout)]
    assert len(json.loads(a.stdout)) == 3
