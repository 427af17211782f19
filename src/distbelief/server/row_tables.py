"""A shard process's embedding tables: named row tables, their settings, and the rules every
row request obeys (ids this shard owns, a pushed sequence applied once).

Tables are declared by their clients (name, row width and, when the client gives it, the
number of rows, ``num_embeddings``) and made with the process's settings (row optimizer,
admission, eviction, initialisation), which every table of the job shares. One lock covers
every table: a request touching several tables is applied whole, and a checkpoint snapshot
sees no half-applied push.

Memory per row on a shard: ``(D + S) * 4 + 32`` bytes (values, S floats of optimizer state: 0
for SGD, D for Adagrad, 1 for row-wise Adagrad, 2D for Adam; the id and last step as int64; 16
bytes of id -> slot index), plus the slack of capacity grown by doubling (at most 2x, in
chunks) and, while a checkpoint is written, a copy of the tables.
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass

import torch

from distbelief.config import MAX_ROW_WIDTH
from distbelief.errors import TableSizeMismatchError, TableWidthMismatchError
from distbelief.server.row_optimizers import (
    LazyAdam,
    RowAdagrad,
    RowOptimizer,
    RowSGD,
    RowWiseAdagrad,
)
from distbelief.server.row_table import RowTable
from distbelief.server.sessions import remember
from distbelief.sharding.rows import row_shard
from distbelief.wire.row_ops import MAX_PULL_ROWS_BYTES

ROW_OPTIMIZERS = ("sgd", "adagrad", "rowwise-adagrad", "adam")
"""The row optimizers a shard can run (``--row-optimizer``)."""

_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_MAX_DIM = MAX_ROW_WIDTH


def check_table_name(name: object) -> str:
    """``name`` if it can name a table; ValueError naming it otherwise."""
    if not isinstance(name, str) or not _TABLE_NAME.fullmatch(name):
        raise ValueError(f"table name {name!r} must be 1-128 letters, digits, '_', '.' or '-'")
    return name


@dataclass(frozen=True)
class RowTableSettings:
    """How a shard makes its tables: the row optimizer and its rates, admission, eviction and
    the initial rows. Every shard of a job holds the same settings."""

    optimizer: str = "sgd"
    lr: float = 0.05
    eps: float | None = None
    """None: the optimizer's default (1e-10 for the Adagrads, 1e-8 for Adam)."""
    betas: tuple[float, float] = (0.9, 0.999)
    admit_after: int = 1
    max_rows: int | None = None
    """Rows one shard holds per table at most (least recently pushed evicted first)."""
    ttl_steps: int | None = None
    init_std: float = 0.01
    """New rows are Normal(0, init_std), seeded by id (0: zeros)."""
    seed: int = 0

    def make_optimizer(self) -> RowOptimizer:
        """The row optimizer these settings name.

        Raises:
            ValueError: an unknown optimizer or a rate out of range.
        """
        if self.optimizer == "sgd":
            return RowSGD(self.lr)
        if self.optimizer == "adagrad":
            return RowAdagrad(self.lr, eps=1e-10 if self.eps is None else self.eps)
        if self.optimizer == "rowwise-adagrad":
            return RowWiseAdagrad(self.lr, eps=1e-10 if self.eps is None else self.eps)
        if self.optimizer == "adam":
            return LazyAdam(self.lr, betas=self.betas, eps=1e-8 if self.eps is None else self.eps)
        raise ValueError(
            f"unknown row optimizer {self.optimizer!r}; choose one of {ROW_OPTIMIZERS}"
        )

    def make_table(self, dim: int) -> RowTable:
        return RowTable(
            dim,
            self.make_optimizer(),
            admit_after=self.admit_after,
            max_rows=self.max_rows,
            ttl_steps=self.ttl_steps,
            init="normal" if self.init_std > 0 else "zeros",
            init_std=self.init_std,
            seed=self.seed,
        )

    def to_json(self) -> dict:
        values = asdict(self)
        values["betas"] = list(self.betas)
        return values


@dataclass(frozen=True)
class TableCounters:
    """One table's figures on one shard."""

    rows: int
    admitted: int
    evicted: int
    pending: int
    steps: int
    capacity: int
    dim: int


class ShardTables:
    """The tables of shard ``shard_id`` of ``num_shards``.

    Args:
        shard_id: This shard's id: it holds the rows whose ids ``row_shard`` maps here.
        num_shards: The job's shard count.
        settings: How tables are made.
    """

    def __init__(self, shard_id: int, num_shards: int, settings: RowTableSettings) -> None:
        settings.make_optimizer()  # refuses bad settings before anything is served
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.settings = settings
        self._lock = threading.Lock()
        self._tables: dict[str, RowTable] = {}
        self._sizes: dict[str, int] = {}
        """Each table's size (``num_embeddings``) as first declared; absent: never declared."""
        self._last_seq: dict[str, int] = {}
        self.pushed_steps: dict[str, int] = {}
        """Worker id -> the step of its last push this life applied: a worker restarted after
        a death pushes none of the steps up to it again (not saved: a restored shard knows
        none)."""
        self.num_pulled_rows = 0
        self.num_pushed_rows = 0

    def declare(self, name: object, dim: object, size: object = None) -> RowTable:
        """Table ``name`` with rows of ``dim`` values, made empty when first declared.

        Raises:
            ValueError: a bad name, width or size.
            TableWidthMismatchError: a table of that name with another row width.
            TableSizeMismatchError: a table of that name with another size.
        """
        name = check_table_name(name)
        self.declare_all({name: dim}, None if size is None else {name: size})
        with self._lock:
            return self._tables[name]

    def declare_all(self, declared: dict, sizes: dict | None = None) -> None:
        """Every table of ``declared`` (name -> row width), each made empty when first
        declared: all of them, or (refused) none. ``sizes`` (name -> the table's number of
        rows, for some of them) is remembered per table: a table is refused another size than
        the one it was first declared (or restored) with.

        Raises:
            ValueError: a bad name, width or size.
            TableWidthMismatchError: a table of that name with another row width.
            TableSizeMismatchError: a table of that name with another size.
        """
        checked = [(check_table_name(name), dim) for name, dim in declared.items()]
        for name, dim in checked:
            if type(dim) is not int or not 1 <= dim <= _MAX_DIM:
                raise ValueError(f"table {name}: row width must be an integer in 1..{_MAX_DIM}")
        sizes = sizes or {}
        for name, size in sizes.items():
            if name not in declared:
                raise ValueError(f"table {name!r}: a size without its row width")
            if type(size) is not int or size < 1:
                raise ValueError(f"table {name}: size must be an integer >= 1, got {size!r}")
        with self._lock:
            for name, dim in checked:
                table = self._tables.get(name)
                # No hint in either refusal: only the client knows where its width and size
                # came from (a flag, its data, the user's model).
                if table is not None and table.dim != dim:
                    raise TableWidthMismatchError(
                        f"table {name} holds rows of {table.dim} values on shard "
                        f"{self.shard_id}, not {dim}"
                    )
                held = self._sizes.get(name)
                if held is not None and sizes.get(name, held) != held:
                    raise TableSizeMismatchError(
                        f"table {name} holds {held} rows on shard {self.shard_id}, not "
                        f"{sizes[name]}"
                    )
            for name, dim in checked:
                if name not in self._tables:
                    self._tables[name] = self.settings.make_table(dim)
                if name in sizes:
                    self._sizes.setdefault(name, sizes[name])

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tables)

    def _table(self, name: object) -> RowTable:
        table = self._tables.get(name)  # type: ignore[arg-type]
        if table is None:
            raise ValueError(
                f"shard {self.shard_id} has no table {name!r} "
                "(a client declares it first: RowClient.handshake())"
            )
        return table

    def _check_owned(self, ids: torch.Tensor) -> None:
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError("row ids must be a 1-D int64 tensor")
        if self.num_shards > 1 and ids.numel():
            owners = row_shard(ids, self.num_shards)
            if not bool((owners == self.shard_id).all()):
                raise ValueError(
                    f"ids sent to shard {self.shard_id} that shard "
                    f"{int(owners[owners != self.shard_id][0])} of {self.num_shards} owns"
                )

    def _split_ids(self, counts: list[int], ids: torch.Tensor) -> list[torch.Tensor]:
        self._check_owned(ids)
        if sum(counts) != ids.numel():
            raise ValueError(f"id counts {counts} do not add up to the {ids.numel()} ids sent")
        return list(ids.split(counts))

    def pull(self, names: list[str], counts: list[int], ids: torch.Tensor) -> torch.Tensor:
        """The rows of each table's ids (``counts[t]`` of ``ids`` for ``names[t]``, one table
        after the other), flattened in that order.

        Raises:
            ValueError: an undeclared table, counts that do not match, ids this shard does
                not own, or more than ``MAX_PULL_ROWS_BYTES`` of rows.
        """
        parts = self._split_ids(counts, ids)
        with self._lock:
            tables = [self._table(name) for name in names]
            asked = sum(count * table.dim * 4 for count, table in zip(counts, tables, strict=True))
            if asked > MAX_PULL_ROWS_BYTES:
                raise ValueError(
                    f"a pull of {asked} bytes of rows is past the {MAX_PULL_ROWS_BYTES} one "
                    "request may ask for: split it"
                )
            rows = [table.pull(part).reshape(-1) for table, part in zip(tables, parts, strict=True)]
            self.num_pulled_rows += ids.numel()
        return torch.cat(rows) if rows else torch.zeros(0)

    def push(
        self,
        names: list[str],
        counts: list[int],
        ids: torch.Tensor,
        grads: torch.Tensor,
        *,
        seq: tuple[str, int] | None = None,
        worker: str | None = None,
        step: int | None = None,
    ) -> bool:
        """One step of every table named: each table's unique ids (as in :meth:`pull`) and
        their summed gradient rows, flattened alike in ``grads``.

        ``seq`` (session, number): a push whose number this session already reached is a
        retry of one applied before and is acknowledged without applying it again.
        ``worker`` and ``step``: whose push it is and of which of its steps, remembered in
        ``pushed_steps`` once applied.

        Returns:
            False if it was such a retry.

        Raises:
            ValueError: an undeclared table, ids this shard does not own, repeated ids, or
                sizes that do not match; a refused push changes nothing.
        """
        parts = self._split_ids(counts, ids)
        if grads.dtype != torch.float32 or grads.dim() != 1:
            raise ValueError("gradient rows must be a flat float32 tensor")
        with self._lock:
            if seq is not None:
                session, number = seq
                if number <= self._last_seq.get(session, 0):
                    return False
            tables = [self._table(name) for name in names]
            sizes = [part.numel() * table.dim for part, table in zip(parts, tables, strict=True)]
            if sum(sizes) != grads.numel():
                raise ValueError(
                    f"{grads.numel()} gradient values sent for rows that need {sum(sizes)}"
                )
            # One torch.unique per table: a sort of every table's ids together (by id, then
            # stably by table) measured 2.5x faster for 26 tables of 44 ids, but slower from
            # a few hundred ids a table, and 2-3x slower for one table of 4096.
            for name, part in zip(names, parts, strict=True):
                if torch.unique(part).numel() != part.numel():
                    raise ValueError(f"table {name}: pushed ids must be unique (sum repeats)")
            for table, part, flat in zip(tables, parts, grads.split(sizes), strict=True):
                table.apply_checked(part, flat.view(-1, table.dim))
            self.num_pushed_rows += ids.numel()
            if seq is not None:
                remember(self._last_seq, seq[0], seq[1])
            if worker is not None and step is not None:
                remember(self.pushed_steps, worker, step)
        return True

    def counters(self) -> dict[str, TableCounters]:
        """Each table's figures, by name."""
        with self._lock:
            return {
                name: TableCounters(
                    rows=table.num_rows,
                    admitted=table.num_admitted,
                    evicted=table.num_evicted,
                    pending=table.num_pending,
                    steps=table.num_steps,
                    capacity=table.capacity,
                    dim=table.dim,
                )
                for name, table in sorted(self._tables.items())
            }

    @property
    def total_steps(self) -> int:
        """Pushes applied, over every table (what a checkpoint compares to skip a save)."""
        with self._lock:
            return sum(table.num_steps for table in self._tables.values())

    def snapshot(self) -> dict[str, dict]:
        """Every table's ``state_dict()`` (copies, taken under the lock) with its settings."""
        return self.snapshot_with_steps()[1]

    def snapshot_with_steps(self) -> tuple[int, dict[str, dict]]:
        """(``total_steps``, ``snapshot()``), both of the same moment.

        The copy is taken under the lock, which holds pushes back for a memory copy of the
        tables (about a second per GB); writing the files happens after, while serving goes
        on, and needs as much memory again as the tables hold."""
        with self._lock:
            steps = sum(table.num_steps for table in self._tables.values())
            return steps, {
                name: {**table.state_dict(), "settings": self._table_settings(name)}
                for name, table in self._tables.items()
            }

    def _table_settings(self, name: str) -> dict:
        """What a checkpoint keeps of table ``name``'s settings: the shard's, and its size."""
        size = self._sizes.get(name)
        return {**self.settings.to_json(), **({} if size is None else {"num_embeddings": size})}

    def restore(self, tables: dict[str, dict]) -> None:
        """Replaces the tables with the ``snapshot()`` ``tables`` (before serving anyone).

        Raises:
            ValueError: a table's dim or row optimizer differs from these settings'.
        """
        with self._lock:
            restored, sizes = {}, {}
            for name, state in tables.items():
                table = self.settings.make_table(int(state["dim"]))
                table.load_state_dict(state)
                restored[check_table_name(name)] = table
                size = (state.get("settings") or {}).get("num_embeddings")
                if size is not None:  # a save without it takes the first declared
                    sizes[name] = int(size)
            self._tables, self._sizes = restored, sizes
