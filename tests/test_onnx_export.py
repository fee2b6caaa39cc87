"""The ONNX export: same weights and preprocessing as torch, dynamic text length, atomic, never fatal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from retrieval.model.export_cache import export_dir, exports_root, unsupported_marker  # noqa: E402
from retrieval.model.onnx_encoder import OnnxEncoder, export_key  # noqa: E402

TEXTS = ["", "a dog", "a dog running on a beach at sunset with friends", "Café crème, 東京 🐶 &amp; more",
         " ".join(f"word{i}" for i in range(150)), "x"]


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def exported(encoder, first_query, first_query_cache: Path) -> Path:
    """The export the first query of an index made, in its own cache (tests/fixtures.py)."""
    return first_query_cache / "onnx" / export_key(encoder.fingerprint)


@pytest.fixture(scope="module")
def onnx_encoder(encoder, exported: Path) -> OnnxEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSMODAL_CACHE", str(exported.parent.parent))
        enc = OnnxEncoder.open(None, encoder.fingerprint)
    assert enc is not None and enc.folder == exported
    return enc


def test_layout_and_metadata(encoder, exported: Path, home: Path, monkeypatch) -> None:
    monkeypatch.setenv("CROSSMODAL_CACHE", str(exported.parent.parent))
    assert exported == export_dir(encoder.fingerprint) and exports_root() == exported.parent
    assert not (home / "onnx").exists()  # nothing of the export in the home: the cache holds it
    names = {p.name for p in exported.iterdir()}
    assert {"text.onnx", "text.onnx.data", "image.onnx", "image.onnx.data", "export.json", "zero_shot.json",
            "bpe_simple_vocab_16e6.txt.gz"} == names
    meta = json.loads((exported / "export.json").read_text())
    assert meta["fingerprint"] == json.loads(encoder.fingerprint.to_json())
    assert meta["check"]["min_cosine_text"] >= 0.9999 and meta["check"]["min_cosine_image"] >= 0.9999
    assert meta["bytes"]["text.onnx.data"] > 1e6 and meta["tokenizer"]["context_length"] == 77
    assert not [p for p in exports_root().iterdir() if p.name.startswith(".")]
    assert [p.name for p in exports_root().iterdir()] == [exported.name]  # no lock file or marker left


def test_text_embeddings_agree_with_torch(encoder, onnx_encoder) -> None:
    got, ref = onnx_encoder.encode_texts(TEXTS), encoder.encode_texts(TEXTS)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert cos(got, ref).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_text_graph_is_exact_on_any_length(encoder, onnx_encoder) -> None:
    """The dynamic sequence axis: trimmed to the longest text == padded to 77 == open_clip's encode_text."""
    import torch

    tokens = onnx_encoder.tokenizer(TEXTS[:4])
    n = int(tokens.argmax(axis=1).max()) + 1
    session = onnx_encoder._session("text.onnx")
    trimmed = session.run(None, {"tokens": tokens[:, :n]})[0]
    full = session.run(None, {"tokens": tokens})[0]
    with torch.inference_mode():
        ref = encoder.model.encode_text(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(trimmed, full, atol=1e-4)
    assert cos(trimmed, ref).min() >= 0.9999


def test_image_embeddings_agree_with_torch(encoder, onnx_encoder, photos) -> None:
    files = [photos[f"img{i:02d}"] for i in range(0, 10, 2)] + [photos["rotated"]]
    got = np.stack([onnx_encoder.encode_image_bytes(p.read_bytes()) for p in files])
    ref = np.stack([encoder.encode_image_bytes(p.read_bytes()) for p in files])
    assert cos(got, ref).min() >= 0.999
    assert onnx_encoder.preprocess == encoder.preprocess


def test_pixels_normalised_like_torch(encoder, onnx_encoder) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(onnx_encoder.pixels_to_array(pixels), encoder.pixels_to_tensor(pixels).numpy(),
                               atol=1e-5)


def test_zero_shot_metadata_copied(onnx_encoder) -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES

    from retrieval.query.vocab import _zero_shot

    names, templates = _zero_shot(onnx_encoder)
    assert names == list(IMAGENET_CLASSNAMES)
    assert [t(c) for c in names[:50] for t in templates] == \
        [t(c) for c in IMAGENET_CLASSNAMES[:50] for t in SIMPLE_IMAGENET_TEMPLATES]


def test_key_changes_with_the_model(encoder) -> None:
    from dataclasses import replace

    fp = encoder.fingerprint
    assert export_key(fp) == export_key(replace(fp, pretrained="/elsewhere/same.pt"))
    assert export_key(fp) != export_key(replace(fp, weights="sha256:" + "0" * 64))
    assert export_key(fp) != export_key(replace(fp, model="ViT-B-32"))


def test_failed_export_leaves_nothing_and_says_one_line(encoder, tmp_path, own_cache, monkeypatch) -> None:
    import torch

    import retrieval.model.onnx_export as ox

    def fake_export(_module, _args, path, **_k):
        Path(path).write_bytes(b"half an export")

    def broken(*_a, **_k):
        raise RuntimeError("simulated failure\nsecond line")

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    monkeypatch.setattr(ox, "_optimise", broken)
    lines: list[str] = []
    assert ox.ensure_export(encoder, tmp_path, lines.append) is None
    assert len(lines) == 1 and "simulated failure" in lines[0] and "torch" in lines[0]
    assert not export_dir(encoder.fingerprint).exists() and not (tmp_path / "onnx").exists()
    from retrieval.model.onnx_upkeep import failure_marker

    # no temporary folder (nor lock file) left either: only the failure's time, so queries back off
    # (test_hostile_caches.py)
    assert [p.name for p in exports_root().iterdir()] == [failure_marker(encoder.fingerprint).name]


def test_unsupported_model_is_marked_once(encoder, tmp_path, own_cache, monkeypatch) -> None:
    import retrieval.model.onnx_export as ox

    def unsupported(_model):
        raise ox.ExportUnsupported("no exportable text tower (test)")

    monkeypatch.setattr(ox, "check_exportable", unsupported)
    lines: list[str] = []
    assert ox.ensure_export(encoder, tmp_path, lines.append) is None
    assert len(lines) == 1 and "no exportable text tower" in lines[0]
    assert unsupported_marker(encoder.fingerprint).is_file()
    assert ox.ensure_export(encoder, tmp_path, lines.append) is None and len(lines) == 1


def test_broken_export_is_ignored_then_replaced(encoder, exported: Path, tmp_path, own_cache, monkeypatch) -> None:
    import retrieval.model.onnx_export as ox

    target = export_dir(encoder.fingerprint)
    shutil.copytree(exported, target)
    (target / "image.onnx.data").unlink()  # an incomplete folder is never used
    assert OnnxEncoder.open(tmp_path, encoder.fingerprint) is None
    meta = json.loads((target / "export.json").read_text())
    meta["onnxruntime"] = "0.1.0"  # and neither is one optimised by another onnxruntime
    shutil.copy(exported / "image.onnx.data", target / "image.onnx.data")
    (target / "export.json").write_text(json.dumps(meta))
    assert OnnxEncoder.open(tmp_path, encoder.fingerprint) is None

    def export_again(_encoder, home):  # a real export is tested above; this checks the install step
        tmp = exports_root() / f".{target.name}.{os.getpid()}.again.tmp"
        shutil.copytree(exported, tmp)
        ox._install(tmp, target, encoder.fingerprint)
        return target

    monkeypatch.setattr(ox, "export_onnx", export_again)
    assert ox.ensure_export(encoder, tmp_path) == target
    assert OnnxEncoder.open(tmp_path, encoder.fingerprint) is not None
    assert [p.name for p in exports_root().iterdir()] == [target.name]


@pytest.mark.subprocess
def test_folders_of_killed_exporters_are_swept(encoder, tmp_path) -> None:
    import retrieval.model.onnx_export as ox

    root = tmp_path / "onnx"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = root / f".{export_key(encoder.fingerprint)}.{dead}.abc123.tmp"
    live = root / f".{export_key(encoder.fingerprint)}.{os.getpid()}.def456.tmp"
    for p in (stale, live):
        p.mkdir(parents=True)
        (p / "text.onnx.data").write_bytes(b"x")
    ox._sweep(root)
    assert not stale.exists() and live.exists()
