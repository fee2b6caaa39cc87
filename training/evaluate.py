"""Recall@K on Flickr30k/COCO-style image-caption data, with and without co-attention reranking.

Protocol (clip_benchmark's zero-shot retrieval): every caption is a text->image query whose one positive
is its image; every image is an image->text query that hits at K when ANY of its captions (5 each in
Flickr30k/COCO) is among the top K. Reranking reorders the dense top `rerank_k` of each query; ranks past
it keep their dense order, so Recall@K for K > rerank_k is unchanged by construction.

Data layouts (shared with `indexer/train_reranker.py`):
- Karpathy JSON: a folder with `dataset_*.json` (images[].filename, optional images[].filepath, split,
  sentences[].raw) and the images (under `images/`, `<filepath>/`, `flickr30k-images/` or the folder itself);
  or the JSON file itself.
- CSV: `path,caption` rows (a header row is optional; relative paths are relative to the CSV); several rows
  may share an image. CSV has no splits: a stable 10% of the images (by path hash) is `val`, none is `test`
  unless asked for with `--split all`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import CorpusError, InputNotFound, UserError

KS = (1, 5, 10)


# ---- data -----------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """Images with their captions; `caption_image[j]` is the index of caption j's image."""

    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray
    splits: list[str] = field(default_factory=list)

    def split(self, names: str | Sequence[str]) -> Pairs:
        """The images (and their captions) whose split is one of `names` ('all' keeps everything)."""
        names = {names} if isinstance(names, str) else set(names)
        if "all" in names:
            return self
        keep = [i for i, s in enumerate(self.splits) if s in names]
        remap = {old: new for new, old in enumerate(keep)}
        caps = [j for j, i in enumerate(self.caption_image) if int(i) in remap]
        return Pairs([self.images[i] for i in keep], [self.captions[j] for j in caps],
                     np.asarray([remap[int(self.caption_image[j])] for j in caps], dtype=np.int64),
                     [self.splits[i] for i in keep])


def _resolve(root: Path, filepath: str, filename: str) -> Path:
    for cand in (root / "images" / filepath / filename, root / filepath / filename, root / "images" / filename,
                 root / "flickr30k-images" / filename, root / filename):
        if cand.is_file():
            return cand
    return root / "images" / filepath / filename


def load_pairs(data: str | Path, images_dir: str | Path | None = None) -> Pairs:
    """Read a Karpathy-JSON folder/file or a `path,caption` CSV into Pairs (see the module docstring)."""
    data = Path(data).expanduser()
    if not data.exists():
        raise InputNotFound(f"no such file or folder: {data}")
    if data.is_dir():
        found = sorted(data.glob("dataset_*.json")) or sorted(data.glob("*.json"))
        if not found:
            csvs = sorted(data.glob("*.csv"))
            if len(csvs) == 1:
                return _load_csv(csvs[0], images_dir)
            raise UserError(f"{data} holds no dataset_*.json (Karpathy layout) nor one .csv of path,caption")
        return _load_karpathy(found[0], Path(images_dir) if images_dir else data)
    if data.suffix.lower() == ".json":
        return _load_karpathy(data, Path(images_dir) if images_dir else data.parent)
    if data.suffix.lower() in (".csv", ".tsv"):
        return _load_csv(data, images_dir)
    raise UserError(f"{data}: expected a folder, a Karpathy dataset_*.json or a .csv of path,caption")


def _load_karpathy(path: Path, root: Path) -> Pairs:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = doc["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorpusError(f"{path} is not a Karpathy-style dataset JSON (images[].filename, split, "
                          f"sentences[].raw): {e}") from e
    images, captions, owner, splits = [], [], [], []
    for e in entries:
        sents = [s.get("raw", "").strip() for s in e.get("sentences", []) if s.get("raw", "").strip()]
        if not sents or "filename" not in e:
            continue
        idx = len(images)
        images.append(_resolve(root, e.get("filepath", ""), e["filename"]))
        splits.append(str(e.get("split", "test")))
        captions += sents
        owner += [idx] * len(sents)
    if not images:
        raise CorpusError(f"{path} lists no images with captions")
    return Pairs(images, captions, np.asarray(owner, dtype=np.int64), splits)


def _load_csv(path: Path, images_dir: str | Path | None) -> Pairs:
    root = Path(images_dir) if images_dir else path.parent
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines(), delimiter=delim))
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["path", "caption"], ["image", "caption"],
                                                               ["filename", "caption"]):
        rows = rows[1:]
    index: dict[str, int] = {}
    images, captions, owner = [], [], []
    for n, r in enumerate(rows, 1):
        if len(r) < 2 or not r[0].strip() or not r[1].strip():
            raise CorpusError(f"{path}:{n}: expected path,caption")
        p = Path(r[0].strip()).expanduser()
        p = p if p.is_absolute() else root / p
        key = str(p)
        if key not in index:
            index[key] = len(images)
            images.append(p)
        captions.append(r[1].strip())
        owner.append(index[key])
    if not images:
        raise CorpusError(f"{path} has no rows")
    splits = ["val" if int(hashlib.sha256(str(p).encode()).hexdigest()[:8], 16) % 10 == 0 else "train"
              for p in images]
    return Pairs(images, captions, np.asarray(owner, dtype=np.int64), splits)


# ---- features -------------------------------------------------------------------------------------
@dataclass
class Features:
    """Token and pooled features of a Pairs set (the encoder is frozen, so they are computed once)."""

    image_tokens: np.ndarray  # (Ni, Li, d)
    image_mask: np.ndarray  # (Ni, Li) bool
    image_pooled: np.ndarray  # (Ni, d) unit
    text_tokens: np.ndarray  # (Nt, Lt, d)
    text_mask: np.ndarray  # (Nt, Lt) bool
    text_pooled: np.ndarray  # (Nt, d) unit
    caption_image: np.ndarray  # (Nt,)
    logit_scale: float = 1 / 0.07
    caption_texts: list[str] | None = None  # the captions themselves (training: equal texts are not negatives)

    @property
    def dim(self) -> int:
        return int(self.image_pooled.shape[1])

    def image_captions(self) -> list[np.ndarray]:
        """For each image, the indices of its captions."""
        order = np.argsort(self.caption_image, kind="stable")
        bounds = np.searchsorted(self.caption_image[order], np.arange(len(self.image_pooled) + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(len(self.image_pooled))]


ProgressFn = Callable[[str, int, int], None]


def extract_features(encoder: Any, pairs: Pairs, batch_size: int = 32, dtype: Any = np.float16,
                     progress: ProgressFn | None = None) -> Features:
    """Encode every image (one vision pass: pooled + tokens) and caption (pooled + tokens) of `pairs`."""
    from retrieval.fsutil import read_bytes
    from retrieval.media.decode import decode_for_model, is_raw_name

    img_tok, img_pool = [], []
    for start in range(0, len(pairs.images), batch_size):
        chunk = pairs.images[start:start + batch_size]
        pixels = np.stack([decode_for_model(read_bytes(p), encoder.preprocess, raw=is_raw_name(str(p))).pixels
                           for p in chunk])
        pooled, tokens = encoder.encode_pixels_with_tokens(pixels)
        img_pool.append(pooled)
        img_tok.append(tokens.astype(dtype))
        if progress:
            progress("images", start + len(chunk), len(pairs.images))
    length = int(encoder.tokenizer(pairs.captions).argmax(-1).max()) + 1 if pairs.captions else 1
    d = encoder.dim
    text_tokens = np.zeros((len(pairs.captions), length, d), dtype=dtype)
    text_mask = np.zeros((len(pairs.captions), length), dtype=bool)
    text_pooled = np.zeros((len(pairs.captions), d), dtype=np.float32)
    for start in range(0, len(pairs.captions), 128):
        tt = encoder.encode_text_tokens(pairs.captions[start:start + 128])
        n, lt = tt.mask.shape
        text_tokens[start:start + n, :lt] = tt.tokens
        text_mask[start:start + n, :lt] = tt.mask
        text_pooled[start:start + n] = tt.pooled
        if progress:
            progress("captions", start + n, len(pairs.captions))
    image_tokens = np.concatenate(img_tok) if img_tok else np.zeros((0, 1, d), dtype)
    scale = getattr(getattr(encoder, "model", None), "logit_scale", None)
    return Features(image_tokens=image_tokens, image_mask=np.ones(image_tokens.shape[:2], bool),
                    image_pooled=np.concatenate(img_pool) if img_pool else np.zeros((0, d), np.float32),
                    text_tokens=text_tokens, text_mask=text_mask, text_pooled=text_pooled,
                    caption_image=pairs.caption_image.copy(),
                    logit_scale=float(scale.detach().exp()) if scale is not None else 1 / 0.07,
                    caption_texts=list(pairs.captions))


# ---- ranking --------------------------------------------------------------------------------------
def top_k(sim: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best columns per row, best first (ties: lower index first)."""
    k = min(k, sim.shape[1])
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def recall_at_k(orders: np.ndarray, positives: Sequence[Sequence[int] | np.ndarray],
                ks: Sequence[int] = KS) -> dict[int, float]:
    """Fraction of queries with any positive among their first k candidates, per k."""
    out = {}
    for k in ks:
        hits = [bool(np.isin(orders[q, :k], np.asarray(positives[q])).any()) for q in range(len(orders))]
        out[k] = float(np.mean(hits)) if hits else 0.0
    return out


def rerank_orders(scorer: Any, feats: Features, direction: str, candidates: np.ndarray, sim: np.ndarray,
                  batch_pairs: int = 1024, device: str = "cpu") -> np.ndarray:
    """Reorder each query's candidate row by s_dense + lambda * s_coatt; returns reordered candidates.

    direction 't2i': queries are captions, candidates images; 'i2t' the other way round.
    """
    import torch

    q_n, k = candidates.shape
    out = np.empty_like(candidates)
    per = max(1, batch_pairs // max(k, 1))
    scorer = scorer.to(device)
    with torch.inference_mode():
        for start in range(0, q_n, per):
            qs = np.arange(start, min(q_n, start + per))
            cand = candidates[qs]
            dense = np.take_along_axis(sim[qs], cand, axis=1).reshape(-1)
            if direction == "t2i":
                t_idx, i_idx = np.repeat(qs, k), cand.reshape(-1)
            else:
                t_idx, i_idx = cand.reshape(-1), np.repeat(qs, k)
            s = scorer(torch.from_numpy(dense.astype(np.float32)).to(device),
                       torch.from_numpy(feats.text_tokens[t_idx].astype(np.float32)).to(device),
                       torch.from_numpy(feats.text_mask[t_idx]).to(device),
                       torch.from_numpy(feats.image_tokens[i_idx].astype(np.float32)).to(device),
                       torch.from_numpy(feats.image_mask[i_idx]).to(device))
            s = s.float().cpu().numpy().reshape(len(qs), k)
            out[qs] = np.take_along_axis(cand, np.argsort(-s, axis=1, kind="stable"), axis=1)
    return out


@dataclass
class EvalResult:
    """Recall@K per direction, dense and reranked."""

    images: int
    captions: int
    rerank_k: int
    dense: dict[str, dict[int, float]]
    reranked: dict[str, dict[int, float]] | None

    def to_json(self) -> dict:
        def fmt(d):
            return {direction: {f"R@{k}": round(v * 100, 2) for k, v in r.items()} for direction, r in d.items()}

        return {"images": self.images, "captions": self.captions, "rerank_k": self.rerank_k,
                "dense": fmt(self.dense), "reranked": fmt(self.reranked) if self.reranked else None}


def evaluate_features(feats: Features, scorer: Any | None = None, rerank_k: int = 32, ks: Sequence[int] = KS,
                      device: str = "cpu", only: str | None = None) -> EvalResult:
    """Recall@K both directions (or `only` 't2i'/'i2t'), dense and (with a scorer) reranked."""
    sim = feats.text_pooled @ feats.image_pooled.T  # (Nt, Ni)
    depth = max(max(ks), rerank_k)
    pos_t2i = [[int(i)] for i in feats.caption_image]
    pos_i2t = feats.image_captions()
    dense: dict[str, dict[int, float]] = {}
    reranked: dict[str, dict[int, float]] = {}
    for direction, s, pos in (("t2i", sim, pos_t2i), ("i2t", sim.T, pos_i2t)):
        if only and direction != only:
            continue
        orders = top_k(s, depth)
        dense[direction] = recall_at_k(orders, pos, ks)
        if scorer is not None:
            kk = min(rerank_k, orders.shape[1])
            head = rerank_orders(scorer, feats, direction, orders[:, :kk], s, device=device)
            reranked[direction] = recall_at_k(np.concatenate([head, orders[:, kk:]], axis=1), pos, ks)
    return EvalResult(len(feats.image_pooled), len(feats.text_pooled), rerank_k, dense,
                      reranked if scorer is not None else None)
