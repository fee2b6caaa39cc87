"""The one interface every encoder offers, whichever runtime answers: torch (TorchEncoder, indexing and
training) or ONNX Runtime (OnnxEncoder, fast queries without torch). Searcher, Reranker, the vocabulary and
the indexer take an `Encoder` and never ask which one they have.

All outputs are float32 numpy arrays; vectors are L2-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from retrieval.media.decode import Preprocess, decode_for_model
from retrieval.model.spec import Fingerprint


def unit_rows(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 (a zero row stays zero)."""
    v = np.asarray(v, dtype=np.float32)
    return np.asarray(v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), np.float32(1e-12)))


@runtime_checkable
class Encoder(Protocol):
    """A loaded dual encoder. `backend` is "torch" or "onnx"; `device`/`precision` say how it computes.

    Both implementations subclass it (inheriting `encode_image_bytes`); callers only rely on the protocol."""

    fingerprint: Fingerprint
    dim: int
    preprocess: Preprocess
    device: str
    precision: str
    backend: str

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) unit vectors."""
        ...

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Unit vectors of a batch of prepared uint8 images (B, H, W, 3)."""
        ...

    def encode_image_bytes(self, data: bytes, raw: bool = False) -> np.ndarray:
        """The unit vector of one image file's bytes, decoded as indexing decodes; DecodeError for bytes that
        are no image. (Implementations that subclass Encoder inherit this.)"""
        decoded = decode_for_model(data, self.preprocess, raw=raw)
        return np.asarray(self.encode_pixels(decoded.pixels[None])[0])

    def check_tokens(self) -> None:
        """Raise TokensUnsupported (saying why) unless the token-feature methods below work."""
        ...

    def encode_pixels_with_tokens(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ONE vision pass: (unit vectors (B, d), token features (B, 1+P, d))."""
        ...

    def encode_texts_with_tokens(self, texts: Sequence[str], batch_size: int = 64
                                 ) -> tuple[np.ndarray, list[np.ndarray]]:
        """ONE text pass: (unit vectors (n, d), each text's valid token features (n_i, d))."""
        ...

    def zero_shot_metadata(self) -> tuple[list[str], list[str]]:
        """ImageNet class names and prompt templates ('{}' marks the class) for the built-in vocabulary."""
        ...
