"""Caption corpora from .txt, .csv, .tsv and .jsonl files, deduplicated within each named corpus."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import CorpusError
from retrieval.fsutil import read_bytes
from retrieval.model.protocol import Encoder
from retrieval.query.vocab import BUILTIN_CORPUS
from retrieval.rerank import token_cache
from retrieval.store import Store, TextRecord

FORMATS = (".txt", ".csv", ".tsv", ".jsonl")
_DEFAULT_KEYS = ("caption", "text", "sentence", "alt", "alt_text")
COMMIT_TEXTS = 4096


@dataclass
class TextReport:
    corpus: str
    added: int
    duplicates: int
    rows: int
    seconds: float

    def to_json(self) -> dict:
        return {"corpus": self.corpus, "added": self.added, "duplicates": self.duplicates,
                "rows": self.rows, "seconds": round(self.seconds, 3)}


def _pick(columns: list[str], wanted: str | None, what: str, path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise CorpusError(f"{path}: no {what} '{wanted}' (found: {', '.join(columns) or 'none'})")
        return wanted
    if len(columns) == 1:
        return columns[0]
    for key in _DEFAULT_KEYS:
        if key in columns:
            return key
    flag = "--column" if what == "column" else "--field"
    raise CorpusError(f"{path}: say which {what} holds the captions with {flag} "
                      f"(found: {', '.join(columns)})")


def read_corpus(path: str | Path, column: str | None = None, field: str | None = None
                ) -> list[tuple[int, str]]:
    """(row number, caption) pairs; rows are 1-based line or record numbers; blank captions dropped."""
    path = Path(path).expanduser()
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise CorpusError(f"{path}: unsupported caption file type '{ext or '(none)'}' "
                          f"(use {', '.join(FORMATS)})")
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start})") from e
    rows: list[tuple[int, str]] = []
    if ext == ".txt":
        rows = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)]
    elif ext in (".csv", ".tsv"):
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if ext == ".tsv" else ",")
            key = _pick(list(reader.fieldnames or []), column, "column", path)
            rows = [(i, (rec.get(key) or "").strip()) for i, rec in enumerate(reader, 1)]
        except csv.Error as e:
            raise CorpusError(f"{path}: malformed {ext[1:].upper()} ({e})") from e
    else:
        key = field
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}: line {i} is not valid JSON ({e.msg})") from e
            if isinstance(rec, str):
                rows.append((i, rec.strip()))
                continue
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}: line {i} is neither a JSON object nor a string")
            if key is None:
                key = _pick(list(rec.keys()), None, "field", path)
            value = rec.get(key)
            if value is None and key not in rec:
                raise CorpusError(f"{path}: line {i} has no field '{key}'")
            rows.append((i, str(value if value is not None else "").strip()))
    return [(i, t) for i, t in rows if t]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def add_corpus(store: Store, encoder: Encoder, path: str | Path, corpus: str | None = None,
               column: str | None = None, field: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> TextReport:
    """Embed a caption file into a named corpus (default: the file's stem); re-adding adds only new lines."""
    import time

    started = time.perf_counter()
    path = Path(path).expanduser()
    name = (corpus or path.stem).strip()
    if not name or name == BUILTIN_CORPUS:
        raise CorpusError(f"'{name}' cannot be used as a corpus name")
    rows = read_corpus(path, column, field)
    have = store.text_hashes(name)
    fresh: list[TextRecord] = []
    for row, text in rows:
        h = text_hash(text)
        if h not in have:
            have.add(h)
            fresh.append(TextRecord(corpus=name, row=row, text=text, sha256=h))
    tokens = token_cache.writer_for(store.home, encoder, "text")  # reranker's token cache
    for start in range(0, len(fresh), COMMIT_TEXTS):
        part = fresh[start:start + COMMIT_TEXTS]
        if tokens is not None:  # one text pass gives the vectors and the reranker's tokens
            vectors, toks = encoder.encode_texts_with_tokens([r.text for r in part])
            tokens.add([r.sha256 for r in part], toks)
            tokens.flush()  # durable before the catalog commit of the same captions
        else:
            vectors = encoder.encode_texts([r.text for r in part])
        store.add_texts(part, vectors)
        if progress:
            progress(start + len(part), len(fresh))
    return TextReport(corpus=name, added=len(fresh), duplicates=len(rows) - len(fresh), rows=len(rows),
                      seconds=time.perf_counter() - started)
