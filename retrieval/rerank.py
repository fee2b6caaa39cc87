"""Co-attention reranking of the dense top-k: image patch tokens against text word tokens, both directions.

    CoAttention(Q1,K1,V1,Q2,K2,V2) = [ softmax(Q1 K2^T / sqrt(d_k)) V2 , softmax(Q2 K1^T / sqrt(d_k)) V1 ]
    MultiHead(Q,K,V) = Concat(head_1..head_h) W_O,   head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

Text tokens attend to image tokens and image tokens attend to text tokens. Each direction's agreement is
the mean, over the attending tokens (padding masked), of the cosine between a token and what it attended
to; the co-attention score is the mean of the two directions, and the final score fuses it with the dense
cosine: s = s_dense + lambda * s_coatt. The candidate set never changes, only its order.

By default the scorer has no parameters (identity W^Q, W^K, W^V, W_O; the heads split the dimension;
lambda = 1). `indexer/train_reranker.py` learns W's and lambda with the encoder frozen and saves them as a
small safetensors file, which an index records (`crossmodal set-reranker FILE`).

Queries score with the numpy twin (retrieval/coattention.py) and take token features from whichever encoder
answers the query (ONNX Runtime or torch), so a reranked query on an ONNX export imports no torch; the torch
module here is for training and `eval`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .coattention import DEFAULT_HEADS, DEFAULT_LAMBDA, PARAMS, NumpyCoAttention
from .errors import ModelMismatch, UserError
from .search import Hit, Searcher
from .store import ImageFilter, Store
from .tokens import check_model
from .weights import file_sha256

DEFAULT_RERANK_K = 32
FORMAT = "crossmodal-coattention-v1"
META_KEY = "reranker"


def _torch():
    import torch

    return torch


def _make_scorer_class():
    torch = _torch()
    nn = torch.nn

    class CoAttentionScorer(nn.Module):
        """Multi-head co-attention agreement between token sets; see the module docstring for the formula.

        Projections act on the right (x @ W), W (d, d). `identity=True` skips them (the parameter-free
        default); training or loading a file turns it off.
        """

        def __init__(self, dim: int, heads: int = DEFAULT_HEADS, lam: float = DEFAULT_LAMBDA) -> None:
            super().__init__()
            if dim % heads:
                raise ValueError(f"{heads} heads do not split dimension {dim}")
            self.dim, self.heads = dim, heads
            for name in PARAMS:
                self.register_parameter(name, nn.Parameter(torch.eye(dim)))
            self.lam = nn.Parameter(torch.tensor(float(lam)))
            self.identity = True

        def _proj(self, x: Any, name: str) -> Any:
            return x if self.identity else x @ getattr(self, name)

        def _heads(self, x: Any) -> Any:
            """(B, L, d) -> (B, h, L, d_k), contiguous (one copy, reused for keys and values)."""
            b, n, _ = x.shape
            return x.reshape(b, n, self.heads, self.dim // self.heads).transpose(1, 2).contiguous()

        def _attend(self, q: Any, k: Any, v: Any, key_mask: Any) -> Any:
            """MultiHead(q, k, v) before W_O: (B, Lq, d). Batch dims broadcast (1 query vs B candidates)."""
            qh = self._heads(q)
            kh = self._heads(k)
            vh = kh if v is k else self._heads(v)
            logits = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(self.dim // self.heads))
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            out = torch.softmax(logits, dim=-1) @ vh  # (B, h, Lq, d_k)
            b, _, lq, _ = out.shape
            return out.transpose(1, 2).reshape(b, lq, self.dim)

        @staticmethod
        def _agreement(x: Any, attended: Any, mask: Any) -> Any:
            """Mean over x's valid tokens of cos(x_i, attended_i); x may broadcast against attended."""
            dot = torch.linalg.vecdot(x, attended)
            norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(attended, dim=-1)
            cos = dot / norms.clamp_min(1e-8)
            m = mask.to(cos.dtype)
            return (cos * m).sum(-1) / m.sum(-1).clamp_min(1.0)

        def directions(self, text: Any, text_mask: Any, image: Any, image_mask: Any) -> tuple[Any, Any]:
            """(text->image agreement, image->text agreement), each (B,), for B text/image pairs.

            text (B, Lt, d), text_mask (B, Lt) bool, image (B, Li, d), image_mask (B, Li) bool; a leading
            dimension of 1 on either side broadcasts (one query against many candidates).
            """
            t_att = self._attend(self._proj(text, "w_q_text"), self._proj(image, "w_k_image"),
                                 image if self.identity else self._proj(image, "w_v_image"), image_mask)
            i_att = self._attend(self._proj(image, "w_q_image"), self._proj(text, "w_k_text"),
                                 text if self.identity else self._proj(text, "w_v_text"), text_mask)
            t_att, i_att = self._proj(t_att, "w_o_text"), self._proj(i_att, "w_o_image")
            b = max(text.shape[0], image.shape[0])
            s_t = self._agreement(text, t_att, text_mask).expand(b)
            s_i = self._agreement(image, i_att, image_mask).expand(b)
            return s_t, s_i

        def coattention(self, text: Any, text_mask: Any, image: Any, image_mask: Any) -> Any:
            s_t, s_i = self.directions(text, text_mask, image, image_mask)
            return 0.5 * (s_t + s_i)

        def forward(self, dense: Any, text: Any, text_mask: Any, image: Any, image_mask: Any) -> Any:
            """s = s_dense + lambda * s_coatt, (B,)."""
            return dense + self.lam * self.coattention(text, text_mask, image, image_mask)

    return CoAttentionScorer


_SCORER_CLASS = None


def CoAttentionScorer(dim: int, heads: int = DEFAULT_HEADS, lam: float = DEFAULT_LAMBDA):  # noqa: N802
    """Build the scorer (a torch module; torch is imported on first use only)."""
    global _SCORER_CLASS
    if _SCORER_CLASS is None:
        _SCORER_CLASS = _make_scorer_class()
    return _SCORER_CLASS(dim, heads, lam)


# ---- parameter files ------------------------------------------------------------------------------
def save_params(scorer: Any, path: str | Path, model: str = "", weights: str = "") -> None:
    """Write learned W's and lambda as safetensors, with the model they were trained for in the metadata."""
    from safetensors.torch import save_file

    tensors = {n: getattr(scorer, n).detach().float().cpu().contiguous() for n in PARAMS}
    tensors["lam"] = scorer.lam.detach().float().cpu().reshape(1)
    meta = {"format": FORMAT, "dim": str(scorer.dim), "heads": str(scorer.heads), "model": model,
            "weights": weights}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def read_params_meta(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise UserError(f"{path} is not a reranker file ({str(e).splitlines()[0][:120]})") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a crossmodal reranker file (format {meta.get('format')!r})")
    return meta


def _checked_meta(path: str | Path, dim: int | None, weights: str | None) -> tuple[int, int]:
    """(dim, heads) of a reranker file; refuses a file made for another model (dim or weights)."""
    meta = read_params_meta(path)
    fdim, heads = int(meta["dim"]), int(meta["heads"])
    if dim is not None and fdim != dim:
        raise ModelMismatch(f"reranker {path} was trained for {fdim}-d embeddings, this model has {dim}")
    if weights and meta.get("weights") and meta["weights"] != weights:
        raise ModelMismatch(f"reranker {path} was trained on {meta.get('model')} / {meta['weights']}, "
                            f"not on this index's model ({weights})")
    return fdim, heads


def load_scorer(path: str | Path, dim: int | None = None, weights: str | None = None) -> NumpyCoAttention:
    """The query-time (numpy) scorer with the file's parameters; same refusals as load_params."""
    from safetensors.numpy import load_file

    fdim, heads = _checked_meta(path, dim, weights)
    tensors = load_file(str(path))
    return NumpyCoAttention(fdim, heads, float(tensors["lam"].reshape(-1)[0]), {n: tensors[n] for n in PARAMS})


def load_params(path: str | Path, dim: int | None = None, weights: str | None = None) -> Any:
    """A (torch) scorer with the file's parameters; refuses a file made for another model (dim or weights)."""
    from safetensors.torch import load_file

    fdim, heads = _checked_meta(path, dim, weights)
    tensors = load_file(str(path))
    scorer = CoAttentionScorer(fdim, heads)
    torch = _torch()
    with torch.no_grad():
        for n in PARAMS:
            getattr(scorer, n).copy_(tensors[n])
        scorer.lam.copy_(tensors["lam"][0])
    scorer.identity = False
    return scorer.eval()


def record_reranker(store: Store, path: str | Path | None) -> dict[str, str] | None:
    """Record a reranker file (absolute path + sha256) in the index's meta table; None clears it."""
    if path is None:
        store.set_meta(META_KEY, "")
        return None
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise UserError(f"no such reranker file: {p}")
    meta = read_params_meta(p)
    fp = store.fingerprint
    if fp is not None:
        if int(meta["dim"]) != fp.dim:
            raise ModelMismatch(f"reranker {p} was trained for {meta['dim']}-d embeddings, this index has {fp.dim}")
        if meta.get("weights") and meta["weights"] != fp.weights:
            raise ModelMismatch(f"reranker {p} was trained on {meta.get('model')} / {meta['weights']}, "
                                f"not on this index's model ({fp.describe()})")
    info = {"path": str(p), "sha256": file_sha256(str(p))}
    store.set_meta(META_KEY, json.dumps(info, sort_keys=True))
    return info


def recorded_reranker(store: Store) -> dict[str, str] | None:
    raw = store.get_meta(META_KEY)
    return json.loads(raw) if raw else None


# ---- query time -----------------------------------------------------------------------------------
@dataclass
class RerankStats:
    """How the last rerank went: candidates, token-cache hits, items encoded on demand, items unavailable."""

    candidates: int = 0
    cached: int = 0
    recomputed: int = 0
    unavailable: int = 0


def pad(tokens: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(n_i, d) arrays -> (B, max n, d) float32 and a (B, max n) mask."""
    length = max(1, max(len(t) for t in tokens))
    out = np.zeros((len(tokens), length, tokens[0].shape[-1]), np.float32)
    mask = np.zeros((len(tokens), length), bool)
    for i, t in enumerate(tokens):
        out[i, :len(t)] = t
        mask[i, :len(t)] = True
    return out, mask


class Reranker:
    """Reorders a searcher's dense top-k with co-attention over token features (like CrossEncoder.rank).

    Candidate tokens come from the index's token cache (written by `index` and `add-texts`); an entry that
    is missing (an index built before the cache existed, the built-in vocabulary) is computed once from the
    image's thumbnail (else its file) or the caption text, and added to the cache.
    """

    def __init__(self, searcher: Searcher, scorer: Any, images: Any | None = None, texts: Any | None = None,
                 token_encoder: Any = None) -> None:
        self.searcher = searcher
        self.encoder = token_encoder or searcher.encoder  # an Encoder or OnnxEncoder: it has token features
        self.scorer = scorer
        self.images = images
        self.texts = texts
        self.stats = RerankStats()
        self._query: tuple[str, np.ndarray] | None = None

    @classmethod
    def open(cls, searcher: Searcher) -> Reranker:
        """The index's recorded reranker (or the parameter-free one); TokensUnsupported for non-ViT models."""
        from .token_cache import TokenCache

        store = searcher.store
        encoder = searcher.encoder
        if hasattr(encoder, "check_tokens"):  # the ONNX encoder: its export has token outputs, or says why not
            encoder.check_tokens()
        elif hasattr(encoder, "encode_text_tokens"):
            check_model(getattr(encoder, "model", None))
        else:  # an encoder without token features: they come from the model on torch
            encoder = _torch_encoder(store)
            check_model(encoder.model)
        fp = searcher.encoder.fingerprint
        rec = recorded_reranker(store)
        if rec:
            path = rec["path"]
            if not Path(path).is_file():
                raise UserError(f"the reranker this index records is gone from {path}; "
                                f"`crossmodal set-reranker FILE` (or --no-rerank)")
            if file_sha256(path) != rec["sha256"]:
                raise UserError(f"the reranker file {path} changed since it was recorded; "
                                f"record it again with `crossmodal set-reranker {path}`")
            scorer = load_scorer(path, dim=fp.dim, weights=fp.weights)
        else:
            scorer = NumpyCoAttention(fp.dim)
        return cls(searcher, scorer, TokenCache.open(store.home, fp, "image"),
                   TokenCache.open(store.home, fp, "text"), encoder)

    # query ----------------------------------------------------------------------------------------
    def query_vector(self, text: str | None = None, image: bytes | None = None, weight: float = 0.5,
                     negatives: Sequence[str] = (), image_raw: bool = False) -> np.ndarray:
        """Searcher.query_vector, but one text pass also keeps the query's tokens for `rerank_images`."""
        from .search import combine

        text = text if text is not None and text.strip() else None
        if text is None or self.encoder is not self.searcher.encoder:
            return self.searcher.query_vector(text=text, image=image, weight=weight, negatives=negatives,
                                              image_raw=image_raw)
        negatives = [n for n in negatives if n.strip()]
        emb, toks = self.encoder.encode_texts_with_tokens([text] + negatives)
        self._query = (text, toks[0])
        img = self.encoder.encode_image_bytes(image, raw=image_raw) if image is not None else None
        return combine(emb[0], img, weight, list(emb[1:]))

    def _query_tokens(self, text: str) -> np.ndarray:
        if self._query is not None and self._query[0] == text:
            return self._query[1]
        return self.encoder.encode_texts_with_tokens([text])[1][0]

    # candidates -----------------------------------------------------------------------------------
    def image_tokens(self, hits: Sequence[Hit]) -> np.ndarray | None:
        """(n, L, d) float32 tokens of image hits; None when some image can be had no way (keep dense order)."""
        from .errors import CrossmodalError
        from .imageio import decode_for_model, is_raw_name, read_bytes
        from .thumbnails import thumb_path

        shas = [getattr(h.item, "sha256", None) for h in hits]
        if any(s is None for s in shas) and hasattr(self.searcher.store, "image_shas"):
            known = self.searcher.store.image_shas([h.id for h in hits])
            shas = [known.get(h.id) for h in hits]
        found = self.images.get(shas) if self.images is not None else [None] * len(hits)
        missing = [i for i, f in enumerate(found) if f is None]
        self.stats.cached += len(hits) - len(missing)
        if missing:
            pixels = []
            for i in missing:
                thumb = thumb_path(self.searcher.store.home, shas[i]) if shas[i] else None
                path = str(thumb) if thumb is not None and thumb.is_file() else hits[i].item.path or ""
                try:
                    pixels.append(decode_for_model(read_bytes(Path(path)), self.encoder.preprocess,
                                                   raw=is_raw_name(path)).pixels)
                except CrossmodalError:
                    self.stats.unavailable += 1
            if self.stats.unavailable:
                return None
            _, toks = self.encoder.encode_pixels_with_tokens(np.stack(pixels))
            for j, i in enumerate(missing):
                found[i] = toks[j]
            self.stats.recomputed += len(missing)
            if self.images is not None:
                self.images.put([shas[i] for i in missing if shas[i]], [toks[j] for j, i in enumerate(missing)
                                                                        if shas[i]])
        return np.stack(found).astype(np.float32, copy=False)

    def text_tokens(self, hits: Sequence[Hit]) -> list[np.ndarray]:
        """Valid tokens (n_i, d) of caption hits, from the cache or encoded now (and cached)."""
        from .token_cache import text_key

        keys = [text_key(h.item.text or "") for h in hits]
        found = self.texts.get(keys) if self.texts is not None else [None] * len(hits)
        missing = [i for i, f in enumerate(found) if f is None]
        self.stats.cached += len(hits) - len(missing)
        if missing:
            _, toks = self.encoder.encode_texts_with_tokens([hits[i].item.text or "" for i in missing])
            for j, i in enumerate(missing):
                found[i] = toks[j]
            self.stats.recomputed += len(missing)
            if self.texts is not None:
                self.texts.put([keys[i] for i in missing], toks)
        return found  # type: ignore[return-value]

    # scoring --------------------------------------------------------------------------------------
    def _score(self, dense: np.ndarray, text: np.ndarray, text_mask: np.ndarray, image: np.ndarray,
               image_mask: np.ndarray) -> np.ndarray:
        """Fused scores (B,); the numpy scorer (queries) needs no torch, a torch module (tests, eval) does."""
        if getattr(self.scorer, "is_numpy", False):
            return self.scorer(dense, text, text_mask, image, image_mask)
        torch = _torch()
        with torch.inference_mode():
            s = self.scorer(torch.from_numpy(dense), torch.from_numpy(text), torch.from_numpy(text_mask),
                            torch.from_numpy(image), torch.from_numpy(image_mask))
        return s.float().numpy()

    @staticmethod
    def _reorder(hits: Sequence[Hit], scores: np.ndarray) -> list[Hit]:
        order = np.argsort(-scores, kind="stable")  # ties keep the dense order
        return [replace(hits[i], rank=r, score=float(scores[i]), dense_rank=hits[i].rank,
                        dense_score=hits[i].score) for r, i in enumerate(order, 1)]

    def rerank_images(self, text: str, hits: Sequence[Hit]) -> list[Hit]:
        """Text query -> its image hits reordered (same set)."""
        self.stats = RerankStats(candidates=len(hits))
        if not hits:
            return []
        image = self.image_tokens(hits)
        if image is None:
            return mark_dense(hits)
        text_tokens, text_mask = pad([self._query_tokens(text)])
        dense = np.asarray([h.score for h in hits], np.float32)
        return self._reorder(hits, self._score(dense, text_tokens, text_mask, image,
                                               np.ones(image.shape[:2], bool)))

    def rerank_texts(self, image_tokens: np.ndarray, hits: Sequence[Hit]) -> list[Hit]:
        """Image query (its tokens, (L, d)) -> its caption hits reordered (same set)."""
        self.stats = RerankStats(candidates=len(hits))
        if not hits:
            return []
        text_tokens, text_mask = pad(self.text_tokens(hits))
        image = np.asarray(image_tokens, np.float32)[None]
        dense = np.asarray([h.score for h in hits], np.float32)
        return self._reorder(hits, self._score(dense, text_tokens, text_mask, image,
                                               np.ones(image.shape[:2], bool)))


def _torch_encoder(store: Store) -> Any:
    """The index's recorded model on torch (CPU), for token features the query encoder cannot give."""
    from .encoder import load_encoder
    from .session import check_encoder, requested_spec

    spec, sha = requested_spec(store, None, None, "cpu", "auto")
    encoder = load_encoder(spec, checkpoint_sha=sha)
    check_encoder(store, encoder)
    return encoder


def mark_dense(hits: Sequence[Hit]) -> list[Hit]:
    """Hits as they come from the dense search, with dense_rank/dense_score filled in."""
    return [replace(h, dense_rank=h.rank, dense_score=h.score) for h in hits]


def _merge(reranked: list[Hit], rest: Sequence[Hit], k: int) -> list[Hit]:
    return (reranked + mark_dense(rest))[:k]


def search_images(searcher: Searcher, reranker: Reranker | None, q: np.ndarray, text: str | None, k: int,
                  rerank_k: int = DEFAULT_RERANK_K, flt: ImageFilter | None = None) -> list[Hit]:
    """Dense top-max(k, rerank_k); its first rerank_k reordered by co-attention with `text`; then the top k.

    Without a reranker or a text (image-only queries have no words to attend to) it is the dense top-k.
    Compute `q` with `reranker.query_vector` to share the query's text pass.
    """
    if reranker is None or not (text and text.strip()) or rerank_k <= 1:
        return mark_dense(searcher.search_images(q, k, flt))
    hits = searcher.search_images(q, max(k, rerank_k), flt)
    return _merge(reranker.rerank_images(text, hits[:rerank_k]), hits[rerank_k:], k)


def caption(searcher: Searcher, reranker: Reranker | None, image: bytes, k: int, corpus: str | None = None,
            rerank_k: int = DEFAULT_RERANK_K, raw: bool = False) -> list[Hit]:
    """Image -> captions; with a reranker, one vision pass gives the query vector and its tokens."""
    if reranker is None or rerank_k <= 1:
        return mark_dense(searcher.caption(image, k, corpus, raw=raw))
    from .imageio import decode_for_model
    from .search import unit

    decoded = decode_for_model(image, searcher.encoder.preprocess, raw=raw)
    pooled, tokens = reranker.encoder.encode_pixels_with_tokens(decoded.pixels[None])
    if reranker.encoder is not searcher.encoder:  # the dense vector stays the query encoder's own
        pooled = searcher.encoder.encode_pixels(decoded.pixels[None])
    hits = searcher.search_texts(unit(pooled[0]), max(k, rerank_k), corpus)
    return _merge(reranker.rerank_texts(tokens[0], hits[:rerank_k]), hits[rerank_k:], k)
