"""Training and evaluation (torch): the torch twin of the reranker's scorer, reranker training, Recall@K."""
