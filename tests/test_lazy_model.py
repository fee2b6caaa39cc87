"""`crossmodal index` loads the model only when an image needs embedding: an unchanged re-run never does, nor
one that only retries files that failed before; with new files it loads while the first ones decode.

Loading a ViT-B-32 took almost all of an unchanged 10,000-photo re-run (10.5-11.5 s); the index records its
model's preprocessing so decoding can start, and fail, without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from indexer.pipeline import index_paths
from retrieval.model.recorded import ModelOnDemand, record_model, recorded_preprocess
from retrieval.store import Store
from tests.helpers import GOOD, TEST_MODEL, pattern, run_cli


@pytest.fixture
def library(tmp_path: Path, photos: dict[str, Path]) -> Path:
    lib = tmp_path / "lib"
    shutil.copytree(photos["root"], lib)
    return lib


def test_an_unchanged_or_broken_only_rerun_never_loads_the_model(tmp_path: Path, library: Path, encoder) -> None:
    loads: list[int] = []

    def load():  # noqa: ANN202 - the session's TorchEncoder
        loads.append(1)
        return encoder

    with Store.open(tmp_path / "home", create=True, writable=True) as store:
        record_model(store, encoder)
        assert recorded_preprocess(store) == encoder.preprocess
        first = index_paths(store, ModelOnDemand(load, encoder.preprocess, "cpu"), [str(library)], workers=0)
        assert first.added == GOOD and len(loads) == 1
        again = index_paths(store, ModelOnDemand(load, encoder.preprocess, "cpu"), [str(library)], workers=0)
        assert again.unchanged == GOOD and again.added == 0 and len(loads) == 1  # never loaded
        (library / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        broken = index_paths(store, ModelOnDemand(load, encoder.preprocess, "cpu"), [str(library)], workers=0)
        assert "broken.jpg" in " ".join(p for p, _ in broken.skipped)  # new files: the model may load meanwhile
        before = len(loads)
        retry = index_paths(store, ModelOnDemand(load, encoder.preprocess, "cpu"), [str(library)], workers=0)
        assert retry.added == 0 and len(retry.skipped) == len(broken.skipped) and len(loads) == before
        pattern(123, (90, 70)).save(library / "new.png")
        grown = index_paths(store, ModelOnDemand(load, encoder.preprocess, "cpu"), [str(library)], workers=0)
        assert grown.added == 1 and len(loads) == before + 1 and store.count("image") == GOOD + 1


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_rerun_imports_no_model(tmp_path: Path, library: Path, checkpoint: Path) -> None:
    home = tmp_path / "home"
    for p in (library / "truncated.jpg", library / "empty.jpg", library / "notes.jpg"):
        p.unlink()  # only good files: the re-run has nothing to decode at all
    r = run_cli("index", str(library), "--model", TEST_MODEL, "--pretrained", str(checkpoint), "--device", "cpu",
                "--json", home=home)
    assert r.returncode == 0, r.stderr
    r = run_cli("index", str(library), "--json", home=home, env={"CROSSMODAL_DEBUG_IMPORTS": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["unchanged"] == GOOD
    heavy = [ln for ln in r.stderr.splitlines() if "heavy imports:" in ln]
    assert heavy == ["crossmodal: heavy imports: none"], r.stderr
