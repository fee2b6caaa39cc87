"""What test modules import: constants, a seeded checkpoint maker, picture makers, and the one way to run the CLI.

Fixtures live in tests/fixtures.py (loaded by conftest.py); this module has no fixtures, so importing it never
duplicates one.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "webui" / "app.py"
TEST_MODEL = "ViT-S-32"
GOOD = 11  # make_photo_folder: 10 patterns + the rotated one
BAD = 3  # truncated, empty, text named .jpg

# The page tests' pictures (make_webui_photos)
K = 4  # results per page in the page tests ("Results per page" slider)
OLD = datetime(2019, 3, 1, 12, 0).timestamp()  # file time of the top-level pictures
NEW = datetime(2023, 8, 1, 12, 0).timestamp()  # file time of the pictures in sub/
EXIF_DATE = "2021:06:15 10:30:00"


# ---- the model -------------------------------------------------------------------------------------
def make_checkpoint(path: Path, model: str = TEST_MODEL, seed: int = 0) -> Path:
    """Seeded random open_clip weights as an fp16 state dict (half the bytes, loads into fp32 params)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    m = open_clip.create_model(model)
    torch.save({k: v.half() for k, v in m.state_dict().items()}, path)
    return path


def catalog_url(home: Path) -> str:
    """The SQLAlchemy URL of a home's catalog (its pointer file's, else its catalog.sqlite), for tests that
    change a catalog behind the Store's back."""
    pointer = home / "catalog.url"
    return pointer.read_text().strip() if pointer.is_file() else f"sqlite:///{home / 'catalog.sqlite'}"


# ---- the CLI ---------------------------------------------------------------------------------------
def cli_env(env: Mapping[str, str] | None = None, drop: Sequence[str] = ()) -> dict[str, str]:
    """The environment a CLI subprocess gets: ours without CROSSMODAL_HOME (tests pass --home), plus `env`."""
    full = {k: v for k, v in os.environ.items() if k != "CROSSMODAL_HOME" and k not in drop}
    full.setdefault("HF_HUB_OFFLINE", "1")
    full.update(env or {})
    return full


def cli_command(*args: str, home: Path | None = None, python_flags: Sequence[str] = ()) -> list[str]:
    """The command line of `crossmodal [--home HOME] ARGS` run from the checkout, as users run it."""
    return [sys.executable, *python_flags, "-m", "cli"] + (["--home", str(home)] if home else []) + list(args)


def run_cli(*args: str, home: Path | None = None, env: Mapping[str, str] | None = None, timeout: float = 300,
            python_flags: Sequence[str] = (), drop_env: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a subprocess and wait for it."""
    return subprocess.run(cli_command(*args, home=home, python_flags=python_flags), capture_output=True,
                          text=True, timeout=timeout, env=cli_env(env, drop_env), cwd=ROOT)


def start_cli(*args: str, home: Path | None = None, env: Mapping[str, str] | None = None,
              **popen: object) -> subprocess.Popen[bytes]:
    """Start the CLI in a subprocess of its own session (killable as a group) without waiting."""
    return subprocess.Popen(cli_command(*args, home=home), cwd=ROOT, env=cli_env(env),  # type: ignore[call-overload]
                            start_new_session=True, **popen)


def cli_in_process(*args: str, home: Path | None = None) -> Any:
    """Run the CLI in this process through typer's CliRunner (the console script's code path, minus the
    process): a click Result with exit_code, stdout and stderr. Use with the `cli_state` fixture."""
    from typer.testing import CliRunner

    from cli.app import app

    return CliRunner().invoke(app, [*(["--home", str(home)] if home else []), *args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- pictures --------------------------------------------------------------------------------------
def pattern(seed: int, size: tuple[int, int]) -> Image.Image:
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
    img = pattern(seed, (120, 80))
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
        pattern(i, (96 + 8 * i, 72 + 4 * i)).save(p)
        out[f"img{i:02d}"] = p
    out["rotated"] = exif_rotated_jpeg(root / "rotated.jpg")
    buf = io.BytesIO()
    pattern(7, (64, 64)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    out["truncated"] = root / "truncated.jpg"
    (root / "empty.jpg").write_bytes(b"")
    out["empty"] = root / "empty.jpg"
    (root / "notes.jpg").write_text("this is not an image\n")
    out["text_as_jpg"] = root / "notes.jpg"
    (root / "readme.txt").write_text("ignored: not an image extension\n")
    out["root"] = root
    return out


def picture(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A distinct random picture: coloured background, a few rectangles and ellipses, some noise."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
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


def make_webui_photos(root: Path) -> Path:
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
