"""Queries on ONNX Runtime: the same results as torch, no torch import, and fallbacks that say why."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from retrieval.model.export_cache import export_dir, export_key, unsupported_marker  # noqa: E402
from retrieval.model.onnx_encoder import OnnxEncoder  # noqa: E402
from retrieval.model.torch_encoder import TorchEncoder  # noqa: E402
from retrieval.query.open import open_index  # noqa: E402
from tests.helpers import run_cli  # noqa: E402

# These compare dense results with torch's; reranked queries on ONNX are tested in test_onnx_rerank.py.
DENSE = ["--no-rerank"]
QUERIES = ["a dog running on a beach", "red circles", "caption number 3 about colours", "日本の夜 🌃", ""]


@pytest.fixture(scope="module")
def onnx_searcher(home: Path, first_query):
    s = open_index(home, device="cpu", backend="auto")
    yield s
    s.store.close()


@pytest.fixture(scope="module")
def torch_searcher(home: Path, first_query):
    s = open_index(home, device="cpu", precision="fp32", backend="torch")
    yield s
    s.store.close()


def ids(hits) -> list[int]:
    return [h.id for h in hits]


def test_first_query_runs_on_torch_and_exports(first_query, first_query_cache: Path, home: Path) -> None:
    searcher, lines = first_query
    assert isinstance(searcher.encoder, TorchEncoder)
    assert len(lines) == 1 and "no ONNX export" in lines[0] and "torch" in lines[0]
    assert (first_query_cache / "onnx" / export_key(searcher.store.fingerprint) / "export.json").is_file()
    assert (export_dir(searcher.store.fingerprint) / "export.json").is_file()  # the run's cache has it too
    assert not (home / "onnx").exists()


def test_auto_picks_onnx_when_exported(onnx_searcher, torch_searcher) -> None:
    assert isinstance(onnx_searcher.encoder, OnnxEncoder)
    assert isinstance(torch_searcher.encoder, TorchEncoder)
    enc = onnx_searcher.encoder
    assert (enc.dim, enc.fingerprint, enc.device, enc.precision) == (384, torch_searcher.encoder.fingerprint,
                                                                     "cpu", "fp32")


@pytest.mark.parametrize("text", QUERIES)
def test_text_search_equals_torch(onnx_searcher, torch_searcher, text: str) -> None:
    if not text:
        return
    a = onnx_searcher.search_images(onnx_searcher.query_vector(text=text), 8)
    b = torch_searcher.search_images(torch_searcher.query_vector(text=text), 8)
    assert ids(a) == ids(b)
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-4)


def test_image_fused_and_caption_queries_equal_torch(onnx_searcher, torch_searcher, photos) -> None:
    data = photos["img04"].read_bytes()
    for s_kwargs in ({"image": data}, {"text": "at night", "image": data, "weight": 0.3,
                                       "negatives": ["people", "cars"]}):
        a = onnx_searcher.search_images(onnx_searcher.query_vector(**s_kwargs), 11)
        b = torch_searcher.search_images(torch_searcher.query_vector(**s_kwargs), 11)
        assert ids(a) == ids(b)
    for corpus in (None, "alpha", "beta"):
        assert ids(onnx_searcher.caption(data, 10, corpus)) == ids(torch_searcher.caption(data, 10, corpus))
    assert onnx_searcher.similar(data, 3)[0].item.path == str(photos["img04"])


def test_builtin_vocabulary_equal_and_cached_with_texts(onnx_searcher, torch_searcher, tmp_path, monkeypatch):
    """A reduced vocabulary (the full one is 18,000 prompts) embedded on both backends, then cached."""
    import open_clip.zero_shot_metadata as zsm

    import retrieval.query.vocab as vocab

    names, templates = zsm.IMAGENET_CLASSNAMES[:40], zsm.SIMPLE_IMAGENET_TEMPLATES[:3]
    monkeypatch.setattr(zsm, "IMAGENET_CLASSNAMES", names)
    monkeypatch.setattr(zsm, "SIMPLE_IMAGENET_TEMPLATES", templates)
    real = OnnxEncoder.zero_shot_metadata
    monkeypatch.setattr(OnnxEncoder, "zero_shot_metadata",
                        lambda self: (real(self)[0][:40], real(self)[1][:3]))
    ta, va = vocab.builtin_vocabulary(onnx_searcher.encoder, tmp_path / "a")
    tb, vb = vocab.builtin_vocabulary(torch_searcher.encoder, tmp_path / "b")
    assert ta == tb == [f"a photo of a {c}." for c in names]
    assert ((va * vb).sum(axis=1)).min() >= 0.999

    def no_metadata(_encoder):
        raise AssertionError("a cached vocabulary must not need class names or open_clip")

    monkeypatch.setattr(vocab, "_zero_shot", no_metadata)
    tc, vc = vocab.builtin_vocabulary(onnx_searcher.encoder, tmp_path / "a")
    assert tc == ta and np.array_equal(vc, va)


def _heavy(stderr: str) -> str:
    found = [ln for ln in stderr.splitlines() if "heavy imports:" in ln]
    assert len(found) == 1, stderr
    return found[0].split("heavy imports:", 1)[1].strip()


@pytest.mark.subprocess
def test_cli_queries_import_no_torch(home: Path, onnx_searcher, torch_searcher, photos, monkeypatch) -> None:
    import open_clip.zero_shot_metadata as zsm

    import retrieval.query.vocab as vocab

    env = {"CROSSMODAL_DEBUG_IMPORTS": "1"}
    r = run_cli("search", "a dog running on a beach", "-k", "5", "--json", *DENSE, home=home, env=env)
    assert r.returncode == 0, r.stderr
    assert _heavy(r.stderr) == "none"
    q = torch_searcher.query_vector(text="a dog running on a beach")
    assert [h["id"] for h in json.loads(r.stdout)] == ids(torch_searcher.search_images(q, 5))

    r = run_cli("search", "--image", str(photos["img02"]), "-k", "4", "--json", *DENSE, home=home, env=env)
    assert r.returncode == 0 and _heavy(r.stderr) == "none", r.stderr
    q = torch_searcher.query_vector(image=photos["img02"].read_bytes())
    assert [h["id"] for h in json.loads(r.stdout)] == ids(torch_searcher.search_images(q, 4))

    r = run_cli("caption", str(photos["img02"]), "--corpus", "alpha", "-k", "3", "--json", *DENSE, home=home,
                env=env)
    assert r.returncode == 0 and _heavy(r.stderr) == "none", r.stderr
    assert [h["id"] for h in json.loads(r.stdout)] == ids(torch_searcher.caption(photos["img02"].read_bytes(), 3,
                                                                                 "alpha"))

    # the built-in vocabulary from its cache: texts come from the npz, nothing from open_clip
    monkeypatch.setattr(zsm, "IMAGENET_CLASSNAMES", zsm.IMAGENET_CLASSNAMES[:12])
    monkeypatch.setattr(zsm, "SIMPLE_IMAGENET_TEMPLATES", zsm.SIMPLE_IMAGENET_TEMPLATES[:2])
    texts, _ = vocab.builtin_vocabulary(torch_searcher.encoder, home)
    r = run_cli("caption", str(photos["img02"]), "--corpus", "builtin:imagenet", "-k", "12", "--json", *DENSE,
                home=home, env=env)
    assert r.returncode == 0 and _heavy(r.stderr) == "none", r.stderr
    assert sorted(h["text"] for h in json.loads(r.stdout)) == sorted(texts)

    r = run_cli("info", "--json", home=home, env=env)
    assert r.returncode == 0 and _heavy(r.stderr) == "none", r.stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_backend_option_gives_equal_results(home: Path, first_query) -> None:
    args = ("search", "red circles", "--not", "people", "-k", "6", "--json", *DENSE)
    env = {"CROSSMODAL_DEBUG_IMPORTS": "1"}
    onnx = run_cli(*args, "--backend", "onnx", home=home, env=env)
    torch = run_cli(*args, "--backend", "torch", home=home, env=env)
    assert onnx.returncode == 0 and torch.returncode == 0, onnx.stderr + torch.stderr
    assert _heavy(onnx.stderr) == "none" and "torch" in _heavy(torch.stderr)
    assert [h["id"] for h in json.loads(onnx.stdout)] == [h["id"] for h in json.loads(torch.stdout)]
    assert [ln for ln in torch.stderr.splitlines() if "heavy imports" not in ln] == []  # chosen: no notice


def test_missing_onnxruntime_falls_back_with_one_line(home: Path, onnx_searcher, monkeypatch) -> None:
    from retrieval.errors import UserError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    lines: list[str] = []
    s = open_index(home, device="cpu", notify=lines.append)
    try:
        assert isinstance(s.encoder, TorchEncoder)
        assert len(lines) == 1 and "onnxruntime is not available" in lines[0] and "torch" in lines[0]
        for text in QUERIES[:3]:
            assert ids(s.search_images(s.query_vector(text=text), 8)) == \
                ids(onnx_searcher.search_images(onnx_searcher.query_vector(text=text), 8))
    finally:
        s.store.close()
    with pytest.raises(UserError, match="onnxruntime"):
        open_index(home, device="cpu", backend="onnx")


def test_unsupported_model_stays_on_torch(built_index: Path, tmp_path, encoder, own_cache) -> None:
    home = tmp_path / "h"
    shutil.copytree(built_index, home)
    marker = unsupported_marker(encoder.fingerprint)
    marker.parent.mkdir(parents=True)
    marker.write_text("no exportable text tower (test)\n")
    lines: list[str] = []
    s = open_index(home, device="cpu", notify=lines.append)
    try:
        assert isinstance(s.encoder, TorchEncoder)
        assert len(lines) == 1 and "no exportable text tower (test)" in lines[0]
        assert not export_dir(encoder.fingerprint).exists() and not (home / "onnx").exists()
    finally:
        s.store.close()
