"""The CLI end to end, in subprocesses, the way users run it: exit codes, JSON shapes, oracles.

The flow (index, re-run, search, caption, add-texts, info, filters, remove) runs on each catalog backend: SQLite
in the home, and PostgreSQL (`postgres` marker: `--catalog` on the first `index`, later commands without it).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from retrieval.hardware import cpu_has_fast_bf16
from retrieval.store import Store
from tests.helpers import BAD, GOOD, TEST_MODEL, make_checkpoint, run_cli


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_catalog_args(request) -> Callable[[], list[str]]:
    """The `--catalog` arguments of a new index on this run's backend: none (SQLite), or a new database."""
    if request.param == "sqlite":
        return lambda: []
    server, numbers = request.getfixturevalue("pg_server"), itertools.count()
    return lambda: ["--catalog", server.createdb(f"e2e_{os.getpid()}_{next(numbers)}")]


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory, checkpoint, photos, new_catalog_args):
    """An index built by `crossmodal index` (JSON checked in the test below)."""
    home = tmp_path_factory.mktemp("cli-home")
    r = run_cli("index", str(photos["root"]), "--model", TEST_MODEL, "--pretrained", str(checkpoint),
                "--json", "--batch-size", "4", *new_catalog_args(), home=home)
    assert r.returncode == 0, r.stderr
    return home, json.loads(r.stdout)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return r


def user_error(r, *needles: str):
    assert r.returncode == 2, f"exit {r.returncode}: {r.stdout} {r.stderr}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
@pytest.mark.subprocess
def test_index_json_and_skips(cli_home, photos):
    _, report = cli_home
    assert report["added"] == GOOD
    assert set(report) >= {"added", "skipped", "seconds", "images_per_second"}
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.jpg"} and len(reasons) == BAD
    assert "empty" in reasons["empty.jpg"]
    assert report["images_per_second"] > 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_reindex_adds_nothing(cli_home, photos):
    home, _ = cli_home
    r = ok(run_cli("index", str(photos["root"]), "--json", home=home))
    report = json.loads(r.stdout)
    assert report["added"] == 0 and report["updated"] == 0 and report["unchanged"] == GOOD


@pytest.mark.slow
@pytest.mark.subprocess
def test_rotated_image_stored_upright(cli_home, photos):
    home, _ = cli_home
    with Store.open(home) as s:
        ids = [i for i, *_ in s.image_files().values()]
        views = {v.path: v for v in s.items(ids).values()}
    rot = views[str(photos["rotated"])]
    assert (rot.width, rot.height) == (80, 120) and rot.taken_at == "2021-06-15T10:30:00"


@pytest.mark.slow
@pytest.mark.subprocess
def test_add_texts_every_format(cli_home, tmp_path):
    home, _ = cli_home
    (tmp_path / "caps.txt").write_text("a red square\na blue circle\na red square\n")
    (tmp_path / "caps.csv").write_text("id,caption\n1,green field\n2,grey sky\n")
    (tmp_path / "caps.tsv").write_text("alt\tn\nyellow sun\t1\n")
    (tmp_path / "caps.jsonl").write_text('{"text": "purple rain"}\n{"text": "white snow"}\n')
    r = ok(run_cli("add-texts", str(tmp_path / "caps.txt"), "--json", home=home))
    assert json.loads(r.stdout) == {**json.loads(r.stdout), "corpus": "caps", "added": 2, "duplicates": 1}
    ok(run_cli("add-texts", str(tmp_path / "caps.csv"), "--column", "caption", "--corpus", "alt-texts",
               home=home))
    ok(run_cli("add-texts", str(tmp_path / "caps.tsv"), "--column", "alt", "--corpus", "alt-texts", home=home))
    ok(run_cli("add-texts", str(tmp_path / "caps.jsonl"), "--field", "text", "--corpus", "j", home=home))
    info = json.loads(ok(run_cli("info", "--json", home=home)).stdout)
    pg = (home / "catalog.url").is_file()
    assert info["catalog"] == (str(home / "catalog.sqlite") if not pg else  # where the catalog lives
                               (home / "catalog.url").read_text().strip())  # (no password to mask here)
    assert pg or not (home / "catalog.url").exists() and (home / "catalog.sqlite").is_file()
    assert info == {"home": str(home), "catalog": info["catalog"], "model": TEST_MODEL,
                    "pretrained": info["pretrained"], "dim": 384,
                    "images": GOOD, "texts": 7, "corpora": {"alt-texts": 3, "caps": 2, "j": 2},
                    "vector_index": info["vector_index"],  # its content: tests/test_ann.py
                    "onnx_export": info["onnx_export"],
                    "image_precision": "bf16" if cpu_has_fast_bf16() else "fp32"}  # what auto indexed with
    from retrieval.model.export_cache import exports_root

    export = info["onnx_export"]  # the shared cache's export of the model (`index` made or found it)
    assert Path(export["path"]).parent == exports_root() and export["shared"] is True and export["bytes"] > 1e6
    assert info["vector_index"]["text"]["describe"] == "flat (exact)"
    user_error(run_cli("add-texts", str(tmp_path / "caps.csv"), "--column", "nope", home=home),
               "no column 'nope'")


def _oracle(home: Path, modality: str, q: np.ndarray, k: int) -> list[int]:
    with Store.open(home) as s:
        ids, vecs = s.vectors(modality)
    return ids[np.argsort(-(vecs @ q), kind="stable")[:k]].tolist()


@pytest.mark.slow
@pytest.mark.subprocess
def test_search_json_matches_oracle(cli_home, encoder, photos):
    home, _ = cli_home
    r = ok(run_cli("search", "a dog running on a beach", "-k", "4", "--json", "--no-rerank", home=home))
    hits = json.loads(r.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert set(hits[0]) == {"rank", "id", "score", "dense_score", "dense_rank", "path", "width", "height"}
    q = encoder.encode_texts(["a dog running on a beach"])[0]
    assert [h["id"] for h in hits] == _oracle(home, "image", q, 4)
    assert all(Path(h["path"]).is_absolute() and Path(h["path"]).exists() for h in hits)

    r = ok(run_cli("search", "--image", str(photos["img04"]), "-k", "3", "--json", home=home))
    hits = json.loads(r.stdout)
    assert hits[0]["path"] == str(photos["img04"]) and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)

    r = ok(run_cli("search", "at night", "--image", str(photos["img04"]), "--weight", "0.5",
                   "--not", "people", "-k", "5", "--json", "--no-rerank", home=home))
    t, n = encoder.encode_texts(["at night", "people"])
    i = encoder.encode_image_bytes(photos["img04"].read_bytes())
    q = 0.5 * t + 0.5 * i
    q /= np.linalg.norm(q)
    q = q - n
    q /= np.linalg.norm(q)
    assert [h["id"] for h in json.loads(r.stdout)] == _oracle(home, "image", q, 5)

    table = ok(run_cli("search", "a red car", "--not", "people", home=home)).stdout
    assert "rank" in table and "score" in table and str(photos["root"]) in table


@pytest.mark.slow
@pytest.mark.subprocess
def test_caption(cli_home, encoder, photos, tmp_path):
    home, _ = cli_home
    r = ok(run_cli("caption", str(photos["img02"]), "-k", "3", "--json", "--no-rerank", home=home))
    hits = json.loads(r.stdout)
    assert set(hits[0]) == {"rank", "id", "score", "dense_score", "dense_rank", "text", "corpus"}
    q = encoder.encode_image_bytes(photos["img02"].read_bytes())
    if hits[0]["corpus"] != "builtin:imagenet":
        assert [h["id"] for h in hits] == _oracle(home, "text", q, 3)


@pytest.mark.slow
@pytest.mark.subprocess
def test_caption_without_corpus_uses_builtin_vocabulary(checkpoint, photos, tmp_path):
    home = tmp_path / "h"
    ok(run_cli("index", str(photos["img01"]), "--model", TEST_MODEL, "--pretrained", str(checkpoint),
               "--quiet", home=home))
    r = ok(run_cli("caption", str(photos["img01"]), "-k", "2", "--json", home=home))
    hits = json.loads(r.stdout)
    assert [h["corpus"] for h in hits] == ["builtin:imagenet"] * 2
    assert all(h["text"].startswith("a photo of a ") for h in hits)
    assert list((home / "vocab").glob("imagenet-*.npz"))


@pytest.mark.slow
@pytest.mark.subprocess
def test_user_errors_exit_2_with_one_line(cli_home, photos, tmp_path, checkpoint, new_catalog_args):
    home, _ = cli_home
    user_error(run_cli("index", str(tmp_path / "missing"), home=home), "no such file or folder")
    user_error(run_cli("search", "--image", str(tmp_path / "nope.jpg"), home=home), "no such file")
    user_error(run_cli("search", "--image", str(photos["truncated"]), home=home), "corrupt")
    user_error(run_cli("caption", str(photos["text_as_jpg"]), home=home), "not a recognised image")
    user_error(run_cli("search", "x", home=tmp_path / "empty-home"), "no index", "crossmodal index")
    user_error(run_cli("search", home=home), "give a text query")
    # empty home with a model but no images
    empty = tmp_path / "texts-only"
    (tmp_path / "t.txt").write_text("hello\n")
    where = new_catalog_args()[1:]  # PostgreSQL: given by the env var here, which the new home then records
    ok(run_cli("add-texts", str(tmp_path / "t.txt"), "--model", TEST_MODEL, "--pretrained", str(checkpoint),
               home=empty, env={"CROSSMODAL_CATALOG": where[0]} if where else None))
    assert (empty / "catalog.url").is_file() == bool(where)
    user_error(run_cli("search", "x", home=empty), "no images indexed")


@pytest.mark.slow
@pytest.mark.subprocess
def test_model_mismatch_refused(cli_home, photos, tmp_path, checkpoint):
    home, _ = cli_home
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    user_error(run_cli("index", str(photos["root"]), "--model", TEST_MODEL, "--pretrained", str(other),
                       home=home), "not the one this index")
    user_error(run_cli("search", "x", "--pretrained", str(other), home=home), "not the one this index")
    user_error(run_cli("search", "x", "--model", "ViT-B-32", home=home), "built with")
    # the same weights under another path are the same model
    copy = tmp_path / "copy.pt"
    shutil.copy(checkpoint, copy)
    ok(run_cli("search", "x", "--pretrained", str(copy), "-k", "1", home=home))


@pytest.mark.subprocess
def test_no_weights_offline(tmp_path, photos):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    line = user_error(run_cli("index", str(photos["root"]), home=tmp_path / "h", env=env),
                      "ViT-B-32", "laion2b_s34b_b79k", str(tmp_path / "hf" / "hub"), "--pretrained")
    assert "cannot be reached" in line


@pytest.mark.subprocess
def test_help_has_examples():
    r = ok(run_cli("--help"))
    assert "crossmodal index" in r.stdout
    for cmd in ["index", "remove", "add-texts", "search", "caption", "info", "skipped", "repair", "ui"]:
        out = ok(run_cli(cmd, "--help")).stdout
        assert "Example" in out, cmd


@pytest.mark.slow
@pytest.mark.subprocess
def test_filters_remove_and_skipped_from_the_cli(cli_home, photos, tmp_path, checkpoint, new_catalog_args):
    home, _ = cli_home
    r = ok(run_cli("search", "x", "--under", str(photos["root"] / "sub"), "-k", "20", "--json", home=home))
    paths = [h["path"] for h in json.loads(r.stdout)]
    assert len(paths) == 4 and all(p.startswith(str(photos["root"] / "sub") + "/") for p in paths)
    r = ok(run_cli("search", "x", "--after", "2021-06-01", "--before", "2021-07-01", "--json", home=home))
    assert [h["path"] for h in json.loads(r.stdout)] == [str(photos["rotated"])]
    assert json.loads(ok(run_cli("search", "x", "--camera", "leica", "--json", home=home)).stdout) == []
    user_error(run_cli("search", "x", "--after", "last tuesday", home=home), "not a date")
    skipped = json.loads(ok(run_cli("skipped", "--json", home=home)).stdout)
    assert {Path(s["path"]).name for s in skipped} == {"truncated.jpg", "empty.jpg", "notes.jpg"}

    small = tmp_path / "small-home"
    ok(run_cli("index", str(photos["img01"]), str(photos["img02"]), "--model", TEST_MODEL, "--pretrained",
               str(checkpoint), "--quiet", *new_catalog_args(), home=small))
    r = ok(run_cli("remove", str(photos["img01"]), "--json", home=small))
    assert json.loads(r.stdout) == {"removed": 1}
    assert json.loads(ok(run_cli("info", "--json", home=small)).stdout)["images"] == 1
