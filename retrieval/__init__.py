"""Everything a query needs: model, decode, store and search (never imports indexer or webui)."""

__version__ = "0.1.0"
