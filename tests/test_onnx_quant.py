"""`index --precision int8`: the int8 image tower (retrieval/model/onnx_quant.py) is made once per model,
checked against fp32, reused, remade when damaged, refused (one line, then the default precision) when its
check fails, and recorded in the catalog. The test model's export is made once for the module, in an export
cache of the module's own; tests that damage or refuse get a copy of it."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import GOOD, TEST_MODEL, picture, run_cli

CACHE_ENV = "CROSSMODAL_CACHE"


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


@pytest.fixture(scope="module")
def quant_env(tmp_path_factory: pytest.TempPathFactory, encoder, home: Path) -> Iterator[tuple[Path, Path]]:  # noqa: ANN001
    """(home, cache) of this module: a copy of the run's export of the test model (the first query made it, in
    the run's cache or, from earlier versions, in its home), and no int8 tower yet."""
    from retrieval.model.onnx_quant import model_export

    root = tmp_path_factory.mktemp("quant")
    export = model_export(home, encoder.fingerprint)
    assert export is not None
    cache = os.environ.get(CACHE_ENV)
    inside = Path(cache) if cache and export.folder.is_relative_to(cache) else home
    dst = (root / "cache" if inside != home else root / "home") / export.folder.relative_to(inside)
    shutil.copytree(export.folder, dst, copy_function=os.link,
                    ignore=shutil.ignore_patterns("image-int8*", "*.json"))
    for meta in export.folder.glob("*.json"):
        shutil.copy2(meta, dst / meta.name)
    (root / "home").mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "cache"))
        assert model_export(root / "home", encoder.fingerprint) is not None
        yield root / "home", root / "cache"


def fresh_copy(src: tuple[Path, Path], dst: Path, monkeypatch: pytest.MonkeyPatch, int8: bool = True) -> Path:
    """A copy of (home, cache) under `dst`, the cache made current; big export files are hard links (never
    written in place), JSON and int8 files real copies (tests damage them). Returns the copy's home."""

    def copy(a: str, b: str) -> None:
        name = os.path.basename(a)
        if name.startswith("image-int8"):
            if int8:
                shutil.copy2(a, b)
        else:
            (shutil.copy2 if name.endswith(".json") else os.link)(a, b)

    for part in src:
        if part.is_dir():
            shutil.copytree(part, dst / part.name, copy_function=copy)
    monkeypatch.setenv(CACHE_ENV, str(dst / src[1].name))
    return dst / src[0].name


@pytest.fixture(scope="module")
def pixels(encoder, photos) -> np.ndarray:  # noqa: ANN001
    """The test photos as the indexer decodes them (the 10 patterns and the rotated one)."""
    from retrieval.media.decode import decode_for_model

    names = sorted(k for k in photos if k.startswith("img")) + ["rotated"]
    return np.stack([decode_for_model(photos[k].read_bytes(), encoder.preprocess).pixels for k in names])


@pytest.fixture(scope="module")
def made(quant_env: tuple[Path, Path], encoder, pixels: np.ndarray) -> dict[str, Any]:  # noqa: ANN001
    """The int8 tower made through the encoder the indexer uses, and its first outputs."""
    from retrieval.model.int8_encoder import Int8ImageEncoder
    from retrieval.model.onnx_quant import INT8_FILE, INT8_META, model_export

    notes: list[str] = []
    warns: list[str] = []
    enc = Int8ImageEncoder(encoder, quant_env[0], notes.append, warns.append)
    vectors, tokens = enc.encode_pixels_with_tokens(pixels)
    export = model_export(quant_env[0], encoder.fingerprint)
    assert export is not None
    meta = json.loads((export.folder / INT8_META).read_text())
    return {"enc": enc, "notes": notes, "warns": warns, "vectors": vectors, "tokens": tokens, "meta": meta,
            "file": export.folder / INT8_FILE}


def test_made_once_then_reused(made: dict[str, Any], quant_env: tuple[Path, Path], encoder, pixels: np.ndarray,  # noqa: ANN001
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.model import onnx_quant
    from retrieval.model.int8_encoder import Int8ImageEncoder

    assert made["warns"] == [] and len(made["notes"]) == 1 and "making the int8 image tower" in made["notes"][0]
    meta = made["meta"]
    assert meta["verified"] and meta["version"] == onnx_quant.QUANT_VERSION and meta["check"]["photos"] == GOOD
    assert made["enc"].precision == "int8" and made["file"].stat().st_size == meta["bytes"]
    stamp = made["file"].stat().st_mtime_ns

    def never(*_: object, **__: object) -> None:
        raise AssertionError("the int8 tower was made again")

    monkeypatch.setattr(onnx_quant, "quantize_image_graph", never)
    notes: list[str] = []
    again = Int8ImageEncoder(encoder, quant_env[0], notes.append, notes.append)
    vectors, tokens = again.encode_pixels_with_tokens(pixels)
    assert notes == [] and again.precision == "int8" and made["file"].stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(vectors, made["vectors"])
    np.testing.assert_array_equal(again.encode_pixels(pixels), made["vectors"])  # the same graph, one output


def test_within_the_cosine_bound_of_torch_fp32(made: dict[str, Any], encoder, pixels: np.ndarray) -> None:  # noqa: ANN001
    from retrieval.model.onnx_quant import MIN_MEAN_COSINE

    ref_vectors, ref_tokens = encoder.encode_pixels_with_tokens(pixels)  # torch, fp32 (the fixture's encoder)
    assert encoder.precision == "fp32" and made["tokens"].shape == ref_tokens.shape
    emb, tok = _cos(made["vectors"], ref_vectors), _cos(made["tokens"], ref_tokens)
    assert emb.mean() >= MIN_MEAN_COSINE and tok.mean() >= MIN_MEAN_COSINE, (emb.mean(), tok.mean())
    assert emb.min() >= 0.98 and tok.min() >= 0.95, (emb.min(), tok.min())
    assert not np.array_equal(made["vectors"], ref_vectors)  # it really is another graph
    # texts stay on torch
    np.testing.assert_array_equal(made["enc"].encode_texts(["a red square"]), encoder.encode_texts(["a red square"]))


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_damaged_tower_is_remade_after_one_line(made: dict[str, Any], quant_env: tuple[Path, Path], encoder,  # noqa: ANN001
                                                pixels: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                damage: str) -> None:
    from retrieval.model.int8_encoder import Int8ImageEncoder
    from retrieval.model.onnx_quant import INT8_FILE, INT8_META, inspect_int8, model_export

    home = fresh_copy(quant_env, tmp_path, monkeypatch)
    export = model_export(home, encoder.fingerprint)
    assert export is not None and inspect_int8(export.folder, encoder.fingerprint)[0] == "ok"
    path = export.folder / (INT8_META if damage == "meta" else INT8_FILE)
    data = bytearray(path.read_bytes())
    if damage == "flip":  # same size: only the sha256 can tell
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    else:
        data = data[:len(data) // 2]
    path.write_bytes(bytes(data))
    assert inspect_int8(export.folder, encoder.fingerprint)[0] == "damaged"
    notes: list[str] = []
    warns: list[str] = []
    enc = Int8ImageEncoder(encoder, home, notes.append, warns.append)
    vectors, _ = enc.encode_pixels_with_tokens(pixels)
    assert len(warns) == 1 and "damaged" in warns[0] and "making it again" in warns[0], warns
    assert enc.precision == "int8" and inspect_int8(export.folder, encoder.fingerprint)[0] == "ok"
    assert json.loads((export.folder / INT8_META).read_text())["sha256"] == made["meta"]["sha256"]  # deterministic
    np.testing.assert_array_equal(vectors, made["vectors"])


@pytest.mark.slow
def test_refused_tower_falls_back_and_is_remembered(quant_env: tuple[Path, Path], encoder, pixels: np.ndarray,  # noqa: ANN001
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.model import onnx_quant
    from retrieval.model.int8_encoder import Int8ImageEncoder

    home = fresh_copy(quant_env, tmp_path, monkeypatch, int8=False)
    monkeypatch.setattr(onnx_quant, "MIN_MEAN_COSINE", 1.01)  # no graph reaches it
    warns: list[str] = []
    enc = Int8ImageEncoder(encoder, home, None, warns.append)
    vectors, tokens = enc.encode_pixels_with_tokens(pixels)
    assert len(warns) == 1 and warns[0].startswith("int8 refused") and "indexing at fp32 instead" in warns[0], warns
    assert enc.precision == encoder.precision == "fp32"
    ref_vectors, ref_tokens = encoder.encode_pixels_with_tokens(pixels)
    np.testing.assert_array_equal(vectors, ref_vectors)
    np.testing.assert_array_equal(tokens, ref_tokens)
    export = onnx_quant.model_export(home, encoder.fingerprint)
    assert export is not None and not (export.folder / onnx_quant.INT8_FILE).exists()
    state, meta, _ = onnx_quant.inspect_int8(export.folder, encoder.fingerprint)
    assert state == "refused" and meta is not None and meta["verified"] is False

    def never(*_: object, **__: object) -> None:
        raise AssertionError("a refused tower was made again")

    monkeypatch.setattr(onnx_quant, "quantize_image_graph", never)
    warns.clear()
    again = Int8ImageEncoder(encoder, home, None, warns.append)
    np.testing.assert_array_equal(again.encode_pixels(pixels), ref_vectors)
    assert len(warns) == 1 and "int8 refused" in warns[0] and "delete it to check again" in warns[0], warns


def test_too_few_photos_to_check_fall_back_for_this_run(quant_env: tuple[Path, Path], encoder,  # noqa: ANN001
                                                        pixels: np.ndarray, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.model.int8_encoder import Int8ImageEncoder
    from retrieval.model.onnx_quant import INT8_META, MIN_CHECK_PHOTOS, model_export

    home = fresh_copy(quant_env, tmp_path, monkeypatch, int8=False)
    warns: list[str] = []
    enc = Int8ImageEncoder(encoder, home, None, warns.append)
    few = pixels[:MIN_CHECK_PHOTOS - 1]
    np.testing.assert_array_equal(enc.encode_pixels(few), encoder.encode_pixels(few))
    assert len(warns) == 1 and f"needs {MIN_CHECK_PHOTOS} photos" in warns[0] and enc.precision == "fp32"
    export = model_export(home, encoder.fingerprint)
    assert export is not None and not (export.folder / INT8_META).exists()  # nothing recorded: the next run tries


def test_seven_bit_weights_where_there_is_no_vnni(made: dict[str, Any], quant_env: tuple[Path, Path], encoder,  # noqa: ANN001
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.hardware import CPU_FLAGS_ENV
    from retrieval.model.onnx_quant import INT8_META, inspect_int8, model_export, needs_reduce_range

    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2 fma")
    assert needs_reduce_range()
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2 fma avx512f avx512_vnni")
    assert not needs_reduce_range()
    home = fresh_copy(quant_env, tmp_path, monkeypatch)
    export = model_export(home, encoder.fingerprint)
    assert export is not None
    meta = json.loads((export.folder / INT8_META).read_text())
    meta["reduce_range"] = False  # as made on a VNNI CPU
    (export.folder / INT8_META).write_text(json.dumps(meta))
    assert inspect_int8(export.folder, encoder.fingerprint)[0] == "ok"
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2 fma")  # the same home on a CPU without VNNI: made again, 7-bit
    assert inspect_int8(export.folder, encoder.fingerprint)[0] == "none"


def test_index_paths_with_int8_records_the_precision(made: dict[str, Any], quant_env: tuple[Path, Path],  # noqa: ANN001
                                                     encoder, photos, built_index: Path, tmp_path: Path,  # noqa: ANN001
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer.pipeline import index_paths
    from retrieval.model.int8_encoder import Int8ImageEncoder
    from retrieval.model.recorded import image_precisions
    from retrieval.store import Store

    monkeypatch.setenv(CACHE_ENV, str(quant_env[1]))
    home = tmp_path / "int8-home"
    with Store.open(home, create=True, writable=True) as store:
        store.bind_model(encoder.fingerprint)
        report = index_paths(store, Int8ImageEncoder(encoder, quant_env[0]), [str(photos["root"])], workers=0)
        assert report.added == GOOD and image_precisions(store) == ["int8"]
    with Store.open(home) as int8, Store.open(built_index) as fp32:
        assert image_precisions(fp32) == ["fp32"]  # the fixture's index, embedded by torch in fp32
        by_path = {v.path: k for k, v in fp32.items(fp32.vectors("image")[0]).items()}
        ids, vecs = int8.vectors("image")
        items = int8.items(ids)
        ref = np.stack([fp32.vector("image", by_path[items[int(i)].path]) for i in ids])
        assert _cos(vecs, ref).mean() >= 0.99
        for i, q in zip(ids, ref, strict=True):  # each photo's fp32 vector finds its int8 vector first
            assert int(int8.search("image", q[None], 1)[1][0][0]) == int(i)


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_index_int8(quant_env: tuple[Path, Path], checkpoint: Path, photos, built_index: Path,  # noqa: ANN001
                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`crossmodal index --precision int8` makes the tower (once), indexes, records int8, and queries find each
    photo first, as they do in the fp32 index."""
    from retrieval.query.open import open_index

    home = fresh_copy(quant_env, tmp_path, monkeypatch, int8=False)  # the export, no int8 tower yet
    env = {CACHE_ENV: os.environ[CACHE_ENV]}
    args = ("index", str(photos["root"]), "--model", TEST_MODEL, "--pretrained", str(checkpoint), "--precision",
            "int8", "--workers", "0")
    r = run_cli(*args, home=home, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("making the int8 image tower") == 1 and "(int8)" in r.stderr, r.stderr
    assert "refused" not in r.stderr and "warning" not in r.stderr, r.stderr
    info = run_cli("info", "--json", home=home, env=env)
    assert info.returncode == 0 and json.loads(info.stdout)["image_precision"] == "int8", info.stdout
    table = run_cli("info", home=home, env=env)
    assert "int8 image tower" in table.stdout and "mean cosine" in table.stdout, table.stdout
    extra = tmp_path / "more" / "new.jpg"  # one new photo: a first batch of 1 could not check a new tower
    extra.parent.mkdir()
    picture(4242, (120, 90)).save(extra)
    r = run_cli("index", str(extra.parent), "--precision", "int8", "--workers", "0", home=home, env=env)
    assert r.returncode == 0 and "making the int8 image tower" not in r.stderr, r.stderr  # reused
    assert "refused" not in r.stderr and "warning" not in r.stderr, r.stderr
    one = run_cli("search", "--image", str(extra), "-k", "1", "--json", home=home, env=env)
    assert one.returncode == 0 and json.loads(one.stdout)[0]["path"] == str(extra), one.stdout + one.stderr
    int8 = open_index(home, device="cpu")
    fp32 = open_index(built_index, device="cpu")
    try:
        for name in sorted(k for k in photos if k.startswith("img")) + ["rotated"]:
            data = photos[name].read_bytes()
            hits = [s.search_images(s.embed_query(image=data).vector, 1)[0].item.path for s in (int8, fp32)]
            assert hits == [str(photos[name])] * 2, (name, hits)
    finally:
        int8.store.close()
        fp32.store.close()
    for bad, message in ((["add-texts", str(photos["root"] / "readme.txt"), "--precision", "int8"],
                          "only for `crossmodal index`"),
                         (["index", str(photos["root"]), "--precision", "int8", "--device", "cuda"],
                          "runs the image tower on the CPU")):
        r = run_cli(*bad, home=home, env=env)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
