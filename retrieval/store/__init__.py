"""Catalog (SQLite: SQLAlchemy to write, stdlib sqlite3 to read) + vectors (FAISS) behind one facade with a
single commit point."""

from .records import CATALOG, MODALITIES, ImageFilter, ImageRecord, ItemView, QueryOptions, TextRecord
from .store import Store

__all__ = ["CATALOG", "MODALITIES", "ImageFilter", "ImageRecord", "ItemView", "QueryOptions", "Store", "TextRecord"]
