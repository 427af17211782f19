"""A DLRM-style click-through-rate model (Naumov et al. 2019, arXiv:1906.00091).

Owns the architecture only: bottom MLP, one embedding bag per table, pairwise dot-product
interaction, top MLP. The embedding bags may be built on the meta device, so that a table too
large for this process is never allocated and can be swapped for a module that fetches rows.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from distbelief.config import MAX_TENSOR_BYTES, max_table_rows


class DLRM(nn.Module):
    """Dense features and one categorical id per table in, one click logit out.

    forward: the bottom MLP maps the dense features to an embedding_dim vector (ReLU after
    every layer, as in DLRM); each table's id selects an embedding_dim vector from
    ``tables[t]``; the dot products of all pairs among these vectors (the strict upper
    triangle of their Gram matrix), concatenated after the bottom output, feed the top MLP,
    whose last Linear gives the logit. Without dense features there is no bottom MLP and the
    top MLP sees the dot products only.

    Each ``tables[t]`` is an ``nn.EmbeddingBag(table_sizes[t], embedding_dim, mode="sum")``
    called with the (B, 1) int64 ids of table t: a replacement module must accept that call
    and return (B, embedding_dim). Ids index the tables as given; the data must keep them
    below the table sizes.

    Init: the embeddings are U(-sqrt(1/n), sqrt(1/n)) for a table of n rows, as DLRM's
    reference code does; the Linear layers keep PyTorch's default. Seed with
    ``torch.manual_seed`` before building.

    Args:
        num_dense: Dense features per sample, >= 0.
        table_sizes: Rows of each embedding table, each >= 1.
        embedding_dim: Width of every embedding and of the bottom MLP's output, >= 1.
        bottom_hidden: Hidden widths of the bottom MLP; its output layer (to embedding_dim) is
            added after them.
        top_hidden: Hidden widths of the top MLP; its output layer (to 1) is added after them.
        embedding_device: Device of the embedding bags only, e.g. "meta" to build them without
            memory; None keeps the default device. The dense layers are always built for real.
        real_tables: Tables (by index) built on the default device whatever
            ``embedding_device`` says (tables left dense while the others live elsewhere).

    Raises:
        ValueError: If a size is out of range (a table past ``max_table_rows``: more bytes
            than torch can size a tensor to), there are fewer than two vectors to interact
            (one table and no dense features), or ``real_tables`` names no table.
    """

    def __init__(
        self,
        num_dense: int,
        table_sizes: Sequence[int],
        *,
        embedding_dim: int = 16,
        bottom_hidden: Sequence[int] = (64,),
        top_hidden: Sequence[int] = (64, 32),
        embedding_device: torch.device | str | None = None,
        real_tables: Sequence[int] = (),
    ) -> None:
        super().__init__()
        _check_args(num_dense, table_sizes, embedding_dim, bottom_hidden, top_hidden)
        table_sizes = tuple(table_sizes)
        _check_real_tables(real_tables, len(table_sizes))
        self.num_dense = num_dense
        self.embedding_dim = embedding_dim
        self.bottom = (
            _mlp(num_dense, (*bottom_hidden, embedding_dim), relu_last=True) if num_dense else None
        )
        self.tables = nn.ModuleList(
            _embedding_bag(size, embedding_dim, None if t in real_tables else embedding_device)
            for t, size in enumerate(table_sizes)
        )
        num_vectors = len(table_sizes) + (1 if num_dense else 0)
        upper_rows, upper_cols = torch.triu_indices(num_vectors, num_vectors, offset=1)
        # Buffers, not attributes, so they follow the model's .to(device).
        self.register_buffer("_pair_rows", upper_rows, persistent=False)
        self.register_buffer("_pair_cols", upper_cols, persistent=False)
        top_in = len(upper_rows) + (embedding_dim if num_dense else 0)
        self.top = _mlp(top_in, (*top_hidden, 1), relu_last=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Maps (B, num_dense) float features and (B, num_tables) int64 ids to (B,) logits.

        Raises:
            ValueError: ``sparse`` is not (B, num_tables) (a column past the tables would be
                ignored, a missing one fail inside the embedding bag), or ``dense`` has
                another batch size.
        """
        num_tables = len(self.tables)
        if sparse.dim() != 2 or sparse.shape[1] != num_tables:
            raise ValueError(
                f"sparse must be (batch, {num_tables}): one id per table, got {tuple(sparse.shape)}"
            )
        if self.bottom is not None and dense.shape[:1] != sparse.shape[:1]:
            raise ValueError(
                f"dense and sparse must have one row per sample, got {tuple(dense.shape)} "
                f"and {tuple(sparse.shape)}"
            )
        vectors = [table(sparse[:, t : t + 1]) for t, table in enumerate(self.tables)]
        features = []
        if self.bottom is not None:
            dense_vector = self.bottom(dense)
            vectors.insert(0, dense_vector)
            features.append(dense_vector)
        stacked = torch.stack(vectors, dim=1)
        gram = torch.bmm(stacked, stacked.transpose(1, 2))
        features.append(gram[:, self._pair_rows, self._pair_cols])
        return self.top(torch.cat(features, dim=1)).squeeze(1)


def _check_real_tables(real_tables: Sequence[int], num_tables: int) -> None:
    """Refuses an index that is no table: it would leave its table where
    ``embedding_device`` puts the others, without a word."""
    for index in real_tables:
        if type(index) is not int or not 0 <= index < num_tables:
            raise ValueError(
                f"real_tables must be table indices in [0, {num_tables}), got {tuple(real_tables)}"
            )


def _is_count(value: object) -> bool:
    """An integer (numpy's too), not a bool or a float: torch would fail on a float size deep
    inside a layer, and take True as 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_types(
    num_dense: object,
    table_sizes: object,
    embedding_dim: object,
    bottom_hidden: object,
    top_hidden: object,
) -> None:
    """Refuses a size that is no int, naming its argument."""
    for name, value in (("num_dense", num_dense), ("embedding_dim", embedding_dim)):
        if not _is_count(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    for name, values in (
        ("table_sizes", table_sizes),
        ("bottom_hidden", bottom_hidden),
        ("top_hidden", top_hidden),
    ):
        if (
            not isinstance(values, Sequence)
            or isinstance(values, str)
            or not all(_is_count(v) for v in values)
        ):
            raise TypeError(f"{name} must be a list or tuple of ints, got {values!r}")


def _check_args(
    num_dense: int,
    table_sizes: tuple[int, ...],
    embedding_dim: int,
    bottom_hidden: Sequence[int],
    top_hidden: Sequence[int],
) -> None:
    _check_types(num_dense, table_sizes, embedding_dim, bottom_hidden, top_hidden)
    if num_dense < 0:
        raise ValueError(f"num_dense must be >= 0, got {num_dense}")
    if any(size < 1 for size in table_sizes):
        raise ValueError(f"table_sizes must all be >= 1, got {table_sizes}")
    if len(table_sizes) + (1 if num_dense else 0) < 2:
        raise ValueError(
            f"DLRM needs two vectors to interact: got {len(table_sizes)} tables and "
            f"num_dense={num_dense}"
        )
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    max_rows = max_table_rows(embedding_dim)
    too_large = [t for t, size in enumerate(table_sizes) if size > max_rows]
    if too_large:
        # torch's own refusal ("Storage size calculation overflowed") names no table.
        t = too_large[0]
        raise ValueError(
            f"table {t} of {table_sizes[t]} rows is too large for embedding_dim "
            f"{embedding_dim}: torch sizes a tensor to at most {MAX_TENSOR_BYTES} bytes, "
            f"{max_rows} rows of that width"
        )
    if any(width < 1 for width in (*bottom_hidden, *top_hidden)):
        raise ValueError(
            f"bottom_hidden and top_hidden must all be >= 1, got {tuple(bottom_hidden)} and "
            f"{tuple(top_hidden)}"
        )


def _mlp(in_features: int, widths: Sequence[int], *, relu_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        layers.append(nn.Linear(in_features, width))
        if relu_last or i < len(widths) - 1:
            layers.append(nn.ReLU())
        in_features = width
    return nn.Sequential(*layers)


def _embedding_bag(
    num_rows: int, embedding_dim: int, device: torch.device | str | None
) -> nn.EmbeddingBag:
    if torch.device(device or "cpu").type == "meta":
        # Given its weight, the bag skips its default draw: on the meta device that goes through
        # torch's reference ops, which import torch._dynamo (about as long as importing torch).
        weight = torch.empty(num_rows, embedding_dim, device=device)
        bag = nn.EmbeddingBag(num_rows, embedding_dim, mode="sum", _weight=weight)
    else:
        bag = nn.EmbeddingBag(num_rows, embedding_dim, mode="sum", device=device)
    bound = math.sqrt(1.0 / num_rows)
    # On the meta device this only records the shape: nothing is allocated or drawn.
    with torch.no_grad():
        bag.weight.uniform_(-bound, bound)
    return bag
