"""Catalog (SQLite or PostgreSQL: SQLAlchemy to write, a CatalogReader on sqlite3 or psycopg to read) + vectors
(FAISS) behind one facade with a single commit point."""

from retrieval.store.reader import CatalogReader
from retrieval.store.records import CATALOG, MODALITIES, ImageFilter, ImageRecord, ItemView, QueryOptions, TextRecord
from retrieval.store.store import Store

__all__ = ["CATALOG", "MODALITIES", "CatalogReader", "ImageFilter", "ImageRecord", "ItemView", "QueryOptions", "Store",
           "TextRecord"]
