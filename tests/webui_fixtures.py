"""Fixtures shared by the page tests: one seeded checkpoint and one index per test session.

The index is built with the real CLI (`crossmodal index`, `crossmodal add-texts`) over generated
pictures with known folders and dates, so filters can be checked exactly. The random model makes
results meaningless; the tests check mechanics only. Test modules take the fixtures with
`from tests.webui_fixtures import *  # noqa: F403`.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "webui" / "app.py"
MODEL = "ViT-S-32"
K = 4  # results per page in the tests ("Results per page" slider)
OLD = datetime(2019, 3, 1, 12, 0).timestamp()  # file time of the top-level pictures
NEW = datetime(2023, 8, 1, 12, 0).timestamp()  # file time of the pictures in sub/
EXIF_DATE = "2021:06:15 10:30:00"

__all__ = ["webui_checkpoint", "webui_photos", "webui_home", "empty_home", "missing_home"]


def picture(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A distinct random picture: coloured background, a few rectangles and ellipses, some noise."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    w, h = size
    for i in range(5):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        box = (x0, y0, x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2)))
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.rectangle if i % 2 else draw.ellipse)(box, fill=fill)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def jpeg_bytes(seed: int = 1000, size: tuple[int, int] = (120, 90)) -> bytes:
    buf = io.BytesIO()
    picture(seed, size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    """A JPEG cut off after its header: opens, then fails to decode."""
    data = jpeg_bytes(1001, (200, 150))
    return data[: len(data) // 3]


def make_photos(root: Path) -> Path:
    """10 pictures: 6 at the top (2019 file time), 3 in sub/ (2023), 1 JPEG with an EXIF date (2021)."""
    (root / "sub").mkdir(parents=True)
    for i in range(9):
        folder, ext, when = (root, ["jpg", "png"][i % 2], OLD) if i < 6 else (root / "sub", "jpg", NEW)
        p = folder / f"pic{i:02d}.{ext}"
        picture(i, (96 + 8 * i, 72 + 4 * i)).save(p)
        os.utime(p, (when, when))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = EXIF_DATE
    exif[0x010F], exif[0x0110] = "Google", "Pixel 8"
    p = root / "dated.jpg"
    picture(42, (100, 80)).save(p, "JPEG", exif=exif.tobytes())
    os.utime(p, (NEW, NEW))  # the EXIF date must win over the file time
    return root


def run_cli(home: Path, *args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("CROSSMODAL_HOME", None)
    r = subprocess.run([sys.executable, "-m", "indexer.cli", "--home", str(home), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """Build `name` under the session's base temp dir the first time any test module asks for it.

    Each test module star-imports these fixtures, which gives each module its own copy of a session
    fixture; a fixed path plus a done-marker makes the expensive builds happen once per session anyway.
    """
    path = tmp_path_factory.getbasetemp() / name
    done = path.with_name(f"{name}.done")
    if not done.exists():
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
        make(path)
        done.touch()
    return path


def make_checkpoint(path: Path) -> None:
    """Seeded random ViT-S-32 weights (fp16 state dict), loaded back through `--pretrained PATH`."""
    import open_clip
    import torch

    torch.manual_seed(0)
    m = open_clip.create_model(MODEL)
    torch.save({k: v.half() for k, v in m.state_dict().items()}, path)


def make_index(home: Path, photos: Path, checkpoint: Path) -> None:
    """Index `photos` and a 12-line caption corpus with the real CLI."""
    home.mkdir()
    caps = home.parent / "webui-captions.txt"
    caps.write_text("\n".join(f"caption {i}: shapes and colours" for i in range(12)) + "\n")
    run_cli(home, "index", str(photos), "--model", MODEL, "--pretrained", str(checkpoint),
            "--device", "cpu", "--workers", "0", "-q")
    run_cli(home, "add-texts", str(caps), "--corpus", "shapes", "--device", "cpu", "-q")


@pytest.fixture(scope="session")
def webui_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return once(tmp_path_factory, "webui-vits32-seed0.pt", make_checkpoint)


@pytest.fixture(scope="session")
def webui_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return once(tmp_path_factory, "webui-photos", make_photos)


@pytest.fixture(scope="session")
def webui_home(tmp_path_factory: pytest.TempPathFactory, webui_checkpoint: Path, webui_photos: Path) -> Path:
    """The page tests' index (10 images, 12 captions), built once per session."""
    return once(tmp_path_factory, "webui-home", lambda p: make_index(p, webui_photos, webui_checkpoint))


@pytest.fixture
def empty_home(tmp_path: Path) -> Path:
    """A catalog that exists but holds nothing (no model bound yet)."""
    from retrieval.store import Store

    Store.open(tmp_path / "empty", create=True, writable=True).close()
    return tmp_path / "empty"


@pytest.fixture
def missing_home(tmp_path: Path) -> Path:
    return tmp_path / "nothing-here"
