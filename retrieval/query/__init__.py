"""Answering queries: open an index with the encoder that answers it (open.py), dense search (search.py), the
built-in caption vocabulary (vocab.py)."""
