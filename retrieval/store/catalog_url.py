"""Catalog URLs as plain text: the one spelling crossmodal keeps (`postgresql+psycopg://`), and the password
masked wherever a URL is shown (info, error messages).

Why a module of its own: location.py (which picks the reader and the lock) and the PostgreSQL modules it
loads (pg_reader.py, pg_lock.py) all need these, and none of them may import another in a circle. Standard
library only.
"""

from __future__ import annotations

import urllib.parse

from retrieval.errors import UserError

PG_SCHEMES = ("postgresql+psycopg", "postgresql", "postgres")
FORMS = "postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DATABASE, or sqlite (a catalog.sqlite in the home)"


def mask(url: str) -> str:
    """The URL with its password (in the user part or a `password=` parameter) shown as ***."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = "&".join(("password=***" if q.lower().startswith("password=") else q)
                     for q in parts.query.split("&")) if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def parse(text: str) -> str | None:
    """A catalog URL in its one spelling (`postgresql+psycopg://...`); None for SQLite. Anything else, or a
    PostgreSQL URL without a database or with a bad port, is a one-line UserError (password masked)."""
    text = text.strip()
    if text.lower() in ("sqlite", "sqlite:", "sqlite://"):
        return None
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in PG_SCHEMES:
        raise UserError(f"'{mask(text)}' is not a catalog URL (use {FORMS})")
    url = "postgresql+psycopg://" + rest
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise UserError(f"catalog URL {mask(url)}: {e}") from None
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise UserError(f"catalog URL {mask(url)} names no database (use {FORMS})")
    return url
