"""Turns folders and caption files into index entries (scan, decode in workers, embed, store)."""
