"""Co-attention reranking of the dense top-k: the numpy scorer, parameter files, the token-feature cache, and
the Reranker that runs dense-then-rerank."""
