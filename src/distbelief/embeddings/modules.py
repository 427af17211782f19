"""Embedding modules whose rows live on the shards: ``ShardedEmbedding`` and
``ShardedEmbeddingBag`` stand in for ``nn.Embedding`` and ``nn.EmbeddingBag`` and hold no weight.

A forward pass asks its row source for the rows of its input's distinct ids (one ``[u, D]`` leaf
tensor) and each id's index among them, and computes the lookup on those rows, so the backward
pass leaves in the leaf's ``grad`` each distinct id's gradient with its repeats already summed:
exactly what a push sends. ``swap_embeddings`` puts them in place of a model's tables (all
checked first, so a refusal changes nothing). A deep copy of a model (an evaluation copy, say)
shares its tables' row source: the rows stay on the shards, one set of them. A table attached
to a source cannot be pickled: its rows are not in it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from distbelief.sharding.layout import uncompiled_name


class RowSource(Protocol):
    """Where a sharded module gets its rows (``ShardedEmbeddings``)."""

    def lookup(self, table: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows ``[u, D]`` of distinct ids, a tensor the backward pass fills; each of ``ids``'
        index among them, shaped as ``ids``)."""
        ...


def check_ids(table: str, ids: torch.Tensor) -> None:
    """Refuse ids that are not integers (a float id would be truncated to another row), or
    that are not on the CPU, where the rows are served (a GPU's ids failed deep in the wire).

    Raises:
        TypeError: ``ids`` is not an int64 or int32 tensor; the message names ``table``.
        ValueError: ``ids`` is on another device than the CPU.
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"table {table!r}: ids must be integers, got {got}")
    if ids.device.type != "cpu":
        raise ValueError(
            f"table {table!r}: ids must be on the CPU, where sharded tables serve their rows, "
            f"got {ids.device}"
        )


class _ShardedTable(nn.Module):
    def __init__(self, table: str, num_embeddings: int, embedding_dim: int) -> None:
        if not isinstance(table, str) or not table:
            raise TypeError(f"table: must be a non-empty str naming the table, got {table!r}")
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"table {table}: {name} must be an integer >= 1, got {value!r}")
        super().__init__()
        self.table = table
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.source: RowSource | None = None

    def _rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of the unique ids, each id's index among them)."""
        if self.source is None:
            raise RuntimeError(f"table {self.table} is not attached to a ShardedEmbeddings")
        check_ids(self.table, ids)
        return self.source.lookup(self.table, ids.long())

    def extra_repr(self) -> str:
        return f"{self.table!r}, {self.num_embeddings}, {self.embedding_dim}"

    def __deepcopy__(self, memo: dict[int, Any]) -> _ShardedTable:
        # The rows live on the shards, behind one source: the copy reads and trains the same.
        if self.source is not None:
            memo[id(self.source)] = self.source
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__dict__, memo))
        return clone

    def __getstate__(self) -> dict[str, Any]:
        if self.source is not None:
            raise TypeError(
                f"cannot pickle table {self.table!r}: its rows live on the shards, not in it; "
                "save the model's state_dict() (the shards checkpoint the rows)"
            )
        return self.__dict__


class ShardedEmbedding(_ShardedTable):
    """``nn.Embedding`` with its rows on the shards: ``forward(ids)`` -> ``[*ids.shape, D]``.
    Ids may be any int64 (hashed ids included): the shards hold only rows that exist."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows, inverse = self._rows(input)
        return F.embedding(inverse, rows)


class ShardedEmbeddingBag(_ShardedTable):
    """``nn.EmbeddingBag`` with its rows on the shards: the same ``forward(input, offsets,
    per_sample_weights)`` and modes (sum, mean, max)."""

    def __init__(
        self,
        table: str,
        num_embeddings: int,
        embedding_dim: int,
        mode: str = "mean",
        include_last_offset: bool = False,
    ) -> None:
        super().__init__(table, num_embeddings, embedding_dim)
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"table {table}: mode must be sum, mean or max, got {mode!r}")
        if not isinstance(include_last_offset, bool):
            raise TypeError(
                f"table {table}: include_last_offset must be True or False, "
                f"got {include_last_offset!r}"
            )
        self.mode = mode
        self.include_last_offset = include_last_offset

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows, inverse = self._rows(input)
        fixed_bags = input.dim() == 2 and input.shape[1] > 0 and offsets is None
        if fixed_bags and per_sample_weights is None and self.mode != "max":
            # Bags of equal size: a gather and a sum, whose backward is one index_add into the
            # rows' gradient (embedding_bag's dense backward sorts the ids first: measured
            # 20-35% slower for bags of one id).
            # The width is named, not -1: an empty batch of bags ([0, L]) has no size to infer.
            gathered = rows.index_select(0, inverse.reshape(-1)).view(*inverse.shape, rows.shape[1])
            if inverse.shape[1] == 1:
                return gathered.squeeze(1)
            return gathered.sum(1) if self.mode == "sum" else gathered.mean(1)
        return F.embedding_bag(
            inverse,
            rows,
            offsets,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            include_last_offset=self.include_last_offset,
        )


def _unsupported(module: nn.Module) -> str | None:
    if getattr(module, "padding_idx", None) is not None:
        return "padding_idx"
    if getattr(module, "max_norm", None) is not None:
        return "max_norm"
    if getattr(module, "scale_grad_by_freq", False):
        return "scale_grad_by_freq"
    # The shards train every row they serve: a frozen table would be trained all the same.
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.requires_grad:
        return "a frozen weight (requires_grad=False)"
    # The shards hold float32 rows: a float64 table's lookups would come back float32 and
    # fail in the model's next layer.
    if isinstance(weight, torch.Tensor) and weight.dtype != torch.float32:
        return f"a {weight.dtype} weight (the shards hold float32 rows)"
    return None


def _sharded_like(name: str, module: nn.Module) -> _ShardedTable:
    unsupported = _unsupported(module)
    if unsupported is not None:
        raise ValueError(f"table {name}: {unsupported} is not supported on sharded tables")
    # The table is named as the model itself names the module: a compiled model's wrapper adds
    # to its path (_orig_mod.), and a plain replica must look up the same rows.
    table = uncompiled_name(name)
    if isinstance(module, nn.EmbeddingBag):
        return ShardedEmbeddingBag(
            table,
            module.num_embeddings,
            module.embedding_dim,
            mode=module.mode,
            include_last_offset=module.include_last_offset,
        )
    return ShardedEmbedding(table, module.num_embeddings, module.embedding_dim)


def sharded_tables(model: nn.Module, names: list[str] | None = None) -> dict[str, _ShardedTable]:
    """The sharded modules that would stand in for ``model``'s ``nn.Embedding`` and
    ``nn.EmbeddingBag`` modules (all of them, or those at the module paths ``names``), without
    changing ``model``: every table is checked before any is swapped. A module already sharded
    is kept.

    Returns:
        The sharded modules by table name (the module's path in ``model``).

    Raises:
        ValueError: a name is not an embedding module of ``model``, ``model`` is itself an
            ``nn.Embedding`` or ``nn.EmbeddingBag`` (it has no parent to be swapped in), or a
            table uses a feature sharded tables do not have (padding_idx, max_norm,
            scale_grad_by_freq, a frozen weight, a weight of another dtype than float32).
    """
    modules = dict(model.named_modules())
    if names is None:
        chosen = [
            name
            for name, module in modules.items()
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag, _ShardedTable))
        ]
    else:
        # A compiled model's module is found by its path in the model too (``items``, as the
        # table is named, for the wrapper's ``_orig_mod.items``).
        own_paths = {uncompiled_name(path): path for path in modules}
        chosen = [name if name in modules else own_paths.get(name, name) for name in names]
        for name, path in zip(names, chosen, strict=True):
            module = modules.get(path)
            if not isinstance(module, (nn.Embedding, nn.EmbeddingBag, _ShardedTable)):
                found = type(module).__name__ if module is not None else "nothing"
                raise ValueError(
                    f"table {name!r}: the model has {found} there, not an nn.Embedding or "
                    "nn.EmbeddingBag"
                )
    tables: dict[str, _ShardedTable] = {}
    for name in chosen:
        module = modules[name]
        if not name and not isinstance(module, _ShardedTable):
            # A table is swapped into its parent module; the model itself has none.
            raise ValueError(
                f"the model is itself an {type(module).__name__}, which cannot be swapped for a "
                "sharded one in place: give a module that holds it (nn.Sequential(table), say)"
            )
        tables[name] = module if isinstance(module, _ShardedTable) else _sharded_like(name, module)
    return tables


def table_widths(modules: Mapping[str, _ShardedTable]) -> dict[str, int]:
    """Each table's row width, by the name its modules look their rows up under: a module
    built by hand names its own table, which need not be its path in the model, and modules
    that name one table share its rows.

    Raises:
        ValueError: two modules name one table with different widths.
    """
    widths: dict[str, int] = {}
    owners: dict[str, str] = {}
    for path, module in modules.items():
        width = widths.setdefault(module.table, module.embedding_dim)
        owners.setdefault(module.table, path)
        if width != module.embedding_dim:
            raise ValueError(
                f"table {module.table!r}: the modules at {owners[module.table]!r} and "
                f"{path!r} share it with rows of {width} and {module.embedding_dim} values"
            )
    return widths


def table_sizes(modules: Mapping[str, _ShardedTable]) -> dict[str, int]:
    """Each table's number of rows (``num_embeddings``; the largest of modules sharing it),
    by the name its modules look their rows up under."""
    sizes: dict[str, int] = {}
    for module in modules.values():
        sizes[module.table] = max(sizes.get(module.table, 0), module.num_embeddings)
    return sizes


def put_tables(model: nn.Module, tables: Mapping[str, nn.Module]) -> None:
    """Puts each of ``tables`` into ``model`` at its module path (``sharded_tables``' names)."""
    modules = dict(model.named_modules())
    for name, module in tables.items():
        if not name:
            continue  # the model itself, a sharded table already: made its own child, it recursed
        parent_name, _, attribute = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attribute, module)


def swap_embeddings(model: nn.Module, names: list[str] | None = None) -> dict[str, _ShardedTable]:
    """Replaces ``model``'s ``nn.Embedding`` and ``nn.EmbeddingBag`` modules (all of them, or
    those at the module paths ``names``) with sharded ones, in place, all or none: a refused
    table leaves the model as it was. A module already sharded is kept. Their weights are
    dropped: the rows are the shards' (build huge tables on the meta device so they are never
    allocated).

    Returns:
        The sharded modules by table name (the module's path in ``model``).

    Raises:
        ValueError: as ``sharded_tables``, before any module is replaced.
    """
    tables = sharded_tables(model, names)
    put_tables(model, tables)
    return tables
