"""The scene lab's data as a small CLIP trains on it: pixels decoded once, captions tokenized once.

Pixels come from the project's own decode path (`decode_for_model` with the model's Preprocess), so what
the model sees while training is byte for byte what `crossmodal index` feeds it later. Everything is held in
memory (1,600 images of 64 px are 20 MB), which also makes the data order a pure function of the seed.
Relevance follows the scene: `satisfies(scene, spec)` (training/scene_graph.py) for every caption x image pair
of a split; the classic definition (a caption's own image) is kept alongside.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import CorpusError, DecodeError, InputNotFound, UserError
from retrieval.media.decode import Preprocess, decode_for_model
from training.scene_captions import caption_negatives
from training.scene_graph import satisfies
from training.scenes import BINDING, DATASET

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Split:
    """One split's images and captions: pixels (N, S, S, 3) uint8, captions with their image and meaning."""

    name: str
    files: list[str]
    pixels: np.ndarray
    scenes: list[dict[str, Any]]
    captions: list[str]
    specs: list[dict[str, Any]]
    caption_image: np.ndarray  # (Nc,) the index of each caption's own image
    negatives: list[list[str]] = field(default_factory=list)  # per caption, its hard negatives (train only)
    _relevance: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    def image_captions(self) -> list[np.ndarray]:
        """Per image, the indices of its own captions."""
        return [np.flatnonzero(self.caption_image == i) for i in range(len(self.files))]

    def relevance(self) -> np.ndarray:
        """(captions, images) bool: whether the image's scene makes the caption true (computed once)."""
        if self._relevance is None:
            self._relevance = np.asarray([[satisfies(scene, spec) for scene in self.scenes] for spec in self.specs],
                                         dtype=bool).reshape(len(self.specs), len(self.scenes))
        return self._relevance


@dataclass
class SceneData:
    """The train, val and test splits of a generated scene set, the binding probes, and a digest of it all."""

    root: Path
    splits: dict[str, Split]
    binding: list[dict[str, Any]]  # binding_test.json's images[] (test images with their probes)
    digest: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputNotFound(f"cannot read {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise CorpusError(f"{path} is not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise CorpusError(f"{path} holds no images[] list")
    return doc


def _check_entry(e: Any, path: Path) -> None:
    if not isinstance(e, dict) or "filename" not in e or "scene" not in e or not e.get("sentences"):
        raise CorpusError(f"{path}: every image needs filename, scene and sentences (with spec): is it a "
                          f"training.scenes output?")
    for s in e["sentences"]:
        if not isinstance(s, dict) or "raw" not in s or "spec" not in s:
            raise CorpusError(f"{path}: {e['filename']} has a sentence without raw and spec")


def check_folder(root: str | Path) -> Path:
    """The dataset JSON of a scene folder, or the user error saying why there is none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputNotFound(f"no such folder: {root}")
    path = root / DATASET
    if not path.is_file():
        raise UserError(f"{root} holds no {DATASET}; make one with python -m training.scenes {root}")
    return path


def load_scenes(root: str | Path, pre: Preprocess, splits: Sequence[str] = ("train", "val", "test"),
                progress: ProgressFn | None = None) -> SceneData:
    """Read a `python -m training.scenes` output folder and decode its images for the model (see module doc).

    Raises InputNotFound for a missing folder or file, CorpusError for a JSON that is not the generator's,
    DecodeError naming the image that cannot be decoded."""
    path = check_folder(root)
    root = path.parent
    raw_doc = path.read_bytes()
    doc = _read_json(path)
    digest = hashlib.sha256(raw_doc)
    out: dict[str, Split] = {}
    wanted = [e for e in doc["images"] if isinstance(e, dict) and e.get("split") in splits]
    done = 0
    for name in splits:
        entries = [e for e in wanted if e.get("split") == name]
        files, pixels, scenes, caps, specs, owner = [], [], [], [], [], []
        for e in entries:
            _check_entry(e, path)
            file = root / str(e.get("filepath", "images")) / str(e["filename"])
            try:
                data = file.read_bytes()
            except OSError as err:
                raise InputNotFound(f"cannot read {file}: {err.strerror or err}") from err
            digest.update(hashlib.sha256(data).digest())
            try:
                pixels.append(decode_for_model(data, pre).pixels)
            except DecodeError as err:
                raise DecodeError(f"{file}: {err}") from err
            files.append(str(file))
            scenes.append(e["scene"])
            for s in e["sentences"]:
                caps.append(str(s["raw"]))
                specs.append(s["spec"])
                owner.append(len(files) - 1)
            done += 1
            if progress and (done % 200 == 0 or done == len(wanted)):
                progress("decode", done, len(wanted))
        if not files and name == "train":
            raise CorpusError(f"{path} has no train images")
        px = np.stack(pixels) if pixels else np.zeros((0, pre.size, pre.size, 3), np.uint8)
        split = Split(name, files, px, scenes, caps, specs, np.asarray(owner, dtype=np.int64))
        if name == "train":
            split.negatives = [[t for _, t in caption_negatives(scenes[i], spec, cap)]
                               for cap, spec, i in zip(caps, specs, owner, strict=True)]
        out[name] = split
    binding_path = root / BINDING
    binding = _read_json(binding_path)["images"] if binding_path.is_file() else []
    return SceneData(root, out, binding, digest.hexdigest())


def shift_batch(pixels: np.ndarray, rng: np.random.Generator, shift: int) -> np.ndarray:
    """Each image moved by up to `shift` px on each axis, the border repeated into the gap.

    The only augmentation: a flip or a crop would change "left of" or cut an object away (then a count
    or a caption would lie); a few pixels of translation keep every caption true."""
    if shift <= 0:
        return pixels
    n, h, w, _ = pixels.shape
    padded = np.pad(pixels, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    offsets = rng.integers(0, 2 * shift + 1, size=(n, 2))
    return np.stack([padded[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
