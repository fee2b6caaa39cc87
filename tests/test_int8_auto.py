"""`index --precision auto` on the CPU takes the int8 image tower where it measured faster than torch
(retrieval/model/int8_auto.py): measured once per model and CPU kind on the first batch, recorded beside the
tower, followed afterwards; a new home of a model measured faster in int8 indexes without importing torch; a
first batch too small to check a tower, a refused tower, a slower tower or CROSSMODAL_INT8=off stay on torch
without a warning. The fixtures (the module's export cache, its int8 tower) come from test_onnx_quant.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import GOOD, TEST_MODEL, run_cli
from tests.test_onnx_quant import CACHE_ENV, _cos, fresh_copy, made, pixels, quant_env  # noqa: F401 - fixtures

INT8_ENV = "CROSSMODAL_INT8"


@pytest.fixture(autouse=True)
def auto_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """The product's default, which the rest of the suite turns off (conftest)."""
    monkeypatch.setenv(INT8_ENV, "auto")


def _speed(export_folder: Path, torch_precision: str, int8_img_s: float, torch_img_s: float) -> None:
    """Record a measurement as the first batch would have (for the tower now in `export_folder`)."""
    from retrieval.model.int8_auto import record_speed, speed_key
    from retrieval.model.onnx_quant import INT8_META

    sha = json.loads((export_folder / INT8_META).read_text())["sha256"]
    record_speed(export_folder, speed_key(torch_precision), {"int8_img_s": int8_img_s, "torch_img_s": torch_img_s,
                                                             "int8_sha256": sha})


def test_setting_and_cpu_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.errors import UserError
    from retrieval.hardware import CPU_FLAGS_ENV, cpu_kind
    from retrieval.model.int8_auto import auto_int8_allowed, speed_key

    for value, allowed in (("auto", True), ("", True), ("OFF", False), ("off", False)):
        monkeypatch.setenv(INT8_ENV, value)
        assert auto_int8_allowed() is allowed
    monkeypatch.setenv(INT8_ENV, "sometimes")
    with pytest.raises(UserError, match="CROSSMODAL_INT8 must be 'auto' or 'off'"):
        auto_int8_allowed()
    for flags, kind in (("avx2 fma", "avx2"), ("avx2 avx512f avx512_vnni", "vnni"), ("avx2 avx_vnni", "vnni"),
                        ("avx2 avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
                        ("avx2 avx512_bf16 amx_bf16 amx_tile amx_int8", "amx"), ("neon", "other")):
        monkeypatch.setenv(CPU_FLAGS_ENV, flags)
        assert cpu_kind() == kind and speed_key("bf16") == f"{kind}/bf16"


def test_first_batch_measures_once_and_the_choice_follows_it(made: dict[str, Any], quant_env: tuple[Path, Path],  # noqa: F811
                                                             encoder, pixels: np.ndarray, tmp_path: Path,  # noqa: ANN001, F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.model import int8_auto, onnx_quant
    from retrieval.model.int8_auto import MIN_GAIN, SPEED_FILE, read_speeds, speed_key
    from retrieval.model.int8_encoder import Int8ImageEncoder
    from retrieval.model.onnx_quant import model_export

    home = fresh_copy(quant_env, tmp_path, monkeypatch)  # the tower made and checked, never timed
    export = model_export(home, encoder.fingerprint)
    assert export is not None and not (export.folder / SPEED_FILE).exists()
    notes: list[str] = []
    warns: list[str] = []
    enc = Int8ImageEncoder(encoder, home, notes.append, warns.append, auto=True)
    assert enc.precision == encoder.precision == "fp32"  # undecided until the first batch
    vectors, tokens = enc.encode_pixels_with_tokens(pixels)
    entry = read_speeds(export.folder)[speed_key("fp32")]
    assert entry["int8_sha256"] == made["meta"]["sha256"] and entry["photos"] == GOOD and entry["tokens"] is True
    assert entry["int8_img_s"] > 0 and entry["torch_img_s"] > 0
    wins = entry["int8_img_s"] >= MIN_GAIN * entry["torch_img_s"]
    assert warns == [] and len(notes) == 1 and "measured once per model" in notes[0], notes
    assert enc.precision == ("int8" if wins else "fp32")
    expect = made["vectors"] if wins else encoder.encode_pixels_with_tokens(pixels)[0]
    np.testing.assert_array_equal(vectors, expect)

    def never(*_: object, **__: object) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(int8_auto, "measure", never)
    opener = onnx_quant.open_session
    for int8_s, torch_s, precision in ((30.0, 10.0, "int8"), (10.0, 10.0, "fp32"), (10.5, 10.0, "fp32")):
        _speed(export.folder, "fp32", int8_s, torch_s)  # the record decides; under MIN_GAIN is no gain
        # a tower recorded slower is not even opened
        monkeypatch.setattr(onnx_quant, "open_session", opener if precision == "int8" else never)
        notes.clear()
        again = Int8ImageEncoder(encoder, home, notes.append, warns.append, auto=True)
        got, _ = again.encode_pixels_with_tokens(pixels)
        assert again.precision == precision and notes == [] and warns == [], (int8_s, torch_s, notes)
        ref = made["vectors"] if precision == "int8" else encoder.encode_pixels_with_tokens(pixels)[0]
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(again.encode_pixels(pixels), ref)  # decided once for the run


def test_auto_is_silent_where_int8_cannot_be_had(quant_env: tuple[Path, Path], encoder, pixels: np.ndarray,  # noqa: ANN001, F811
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too few photos to check a new tower: torch, nothing said, nothing recorded. A refused tower: torch, one
    progress line, no warning."""
    from retrieval.model import onnx_quant
    from retrieval.model.int8_auto import SPEED_FILE
    from retrieval.model.int8_encoder import Int8ImageEncoder
    from retrieval.model.onnx_quant import INT8_META, MIN_CHECK_PHOTOS, model_export

    home = fresh_copy(quant_env, tmp_path, monkeypatch, int8=False)
    notes: list[str] = []
    warns: list[str] = []
    enc = Int8ImageEncoder(encoder, home, notes.append, warns.append, auto=True)
    few = pixels[:MIN_CHECK_PHOTOS - 1]
    np.testing.assert_array_equal(enc.encode_pixels(few), encoder.encode_pixels(few))
    export = model_export(home, encoder.fingerprint)
    assert export is not None and not (export.folder / INT8_META).exists()
    assert not (export.folder / SPEED_FILE).exists() and notes == warns == [] and enc.precision == "fp32"
    monkeypatch.setattr(onnx_quant, "MIN_MEAN_COSINE", 1.01)  # no graph reaches it
    enc = Int8ImageEncoder(encoder, home, notes.append, warns.append, auto=True)
    np.testing.assert_array_equal(enc.encode_pixels(pixels), encoder.encode_pixels(pixels))
    assert warns == [] and enc.precision == "fp32", warns
    assert [n for n in notes if "int8 refused" in n and "indexing at fp32 instead" in n], notes


def _index(home: Path, folder: Path, checkpoint: Path, *flags: str, env: dict[str, str]) -> tuple[str, str]:
    """`crossmodal index` with -X importtime: (stderr without the import lines, the import lines)."""
    r = run_cli("index", str(folder), "--model", TEST_MODEL, "--pretrained", str(checkpoint), "--workers", "0",
                *flags, home=home, env=env, python_flags=("-X", "importtime"))
    lines = r.stderr.splitlines()
    assert r.returncode == 0, r.stderr[-3000:]
    return ("\n".join(ln for ln in lines if not ln.startswith("import time:")),
            "\n".join(ln for ln in lines if ln.startswith("import time:")))


def _imported(imports: str, module: str) -> bool:
    return any(ln.rsplit("|", 1)[-1].strip() == module for ln in imports.splitlines())


@pytest.mark.slow
@pytest.mark.subprocess
def test_new_home_indexes_in_int8_without_torch(made: dict[str, Any], quant_env: tuple[Path, Path],  # noqa: F811
                                                checkpoint: Path, photos, built_index: Path,  # noqa: ANN001
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose tower measured faster here: a new home (and a later run in it) never imports torch, records
    int8, and every photo finds itself as in the fp32 index; a measurement saying torch is faster, or
    CROSSMODAL_INT8=off, index on torch."""
    from retrieval.model.onnx_quant import model_export
    from retrieval.model.spec import resolve_precision
    from retrieval.query.open import open_index
    from retrieval.store import Store

    base = fresh_copy(quant_env, tmp_path, monkeypatch)
    export = model_export(base, made["enc"].fingerprint)
    assert export is not None
    torch_precision = resolve_precision("auto", "cpu", "index")  # what this run's CPU flags make auto pick
    _speed(export.folder, torch_precision, 30.0, 10.0)
    env = {CACHE_ENV: os.environ[CACHE_ENV], INT8_ENV: "auto"}
    home = tmp_path / "new-home"
    said, imports = _index(home, photos["root"], checkpoint, env=env)
    assert not _imported(imports, "torch") and _imported(imports, "onnxruntime"), said
    assert "(int8)" in said and "warning" not in said and "making" not in said, said
    info = run_cli("info", "--json", home=home, env=env)
    assert info.returncode == 0 and json.loads(info.stdout)["image_precision"] == "int8", info.stdout
    table = run_cli("info", home=home, env={**env, "COLUMNS": "400"})  # one line per row
    assert "auto: uses it here (30.0 vs 10.0 img/s" in table.stdout, table.stdout
    with Store.open(home) as int8, Store.open(built_index) as fp32:
        assert int8.count("image") == GOOD
        by_path = {v.path: k for k, v in fp32.items(fp32.vectors("image")[0]).items()}
        ids, vecs = int8.vectors("image")
        items = int8.items(ids)
        ref = np.stack([fp32.vector("image", by_path[items[int(i)].path]) for i in ids])
        assert _cos(vecs, ref).mean() >= 0.99
    s = open_index(home, device="cpu")
    try:
        for name in sorted(k for k in photos if k.startswith("img")):
            hit = s.search_images(s.embed_query(image=photos[name].read_bytes()).vector, 1)[0].item.path
            assert hit == str(photos[name]), name
    finally:
        s.store.close()
    (photos["root"].parent / "later").mkdir(exist_ok=True)
    later = photos["root"].parent / "later"
    for i, src in enumerate(sorted(photos["root"].glob("img*"))[:3]):  # a later run in the same home
        (later / f"copy{i}{src.suffix}").write_bytes(src.read_bytes() + b"\0" * (i + 1))
    said, imports = _index(home, later, checkpoint, env=env)
    assert not _imported(imports, "torch") and "warning" not in said, said

    bad = run_cli("index", str(photos["root"]), home=tmp_path / "bad-setting", env={**env, INT8_ENV: "maybe"})
    assert bad.returncode == 2 and bad.stderr.strip() == ("crossmodal: error: CROSSMODAL_INT8 must be 'auto' or "
                                                          "'off', not 'maybe'"), bad.stderr
    assert not (tmp_path / "bad-setting").exists()  # refused before the home is made

    _speed(export.folder, torch_precision, 10.0, 30.0)  # torch measured faster
    for name, extra in (("slower", {}), ("off", {INT8_ENV: "off"})):
        if name == "off":
            _speed(export.folder, torch_precision, 30.0, 10.0)
        other = tmp_path / f"home-{name}"
        said, imports = _index(other, photos["root"], checkpoint, env={**env, **extra})
        assert _imported(imports, "torch") and f"({torch_precision})" in said and "warning" not in said, said
        info = run_cli("info", "--json", home=other, env=env)
        assert json.loads(info.stdout)["image_precision"] == torch_precision, (name, info.stdout)


def test_a_read_only_cache_still_decides_the_run(made: dict[str, Any], quant_env: tuple[Path, Path], encoder,  # noqa: ANN001, F811
                                                 pixels: np.ndarray, tmp_path: Path,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed cannot be recorded (a read-only shared cache): one warning, and the run follows what it
    measured."""
    import errno

    from retrieval.model import int8_auto
    from retrieval.model.int8_encoder import Int8ImageEncoder

    home = fresh_copy(quant_env, tmp_path, monkeypatch)

    def read_only(*_: object, **__: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(int8_auto, "record_speed", read_only)
    monkeypatch.setattr(int8_auto, "measure", lambda *_a, **_k: {"int8_img_s": 30.0, "torch_img_s": 10.0})
    notes: list[str] = []
    warns: list[str] = []
    enc = Int8ImageEncoder(encoder, home, notes.append, warns.append, auto=True)
    vectors, _ = enc.encode_pixels_with_tokens(pixels)
    assert len(warns) == 1 and "cannot record the int8 tower's speed" in warns[0], warns
    assert enc.precision == "int8"
    np.testing.assert_array_equal(vectors, made["vectors"])
