"""Embedding tables stored by row on the parameter-server shards: the sharded modules that
stand in for ``nn.Embedding``/``nn.EmbeddingBag``, and ``ShardedEmbeddings``, which serves
their rows and pushes their gradients."""

from distbelief.embeddings.modules import ShardedEmbedding, ShardedEmbeddingBag, swap_embeddings
from distbelief.embeddings.tables import ShardedEmbeddings

__all__ = ["ShardedEmbedding", "ShardedEmbeddingBag", "ShardedEmbeddings", "swap_embeddings"]
