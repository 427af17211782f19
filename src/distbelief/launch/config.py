"""TrainConfig: every setting of a training job, validated once, shared by all its processes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from distbelief.data import DATASET_NAMES
from distbelief.models import MODEL_NAMES
from distbelief.server import (
    SERVER_OPTIMIZER_NAMES,
    ConsistencyConfig,
    server_optimizer_factory,
)
from distbelief.server.optimizers import ServerOptimizerFactory


def _require(condition: bool, field: str, value: object, rule: str) -> None:
    if not condition:
        raise ValueError(f"{field} must be {rule}, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """A Downpour SGD training job."""

    model: str = "lenet"
    """Model to train: one of MODEL_NAMES."""
    dataset: str = "digits"
    """Data set: one of DATASET_NAMES."""
    data_dir: str = "data"
    """Where CIFAR-10 / MNIST files live (downloaded there when missing and online)."""
    download: bool = True
    """Download missing CIFAR-10 / MNIST files (False: fail with the list of files)."""
    num_workers: int = 2
    """Worker processes (replicas), each on its own disjoint slice of the training set."""
    num_shards: int = 2
    """Parameter-server shard processes."""
    n_push: int = 1
    """Push the accrued gradient every this many steps (n_push in Dean et al. 2012)."""
    n_pull: int = 1
    """Fetch fresh parameters every this many steps (n_fetch in Dean et al. 2012)."""
    lr: float = 0.05
    """Worker (local) learning rate."""
    server_optimizer: str = "sgd"
    """Update rule the shards apply to pushed gradients."""
    server_lr: float = 0.05
    """Shards' learning rate (gamma for adagrad)."""
    server_momentum: float = 0.9
    """Momentum of the "momentum" server optimizer."""
    server_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's betas on the shards."""
    server_eps: float | None = None
    """Adagrad's / Adam's epsilon on the shards (None: torch's default)."""
    warmstart_steps: int = 0
    """Only worker 0 trains until the shards have applied this many pushes; then the others
    start from the shards' parameters (Dean et al. 2012's warmstart)."""
    sync: bool = False
    """Synchronous rounds: the shards apply one averaged update per step."""
    backup_workers: int = 0
    """Sync: each round uses the first num_workers - backup_workers gradients."""
    max_staleness: int | None = None
    """Stale synchronous parallel bound in steps (None: unbounded)."""
    staleness_policy: str = "none"
    """none, scale or dc-asgd: how shards adjust stale gradients."""
    dc_lambda: float = 0.04
    """DC-ASGD's lambda."""
    liveness_timeout_s: float = 10.0
    """A worker silent this long no longer holds others back (SSP, sync)."""
    batch_size: int = 32
    """Mini-batch size per worker step."""
    steps: int | None = None
    """Steps per worker; exclusive with epochs."""
    epochs: int | None = None
    """Passes over each worker's slice; used when steps is None (default 15)."""
    seed: int = 0
    """Seeds model initialisation and data order."""
    out_dir: str = ""
    """Run folder; empty means runs/<timestamp>."""
    eval_every_s: float = 1.0
    """Seconds between evaluations of the shards' parameters on the test set."""
    eval_during_training: bool = True
    """Evaluate the shards' parameters every eval_every_s while the workers train; False: only
    once, after the workers finish (the evaluator costs the workers nothing meanwhile)."""
    timeout_s: float = 30.0
    """Limit for each request to a shard."""
    retry_timeout_s: float = 60.0
    """How long workers retry a shard that is unreachable (restarting) before failing."""
    checkpoint_every_s: float = 30.0
    """Seconds between shard checkpoints (they also save at shutdown)."""
    max_restarts: int = 3
    """Restarts allowed per process (worker, shard, evaluator) before giving up on it."""
    blocking: bool = False
    """Workers wait for each push and pull (reproducible; slower)."""
    threads_per_worker: int = 1
    """torch intra-op threads per worker process."""
    log_every_steps: int = 10
    """Steps between a worker's metric records."""
    host: str = "127.0.0.1"
    """Address the local cluster's shards bind to."""

    def __post_init__(self) -> None:
        _require(self.model in MODEL_NAMES, "model", self.model, f"one of {MODEL_NAMES}")
        _require(self.dataset in DATASET_NAMES, "dataset", self.dataset, f"one of {DATASET_NAMES}")
        _require(
            self.server_optimizer in SERVER_OPTIMIZER_NAMES,
            "server_optimizer",
            self.server_optimizer,
            f"one of {SERVER_OPTIMIZER_NAMES}",
        )
        for name in (
            "num_workers",
            "num_shards",
            "n_push",
            "n_pull",
            "batch_size",
            "threads_per_worker",
            "log_every_steps",
        ):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        for name in ("lr", "server_lr"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _require(self.max_restarts >= 0, "max_restarts", self.max_restarts, ">= 0")
        _require(self.retry_timeout_s >= 0, "retry_timeout_s", self.retry_timeout_s, ">= 0")
        for name in ("eval_every_s", "timeout_s", "checkpoint_every_s"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "> 0")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, value, "an integer >= 1")
        _require(self.warmstart_steps >= 0, "warmstart_steps", self.warmstart_steps, ">= 0")
        if self.warmstart_steps and self.sync:
            raise ValueError("warmstart_steps needs asynchronous training: drop sync")
        self.consistency()
        self.server_optimizer_factory()

    def consistency(self) -> ConsistencyConfig:
        """The shards' consistency model; ValueError names a bad combination."""
        return ConsistencyConfig(
            sync=self.sync,
            num_workers=self.num_workers,
            backup_workers=self.backup_workers,
            max_staleness=self.max_staleness,
            staleness_policy=self.staleness_policy,
            dc_lambda=self.dc_lambda,
            liveness_timeout_s=self.liveness_timeout_s,
        )

    def server_optimizer_factory(self) -> ServerOptimizerFactory:
        return server_optimizer_factory(
            self.server_optimizer,
            lr=self.server_lr,
            momentum=self.server_momentum,
            betas=tuple(self.server_betas),
            eps=self.server_eps,
        )

    @property
    def num_epochs(self) -> int:
        """Epochs to run when ``steps`` is None."""
        return self.epochs if self.epochs is not None else 15

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> TrainConfig:
        """Read a config.json written by a run; ValueError names the file on bad content."""
        try:
            raw = json.loads(Path(path).read_text())
            if "server_betas" in raw:
                raw["server_betas"] = tuple(raw["server_betas"])
            return cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}: not a valid run config: {e}") from e
