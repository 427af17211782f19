"""distbelief: DistBelief (Dean et al. 2012) for PyTorch.

The public API is re-exported here and loaded on first use, so ``import distbelief`` (and the
``distbelief`` command's ``--help``) stays fast: torch is imported only when a name needs it.
"""

from __future__ import annotations

from distbelief.lazy import lazy_exports

__version__ = "0.3.0"

_EXPORTS: dict[str, str] = {
    "DownpourSGD": "distbelief.optim",
    "ParameterServerClient": "distbelief.client",
    "JobConfig": "distbelief.config",
    "ConsistencyConfig": "distbelief.config",
    "DistBeliefError": "distbelief.errors",
    "PSError": "distbelief.errors",
    "ShardTimeoutError": "distbelief.errors",
    "HeldTooLongError": "distbelief.errors",
    "ShardUnavailableError": "distbelief.errors",
    "BindError": "distbelief.errors",
    "ClosedError": "distbelief.errors",
    "ProtocolError": "distbelief.errors",
    "NotAPeerError": "distbelief.errors",
    "AuthenticationError": "distbelief.errors",
    "TLSMismatchError": "distbelief.errors",
    "RemoteError": "distbelief.errors",
    "ModelMismatchError": "distbelief.errors",
    "ShardListError": "distbelief.errors",
    "LayoutMismatchError": "distbelief.errors",
    "TableSizeMismatchError": "distbelief.errors",
    "TableWidthMismatchError": "distbelief.errors",
    "TooManyConnectionsError": "distbelief.errors",
    "ConsistencyMismatchError": "distbelief.errors",
    "ShardRestartedError": "distbelief.errors",
    "ShardEmptyError": "distbelief.errors",
    "PlacementRefusedError": "distbelief.errors",
    "UnknownOpError": "distbelief.errors",
    "ClusterError": "distbelief.errors",
    "ConfigFieldError": "distbelief.errors",
    "RendezvousError": "distbelief.errors",
    "ParameterServer": "distbelief.server",
    "CheckpointError": "distbelief.errors",
    "DatasetUnavailableError": "distbelief.errors",
    "ChildFailedError": "distbelief.errors",
    "LauncherInterrupted": "distbelief.errors",
    "RunFolderError": "distbelief.errors",
    "EvaluationNotOpenError": "distbelief.errors",
    "VectorMissingError": "distbelief.errors",
    "CoordinatorError": "distbelief.errors",
    "CoordinatorUnavailableError": "distbelief.errors",
    "EvaluationStalledError": "distbelief.errors",
    "SandblasterConfig": "distbelief.config",
    "PipelineConfig": "distbelief.config",
    "PipelineError": "distbelief.errors",
    "StageTimeoutError": "distbelief.errors",
    "StageUnavailableError": "distbelief.errors",
    "NotAStageError": "distbelief.errors",
    "PipelineStage": "distbelief.pipeline",
    "StageModule": "distbelief.pipeline",
    "build_stage": "distbelief.pipeline",
    "split_model": "distbelief.pipeline",
    "EmbeddingConfig": "distbelief.config",
    "ShardedEmbeddings": "distbelief.embeddings",
    "ShardedEmbedding": "distbelief.embeddings",
    "ShardedEmbeddingBag": "distbelief.embeddings",
    "RowClient": "distbelief.client.rows",
    "reshard_run": "distbelief.launch.reshard",
    "check_ps_addresses": "distbelief.wire.channels",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
