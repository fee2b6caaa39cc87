"""Shard files (indexer/shards.py): round trip, content names, and half-written or damaged ones never read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from indexer.shards import Shard, ShardFailure, ShardRow, complete_shards, read_shard, sweep_temp, write_shard
from retrieval.media.photo_meta import PhotoMeta


def _shard(tokens: bool = True) -> Shard:
    rows = [ShardRow("/p/a.jpg", 10, 1.5, "ab" * 32, 40, 30, PhotoMeta(taken_at="2021-06-15T10:30:00",
                                                                        gps_lat=1.25)),
            ShardRow("/p/ü b.png", 11, 2.5, "cd" * 32, 20, 10)]
    vectors = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    toks = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32) if tokens else None
    return Shard(rows, vectors, [ShardFailure("/p/bad.jpg", 3, 4.0, "empty file (0 bytes)")], toks, "bf16")


def test_round_trip_and_content_name(tmp_path: Path) -> None:
    shard = _shard()
    path = write_shard(tmp_path, shard)
    back = read_shard(path)
    assert back is not None
    assert back.rows == shard.rows and back.failed == shard.failed and back.precision == "bf16"
    np.testing.assert_array_equal(back.vectors, shard.vectors)
    assert back.tokens is not None and shard.tokens is not None
    np.testing.assert_array_equal(back.tokens, shard.tokens)
    assert write_shard(tmp_path, _shard()) == path  # same files, same name: a retried task rewrites it
    moved = Shard([shard.rows[0]], shard.vectors[:1], shard.failed)
    assert write_shard(tmp_path, moved) != path
    plain = read_shard(write_shard(tmp_path / "plain", _shard(tokens=False)))
    assert plain is not None and plain.tokens is None


def test_half_written_and_damaged_shards_are_not_read(tmp_path: Path) -> None:
    good = write_shard(tmp_path, _shard())
    (tmp_path / f"{'0' * 32}.shard.npz.1234.tmp").write_bytes(good.read_bytes()[:100])  # a killed writer's
    damaged = tmp_path / f"{'1' * 32}.shard.npz"
    damaged.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    assert list(complete_shards(tmp_path)) == sorted([good, damaged], key=lambda p: (p.stat().st_mtime, p.name))
    assert read_shard(damaged) is None
    assert sweep_temp(tmp_path) == 1 and sorted(tmp_path.iterdir()) == sorted([good, damaged])
