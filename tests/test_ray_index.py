"""`index --ray`: Ray Data embeds into shard files the driver merges; the result is a local run's, and a
killed run resumes from its shards. One local Ray instance (2 CPUs, a small object store, loopback) serves
the module's `cluster` tests (module scope: it is torn down before the rest of the suite runs); the CLI runs
in-process so `--ray auto` joins it instead of starting another. The refusals need no Ray."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import index_paths
from retrieval.store import Store
from tests.helpers import TEST_MODEL, cli_in_process, make_photo_folder, run_cli

GOOD = 12  # make_photo_folder's 11 good images and one with URL syntax in its name


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=300 * 1024 ** 2, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _state(home: Path) -> dict[str, object]:
    """Everything a run commits for its images, keyed by path (ids may differ between runs)."""
    from retrieval.rerank.token_cache import TokenCache

    with Store.open(home) as s:
        ids, vecs = s.vectors("image")
        items = s.items(ids.tolist())
        by_id = dict(zip(ids.tolist(), vecs, strict=True))
        rows = {v.path: dataclasses.replace(v, id=0) for v in items.values()}
        vectors = {v.path: by_id[i] for i, v in items.items()}
        files = {p: v[1:] for p, v in s.image_files().items()}
        cache = TokenCache.open(home, s.fingerprint, "image")
        tokens = {v.path: cache.get([v.sha256])[0] for v in items.values()}
        return {"rows": rows, "vectors": vectors, "files": files, "skipped": sorted(s.skipped()),
                "thumbs": sorted(p.name for p in (home / "thumbs").rglob("*.jpg")), "tokens": tokens}


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    for key in ("rows", "files", "skipped", "thumbs"):
        assert a[key] == b[key], key
    va, vb = a["vectors"], b["vectors"]
    assert isinstance(va, dict) and isinstance(vb, dict) and va.keys() == vb.keys()
    for p in va:
        np.testing.assert_allclose(va[p], vb[p], atol=1e-5)
    ta, tb = a["tokens"], b["tokens"]
    assert isinstance(ta, dict) and isinstance(tb, dict)
    for p in ta:
        assert ta[p] is not None and tb[p] is not None
        np.testing.assert_allclose(ta[p], tb[p], atol=1e-3)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    lib = make_photo_folder(tmp_path_factory.mktemp("ray") / "library")
    shutil.copy(lib["img01"], lib["root"] / "odd #1 ?x %20;y.png")  # URL syntax in a name stays a name
    return lib


@pytest.fixture(scope="module")
def local_home(tmp_path_factory: pytest.TempPathFactory, encoder, library) -> Path:  # noqa: ANN001
    from retrieval.model.recorded import record_model

    home = tmp_path_factory.mktemp("local") / "home"
    with Store.open(home, create=True, writable=True) as store:
        record_model(store, encoder)
        r = index_paths(store, encoder, [str(library["root"])], batch_size=4, workers=0)
    assert r.added == GOOD and len(r.skipped) == 3
    return home


def _index_args(library: dict[str, Path], checkpoint: Path, *extra: str) -> list[str]:
    return ["index", str(library["root"]), "--model", TEST_MODEL, "--pretrained", str(checkpoint), "--device",
            "cpu", "--precision", "fp32", "--quiet", "--json", *extra]


@pytest.mark.slow
@pytest.mark.cluster
def test_ray_run_commits_what_a_local_run_does(ray_session, cli_state, tmp_path, library, checkpoint,
                                               local_home) -> None:  # noqa: ANN001
    home = tmp_path / "home"
    res = cli_in_process(*_index_args(library, checkpoint, "--ray", "auto", "--shard-size", "3",
                                      "--batch-size", "2"), home=home)
    assert res.exit_code == 0, res.output
    _same(_state(home), _state(local_home))
    assert not (home / "shards").exists()  # every shard merged and deleted
    again = cli_in_process(*_index_args(library, checkpoint, "--ray", "auto"), home=home)
    assert again.exit_code == 0 and f'"unchanged": {GOOD}' in again.stdout  # an unchanged re-run embeds nothing


@pytest.mark.slow
@pytest.mark.cluster
def test_killed_run_resumes_from_its_shards(ray_session, tmp_path, encoder, checkpoint, library, local_home,
                                            monkeypatch) -> None:  # noqa: ANN001
    from indexer import distributed, shard_merge
    from indexer.distributed import RaySettings
    from indexer.shard_merge import ray_embedder
    from indexer.shards import folder_for, read_shard
    from retrieval.model.recorded import record_model
    from retrieval.model.spec import ModelSpec

    spec = ModelSpec(name=TEST_MODEL, pretrained=str(checkpoint), device="cpu", precision="fp32")
    sha = encoder.fingerprint.weights.split(":", 1)[1]
    settings = RaySettings(shard_size=2, batch_size=2, actors=1)
    home, side = tmp_path / "home", tmp_path / "side"
    side.mkdir()
    real_take = shard_merge._Merger.take
    taken: list[Path] = []

    def dying_take(self, path: Path, fresh: bool) -> int:  # noqa: ANN001
        shutil.copy(path, side / path.name)  # kept, to bring back a shard that was merged
        taken.append(path)
        n = real_take(self, path, fresh)
        if len(taken) == 3:  # the run dies right after merging three shards, once an actor wrote a fourth
            deadline = time.monotonic() + 120
            while not set(path.parent.glob("*.shard.npz")) - set(taken) and time.monotonic() < deadline:
                time.sleep(0.1)
            raise KeyboardInterrupt
        return n

    with Store.open(home, create=True, writable=True) as store:
        record_model(store, encoder)
        monkeypatch.setattr(shard_merge._Merger, "take", dying_take)
        with pytest.raises(KeyboardInterrupt):
            index_paths(store, encoder, [str(library["root"])],
                        embed=ray_embedder(settings, spec, sha, commit_every=2))
        committed = store.count("image")
        folder = folder_for(home, store.fingerprint)
    assert 0 < committed < GOOD
    left = sorted(folder.glob("*.shard.npz"))
    # A merged shard whose deletion the kill cut short, and a worker's half-written shard.
    shutil.copy(side / taken[0].name, folder / taken[0].name)
    (folder / "0123abcd.shard.npz.99999.tmp").write_bytes(b"half a shard")
    with Store.open(home) as store:
        done = set(store.image_files())
    held = {r.path for s in map(read_shard, folder.glob("*.shard.npz")) if s is not None
            for r in [*s.rows, *s.failed] if r.path not in done}
    assert left and held  # the kill left work in shards
    monkeypatch.setattr(shard_merge._Merger, "take", real_take)
    sent: list[int] = []
    real_embed = distributed.embed_files

    def counting(files, *a, **k):  # noqa: ANN001, ANN202
        sent.append(len(files))
        yield from real_embed(files, *a, **k)

    monkeypatch.setattr(distributed, "embed_files", counting)
    with Store.open(home, writable=True) as store:
        r = index_paths(store, encoder, [str(library["root"])],
                        embed=ray_embedder(settings, spec, sha, commit_every=2))
    assert sum(sent) == GOOD + 3 - committed - len(held)  # only what no shard held went to Ray
    assert r.added == GOOD - committed
    _same(_state(home), _state(local_home))
    assert not (home / "shards").exists()


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.subprocess
def test_an_address_joins_the_running_cluster(ray_session, tmp_path, library, checkpoint, local_home) -> None:  # noqa: ANN001
    import ray

    address = ray.get_runtime_context().gcs_address  # the module's instance, as a cluster's head
    home = tmp_path / "home"
    res = run_cli(*_index_args(library, checkpoint, "--ray", address, "--shard-size", "5"), home=home,
                  env={"RAY_AUTH_MODE": "disabled"})
    assert res.returncode == 0, res.stderr
    _same(_state(home), _state(local_home))
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2  # joined, not started or stopped


@pytest.mark.slow
@pytest.mark.cluster
def test_names_that_are_not_utf8_are_indexed_under_ray(ray_session, cli_state, tmp_path, encoder, checkpoint,
                                                       library) -> None:  # noqa: ANN001
    """Ray Data takes text paths only: names that are not valid UTF-8 (a Latin-1 folder, a Shift-JIS file, a
    bad file among them) are embedded by the driver with the actors' code, and the run commits what a local
    run does, beside files Ray embedded."""
    from retrieval.model.recorded import record_model
    from retrieval.store.paths import to_catalog

    root = tmp_path / "lib"
    raw = os.fsencode(root)
    os.makedirs(raw + b"/caf\xe9")
    shutil.copy(library["img01"], os.fsdecode(raw + b"/caf\xe9/inside.png"))
    shutil.copy(library["img02"], os.fsdecode(raw + b"/\x83\x5c\x83\x74\x83\x67.webp"))  # Shift-JIS
    with open(raw + b"/caf\xe9/broken\xff.jpg", "wb") as f:
        f.write(b"not a jpeg")
    shutil.copy(library["img03"], root / "plain.jpeg")  # Ray still embeds the rest
    local = tmp_path / "local"
    with Store.open(local, create=True, writable=True) as store:
        record_model(store, encoder)
        r = index_paths(store, encoder, [str(root)], batch_size=4, workers=0)
    assert r.added == 3 and len(r.skipped) == 1
    home = tmp_path / "home"
    res = cli_in_process("index", str(root), "--model", TEST_MODEL, "--pretrained", str(checkpoint), "--device",
                         "cpu", "--precision", "fp32", "--quiet", "--json", "--ray", "auto", "--shard-size", "2",
                         home=home)
    assert res.exit_code == 0, res.output
    ray_state, local_state = _state(home), _state(local)
    _same(ray_state, local_state)
    rows, skipped = ray_state["rows"], ray_state["skipped"]
    assert isinstance(rows, dict) and isinstance(skipped, list)
    assert sorted(rows) == sorted(to_catalog(os.fsdecode(raw + name)) for name in (
        b"/caf\xe9/inside.png", b"/\x83\x5c\x83\x74\x83\x67.webp", b"/plain.jpeg"))
    assert [p for p, _ in skipped] == [to_catalog(os.fsdecode(raw + b"/caf\xe9/broken\xff.jpg"))]
    assert not (home / "shards").exists()


class DyingOnce:
    """Stands in for ShardEmbedder (imported by Ray's workers from this module): the first call in a home
    kills its actor process, as a lost machine would."""

    def __init__(self, **kwargs: object) -> None:
        from indexer.distributed import ShardEmbedder

        self.inner = ShardEmbedder(**kwargs)  # type: ignore[arg-type]
        self.marker = Path(str(kwargs["folder"])).parents[1] / "an-actor-died"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.marker.exists():
            self.marker.write_text("once")
            os._exit(1)
        return self.inner(batch)


@pytest.mark.slow
@pytest.mark.cluster
def test_a_lost_actor_is_restarted_and_its_batch_retried(ray_session, tmp_path, encoder, checkpoint, library,
                                                         local_home, monkeypatch) -> None:  # noqa: ANN001
    from indexer import distributed
    from indexer.distributed import RaySettings
    from indexer.shard_merge import ray_embedder
    from retrieval.model.recorded import record_model
    from retrieval.model.spec import ModelSpec

    monkeypatch.setattr(distributed, "ShardEmbedder", DyingOnce)
    spec = ModelSpec(name=TEST_MODEL, pretrained=str(checkpoint), device="cpu", precision="fp32")
    home = tmp_path / "home"
    with Store.open(home, create=True, writable=True) as store:
        record_model(store, encoder)
        r = index_paths(store, encoder, [str(library["root"])],
                        embed=ray_embedder(RaySettings(shard_size=4, batch_size=2, actors=1), spec,
                                           encoder.fingerprint.weights.split(":", 1)[1]))
    assert (home / "an-actor-died").read_text() == "once" and r.added == GOOD
    _same(_state(home), _state(local_home))


def test_ray_missing_is_one_line(cli_state, tmp_path, library, checkpoint, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    res = cli_in_process(*_index_args(library, checkpoint, "--ray", "auto"), home=tmp_path / "home")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("error: --ray needs Ray Data and pyarrow: pip install "
                                                 "'crossmodal[cluster]'"), res.stderr
    assert not (tmp_path / "home").exists()  # refused before any work


@pytest.mark.parametrize("flag", [["--workers", "2"], ["--gpu-decode"], ["--precision", "int8"]])
def test_local_pipeline_flags_are_refused_with_ray(cli_state, tmp_path, library, checkpoint, flag) -> None:  # noqa: ANN001
    args = [a for a in _index_args(library, checkpoint, "--ray", "auto") if a not in ("--precision", "fp32")]
    res = cli_in_process(*args, *flag, home=tmp_path / "home")
    assert res.exit_code == 2 and "with --ray each actor decodes and embeds" in res.stderr, res.stderr
    assert not (tmp_path / "home").exists()
