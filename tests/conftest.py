"""Shared fixtures: a seeded small open_clip model saved to a file, generated photos, built indexes.

No network: the model is random-initialised, saved, and loaded back through `--pretrained PATH`, the same
path users take with their own checkpoints. Results are meaningless semantically; tests check mechanics
against oracles.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TEST_MODEL = "ViT-S-32"
ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_checkpoint(path: Path, model: str = TEST_MODEL, seed: int = 0) -> Path:
    """Seeded random open_clip weights as an fp16 state dict (half the bytes, loads into fp32 params)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    m = open_clip.create_model(model)
    torch.save({k: v.half() for k, v in m.state_dict().items()}, path)
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "vit-s-32-seed0.pt")


@pytest.fixture(scope="session")
def encoder(checkpoint: Path):
    from retrieval.config import ModelSpec
    from retrieval.encoder import load_encoder

    return load_encoder(ModelSpec(name=TEST_MODEL, pretrained=str(checkpoint), device="cpu", precision="fp32"))


def _pattern(seed: int, size: tuple[int, int]) -> Image.Image:
    """A distinct picture per seed: gradients, blocks and noise, so embeddings differ."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    freq = rng.uniform(0.01, 0.2, 3)
    img = np.stack([(base[c] + 120 * np.sin(x * freq[c] + y * freq[(c + 1) % 3])) % 256 for c in range(3)], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def exif_rotated_jpeg(path: Path, seed: int = 99) -> Path:
    """A landscape-stored JPEG whose EXIF says 'rotate 90' (orientation 6): upright it is portrait."""
    img = _pattern(seed, (120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif.get_ifd(0x8769)[0x9003] = "2021:06:15 10:30:00"
    img.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path


def make_photo_folder(root: Path, n: int = 10) -> dict[str, Path]:
    """A folder of good images in several formats plus the bad ones users have."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    out: dict[str, Path] = {}
    for i in range(n):
        ext = ["jpg", "png", "webp", "jpeg"][i % 4]
        p = (root / "sub" if i % 3 == 0 else root) / f"img{i:02d}.{ext}"
        _pattern(i, (96 + 8 * i, 72 + 4 * i)).save(p)
        out[f"img{i:02d}"] = p
    out["rotated"] = exif_rotated_jpeg(root / "rotated.jpg")
    buf = io.BytesIO()
    _pattern(7, (64, 64)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    out["truncated"] = root / "truncated.jpg"
    (root / "empty.jpg").write_bytes(b"")
    out["empty"] = root / "empty.jpg"
    (root / "notes.jpg").write_text("this is not an image\n")
    out["text_as_jpg"] = root / "notes.jpg"
    (root / "readme.txt").write_text("ignored: not an image extension\n")
    out["root"] = root
    return out


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "library")


GOOD = 11  # 10 patterns + the rotated one
BAD = 3  # truncated, empty, text named .jpg


@pytest.fixture(scope="session")
def built_index(tmp_path_factory: pytest.TempPathFactory, encoder, photos) -> Path:
    """An index over `photos` with two caption corpora, built in-process (fast) through the library."""
    from indexer.pipeline import index_paths
    from indexer.texts import add_corpus
    from retrieval.store import Store

    home = tmp_path_factory.mktemp("home")
    caps = tmp_path_factory.mktemp("caps")
    (caps / "a.txt").write_text("\n".join(f"caption number {i} about colours" for i in range(30)))
    (caps / "b.csv").write_text("id,caption\n" + "\n".join(f"{i},a second corpus line {i}" for i in range(20)))
    with Store.open(home, create=True, writable=True) as store:
        store.bind_model(encoder.fingerprint)
        index_paths(store, encoder, [str(photos["root"])], batch_size=4, workers=1)
        add_corpus(store, encoder, caps / "a.txt", corpus="alpha")
        add_corpus(store, encoder, caps / "b.csv", corpus="beta")
    return home


def run_cli(*args: str, home: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI in a subprocess, as users do."""
    full_env = dict(os.environ)
    full_env.pop("CROSSMODAL_HOME", None)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "indexer.cli"] + (["--home", str(home)] if home else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
