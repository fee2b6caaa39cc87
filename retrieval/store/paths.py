"""File paths as the catalog stores them: every name, UTF-8 or not, as valid text that maps back to its bytes.

POSIX file names are bytes. Python hands the ones that are not valid UTF-8 (Latin-1 `caf\\xe9.jpg` from an old
camera, Shift-JIS from a zip archive or a Windows share) to us as `str` with lone surrogates
(surrogateescape), which neither Python's sqlite3 nor PostgreSQL's `text` accepts. The catalog therefore
stores a *catalog path*: the name itself, except that each undecodable byte is written `\\xHH` and a backslash
that is really in the name is written doubled (`\\\\`), as Python writes bytes (`b'caf\\xe9.jpg'`).

Why this escaping and not a BLOB/bytea column beside a display text: a display text is lossy (`caf\\xe9` and
`caf\\xe8` both show as `caf\ufffd`), so the UNIQUE key, the diff and the prefix filter would all have to move to
the bytes column, changing every read's SQL on both backends; whereas the escaping
- is reversible and cannot collide: decoding reads `\\\\` as one backslash and `\\xHH` as one byte, so a real
  UTF-8 name that looks like an escape (a file literally named `caf\\xe9.jpg`) is stored `caf\\\\xe9.jpg`, apart
  from the Latin-1 one (`caf\\xe9.jpg`); the column's UNIQUE constraint keeps meaning "one row per file";
- keeps one text key in the one column every read already uses (scan diff, move detection, `remove`,
  `--under`), the same on SQLite and PostgreSQL, with no change to the reader interface or its SQL;
- maps each character (or undecodable byte) on its own and never touches `/`, so a folder's catalog path
  plus `/` is a prefix of the catalog paths of everything under it: the prefix filter stays a prefix filter;
- stores names without a backslash and valid UTF-8 (nearly all) unchanged, so existing catalogs keep their
  rows; schema 3's migration doubles the backslashes of the few names that have one.

Everything the Store takes or returns as a path is a catalog path (ImageFilter.under too): the indexer
converts with `to_catalog`, whoever opens a file converts back with `from_catalog`, and what people see
(tables, JSON, the page) is `display_path`, with U+FFFD where a byte is not UTF-8. Standard library only
(query processes import it).
"""

from __future__ import annotations

import base64
import os
import re

_ESCAPED = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def to_catalog(path: str | os.PathLike[str]) -> str:
    """The catalog path of a file system path (a `str` as os.walk / os.fsdecode give it, surrogates and all)."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return text.replace("\\", "\\\\")
    out = []
    for ch in os.fsencode(text).decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append("\\\\" if ch == "\\" else ch)
    return "".join(out)


def catalog_bytes(text: str) -> bytes:
    """The exact file name bytes a catalog path stands for."""
    if "\\" not in text:
        return text.encode("utf-8")
    out = bytearray()
    pos = 0
    for m in _ESCAPED.finditer(text):
        out += text[pos:m.start()].encode("utf-8")
        token = m.group(1)
        out += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


def from_catalog(text: str) -> str:
    """The path to open for a catalog path: the original bytes, as os functions take them (surrogateescape)."""
    if "\\" not in text:
        return text
    return os.fsdecode(catalog_bytes(text))


def is_exact(text: str) -> bool:
    """Whether the name is valid UTF-8, so `display_path` shows it exactly."""
    if "\\" not in text:
        return True
    try:
        catalog_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def display_path(text: str) -> str:
    """A catalog path for people: valid UTF-8 as is, each undecodable byte as U+FFFD (never a surrogate)."""
    if "\\" not in text:
        return text
    return catalog_bytes(text).decode("utf-8", "replace")


def path_json(text: str) -> dict[str, str]:
    """JSON fields of a catalog path: `path` to show (a string, U+FFFD for undecodable bytes), and for a name
    that is not valid UTF-8 only, `path_bytes`: the exact name as base64, so a script can open the file."""
    out = {"path": display_path(text)}
    if not is_exact(text):
        out["path_bytes"] = base64.b64encode(catalog_bytes(text)).decode("ascii")
    return out
