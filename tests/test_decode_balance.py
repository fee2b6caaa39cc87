"""Decode and model in balance: a run times both stages on its first batch and picks its decode processes.

The choice is a pure function of the two measured times (checked here against the cost model), and a
measured run gives the same catalog as one with a fixed worker count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import choose_workers, index_paths
from retrieval.store import Store


@pytest.mark.parametrize(("decode_ms", "model_ms", "cores", "want"), [
    (10, 25, 2, 0),   # decoding is cheap next to the model: in-process, the model keeps both cores
    (25, 25, 2, 0),   # equal: a worker would halve the model's threads for no gain
    (60, 25, 2, 1),   # 12 MP photos: the decoder would hold the model up
    (20, 25, 8, 1),
    (100, 20, 16, 4),
    (5, 5, 1, 0),     # one core: nothing to overlap
])
def test_choose_workers_follows_the_cost_model(decode_ms: float, model_ms: float, cores: int, want: int) -> None:
    assert choose_workers(decode_ms / 1000, model_ms / 1000, cores) == want


def test_a_measured_run_equals_a_fixed_one(tmp_path: Path, encoder, photos: dict[str, Path]) -> None:
    results = {}
    for workers in (None, 0):
        with Store.open(tmp_path / f"home-{workers}", create=True, writable=True) as store:
            store.bind_model(encoder.fingerprint)
            report = index_paths(store, encoder, [str(photos["root"])], batch_size=4, workers=workers)
            ids, vecs = store.vectors("image")
            items = store.items(ids.tolist())
            results[workers] = (report, {items[i].path: v for i, v in zip(ids.tolist(), vecs, strict=True)})
    measured, fixed = results[None][0], results[0][0]
    assert measured.workers is not None and set(measured.stages) == {"decode_ms", "model_ms"}
    assert measured.stages["decode_ms"] > 0 and measured.stages["model_ms"] > 0
    assert "decode_workers" in measured.to_json() and fixed.workers == 0 and not fixed.stages
    assert (measured.added, sorted(measured.skipped)) == (fixed.added, sorted(fixed.skipped))
    a, b = results[None][1], results[0][1]
    assert set(a) == set(b) and all(np.allclose(a[p], b[p], atol=1e-6) for p in a)


def test_decoding_goes_on_while_the_model_loads(tmp_path: Path, encoder, photos: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A model still loading in the background does not stall the run: files keep decoding meanwhile, and
    the result equals a run with the model already loaded."""
    import threading
    import time

    import indexer.decode as decode
    from retrieval.model.recorded import ModelOnDemand

    decoded: list[str] = []
    real = decode.decode_entry
    monkeypatch.setattr(decode, "decode_entry", lambda e, pre, home=None: (decoded.append(e.path),
                                                                           real(e, pre, home))[1])
    loaded = threading.Event()
    seen_at_load: list[int] = []

    def slow_load():  # noqa: ANN202 - the session's TorchEncoder
        deadline = time.monotonic() + 5  # the weights "load" until ten files decoded (or 5 s went by)
        while len(decoded) < 10 and not loaded.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_at_load.append(len(decoded))
        return encoder

    results = {}
    for name, source in (("lazy", ModelOnDemand(slow_load, encoder.preprocess, "cpu")), ("ready", encoder)):
        with Store.open(tmp_path / name, create=True, writable=True) as store:
            store.bind_model(encoder.fingerprint)
            report = index_paths(store, source, [str(photos["root"])], batch_size=2)
            ids, vecs = store.vectors("image")
            items = store.items(ids.tolist())
            results[name] = (report.added, {items[i].path: v for i, v in zip(ids.tolist(), vecs, strict=True)})
    loaded.set()
    assert seen_at_load and seen_at_load[0] >= 10  # more than the first batch of 2 decoded while loading
    (added_a, a), (added_b, b) = results["lazy"], results["ready"]
    assert added_a == added_b and set(a) == set(b) and all(np.allclose(a[p], b[p], atol=1e-6) for p in a)


@pytest.mark.parametrize("right", [True, False])
def test_a_new_index_decodes_with_a_guess_and_again_when_it_was_wrong(tmp_path: Path, encoder,
                                                                      photos: dict[str, Path], right: bool) -> None:
    """A new index guesses its model's preprocessing (from the shared export cache) to decode while the model
    loads; the loaded model's own decides, the model is recorded by `ready` in the embedding thread, and a
    wrong guess costs a second decode of what was decoded, never a different index."""
    import dataclasses
    import threading

    from retrieval.model.recorded import ModelOnDemand, record_model

    guess = encoder.preprocess if right else dataclasses.replace(encoder.preprocess, size=encoder.preprocess.size // 2,
                                                                 resize_mode="squash")
    threads: list[str] = []

    def ready(enc):  # noqa: ANN001, ANN202 - the session's TorchEncoder
        threads.append(threading.current_thread().name)
        record_model(store, enc)
        return enc

    results = {}
    for name in ("guessed", "loaded"):
        with Store.open(tmp_path / name, create=True, writable=True) as store:
            if name == "guessed":
                source = ModelOnDemand(lambda: encoder, guess, "cpu", ready, guessed=True)
                report = index_paths(store, source, [str(photos["root"])], batch_size=2)
                assert source.preprocess == encoder.preprocess and store.fingerprint == encoder.fingerprint
            else:
                record_model(store, encoder)
                report = index_paths(store, encoder, [str(photos["root"])], batch_size=2)
            ids, vecs = store.vectors("image")
            items = store.items(ids.tolist())
            results[name] = (report.added, sorted(report.skipped),
                             {items[i].path: v for i, v in zip(ids.tolist(), vecs, strict=True)})
    assert threads == [threading.main_thread().name]
    (added_a, skipped_a, a), (added_b, skipped_b, b) = results["guessed"], results["loaded"]
    assert (added_a, skipped_a) == (added_b, skipped_b) and set(a) == set(b)
    assert all(np.allclose(a[p], b[p], atol=1e-6) for p in a)


def test_the_guess_comes_from_an_export_of_the_same_model_and_weights(tmp_path: Path, encoder,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from retrieval.model.recorded import predicted_preprocess

    monkeypatch.setenv("CROSSMODAL_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"weights")
    assert predicted_preprocess("ViT-X", str(ckpt)) is None  # nothing exported yet
    folder = tmp_path / "cache" / "onnx" / "0123456789abcdef"
    folder.mkdir(parents=True)
    fp = {"model": "ViT-X", "pretrained": str(ckpt.resolve()), "weights": "sha256:00", "dim": 8}
    (folder / "export.json").write_text(json.dumps({"fingerprint": fp, "preprocess": encoder.preprocess.to_json()}))
    assert predicted_preprocess("ViT-X", str(ckpt)) == encoder.preprocess
    assert predicted_preprocess("ViT-Y", str(ckpt)) is None  # another architecture
    other = tmp_path / "v.pt"
    other.write_bytes(b"other")
    assert predicted_preprocess("ViT-X", str(other)) is None  # other weights
    assert predicted_preprocess("ViT-X", str(tmp_path / "gone.pt")) is None  # a missing file: load says so
    (folder / "export.json").write_text("{not json")
    assert predicted_preprocess("ViT-X", str(ckpt)) is None  # a damaged record is no guess
