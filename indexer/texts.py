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
MAX_CORPUS_BYTES = 512 * 1024 * 1024  # a caption file is read whole; a bigger one is refused, not swapped in
MAX_FIELD_LINES = 64  # a quoted CSV/TSV caption spanning more lines than this is an unclosed quote


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
        text = read_bytes(path, MAX_CORPUS_BYTES, "a caption file").decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start})") from e
    if ext == ".txt":
        rows = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)]
    elif ext in (".csv", ".tsv"):
        rows = _read_table(path, text, "\t" if ext == ".tsv" else ",", column)
    else:
        rows = _read_jsonl(path, text, field)
    return [(i, t) for i, t in rows if t]


def _read_table(path: Path, text: str, delimiter: str, column: str | None) -> list[tuple[int, str]]:
    """CSV/TSV records, refusing a runaway quote (which would swallow the rest of the file as one caption).

    csv's strict mode catches a quote left open to the end of the file or closed mid-field; a record
    spanning more than MAX_FIELD_LINES lines catches the rest: no real caption is that long.
    """
    what = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    at = 0
    rows: list[tuple[int, str]] = []
    while True:
        start = reader.line_num + 1
        where = f"row {len(rows) + 1}" if header is not None else "the header"
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise CorpusError(f"{path}: malformed {what} in {where} (from line {start}): {e}; "
                              "an unclosed quote?") from e
        if reader.line_num - start >= MAX_FIELD_LINES:
            raise CorpusError(f"{path}: {where} runs from line {start} to line {reader.line_num}; "
                              "an unclosed quote?")
        if not rec:  # a blank line
            continue
        if header is None:
            header = rec
            key = _pick(header, column, "column", path)
            at = len(header) - 1 - header[::-1].index(key)  # the last of equal names, as csv.DictReader did
            continue
        rows.append((len(rows) + 1, (rec[at] if at < len(rec) else "").strip()))
    if header is None:
        _pick([], column, "column", path)  # an empty file: say what is missing
    return rows


def _read_jsonl(path: Path, text: str, field: str | None) -> list[tuple[int, str]]:
    """One JSON string, or one object with a text field, per line."""
    rows: list[tuple[int, str]] = []
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
        if isinstance(value, (dict, list, bool)):  # str() would store Python's repr, not a caption
            kind = {dict: "an object", list: "a list", bool: "true/false"}[type(value)]
            raise CorpusError(f"{path}: line {i}: field '{key}' holds {kind}, not text")
        rows.append((i, str(value if value is not None else "").strip()))
    return rows


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
