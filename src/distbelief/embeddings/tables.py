"""ShardedEmbeddings: the worker's side of a model's embedding tables on the shards.

It swaps the model's ``nn.Embedding``/``nn.EmbeddingBag`` modules for sharded ones and serves
their rows: a forward pass gets the rows of the batch's unique ids (prefetched for every table
in one request per shard, or pulled when a module asks), and ``step()`` pushes each table's
unique ids with their summed gradient rows. The worker holds only the current batch's rows and
a bounded cache (``row_cache_mb``), never a whole table. Dense parameters are left to
``DownpourSGD``; call both optimizers' ``step()`` each step.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import socket
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from distbelief.client.rows import RowClient, coalesce_rows
from distbelief.config import (
    MAX_CACHE_MB,
    MAX_RATE,
    amount_problem,
    amount_rule,
    check_count,
    environment_setting,
    table_names,
)
from distbelief.embeddings.cache import RowCache, cache_rows_for
from distbelief.embeddings.grad_scaling import unscaled_rows
from distbelief.embeddings.modules import (
    check_ids,
    put_tables,
    sharded_tables,
    table_sizes,
    table_widths,
)
from distbelief.errors import ClosedError
from distbelief.optim.closing import flush_then_close
from distbelief.optim.connection_settings import (
    AUTH_KEY_FILE_ENV,
    _key_bytes,
    check_optional_callback,
    check_optional_str,
    check_worker_id,
    hosts_of_ps_named,
    ps_addresses,
    request_timeout_s,
)
from distbelief.wire.security import WireSecurity, read_key_file

_MB = 1 << 20


def _unique_sum(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """(unique ids, their summed rows) of several (ids, rows) parts, each one's ids distinct
    and ascending already (a lookup's, or a sum of them): one part is its own sum."""
    if len(parts) == 1:
        return parts[0]
    return coalesce_rows(torch.cat([ids for ids, _ in parts]), torch.cat([r for _, r in parts]))


def _used_rows(ids: torch.Tensor, grads: torch.Tensor, used: torch.Tensor | None) -> tuple:
    if used is None or bool(used.all()):
        return ids, grads
    return ids[used], grads[used]


def _identity(ids: torch.Tensor) -> tuple:
    """Where a tensor's elements are, in their order: the same for the ``[B]`` column a loop
    prefetches and the ``[B, 1]`` view of it a module looks up."""
    strides = tuple(
        stride for size, stride in zip(ids.shape, ids.stride(), strict=True) if size > 1
    )
    return ids.data_ptr(), ids.numel(), ids.dtype, strides


def _check_names(name: str, value: object) -> None:
    """``ps`` and ``tables`` are names: one str (comma-separated) or a list or tuple of str."""
    is_list = isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)
    if not (isinstance(value, str) or is_list):
        raise TypeError(f"{name} must be a str (comma-separated) or a list of str, got {value!r}")


def _check_amount(name: str, value: object, most: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {amount_rule(zero_ok=True)}, got {value!r}")
    problem = amount_problem(value, zero_ok=True, most=most)
    if problem is not None:
        raise ValueError(f"{name} {problem}, got {value!r}")


def _id_tensor(table: str, ids: object) -> torch.Tensor:
    """A table's ids as an integer tensor: given as one, or as a list or tuple of ints (a float
    id is refused, not truncated)."""
    if isinstance(ids, list | tuple):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TypeError(f"table {table!r}: ids must be integers, got {ids!r}")
        ids = torch.tensor(ids, dtype=torch.int64)
    check_ids(table, ids)
    return ids


def _unique_ids(ids_by_table: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(each table's distinct ids; each table's (identity of the ids given, their inverse, the
    ids))."""
    unique, inverse = {}, {}
    for name, given in ids_by_table.items():
        ids = _id_tensor(name, given)
        unique[name], positions = torch.unique(
            ids.long().reshape(-1), sorted=True, return_inverse=True
        )
        # The ids are kept with their identity: while they live, no other tensor can be at
        # their address (ids changed in place after a prefetch are not supported).
        inverse[name] = (_identity(ids), positions, ids)
    return unique, inverse


class _Fetch:
    """Rows on their way: cached ones found, the rest pulled; ``result()`` joins them (and
    caches what was pulled)."""

    def __init__(self, owner, unique_by_table: dict, found: dict, missing: dict, pulling) -> None:
        self._owner, self._unique = owner, unique_by_table
        self._found, self._missing, self._pulling = found, missing, pulling

    def result(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``(ids, rows)`` per table."""
        pulled = self._pulling.result() if self._pulling is not None else {}
        out = {}
        for name, ids in self._unique.items():
            if name not in self._found:
                out[name] = (ids, pulled[name])
                continue
            rows, hit = self._found[name]
            if name in pulled:
                rows[~hit] = pulled[name]
                self._owner.caches[name].insert(
                    self._missing[name], pulled[name], self._owner.num_steps
                )
            out[name] = (ids, rows)
        return out


def _check_not_served(modules: Mapping[str, nn.Module]) -> None:
    """Refuses tables that another ``ShardedEmbeddings`` still serves: attached to a second
    one, their forward passes and gradients would go to it alone, and the first one's
    ``step()`` would push nothing, without a word. Once that one is closed, they may be
    attached again; so may a deep copy's (it shares the source, but not the modules)."""
    for name, module in modules.items():
        source = getattr(module, "source", None)
        if (
            isinstance(source, ShardedEmbeddings)
            and not source._closed
            and any(module is served for served in source.modules.values())
        ):
            raise ValueError(
                f"table {name!r} is served by another ShardedEmbeddings, still open: close it "
                "first (a table is served by one ShardedEmbeddings at a time)"
            )


class ShardedEmbeddings:
    """A model's embedding tables, stored by row on the shards.

    Args:
        model: Its ``nn.Embedding``/``nn.EmbeddingBag`` modules (all, or those ``tables``
            names) are replaced in place by sharded ones, once every table is checked and
            the shards are reached (a refusal leaves the model as it was); build the model's
            big tables on the meta device so they are never allocated. Build ``DownpourSGD`` on
            ``model.parameters()`` after this, so it takes only the dense parameters.
        ps: Shard addresses, a list or comma-separated, as for ``DownpourSGD`` (default:
            ``DISTBELIEF_PS``).
        tables: Module paths of the tables to shard, a list or comma-separated (default:
            every embedding module).
        lr: The rate the worker applies its own gradients to cached rows with, between pulls
            (a finite number >= 0).
        n_push: Push the tables' accrued gradients every this many steps.
        n_pull: A pulled row serves this many steps from the cache (1: every step pulls).
        row_cache_mb: The cache's budget over all tables, in MiB (0: no cache).
        blocking: Wait for each push to be applied inside ``step()``.
        timeout_s, retry_timeout_s, worker_id, auth_key, security, source_host: as
            ``DownpourSGD``.
        on_push_applied: Called with the step of each push once every shard has applied it
            (``applied_step``), on the thread that calls ``step()``, ``flush()`` or
            ``close()``, as ``DownpourSGD``'s. Default: none.

    Raises:
        TypeError: an argument of the wrong type (``model`` not a module, ``lr`` not a number,
            ``blocking`` not a bool, ``on_push_applied`` not a function).
        ValueError: no embedding module to shard, a bad name or setting, no shard address,
            or a table another ``ShardedEmbeddings`` still serves (close that one first).
        ModelMismatchError: a shard holds a table of that name with another row width or
            number of rows.
        ShardTimeoutError / ShardUnavailableError: a shard did not answer in time.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        ps: str | Sequence[str] | None = None,
        tables: Sequence[str] | None = None,
        lr: float = 0.01,
        n_push: int = 1,
        n_pull: int = 1,
        row_cache_mb: float = 0.0,
        blocking: bool = False,
        timeout_s: float | None = None,
        retry_timeout_s: float = 60.0,
        worker_id: str | None = None,
        auth_key: bytes | str | None = None,
        security: WireSecurity | None = None,
        source_host: str | None = None,
        on_push_applied: Callable[[int], None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_worker_id(worker_id)
        check_optional_str("source_host", source_host)
        check_optional_callback("on_push_applied", on_push_applied)
        if not isinstance(blocking, bool):
            raise TypeError(f"blocking must be True or False, got {blocking!r}")
        for name, value in (("n_push", n_push), ("n_pull", n_pull)):
            check_count(name, value)
        auth_key = _key_bytes(auth_key)
        _check_amount("row_cache_mb", row_cache_mb, MAX_CACHE_MB)
        _check_amount("lr", lr, MAX_RATE)
        timeout_s = request_timeout_s(timeout_s)
        for name, value in (("ps", ps), ("tables", tables)):
            if value is not None:
                _check_names(name, value)
        names = table_names(tables)
        # Every table is checked and the shards reached before the model is changed: a refusal
        # leaves the user's model as it was.
        self.modules = sharded_tables(model, list(names) if names is not None else None)
        if not self.modules:
            raise ValueError("the model has no nn.Embedding or nn.EmbeddingBag to shard")
        _check_not_served(self.modules)
        self.lr, self.n_push, self.n_pull, self.blocking = lr, n_push, n_pull, blocking
        self.dims = table_widths(self.modules)
        key_file = environment_setting(AUTH_KEY_FILE_ENV)
        if auth_key is None and security is None and key_file:
            auth_key = read_key_file(key_file)
        with hosts_of_ps_named(ps):
            self.client = RowClient(
                ps_addresses(ps),
                self.dims,
                sizes=table_sizes(self.modules),
                timeout_s=timeout_s,
                retry_timeout_s=retry_timeout_s,
                security=security or WireSecurity(auth_key=auth_key),
                worker_id=worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}",
                source_host=source_host,
            )
        try:
            self.client.handshake()
        except BaseException:
            self.client.close(wait=False)
            raise
        budget = int(row_cache_mb * _MB) // len(self.dims)
        self.caches = {
            name: RowCache(dim, cache_rows_for(budget, dim), n_pull)
            for name, dim in self.dims.items()
            if cache_rows_for(budget, dim) > 0
        }
        put_tables(model, self.modules)
        for module in self.modules.values():
            module.source = self
        self.num_steps = 0
        self._batch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._next: _Fetch | dict | None = None  # prefetch_next's, for the step after this
        self._pending: _Fetch | dict | None = None  # this step's, fetched by the last one
        # Per table, the identity and inverse indices of the ids prefetched for this step
        # (and the next): a module looking up those very ids needs no search of its own.
        self._inverse: dict[str, tuple] = {}
        self._next_inverse: dict[str, tuple] = {}
        self._touched: dict[str, list[tuple]] = {}  # table -> [(ids, rows leaf, used mask)]
        self._accrued: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._push_futures: list[cf.Future] = []
        self.applied_step = 0
        """The step of the last push every shard has applied (answered)."""
        self._in_flight_step = 0
        """The step of the push whose replies are ``_push_futures``."""
        self._on_push_applied = on_push_applied
        self._closed = False
        self.rows_pulled = 0
        self.rows_pushed = 0

    # -- rows for the forward pass -------------------------------------------------------

    def __enter__(self) -> ShardedEmbeddings:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        """``close()``: ``with ShardedEmbeddings(...) as x:`` closes it however the block ends.
        A block ended by Ctrl-C (``KeyboardInterrupt``) closes at once instead, pushing
        nothing more: its flush would wait up to ``retry_timeout_s`` for a shard that is down,
        and then raise in place of the interrupt."""
        self._close(flush=exc_type is None or not issubclass(exc_type, KeyboardInterrupt))

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise ClosedError("ShardedEmbeddings", action)

    def __getstate__(self) -> dict:
        # A deep copy of a model shares this (embeddings/modules.py); a copy of it alone would
        # have connections of its own to nothing.
        named = ", ".join(repr(name) for name in getattr(self, "dims", {}))
        raise TypeError(
            f"cannot pickle or copy a ShardedEmbeddings (tables {named}): it holds connections "
            "to the shards; save the model's state_dict(), the shards checkpoint the rows"
        )

    def prefetch(self, ids_by_table: Mapping[str, torch.Tensor]) -> None:
        """Fetch the rows of each table's ids (an integer tensor of any shape, or a list of
        ints; repeats allowed) for this step, every table in one request per shard; a forward
        pass then finds them here.

        Raises:
            TypeError: a table's ids are not integers.
            ClosedError: called after ``close()`` (a RuntimeError).
        """
        self._check_open("prefetch")
        self._take_next()
        unique, inverse = _unique_ids(self._by_table(ids_by_table))
        self._inverse.update(inverse)
        self._batch.update(self._start_fetch(unique).result())

    def prefetch_next(self, ids_by_table: Mapping[str, torch.Tensor]) -> None:
        """Start fetching the next step's rows now, so that they travel while this step
        computes; the next step's forward pass waits for them. They are pulled before this
        step's push is applied, so rows the two steps share are one step stale, as Downpour's
        asynchronous pulls are; with ``blocking`` they are pulled after the push instead.

        Raises:
            TypeError: a table's ids are not integers.
            ClosedError: called after ``close()`` (a RuntimeError).
        """
        self._check_open("prefetch_next")
        unique, self._next_inverse = _unique_ids(self._by_table(ids_by_table))
        self._next = unique if self.blocking else self._start_fetch(unique)

    def _by_table(self, ids_by_table: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """``ids_by_table`` keyed by table name: a key may also be a module's path in
        ``modules`` (a compiled model's ``_orig_mod.items``, a hand-built module's path),
        which names its module's table. The ids of keys naming one table (modules that share
        it, each reading its own column) are fetched together."""
        if not isinstance(ids_by_table, Mapping):
            raise TypeError(f"ids_by_table must map table names to ids, got {ids_by_table!r}")
        given: dict[str, list[tuple[str, object]]] = {}
        for key, ids in ids_by_table.items():
            module = self.modules.get(key) if key not in self.dims else None
            given.setdefault(module.table if module is not None else key, []).append((key, ids))
        return {
            table: ids[0][1]
            if len(ids) == 1  # as given: a forward pass of the very tensor finds its inverse
            else torch.cat([_id_tensor(key, each).reshape(-1) for key, each in ids])
            for table, ids in given.items()
        }

    def has_rows_for_step(self) -> bool:
        """Whether this step's rows are here or on their way (a ``prefetch_next`` of the last
        step, or a ``prefetch`` of this one)."""
        return self._pending is not None or bool(self._batch)

    def _take_next(self) -> None:
        """The rows fetched by ``prefetch_next`` for this step, into this step's rows."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if isinstance(pending, dict):  # blocking: fetched now, after the last push
            pending = self._start_fetch(pending)
        self._batch.update(pending.result())

    def lookup(self, table: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A sharded module's rows: (rows of the distinct ids, each id's index among them).

        When this step's rows of ``table`` were prefetched and hold every id, they are the rows
        (each id found by a binary search: no second sort of the batch); otherwise the module's
        distinct ids are fetched from the cache or the shards. With gradients on, the rows are
        a fresh leaf the backward pass fills and ``step()`` pushes."""
        self._check_open("a forward pass")
        self._take_next()
        held = self._batch.get(table)
        rows = inverse = used = None
        known = self._inverse.get(table)
        if held is not None and known is not None and known[0] == _identity(ids):
            # The very ids prefetched: their inverse is known, and every row is used.
            unique_ids, rows, inverse = held[0], held[1], known[1].view(ids.shape)
        elif held is not None and held[0].numel():
            ids = ids.contiguous()
            positions = torch.searchsorted(held[0], ids).clamp_(max=held[0].numel() - 1)
            if bool((held[0][positions] == ids).all()):
                unique_ids, rows, inverse = held[0], held[1], positions
                # Only the ids this lookup used are pushed: a prefetched row it did not use
                # gets no (zero) gradient, which would still move Adam's moments.
                used = torch.zeros(unique_ids.numel(), dtype=torch.bool)
                used[positions.reshape(-1)] = True
        if rows is None:
            unique_ids, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            rows = self._start_fetch({table: unique_ids}).result()[table][1]
        if torch.is_grad_enabled():
            rows = rows.detach().requires_grad_(True)
            self._touched.setdefault(table, []).append((unique_ids, rows, used))
        return rows, inverse

    def _start_fetch(self, unique_by_table: Mapping[str, torch.Tensor]) -> _Fetch:
        """Rows of unique ids per table: fresh cached rows now, the rest pulled in one request
        per shard, under way when this returns."""
        found, missing = {}, {}
        for name, ids in unique_by_table.items():
            cache = self.caches.get(name)
            if cache is None:
                missing[name] = ids
                continue
            cached_rows, hit = cache.lookup(ids, self.num_steps)
            rows = torch.empty(ids.numel(), self.dims[name])
            rows[hit] = cached_rows
            found[name] = (rows, hit)
            if not bool(hit.all()):
                missing[name] = ids[~hit]
        self.rows_pulled += sum(ids.numel() for ids in missing.values())
        pulling = self.client.start_pull(missing) if missing else None
        return _Fetch(self, dict(unique_by_table), found, missing, pulling)

    def forget_batch(self) -> None:
        """Drop the prefetched rows without a step (an evaluator, between test batches)."""
        self._batch.clear()
        self._touched.clear()
        self._next = self._pending = None
        self._inverse, self._next_inverse = {}, {}

    # -- pushing gradients ---------------------------------------------------------------

    def step(self, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """End of a step: accrue the tables' gradients from the backward pass, push them every
        ``n_push`` steps, apply them locally to cached rows, and forget this step's rows.

        Args:
            grad_scaler: The ``torch.amp.GradScaler`` that scaled the loss, if one did (call
                this before its ``update()``, which changes the scale): the rows' gradients
                are unscaled, and a step with an inf or NaN among them is skipped, as the
                scaler skips an optimizer's step: nothing of it is applied or pushed, and
                the scaler's ``update()`` backs its scale off for it.

        Raises:
            TypeError: ``grad_scaler`` is no ``torch.amp.GradScaler``.
            ShardTimeoutError / ShardUnavailableError / RemoteError: a past push failed.
            ClosedError: called after ``close()`` (a RuntimeError).
        """
        self._check_open("step")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        for table, (ids, summed) in self._step_gradients(grad_scaler).items():
            self._accrued.setdefault(table, []).append((ids, summed))
            cache = self.caches.get(table)
            if cache is not None and self.lr:
                cache.apply(ids, summed * -self.lr)
        self._touched.clear()
        self._batch.clear()
        self._pending, self._next = self._next, None
        self._inverse, self._next_inverse = self._next_inverse, {}
        self.num_steps += 1
        if self.num_steps % self.n_push == 0:
            self._push_accrued()

    def _step_gradients(self, grad_scaler: torch.amp.GradScaler | None) -> dict:
        """This step's (distinct ids, summed gradient rows) of each table a backward pass
        reached, unscaled by ``grad_scaler``; none when a scaled one is not finite (the loss
        overflowed at that scale: the scaler skips the step, and backs off in ``update()``)."""
        gradients = {}
        for table, parts in self._touched.items():
            grads = [
                _used_rows(ids, rows.grad, used)
                for ids, rows, used in parts
                if rows.grad is not None
            ]
            if grads:
                gradients[table] = _unique_sum(grads)
        return gradients if grad_scaler is None else unscaled_rows(grad_scaler, gradients)

    def resume(self, step: int, applied_steps: Sequence[int | None] | None = None) -> None:
        """Go on from ``step`` (a restarted replica's); ``applied_steps``: per shard, the step
        of the last push it applied from the replica's previous life (``client.pushed_steps``
        of a restarted one; None: none), so that a shard is sent none of the steps up to it
        again and each step's rows are applied once on every shard.

        Raises:
            ValueError: ``step`` is no count >= 0, or ``applied_steps`` gives no step (or
                None) per shard.
            ClosedError: called after ``close()``, whose ``applied_step`` it would overwrite.
        """
        self._check_open("resume")
        check_count("step", step, least=0)
        self.client.hold_steps(applied_steps, "applied_steps")
        self.num_steps = self.applied_step = step

    def _push_accrued(self) -> None:
        # Tensors are sent without a copy, so the previous push must be done first.
        self._finish_push()
        updates = {table: _unique_sum(parts) for table, parts in self._accrued.items() if parts}
        self._accrued.clear()
        if not updates:
            self._note_applied(self.num_steps)  # nothing left to send: every step is there
            return
        self.rows_pushed += sum(ids.numel() for ids, _ in updates.values())
        if self.blocking:
            self.client.push_now(updates, self.num_steps)
            self._note_applied(self.num_steps)
        else:
            self._push_futures = self.client.push(updates, self.num_steps)
            self._in_flight_step = self.num_steps

    def _finish_push(self) -> None:
        """Wait for the push in flight: its step is then applied."""
        self.client.wait(self._push_futures)
        self._push_futures = []
        self._note_applied(self._in_flight_step)  # once: an older step is no news

    def _note_applied(self, step: int) -> None:
        """Every shard has applied the push of ``step``: tell ``on_push_applied``."""
        if step <= self.applied_step:
            return
        self.applied_step = step
        if self._on_push_applied is not None:
            self._on_push_applied(step)

    def flush(self) -> None:
        """Push what is accrued and wait until every push is applied.

        Raises:
            ClosedError: called after ``close()`` (which flushed already).
        """
        self._check_open("flush")
        self._push_accrued()
        self._finish_push()

    def close(self) -> None:
        """Flush, then close the connections. Closing twice does nothing.

        After a request raised because a shard stayed unreachable past ``retry_timeout_s``,
        close sends nothing more: it closes the connections at once rather than wait that
        long again (for the flush, then for the requests still retrying).

        Raises:
            ShardTimeoutError / ShardUnavailableError / RemoteError: the last push failed.
        """
        self._close(flush=True)

    def _close(self, *, flush: bool) -> None:
        """``close()``; without ``flush``, at once: nothing more is pushed, and requests still
        retrying a shard that is down stop retrying."""
        if self._closed:
            return

        def close(interrupted: bool) -> None:
            self._closed = True
            self.client.close(wait=not (self.client.unreachable or interrupted))

        flush_then_close(self.flush if flush and not self.client.unreachable else None, close)

    def take_figures(self) -> dict[str, int]:
        """Rows pulled and pushed, and cache hits and misses, since the last call."""
        figures = {
            "rows_pulled": self.rows_pulled,
            "rows_pushed": self.rows_pushed,
            "cache_hits": sum(cache.hits for cache in self.caches.values()),
            "cache_misses": sum(cache.misses for cache in self.caches.values()),
        }
        self.rows_pulled = self.rows_pushed = 0
        for cache in self.caches.values():
            cache.hits = cache.misses = 0
        return figures
