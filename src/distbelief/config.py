"""The job's config: one frozen dataclass per concern, composed into ``JobConfig``; the names of
models, data sets, server optimizers and staleness policies. Low in the import graph: it imports
no torch and nothing of distbelief's but ``errors`` and ``hosts``, so the command line builds its
flags from these fields without loading the training code. One docstring and one default per
field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from distbelief.errors import ConfigFieldError
from distbelief.hosts import is_host

MODEL_NAMES = ("lenet", "alexnet", "mlp", "wide-mlp", "wide-cnn", "dlrm")
CLICK_LOG_DATASETS = ("synthetic-ctr", "criteo", "movielens")
DATASET_NAMES = ("digits", "cifar10", "mnist", "synthetic", *CLICK_LOG_DATASETS)
TABLE_SIZE_DATASETS = ("synthetic-ctr", "criteo")
"""The data sets whose ids a table size sizes (``DataConfig.table_size``)."""
CLICK_LOG_TABLES = {"synthetic-ctr": 26, "criteo": 26, "movielens": 2}
"""Categorical features of each click log, one dlrm table each: criteo's C1..C26 (the synthetic
log has as many), movielens's user and movie ids."""
CLICK_MODELS = ("dlrm",)
"""Models of click logs: they read the click-log data sets, and only those."""
SERVER_OPTIMIZER_NAMES = ("sgd", "momentum", "adagrad", "adam")
SERVER_OPTIMIZER_SETTINGS: dict[str, tuple[str, ...]] = {
    "momentum": ("momentum",),
    "betas": ("adam",),
    "eps": ("adagrad", "adam"),
}
"""The server section's hyperparameters -> the server optimizers that use them
(``distbelief/server/optimizers.py``); the others ignore them."""
SERVER_DESIGNS = ("pool", "threads")
"""How a server schedules its connections (``distbelief/wire/rpc_server.py``)."""
STALENESS_POLICIES = ("none", "scale", "dc-asgd")
ALGORITHMS = ("downpour", "sandblaster")
LINE_SEARCHES = ("strong-wolfe", "fixed")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")
ROW_OPTIMIZER_NAMES = ("sgd", "adagrad", "rowwise-adagrad", "adam")
WIRE_DTYPES = ("fp32", "bf16", "fp16")
"""Dtypes pushes and pulls may travel in (fp32: each slice as it is)."""
NO_PUSH_COMPRESSION = "none"
_DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
TRANSPORTS = ("auto", "tcp", "shm")
"""How connections move bytes: auto (shared memory between processes of one host, TCP
otherwise), tcp (TCP only; shards refuse shared memory), shm (every connection asks for it)."""
TRANSPORT_ENV = "DISTBELIEF_TRANSPORT"
"""The environment variable that carries the transport to every process of a job."""


def environment_setting(name: str) -> str | None:
    """The environment variable ``name``'s value; None when it is unset or empty, as a shell's
    ``NAME= command`` clears it."""
    return os.environ.get(name) or None


CLUSTER_ENGINES = ("local", "ray")
DEFAULT_EPOCHS = 15
"""Passes over each worker's slice when neither steps nor epochs is given."""
DEFAULT_MINIBATCH_SIZE = 32
"""Downpour's mini-batch when no batch size is given."""
PORTIONS_PER_WORKER = 10
"""Sandblaster's portions per worker when no number of portions is given."""


def unused_server_setting(users: tuple[str, ...], optimizer: str) -> str:
    """Why a server-optimizer setting is refused: ``optimizer`` is none of its ``users``."""
    return f"only applies to server optimizer {' or '.join(users)}, not {optimizer!r}"


def dc_lambda_unused(staleness_policy: str) -> str:
    """Why a DC-ASGD lambda is refused: the staleness policy is another one."""
    return f"only applies to staleness policy dc-asgd, not {staleness_policy!r}"


def push_compression_fraction(text: str) -> float | None:
    """The top-k fraction of a push compression setting (``"topk:0.01"`` -> 0.01; ``"none"``
    -> None).

    Raises:
        ValueError: ``text`` is neither ``none`` nor ``topk:F`` with F in (0, 1].
    """
    kind, _, value = str(text).partition(":")
    if kind == NO_PUSH_COMPRESSION and not value:
        return None
    try:
        # As written, or refused: float() would also take spaces around F and digits
        # grouped with "_", which "none" (taken as written) does not.
        fraction = float(value) if kind == "topk" and value.strip() == value else None
    except ValueError:
        fraction = None
    if fraction is None or "_" in value or not 0 < fraction <= 1:
        raise ValueError(f"must be none or topk:F with F in (0, 1] (e.g. topk:0.01), got {text!r}")
    return fraction


_NO_PORT = " (without a port or scheme)"


def _layer_indices(count: int) -> str:
    """``1 layer index``, ``3 layer indices``."""
    return f"{count} layer {'index' if count == 1 else 'indices'}"


def _require(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ConfigFieldError(name, f"must be {rule}, got {value!r}")


_MAX_COUNT = 2**31 - 1
"""The largest count a bound may hold (a step count past it means no bound; the wire's JSON
carries it as a 64-bit integer)."""
_MAX_SIZE = 2**63 - 1
"""The largest size (rows, bytes) a setting may hold: the shards get the row bounds in a
request's JSON, which carries 64-bit integers only (a larger one fails every reply)."""


MAX_THREADS = 1024
"""The most torch threads one process may be given (``--threads``, ``--server-threads``): far
past any machine's cores; torch's thread pool crashes the process at about a hundred thousand."""


def _is_count(value: object) -> bool:
    """Whether ``value`` is an int (not a bool) in [0, _MAX_COUNT]."""
    return type(value) is int and 0 <= value <= _MAX_COUNT


def check_count(name: str, value: object, *, least: int = 1) -> None:
    """Refuses ``value`` as a count of at least ``least`` (``_is_count``: a bool is no count).

    Raises:
        ValueError: it is not, naming ``name``.
    """
    if type(value) is int and value > _MAX_COUNT:
        rule = f"an integer <= {_MAX_COUNT}"
    elif not _is_count(value) or value < least:  # type: ignore[operator]
        rule = f"an integer >= {least}"
    else:
        return
    raise ValueError(f"{name} must be {rule}, got {value!r}")


MAX_WAIT_S = 7 * 24 * 3600.0
"""The longest time a setting may give (a week): waits of centuries overflow the clocks that
bound them (a socket's, a lock's, a deadline's time_t)."""
MAX_CACHE_MB = float(2**30)
"""The largest row cache (a pebibyte): its size in bytes must stay a finite number."""
MAX_RATE = 3.4028234663852886e38
"""The largest rate (float32's largest number): a rate multiplies float32 tensors, and a larger
one cannot be converted to their type."""
MAX_TENSOR_BYTES = 2**63 - 1
"""The most bytes torch sizes one tensor to (an int64): past it, it refuses to build the tensor,
even on the meta device, where nothing is allocated."""
TABLE_VALUE_BYTES = 4
"""Bytes of one value of a dlrm table (float32)."""
CRITEO_RAW_ID_ROWS = 2**32 + 1
"""Rows of a criteo table without ``--table-size``: one per 8-hex-digit id, and one for none."""
MAX_ROW_WIDTH = 2**16
"""The widest embedding row a shard holds (values per row): a dlrm's ``embedding_dim`` too."""


MAX_SYNTHETIC_TABLE_SIZE = 2**31
"""Largest table_size of synthetic-ctr: keeps its id permutation's products inside int64."""


def max_table_rows(embedding_dim: int) -> int:
    """The most rows a dlrm table of ``embedding_dim`` columns can have (``MAX_TENSOR_BYTES``):
    a click log's ids must stay below it, as a table holds its largest id + 1 rows."""
    return MAX_TENSOR_BYTES // (embedding_dim * TABLE_VALUE_BYTES)


def is_amount(value: object, *, zero_ok: bool = False, most: float = math.inf) -> bool:
    """Whether ``value`` is a finite int or float > 0 (>= 0 where ``zero_ok``), at most
    ``most``: a rate, size or duration. A bool is no number, and NaN or an infinity is no
    amount (an infinite rate or size breaks the arithmetic, an infinite wait overflows the
    clock)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value <= most and (value >= 0 if zero_ok else value > 0)


def amount_rule(*, zero_ok: bool = False) -> str:
    """What ``is_amount`` asks for, in words for an error message."""
    return f"a finite number {'>=' if zero_ok else '>'} 0"


def amount_problem(value: object, *, zero_ok: bool = False, most: float = math.inf) -> str | None:
    """What is wrong with ``value`` as an amount of at most ``most`` (``is_amount``), in words
    for an error message ("must be ..."); None if nothing."""
    if not is_amount(value, zero_ok=zero_ok):
        return f"must be {amount_rule(zero_ok=zero_ok)}"
    if value > most:  # type: ignore[operator]
        # A whole bound in full: %g said 2**30 as 1.07374e+09, which 1073741825 looked under.
        whole = float(most).is_integer() and abs(most) < 1e15
        return f"must be <= {int(most) if whole else format(most, 'g')}"
    return None


def check_wait(name: str, value: object, *, zero_ok: bool = False) -> None:
    """Refuses ``value`` as a number of seconds to wait (``is_amount``, at most
    ``MAX_WAIT_S``).

    Raises:
        ValueError: it is not, naming ``name``.
    """
    problem = amount_problem(value, zero_ok=zero_ok, most=MAX_WAIT_S)
    if problem is not None:
        raise ValueError(f"{name} {problem}, got {value!r}")


def _require_amounts(
    config: object, *names: str, zero_ok: bool = False, most: float = math.inf
) -> None:
    for name in names:
        value = getattr(config, name)
        problem = amount_problem(value, zero_ok=zero_ok, most=most)
        if problem is not None:
            raise ConfigFieldError(name, f"{problem}, got {value!r}")


def _require_rates(config: object, *names: str, zero_ok: bool = False) -> None:
    _require_amounts(config, *names, zero_ok=zero_ok, most=MAX_RATE)


def _require_waits(config: object, *names: str, zero_ok: bool = False) -> None:
    _require_amounts(config, *names, zero_ok=zero_ok, most=MAX_WAIT_S)


def _require_counts(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        _require(is_int and value >= 1, name, value, "an integer >= 1")
        _require(value <= _MAX_COUNT, name, value, f"<= {_MAX_COUNT}")


def _require_list(name: str, value: object, rule: str, *, text_ok: bool = False) -> None:
    """Refuses ``value`` unless it is a list or tuple (or, where ``text_ok``, a str the field
    parses): a number or a bool would fail deep inside with a TypeError that names nothing."""
    kinds = (list, tuple, str) if text_ok else (list, tuple)
    _require(isinstance(value, kinds), name, value, rule)


def _require_optional_counts(config: object, *names: str, least: int = 1) -> None:
    """Refuses a field that holds neither None nor an int (not a bool) of at least ``least``:
    a float, a bool or a text from config.json would otherwise slip past a bare comparison.
    These are sizes (bytes, rows) that may pass ``_MAX_COUNT``, up to ``_MAX_SIZE``."""
    for name in names:
        value = getattr(config, name)
        ok = value is None or (type(value) is int and value >= least)
        _require(ok, name, value, f"an integer >= {least}")
        _require(value is None or value <= _MAX_SIZE, name, value, f"<= {_MAX_SIZE}")


def _require_declared_types(config: Any) -> None:
    """Refuses a field declared bool or str that holds anything else: "no" would read as true,
    and a number where a path or an address goes fails only once a process uses it."""
    for item in fields(config):
        value = getattr(config, item.name)
        _require(item.type != "bool" or isinstance(value, bool), item.name, value, "True or False")
        _require(item.type != "str" or isinstance(value, str), item.name, value, "a string")


def _require_choice(config: Any, name: str) -> None:
    choices = next(item.metadata["choices"] for item in fields(config) if item.name == name)
    value = getattr(config, name)
    _require(value in choices, name, value, f"one of {', '.join(choices)}")


RAY_OWN_INSTANCE = "local"
"""The ``ray_address`` that asks for a Ray instance of the job's own, as not giving one does."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterConfig:
    """The job's processes: how many of each role, and where they run."""

    num_workers: int = 2
    """Worker processes (replicas), each on its own disjoint slice of the training set; a
    synchronous round expects this many gradients."""
    num_shards: int = 2
    """Parameter-server shard processes."""
    host: str = "127.0.0.1"
    """Address the local cluster's shards bind to."""
    shard_hosts: tuple[str, ...] = ()
    """Addresses the shards bind to, shard i to the (i mod N)-th of the N given, e.g.
    127.0.0.2,127.0.0.3 (default: 127.0.0.1)."""
    worker_host: str = ""
    """Address of this machine the workers' connections (to the shards, the coordinator, the
    next stage) leave from and a partitioned replica's stages listen on (default: the one the
    operating system picks; stages listen on the host)."""
    threads_per_worker: int = 1
    """torch intra-op threads per worker process."""
    device: str = "cpu"
    """Where each Downpour worker's replica trains: cpu, cuda or cuda:N (gradients are accrued
    there; pushes and pulls pass through pinned host memory)."""
    transport: str = field(default="auto", metadata={"choices": TRANSPORTS})
    """How processes move bytes: auto uses shared memory between processes of one host and
    TCP otherwise; tcp never uses shared memory; shm asks for it on every connection (falling
    back to TCP, with a warning, where it cannot be used)."""
    engine: str = field(default="local", metadata={"choices": CLUSTER_ENGINES})
    """What starts, watches and restarts the processes: local (child processes of the launcher
    on this machine) or ray (Ray actors, shards spread over the nodes; needs the ray extra)."""
    ray_address: str = ""
    """With the ray engine: an existing Ray cluster's address (HOST:PORT of its head, or auto);
    not given, or local: a Ray instance started on this machine for the job (local: a resumed
    run that joined a cluster starts its own)."""

    def __post_init__(self) -> None:
        _require_counts(self, "num_workers", "num_shards", "threads_per_worker")
        threads = self.threads_per_worker
        _require(threads <= MAX_THREADS, "threads_per_worker", threads, f"<= {MAX_THREADS}")
        _require(bool(self.host), "host", self.host, "a host name or address")
        device_ok = isinstance(self.device, str) and _DEVICE_PATTERN.fullmatch(self.device)
        _require(bool(device_ok), "device", self.device, "cpu, cuda or cuda:N")
        hosts_rule = f"IP addresses or host names{_NO_PORT}"
        _require_list("shard_hosts", self.shard_hosts, f"a list of {hosts_rule}")
        object.__setattr__(self, "shard_hosts", tuple(self.shard_hosts))
        for host in self.shard_hosts:
            _require(isinstance(host, str) and is_host(host), "shard_hosts", host, hosts_rule)
        if self.worker_host:
            rule = f"an IP address or host name{_NO_PORT}"
            worker_host = self.worker_host
            _require(
                isinstance(worker_host, str) and is_host(worker_host),
                "worker_host",
                worker_host,
                rule,
            )
        _require_choice(self, "transport")
        _require_choice(self, "engine")
        if self.ray_address and self.engine != "ray":
            raise ConfigFieldError(
                "ray_address",
                f"only applies with engine ray (--cluster ray), got {self.ray_address!r}",
            )
        if self.ray_address == RAY_OWN_INSTANCE:  # Ray's own word for it (ray.init)
            object.__setattr__(self, "ray_address", "")
        if self.engine == "ray" and (self.shard_hosts or self.worker_host):
            field_name = "shard_hosts" if self.shard_hosts else "worker_host"
            who = "shards bind to" if self.shard_hosts else "workers connect from"
            raise ConfigFieldError(
                field_name, f"does not apply with the ray engine ({who} their node's address)"
            )
        _require_declared_types(self)  # last: the checks above name a bad host's rule

    def shard_host(self, shard_id: int) -> str:
        """The address shard ``shard_id`` binds to."""
        return self.shard_hosts[shard_id % len(self.shard_hosts)] if self.shard_hosts else self.host


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """The data set the workers train on and the evaluator tests on."""

    name: str = field(default="digits", metadata={"choices": DATASET_NAMES})
    """Data set to train on."""
    data_dir: str = "data"
    """Folder of the data set's files: CIFAR-10 / MNIST (downloaded there when missing), Criteo,
    MovieLens."""
    download: bool = True
    """Download missing CIFAR-10 / MNIST files (when off, fail and name them)."""
    table_size: int | None = None
    """Ids per table: of synthetic-ctr (default 10000), or the rows criteo's hashed ids are
    folded into (default: the raw 32-bit ids)."""

    def __post_init__(self) -> None:
        _require_declared_types(self)
        _require_choice(self, "name")
        size = self.table_size
        if self.name == "synthetic-ctr" and type(size) is int:
            # Before the bound of any size: past 2**63 that named 2**63 - 1, not this one.
            most = MAX_SYNTHETIC_TABLE_SIZE
            _require(size <= most, "table_size", size, f"<= {most} (2**31)")
        _require_optional_counts(self, "table_size", least=2)
        if size is not None and self.name not in TABLE_SIZE_DATASETS:
            names = " and ".join(TABLE_SIZE_DATASETS)
            raise ConfigFieldError("table_size", f"applies to {names}, not {self.name!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """The model every process builds identically."""

    name: str = field(default="lenet", metadata={"choices": MODEL_NAMES})
    """Model to train."""
    seed: int = 0
    """Seeds the model's initial parameters (every process builds the same replica) and the
    workers' data order."""
    embedding_dim: int = 16
    """Width of the dlrm model's embedding rows (and of its bottom MLP's output)."""

    def __post_init__(self) -> None:
        _require_choice(self, "name")
        _require_counts(self, "embedding_dim")
        _require(
            self.embedding_dim <= MAX_ROW_WIDTH,
            "embedding_dim",
            self.embedding_dim,
            f"<= {MAX_ROW_WIDTH} (the widest row a shard holds)",
        )
        _require(_is_count(self.seed), "seed", self.seed, f"an integer in [0, {_MAX_COUNT}]")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig:
    """The training algorithm, and the workers' side of Downpour SGD: local steps, and how often
    they push and pull."""

    algorithm: str = field(default="downpour", metadata={"choices": ALGORITHMS})
    """downpour (asynchronous SGD, Dean et al. 2012 section 4.1) or sandblaster (batch L-BFGS
    driven by a coordinator, section 4.2; see the sandblaster section)."""
    lr: float = 0.05
    """Worker (local) learning rate: the step a worker takes between its pulls, each of which
    replaces its parameters with the shards', which train at --server-lr."""
    n_push: int = 1
    """Push the accrued gradient every N steps (n_push in Dean et al. 2012)."""
    n_pull: int = 1
    """Fetch fresh parameters every N steps (n_fetch in Dean et al. 2012)."""
    batch_size: int | None = None
    """Examples per step: Downpour's mini-batch (default 32); Sandblaster's batch of every
    evaluation, a fixed seeded sample of the training set (default: all of it)."""
    steps: int | None = None
    """Steps per worker; exclusive with epochs."""
    epochs: int | None = None
    """Passes over each worker's slice of the training set (default 15 when steps is not
    given either)."""
    blocking: bool = False
    """Workers wait for every push and pull (reproducible, slower)."""
    warmstart_steps: int = 0
    """Warmstart (Dean et al. 2012): worker 0 trains alone until the shards have applied its
    first N pushes; the others then start from the shards' parameters."""
    wire_dtype: str = field(default="fp32", metadata={"choices": WIRE_DTYPES})
    """Pushes and pulls of the dense parameters travel in this dtype: fp32 (as they are), bf16
    or fp16; the shards keep float32 parameters and convert on arrival."""
    push_compression: str = NO_PUSH_COMPRESSION
    """none, or topk:F: each push carries only the fraction F of each slice's accrued gradient
    of largest magnitude (indices and values); the rest stays on the worker and is added to
    its next push (error feedback)."""

    def __post_init__(self) -> None:
        _require_declared_types(self)
        _require_choice(self, "algorithm")
        _require_choice(self, "wire_dtype")
        try:
            push_compression_fraction(self.push_compression)
        except ValueError as e:
            raise ConfigFieldError("push_compression", str(e)) from None
        _require_counts(self, "n_push", "n_pull")
        _require_rates(self, "lr", zero_ok=True)
        if self.steps is not None and self.epochs is not None:
            raise ConfigFieldError("epochs", f"cannot be given with steps, got {self.epochs!r}")
        _require_counts(
            self,
            *(
                name
                for name in ("batch_size", "steps", "epochs")
                if getattr(self, name) is not None
            ),
        )
        warmstart = self.warmstart_steps
        _require(_is_count(warmstart), "warmstart_steps", warmstart, f"in [0, {_MAX_COUNT}]")

    @property
    def minibatch_size(self) -> int:
        """Downpour's mini-batch size."""
        return self.batch_size if self.batch_size is not None else DEFAULT_MINIBATCH_SIZE

    @property
    def num_epochs(self) -> int:
        """Epochs to run when ``steps`` is None."""
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """The shards' side: the update rule they apply to pushed gradients, and their
    checkpoints."""

    optimizer: str = field(default="sgd", metadata={"choices": SERVER_OPTIMIZER_NAMES})
    """Update rule the shards apply to pushed gradients."""
    lr: float = 0.05
    """The shards' learning rate (gamma of adagrad)."""
    momentum: float = 0.9
    """Momentum factor of the momentum server optimizer."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's beta1,beta2 on the shards."""
    eps: float | None = None
    """Adagrad's / adam's epsilon on the shards (default: torch's)."""
    checkpoint_every_s: float = 30.0
    """Seconds between shard checkpoints (the shards also save at shutdown)."""
    design: str = field(default="pool", metadata={"choices": SERVER_DESIGNS})
    """How a shard serves its connections: pool (idle connections wait in epoll and a few
    threads answer whichever has a request, in arrival order: thousands of replicas per shard)
    or threads (a thread per connection)."""
    max_connections: int = 4096
    """Connections a shard serves at once; a connection past it is refused with
    TooManyConnectionsError (the shard raises its open-file limit to fit)."""
    threads: int = 1
    """torch intra-op threads per shard process (its updates are elementwise passes; more
    threads pay off only for large slices on cores that no worker of the job uses)."""

    def __post_init__(self) -> None:
        _require_choice(self, "optimizer")
        _require_choice(self, "design")
        _require_counts(self, "max_connections", "threads")
        _require(self.threads <= MAX_THREADS, "threads", self.threads, f"<= {MAX_THREADS}")
        _require_rates(self, "lr", zero_ok=True)
        momentum_ok = is_amount(self.momentum, zero_ok=True) and self.momentum < 1
        _require(momentum_ok, "momentum", self.momentum, "in [0, 1)")
        _require_list("betas", self.betas, "two numbers in [0, 1)")
        betas_ok = len(self.betas) == 2 and all(
            is_amount(beta, zero_ok=True) and beta < 1 for beta in self.betas
        )
        _require(betas_ok, "betas", self.betas, "two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(self.betas))  # a list equals no default
        if self.eps is not None:
            _require_rates(self, "eps")
        _require_waits(self, "checkpoint_every_s")
        defaults = {item.name: item.default for item in fields(self)}
        for name, users in SERVER_OPTIMIZER_SETTINGS.items():
            value = getattr(self, name)
            if self.optimizer not in users and value != defaults[name]:
                # The optimizer chosen would ignore it without a word.
                raise ConfigFieldError(name, unused_server_setting(users, self.optimizer))


_DEFAULT_DC_LAMBDA = 0.04


@dataclass(frozen=True, kw_only=True, slots=True)
class ConsistencyConfig:
    """A shard's consistency model. Workers learn it from the shard at their handshake; the
    number of workers a synchronous round expects is the cluster section's."""

    sync: bool = False
    """Synchronous rounds: the shards apply one averaged update per round of the workers'
    gradients from one version (Chen et al. 2016)."""
    backup_workers: int = 0
    """Sync: a round is applied after the first num_workers - N gradients."""
    max_staleness: int | None = None
    """Stale synchronous parallel (Ho et al. 2013): hold a worker's pull while it is more than
    N steps ahead of the slowest live worker (default: no bound)."""
    staleness_policy: str = field(default="none", metadata={"choices": STALENESS_POLICIES})
    """How the shards adjust a stale gradient: none, scale (Zhang et al. 2016), dc-asgd (Zheng
    et al. 2017)."""
    dc_lambda: float = _DEFAULT_DC_LAMBDA
    """Variance-control factor lambda of DC-ASGD (constant variant)."""
    liveness_timeout_s: float = 10.0
    """Seconds of silence after which a worker counts as dead and no longer holds the others
    back (SSP, sync)."""
    apply_worker_lr: bool = False
    """Workers push updates already scaled by the learning rate of each step (the seed's
    ParameterServer), which the shard adds (its optimizer is SGD with rate 1), so each worker's
    own rate and LR scheduler decide the step size."""

    def __post_init__(self) -> None:
        _require_declared_types(self)
        counts = f"an integer in [0, {_MAX_COUNT}]"
        _require(_is_count(self.backup_workers), "backup_workers", self.backup_workers, counts)
        _require(
            self.max_staleness is None or _is_count(self.max_staleness),
            "max_staleness",
            self.max_staleness,
            counts,
        )
        _require_choice(self, "staleness_policy")
        if self.backup_workers and not self.sync:
            raise ConfigFieldError(
                "backup_workers", f"only applies to sync rounds, got {self.backup_workers}"
            )
        _require_rates(self, "dc_lambda", zero_ok=True)
        if self.dc_lambda != _DEFAULT_DC_LAMBDA and self.staleness_policy != "dc-asgd":
            raise ConfigFieldError("dc_lambda", dc_lambda_unused(self.staleness_policy))
        if self.sync and self.max_staleness is not None:
            raise ConfigFieldError(
                "max_staleness",
                f"cannot bound sync rounds (they have no staleness), got {self.max_staleness}",
            )
        if self.sync and self.staleness_policy != "none":
            raise ConfigFieldError(
                "staleness_policy",
                "cannot apply to sync rounds (they have no staleness), "
                f"got {self.staleness_policy!r}",
            )
        if self.apply_worker_lr and self.staleness_policy == "dc-asgd":
            # DC-ASGD's correction g*g*(w_now - w_fetched) assumes a raw gradient.
            raise ConfigFieldError(
                "staleness_policy", "'dc-asgd' needs raw gradients, not apply_worker_lr"
            )
        _require_waits(self, "liveness_timeout_s")


@dataclass(frozen=True, kw_only=True, slots=True)
class SandblasterConfig:
    """Sandblaster L-BFGS (Dean et al. 2012, section 4.2): a coordinator runs L-BFGS on the
    shards' vectors; workers compute each evaluation's batch gradient in portions."""

    history: int = 10
    """Pairs (s, y) L-BFGS keeps on the shards (m, its history size)."""
    portions: int | None = None
    """Pieces each evaluation's batch is cut into, handed to whichever worker is free
    (default: 10 per worker)."""
    line_search: str = field(default="strong-wolfe", metadata={"choices": LINE_SEARCHES})
    """strong-wolfe (torch's line search), or fixed (every step is step_size)."""
    max_iterations: int = 20
    """L-BFGS iterations (fewer when it converges first)."""
    max_evaluations: int | None = None
    """Objective evaluations in all, the first and the line searches' included: torch's
    max_eval. L-BFGS stops after the iteration that reaches them; a line search is bounded by
    those left (torch's max_ls: its first trial is always made, and it may make one past the
    bound, so a run can end at max_evaluations + 1, as torch's step() does) (default: no
    budget, max_iterations alone bounds the run; torch's default is 1.25 x its max_iter)."""
    step_size: float = 1.0
    """The fixed step, or the line search's first trial step (torch's lr of LBFGS)."""
    portions_per_push: int = 2
    """A worker pushes the gradient sum of its finished portions every N portions (and when
    it runs out of work)."""
    backup_tasks: bool = True
    """Near the end of an evaluation, idle workers also get the unfinished portions; the
    first answer counts."""

    def __post_init__(self) -> None:
        _require_declared_types(self)
        _require_counts(self, "history", "max_iterations", "portions_per_push")
        _require_optional_counts(self, "portions", "max_evaluations")
        _require_choice(self, "line_search")
        _require_rates(self, "step_size")

    def num_portions(self, num_workers: int) -> int:
        """Portions per evaluation for ``num_workers`` workers."""
        return self.portions if self.portions is not None else PORTIONS_PER_WORKER * num_workers


def _layer_index(part: object) -> int | None:
    """An int, or a str of one, as a layer index; None for anything else (a bool or a fraction
    is no layer index, though int() would take both)."""
    if type(part) is int:
        return part
    try:
        return int(part) if isinstance(part, str) else None
    except ValueError:
        return None


def _split_points(text: object) -> tuple[int, ...] | None:
    """``"3,7"`` (a flag's text) or a list or tuple (JSON, Python) as a tuple of ints; None
    stays None."""
    if text is None:
        return text
    rule = "integers like 3,7"
    _require_list("split_points", text, rule, text_ok=True)
    parts = text.split(",") if isinstance(text, str) else text  # type: ignore[attr-defined]
    points = tuple(_layer_index(part) for part in parts)
    _require(None not in points, "split_points", text, rule)
    return points  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    """Model parallelism (Dean et al. 2012, section 3): each replica's model cut into
    partitions, each trained by its own stage process that pushes and pulls only its own
    parameters; activations cross the cuts on a pipeline schedule of micro-batches."""

    num_partitions: int = 1
    """Partitions (stage processes) per replica; 1: the whole model in one worker process."""
    num_micro_batches: int = 1
    """Micro-batches each batch is cut into, so that the stages work at the same time."""
    schedule: str = field(default="1f1b", metadata={"choices": PIPELINE_SCHEDULES})
    """Pipeline schedule: 1f1b (one forward, one backward) or gpipe (all forwards, then all
    backwards); both give the same gradients."""
    split_points: tuple[int, ...] | None = None
    """Layers at which to cut the model, comma-separated (default: balance the measured compute
    time of the partitions)."""
    max_stage_bytes: int | None = None
    """Memory budget of one stage for its parameters and optimizer state: refuse to start a
    stage that needs more (default: no budget)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "split_points", _split_points(self.split_points))
        _require_counts(self, "num_partitions", "num_micro_batches")
        _require_choice(self, "schedule")
        if self.schedule != "1f1b" and self.num_partitions == 1:
            raise ConfigFieldError(
                "schedule",
                f"only applies to partitioned replicas (partitions > 1), got {self.schedule}",
            )
        points = self.split_points
        if points and self.num_partitions == 1:
            raise ConfigFieldError(
                "split_points",
                "only applies to partitioned replicas (partitions > 1), "
                f"got {','.join(map(str, points))}",
            )
        if points is not None and len(points) != self.num_partitions - 1:
            raise ConfigFieldError(
                "split_points",
                f"must be {_layer_indices(self.num_partitions - 1)} for "
                f"{self.num_partitions} partitions, got {','.join(map(str, points))}",
            )
        _require_optional_counts(self, "max_stage_bytes")


_TABLE_NAME = re.compile(r"tables\.(0|[1-9][0-9]*)")
"""How dlrm names its embedding tables (``check_row_settings_apply`` checks the index against
the data set's table count)."""


def unknown_table_problem(
    names: tuple[str, ...] | None, dataset_name: str, num_tables: int
) -> str | None:
    """What is wrong with ``names`` (``--tables``) for the dlrm model of ``dataset_name``, a
    click log of ``num_tables`` tables: a name it has no table of; None if nothing."""
    unknown = sorted(set(names or ()) - {f"tables.{t}" for t in range(num_tables)})
    if not unknown:
        return None
    return (
        f"the dlrm model of {dataset_name} has no table {unknown[0]!r} "
        f"(it has tables.0 .. tables.{num_tables - 1})"
    )


def table_names(text: object) -> tuple[str, ...] | None:
    """``--tables a,b`` (or a list or tuple) as a tuple of names; None stays None.

    Raises:
        ConfigFieldError: no name in it, an empty name between commas, or a name twice.
    """
    if text is None:
        return None
    _require_list("tables", text, "module names like a,b", text_ok=True)
    parts = text.split(",") if isinstance(text, str) else list(text)  # type: ignore[attr-defined]
    names = tuple(str(part).strip() for part in parts)
    if not any(names):
        raise ConfigFieldError("tables", f"must name at least one module, got {text!r}")
    if "" in names:
        raise ConfigFieldError("tables", f"has an empty item in the list {text!r}")
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise ConfigFieldError("tables", f"names {twice!r} twice")
    return names


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbeddingConfig:
    """Embedding tables stored by row on the shards: which of the model's tables, the row
    optimizer the shards run, admission and eviction of ids, and the workers' row cache."""

    tables: tuple[str, ...] | None = None
    """Module paths of the embedding tables to store by row, comma-separated (default: every
    nn.Embedding and nn.EmbeddingBag of the model)."""
    row_optimizer: str = field(default="sgd", metadata={"choices": ROW_OPTIMIZER_NAMES})
    """Update rule the shards apply to pushed rows: sgd, adagrad, rowwise-adagrad (one
    accumulator per row) or adam (lazy: only pushed rows advance)."""
    row_lr: float = 0.05
    """The shards' learning rate for table rows."""
    admit_after: int = 1
    """Pushes of an id before it gets a row (until then it reads as zeros; with 1, an id
    without a row reads as its initial row, row_init_std)."""
    max_rows_per_shard: int | None = None
    """Rows one shard holds per table; beyond it the least recently pushed rows are evicted
    (default: no limit). Also the most ids awaiting admission (admit_after) it counts."""
    row_ttl_steps: int | None = None
    """Evict rows, and forget the counts of ids awaiting admission, not pushed in this many of
    their table's steps (default: never)."""
    row_init_std: float = 0.01
    """New rows start as Normal(0, this), seeded by id (0: zeros)."""
    row_cache_mb: float = 0.0
    """A worker's cache of pulled rows, in MiB over all tables; a cached row serves for n_pull
    steps (0: no cache, rows are pulled every step)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", table_names(self.tables))
        _require_choice(self, "row_optimizer")
        _require_rates(self, "row_lr", zero_ok=True)
        _require_counts(self, "admit_after")
        _require_optional_counts(self, "max_rows_per_shard", "row_ttl_steps")
        _require_rates(self, "row_init_std", zero_ok=True)
        _require_amounts(self, "row_cache_mb", zero_ok=True, most=MAX_CACHE_MB)


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultsConfig:
    """How long to wait for a peer, and how often to bring a dead process back."""

    timeout_s: float = 30.0
    """Seconds before a request to a shard fails."""
    retry_timeout_s: float = 60.0
    """Seconds to keep retrying an unreachable shard (e.g. restarting) before failing."""
    max_restarts: int = 3
    """Restarts allowed per process (worker, shard, evaluator) that dies (a partitioned
    replica's stages share one count: the replica restarts as one)."""

    def __post_init__(self) -> None:
        _require_waits(self, "timeout_s")
        _require_waits(self, "retry_timeout_s", zero_ok=True)
        restarts = self.max_restarts
        _require(
            type(restarts) is int and restarts >= 0, "max_restarts", restarts, "an integer >= 0"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportingConfig:
    """Where a run's records go and how often it measures itself."""

    out_dir: str = ""
    """Run folder (default runs/<time>); eval appends its evaluations to OUT/metrics.csv."""
    eval_every_s: float = 1.0
    """Seconds between evaluations of the shards' parameters on the test set."""
    eval_during_training: bool = True
    """Evaluate while the workers train (when off, the test accuracy is measured once, at the
    end, and the evaluator costs the workers nothing)."""
    draw_plots: bool = True
    """Draw the run folder's PNGs when the job ends (about a CPU second of the launcher's;
    when off, distbelief plot RUN draws them from the records at any time)."""
    log_every_steps: int = 10
    """Steps between a worker's metric records."""

    def __post_init__(self) -> None:
        _require_declared_types(self)
        _require_waits(self, "eval_every_s")
        _require_counts(self, "log_every_steps")


@dataclass(frozen=True, kw_only=True, slots=True)
class JobConfig:
    """Every setting of a training job, validated once and shared by all its processes; the
    run folder's config.json holds it, one JSON object per section."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Processes of each role, and where."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data set."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The workers' side of Downpour SGD."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The shards' update rule and checkpoints."""
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    """The shards' consistency model."""
    sandblaster: SandblasterConfig = field(default_factory=SandblasterConfig)
    """Sandblaster L-BFGS."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Model parallelism: partitions per replica and their pipeline."""
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    """Embedding tables stored by row on the shards."""
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    """Timeouts, retries and restarts."""
    reporting: ReportingConfig = field(default_factory=ReportingConfig)
    """Run folder, evaluations, metric records."""

    def __post_init__(self) -> None:
        for section, section_type in _section_types().items():
            value = getattr(self, section)
            if not isinstance(value, section_type):
                raise TypeError(f"{section} must be a {section_type.__name__}, got {value!r}")
        num_workers = self.cluster.num_workers
        backup_workers = self.consistency.backup_workers
        if backup_workers >= num_workers:
            raise ConfigFieldError(
                "consistency.backup_workers",
                f"must be < the number of workers ({num_workers}), got {backup_workers}",
            )
        self._check_algorithm_fields()
        portions, batch_size = self.sandblaster.portions, self.optimizer.batch_size
        if portions is not None and batch_size is not None and portions > batch_size:
            raise ConfigFieldError(
                "sandblaster.portions",
                f"must be <= the batch size ({batch_size}), got {portions}",
            )
        micro_batches = self.pipeline.num_micro_batches
        if micro_batches > 1 and self.pipeline.num_partitions == 1:
            raise ConfigFieldError(
                "pipeline.num_micro_batches",
                f"only applies to partitioned replicas (partitions > 1), got {micro_batches}",
            )
        if micro_batches > self.optimizer.minibatch_size:
            raise ConfigFieldError(
                "pipeline.num_micro_batches",
                f"must be <= the batch size ({self.optimizer.minibatch_size}), got {micro_batches}",
            )
        self._check_click_model()
        self._check_device()
        partitions = self.pipeline.num_partitions
        if self.cluster.engine == "ray" and partitions > 1:
            # A partitioned replica restarts as a whole, each stage on its old address: the
            # local launcher does that; Ray restarts one actor at a time, wherever it fits.
            raise ConfigFieldError(
                "pipeline.num_partitions",
                f"must be 1 with the ray engine (model-parallel replicas run with the local "
                f"one), got {partitions}",
            )
        if self.optimizer.warmstart_steps and self.consistency.sync:
            raise ConfigFieldError(
                "optimizer.warmstart_steps",
                "needs asynchronous training, not sync rounds, "
                f"got {self.optimizer.warmstart_steps}",
            )
        for name in ("n_push", "n_pull"):
            every = getattr(self.optimizer, name)
            if self.consistency.sync and every != 1:
                # A round averages one gradient per worker, each from the version it pulled.
                raise ConfigFieldError(
                    f"optimizer.{name}",
                    f"must be 1 with sync rounds (they push and pull every step), got {every}",
                )

    def check_row_settings_apply(self) -> None:
        """Refuse row settings (the embeddings section, and the model's embedding width) for a
        model without tables, where they would be ignored without a word, and a table the click
        log's model does not have. Only where the model is chosen (``train``, ``worker``): a
        shard (``ps``) takes row settings but not the model.

        Raises:
            ConfigFieldError: the first such setting that differs from its default, or the
                first table name of ``tables`` the model lacks.
        """
        if self.model.name in CLICK_MODELS:
            tables = CLICK_LOG_TABLES[self.data.name]
            problem = unknown_table_problem(self.embeddings.tables, self.data.name, tables)
            if problem is not None:
                raise ConfigFieldError("embeddings.tables", problem)
            self._check_dense_tables_fit()
            return
        changed = [
            f"embeddings.{item.name}"
            for item in fields(EmbeddingConfig)
            if getattr(self.embeddings, item.name) != item.default
        ]
        if self.model.embedding_dim != ModelConfig().embedding_dim:
            changed.append("model.embedding_dim")
        if changed:
            raise ConfigFieldError(
                changed[0], f"only applies to model dlrm, not {self.model.name!r}"
            )

    def tables_left_dense(self) -> tuple[str, ...]:
        """The click log's tables ``--tables`` leaves out, in order: dense parameters, built
        whole on every worker (none without ``--tables``, which puts every table on the
        shards, or with another model)."""
        named = self.embeddings.tables
        if named is None or self.model.name not in CLICK_MODELS:
            return ()
        every = (f"tables.{t}" for t in range(CLICK_LOG_TABLES.get(self.data.name, 0)))
        return tuple(table for table in every if table not in named)

    def check_row_caches_fit_here(self) -> None:
        """The local launcher's check (every worker on this machine): each worker allocates
        its whole row cache as it starts, and caches larger together than this machine's
        memory failed the workers then (or stalled them, swapping, past the shards' timeout).

        Raises:
            ConfigFieldError: field ``embeddings.row_cache_mb``.
        """
        memory = physical_memory_bytes()
        workers = self.cluster.num_workers
        cache_bytes = self.embeddings.row_cache_mb * 2**20 * workers
        if self.model.name in CLICK_MODELS and memory is not None and cache_bytes > memory:
            raise ConfigFieldError(
                "embeddings.row_cache_mb",
                f"must fit {workers} time{'s' * (workers > 1)} in this machine's memory "
                f"({memory / 2**20:.0f} MiB): each worker allocates its cache whole as it "
                f"starts, got {self.embeddings.row_cache_mb:g}",
            )

    def _check_dense_tables_fit(self) -> None:
        """A table ``--tables`` leaves out is a dense parameter, built whole on every worker
        and shard: criteo's without ``--table-size`` has a row per raw 32-bit id, more bytes
        than a machine holds; a synthetic click log's of a ``--table-size`` larger than this
        machine's memory too (the worker would fail allocating it once started). MovieLens
        sizes its tables by its ids: the check of its file refuses an id too large."""
        dense = self.tables_left_dense()
        if not dense:
            return
        width, rows = self.model.embedding_dim, self.data.table_size
        if self.data.name == "criteo" and rows is None:
            rows = CRITEO_RAW_ID_ROWS
            gib = rows * width * TABLE_VALUE_BYTES / 2**30
            raise ConfigFieldError(
                "embeddings.tables",
                f"leaves {dense[0]} a dense parameter of criteo's raw ids ({rows} rows x "
                f"{width} values x {TABLE_VALUE_BYTES} bytes: {gib:.0f} GiB on "
                "every worker, and split over the shards): name every table, or fold the ids "
                "with --table-size",
            )
        memory = physical_memory_bytes()
        if self.data.name != "synthetic-ctr" or rows is None or memory is None:
            return
        dense_bytes = len(dense) * rows * width * TABLE_VALUE_BYTES
        if dense_bytes > memory:
            which = dense[0] if len(dense) == 1 else f"{len(dense)} tables ({dense[0]}, ...)"
            raise ConfigFieldError(
                "embeddings.tables",
                f"leaves {which} a dense parameter of {rows} rows x {width} values x "
                f"{TABLE_VALUE_BYTES} bytes ({dense_bytes / 2**30:.0f} GiB on every worker, more "
                f"than this machine's {memory / 2**30:.0f} GiB): name every table, or give a "
                "smaller --table-size",
            )

    def _check_click_model(self) -> None:
        """A click model reads click logs only, and a click log needs one; tables are trained
        by Downpour on whole replicas (not partitioned)."""
        click_model = self.model.name in CLICK_MODELS
        if click_model != (self.data.name in CLICK_LOG_DATASETS):
            wanted = ", ".join(CLICK_LOG_DATASETS if click_model else CLICK_MODELS)
            raise ConfigFieldError(
                "data.name" if click_model else "model.name",
                f"data set {self.data.name!r} does not go with model {self.model.name!r}: "
                + (f"use a click log ({wanted})" if click_model else f"use model {wanted}"),
            )
        size, width = self.data.table_size, self.model.embedding_dim
        if size is not None and size > max_table_rows(width):
            raise ConfigFieldError(
                "data.table_size",
                f"must be <= {max_table_rows(width)}: a table of {size} rows of {width} values "
                f"(the embedding width) x {TABLE_VALUE_BYTES} bytes is more than the "
                f"{MAX_TENSOR_BYTES} bytes torch can size a tensor to, got {size}",
            )
        tables = self.embeddings.tables
        malformed = [name for name in tables or () if not _TABLE_NAME.fullmatch(name)]
        if malformed and click_model:  # another model's --tables is refused as such below
            raise ConfigFieldError(
                "embeddings.tables",
                f"{malformed[0]!r} is not a table of model dlrm (tables.0, tables.1, ...)",
            )
        if click_model and self.pipeline.num_partitions > 1:
            raise ConfigFieldError(
                "pipeline.num_partitions",
                f"must be 1 for model {self.model.name}, got {self.pipeline.num_partitions}",
            )
        if click_model and self.optimizer.algorithm != "downpour":
            raise ConfigFieldError(
                "optimizer.algorithm",
                f"must be downpour for model {self.model.name}, got {self.optimizer.algorithm}",
            )

    def _check_device(self) -> None:
        """A GPU trains whole Downpour replicas of the image models (the click model's tables
        and the pipeline's stages train on the CPU)."""
        if self.cluster.device == "cpu":
            return
        if self.model.name in CLICK_MODELS:
            raise ConfigFieldError(
                "cluster.device",
                f"must be cpu for model {self.model.name}, got {self.cluster.device!r}",
            )
        if self.pipeline.num_partitions > 1:
            raise ConfigFieldError(
                "cluster.device",
                f"must be cpu with {self.pipeline.num_partitions} partitions per replica, "
                f"got {self.cluster.device!r}",
            )

    def _check_algorithm_fields(self) -> None:
        """Refuses a setting the chosen algorithm does not use (a flag that would do nothing)."""
        defaults = {name: section() for name, section in _section_types().items()}
        for path, value in self.to_fields().items():
            owner = algorithm_of_field(path)
            if owner in (None, self.optimizer.algorithm):
                continue
            section, _, name = path.partition(".")
            if value != getattr(defaults[section], name):
                raise ConfigFieldError(
                    path, f"only applies to algorithm {owner}, not {self.optimizer.algorithm}"
                )

    @classmethod
    def from_fields(cls, values: Mapping[str, object]) -> JobConfig:
        """The job of ``{"section.field": value}``; fields not given keep their defaults.

        Raises:
            ConfigFieldError: a value is out of range; ``field`` is its ``section.field``.
            ValueError: a name is not a config field.
        """
        section_types = _section_types()
        kwargs: dict[str, dict[str, object]] = {name: {} for name in section_types}
        for path, value in values.items():
            if not isinstance(path, str):
                raise ValueError(f"unknown config field {path!r}: a field is named 'section.name'")
            section, _, name = path.partition(".")
            types = _field_types(section_types[section]) if section in section_types else {}
            if name not in types:
                raise ValueError(f"unknown config field {path!r}")
            is_tuple = types[name].startswith("tuple") and isinstance(value, list)
            kwargs[section][name] = tuple(value) if is_tuple else value  # JSON has no tuples
        algorithm = values.get("optimizer.algorithm", OptimizerConfig().algorithm)
        sections: dict[str, Any] = {}
        for section, section_type in section_types.items():
            try:
                sections[section] = section_type(**kwargs[section])
            except ConfigFieldError as e:
                path = f"{section}.{e.field}"
                owner = algorithm_of_field(path)
                unused = e.problem.startswith("only applies to")  # not a bad value: unused
                if unused and algorithm in ALGORITHMS and owner not in (None, algorithm):
                    # Said first: the section's own refusal would point at another of its
                    # settings (--server-optimizer momentum), which this algorithm refuses too.
                    problem = f"only applies to algorithm {owner}, not {algorithm}"
                    raise ConfigFieldError(path, problem) from e
                raise ConfigFieldError(path, e.problem) from e
        return cls(**sections)

    def to_fields(self) -> dict[str, object]:
        """``{"section.field": value}`` of every field."""
        return {
            f"{section.name}.{item.name}": getattr(getattr(self, section.name), item.name)
            for section in fields(self)
            for item in fields(getattr(self, section.name))
        }

    def with_fields(self, changes: Mapping[str, object]) -> JobConfig:
        """A copy with ``{"section.field": value}`` changed, validated again."""
        return JobConfig.from_fields({**self.to_fields(), **changes})

    def to_json(self) -> str:
        """The job as config.json holds it: one JSON object per section."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | Path) -> JobConfig:
        """Read a run folder's config.json, sectioned or flat (as runs wrote it before the
        sections); ValueError names the file on bad content."""
        path = Path(path)
        if path.name == "config.json" and not path.exists() and path.parent.is_dir():
            # A folder given where a run folder is expected (a typo, a parent folder).
            raise ValueError(f"{path.parent}: not a run folder (it has no config.json)")
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
            return cls.from_fields(dotted_fields(raw))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a valid run config: {e}") from e


DOWNPOUR_ONLY_FIELDS: dict[str, tuple[str, ...]] = {
    "cluster": ("device",),
    "optimizer": (
        "lr",
        "n_push",
        "n_pull",
        "steps",
        "epochs",
        "blocking",
        "warmstart_steps",
        "wire_dtype",
        "push_compression",
    ),
    "server": ("optimizer", "lr", "momentum", "betas", "eps"),
    "consistency": (),
    "pipeline": (),
    "embeddings": (),
}
"""Fields Sandblaster does not use, by section (an empty tuple: the whole section)."""


def algorithm_of_field(path: str) -> str | None:
    """The one algorithm that uses config field ``path`` ("section.name"): "downpour" for
    ``DOWNPOUR_ONLY_FIELDS``, "sandblaster" for its own section; None for a field both use."""
    section, _, name = path.partition(".")
    if section == "sandblaster":
        return "sandblaster"
    names = DOWNPOUR_ONLY_FIELDS.get(section)
    return "downpour" if names is not None and (not names or name in names) else None


FLAT_FIELDS: dict[str, str] = {
    "num_workers": "cluster.num_workers",
    "num_shards": "cluster.num_shards",
    "host": "cluster.host",
    "threads_per_worker": "cluster.threads_per_worker",
    "dataset": "data.name",
    "data_dir": "data.data_dir",
    "download": "data.download",
    "model": "model.name",
    "seed": "model.seed",
    "lr": "optimizer.lr",
    "n_push": "optimizer.n_push",
    "n_pull": "optimizer.n_pull",
    "batch_size": "optimizer.batch_size",
    "steps": "optimizer.steps",
    "epochs": "optimizer.epochs",
    "blocking": "optimizer.blocking",
    "warmstart_steps": "optimizer.warmstart_steps",
    "server_optimizer": "server.optimizer",
    "server_lr": "server.lr",
    "server_momentum": "server.momentum",
    "server_betas": "server.betas",
    "server_eps": "server.eps",
    "checkpoint_every_s": "server.checkpoint_every_s",
    "sync": "consistency.sync",
    "backup_workers": "consistency.backup_workers",
    "max_staleness": "consistency.max_staleness",
    "staleness_policy": "consistency.staleness_policy",
    "dc_lambda": "consistency.dc_lambda",
    "liveness_timeout_s": "consistency.liveness_timeout_s",
    "timeout_s": "faults.timeout_s",
    "retry_timeout_s": "faults.retry_timeout_s",
    "max_restarts": "faults.max_restarts",
    "out_dir": "reporting.out_dir",
    "eval_every_s": "reporting.eval_every_s",
    "eval_during_training": "reporting.eval_during_training",
    "log_every_steps": "reporting.log_every_steps",
}
"""The field names of the flat config.json that runs wrote before the sections -> their
``section.field`` now (a run folder written then can still be resumed and plotted)."""


def dotted_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json's object as ``{"section.field": value}``, whether it is sectioned or flat
    (``FLAT_FIELDS``); keys that are neither are kept as they are."""
    section_names = set(_section_types())
    dotted: dict[str, Any] = {}
    for key, value in raw.items():
        if key in section_names and isinstance(value, dict):
            dotted.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            dotted[FLAT_FIELDS.get(key, key)] = value
    return dotted


def _section_types() -> dict[str, Any]:
    # Each section's default factory is its class: the sections are listed once, in JobConfig.
    return {item.name: item.default_factory for item in fields(JobConfig)}


def _field_types(section_type: Any) -> dict[str, str]:
    # Annotations are strings here (postponed evaluation); "tuple[...]" is all that matters.
    return {item.name: str(item.type) for item in fields(section_type)}


def physical_memory_bytes() -> int | None:
    """This machine's memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
