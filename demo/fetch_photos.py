"""Fetch a small demo collection of real photographs: the sample photos inside the scikit-image and
scikit-learn wheels (public domain / CC licensed, see their data READMEs), via `pip download`.

Usage: python demo/fetch_photos.py OUT_DIR
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WANT = {
    "scikit-image": ("skimage/data/", {"astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                                       "motorcycle_left.png", "camera.png", "hubble_deep_field.jpg",
                                       "retina.jpg", "color.png", "immunohistochemistry.png"}),
    "scikit-learn": ("sklearn/datasets/images/", {"china.jpg", "flower.jpg"}),
}


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    if len(list(out.iterdir())) >= 8:
        print(f"demo photos already in {out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for package in WANT:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, package]
            if subprocess.call(cmd) != 0:
                print(f"could not download {package}; put any photos in {out} instead", file=sys.stderr)
                return 1
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    for prefix, files in WANT.values():
                        if name.startswith(prefix) and Path(name).name in files:
                            (out / Path(name).name).write_bytes(z.read(name))
    print(f"{len(list(out.iterdir()))} demo photos in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".demo/photos")))
