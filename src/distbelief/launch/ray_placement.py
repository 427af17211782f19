"""Where a job's actors go on a Ray cluster: the CPUs each asks for (and the job in all, checked
against the cluster), the placement group that spreads the processes that listen (shards, the
coordinator) over the nodes, and each actor's options. Ray is imported only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distbelief.config import MAX_WAIT_S, amount_problem, environment_setting
from distbelief.errors import ClusterError
from distbelief.launch.cluster import ProcessKind, ProcessSpec

if TYPE_CHECKING:
    from distbelief.config import JobConfig

PLACEMENT_TIMEOUT_S = 60.0
"""Longest wait for Ray to reserve the shards' places, and for each actor started later (a
worker, the evaluator, a restarted process) to get its CPUs (unless
``DISTBELIEF_PLACEMENT_TIMEOUT_S`` says otherwise)."""
PLACEMENT_TIMEOUT_ENV = "DISTBELIEF_PLACEMENT_TIMEOUT_S"


def placement_timeout_s() -> float:
    """``DISTBELIEF_PLACEMENT_TIMEOUT_S`` in seconds, else ``PLACEMENT_TIMEOUT_S``.

    Raises:
        ValueError: the variable is not a number of seconds > 0 (at most a week), naming it.
    """
    text = environment_setting(PLACEMENT_TIMEOUT_ENV)
    if text is None:
        return PLACEMENT_TIMEOUT_S
    try:
        value: object = float(text)
    except ValueError:
        value = text
    problem = amount_problem(value, most=MAX_WAIT_S)
    if problem is not None:
        raise ValueError(f"{PLACEMENT_TIMEOUT_ENV} {text!r}: {problem} (seconds)")
    return float(text)


PLACED_KINDS = (ProcessKind.SHARD, ProcessKind.COORDINATOR)
"""Kinds that listen, so stay in their bundle of the placement group, on one node: a restart
binds its old address."""


def num_cpus(config: JobConfig) -> int:
    """Logical CPUs the job's processes ask Ray for: one per shard, evaluator and coordinator,
    ``threads_per_worker`` per worker."""
    cluster = config.cluster
    coordinator = 1 if config.optimizer.algorithm == "sandblaster" else 0
    return cluster.num_shards + cluster.num_workers * cluster.threads_per_worker + 1 + coordinator


def early_processes(config: JobConfig) -> list[ProcessSpec]:
    """Every process of the job, in the order their actors are made, at once, before any
    starts: their fresh interpreters and imports are paid while the shards start (and not
    while the workers train)."""
    kinds = [ProcessKind.SHARD, ProcessKind.WORKER, ProcessKind.EVALUATOR]
    if config.optimizer.algorithm == "sandblaster":
        kinds.insert(1, ProcessKind.COORDINATOR)
    counts = {ProcessKind.SHARD: config.cluster.num_shards}
    counts[ProcessKind.WORKER] = config.cluster.num_workers
    return [ProcessSpec(kind, index) for kind in kinds for index in range(counts.get(kind, 1))]


def check_resources(config: JobConfig, address: str) -> None:
    """Refuses a cluster with fewer CPUs than the job asks for (its actors would wait forever).

    Raises:
        ClusterError: too few CPUs (``field``: ``cluster.num_workers``); says how many the
            job needs and for which processes.
    """
    import ray

    needed = num_cpus(config)
    available = ray.cluster_resources().get("CPU", 0)
    if available < needed:
        raise ClusterError(
            f"the Ray cluster at {address} has {available:g} CPUs; this job needs {needed} "
            f"({_cpus_needed(config)})",
            field="cluster.num_workers",
        )


def _cpus_needed(config: JobConfig) -> str:
    """What ``num_cpus`` counts, as the job has it: "2 shards, 8 workers x 1 thread
    (--threads), the evaluator" (and Sandblaster's coordinator)."""
    cluster = config.cluster
    threads = cluster.threads_per_worker
    parts = [
        f"{cluster.num_shards} shard{'s' * (cluster.num_shards != 1)}",
        f"{cluster.num_workers} worker{'s' * (cluster.num_workers != 1)} x {threads} "
        f"thread{'s' * (threads != 1)} (--threads)",
        "the evaluator",
    ]
    if config.optimizer.algorithm == "sandblaster":
        parts.append("the coordinator")
    return ", ".join(parts)


def reserve_places(config: JobConfig, address: str) -> Any:
    """A placement group (strategy SPREAD) with one bundle of one CPU per shard (and one for
    the coordinator), ready.

    Raises:
        ClusterError: Ray did not reserve it within ``placement_timeout_s()``.
    """
    import ray
    from ray.util.placement_group import placement_group

    count = config.cluster.num_shards
    if config.optimizer.algorithm == "sandblaster":
        count += 1  # the coordinator's
    group = placement_group([{"CPU": 1}] * count, strategy="SPREAD")
    timeout_s = placement_timeout_s()
    if not group.wait(timeout_seconds=timeout_s):
        ray.util.remove_placement_group(group)
        raise ClusterError(
            f"Ray could not place the {count} shards within {timeout_s:g}s "
            f"(the cluster at {address} is busy or too small)"
        )
    return group


def actor_options(config: JobConfig, spec: ProcessSpec, namespace: str, group: Any) -> dict:
    """Ray options of the actor of ``spec``'s process: its name in ``namespace`` (so tools can
    find it), its CPUs, its restarts (``--max-restarts``; a call is never retried: the launcher
    decides what a restarted process runs), and, if it listens, its bundle of ``group``."""
    options: dict[str, Any] = {
        "name": spec.name,
        "namespace": namespace,
        "num_cpus": 1,
        "max_restarts": config.faults.max_restarts,
        "max_task_retries": 0,
    }
    if spec.kind is ProcessKind.WORKER:
        options["num_cpus"] = config.cluster.threads_per_worker
    if spec.kind in PLACED_KINDS:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        num_shards = config.cluster.num_shards
        bundle = spec.index if spec.kind is ProcessKind.SHARD else num_shards
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=bundle
        )
    return options
