"""Catalog (SQLAlchemy) + vectors (FAISS) behind one facade with a single commit point."""

from .store import MODALITIES, ImageFilter, ImageRecord, ItemView, Store, TextRecord

__all__ = ["MODALITIES", "ImageFilter", "ImageRecord", "ItemView", "Store", "TextRecord"]
