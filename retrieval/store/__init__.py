"""Catalog (SQLAlchemy) + vectors (FAISS) behind one facade with a single commit point."""

from .store import MODALITIES, ImageRecord, ItemView, Store, TextRecord

__all__ = ["MODALITIES", "ImageRecord", "ItemView", "Store", "TextRecord"]
