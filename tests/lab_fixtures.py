"""The small scene lab the slow tests share (session scope): 800 generated scenes of 64-96 px, a 48 px CLIP
trained on them for 300 steps (tests/test_train_clip.py checks it learns; tests/test_quality_lab.py measures
the reranker and the relevance cutoff with it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from training.scenes import generate
from training.train_clip import TrainConfig, train

SMALL_CFG: dict[str, Any] = {  # 48 px input, 8 px patches, two thin towers: trains in seconds on 2 cores
    "embed_dim": 64,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 96, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# One thread: tests share the machine with other work, where two OpenMP threads on two cores can run 15x slower.
N_IMAGES = {"train": 640, "val": 80, "test": 80}
RUN = TrainConfig(steps=300, batch=64, lr=2e-3, warmup=30, eval_every=100, seed=0, threads=1)


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train-clip") / "scenes"
    generate(out, sum(N_IMAGES.values()), seed=0, size_range=(64, 96))
    return out


@pytest.fixture(scope="session")
def small_cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("train-clip-cfg") / "small.json"
    path.write_text(json.dumps(SMALL_CFG))
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, scenes: Path, small_cfg: Path) -> tuple[Path, dict[str, Any]]:
    """(output folder, log) of the shared small run."""
    out = tmp_path_factory.mktemp("train-clip-run") / "model"
    events: list[str] = []
    log = train(scenes, out, RUN, small_cfg, on_event=lambda kind, info: events.append(kind))
    assert events.count("eval") == 3 and events[-1] == "done"  # steps 0, 100, 200, then the final one
    return out, log
