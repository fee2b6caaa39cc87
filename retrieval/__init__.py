"""Everything a query needs and the pieces indexing shares: media, model, store, query, rerank.

Never imports indexer, cli, training or webui."""

__version__ = "0.1.0"
