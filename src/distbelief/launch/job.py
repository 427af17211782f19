"""Run a training job on a Cluster: validate, prepare the run folder, start the processes, have
``supervise.py`` route their events to one sink (metrics.csv, TensorBoard, the progress display)
and stop them in order, show faults, leave the run folder's records (``run_records.py``) however
the job ended. It never
touches processes itself: that is the Cluster's job. The telemetry and plots packages load each
name on first use: a bad flag is refused before anything heavy is imported, and the launcher
loads what it needs while the processes' forkserver loads torch (which the launcher itself loads
only to read a data set's files before the job, and to count its examples for ``--epochs``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from distbelief import telemetry
from distbelief.config import JobConfig
from distbelief.coordinator.checkpoint import RECORD_FILE
from distbelief.data.files import FILE_DATASETS, require_data_files
from distbelief.errors import (
    CheckpointError,
    ChildFailedError,
    DistBeliefError,
    LauncherInterrupted,
    RunFolderError,
)
from distbelief.files import check_folder_can_be_made
from distbelief.launch.cluster import (
    CHECKPOINT_DIR,
    Cluster,
    Event,
    Fault,
    ProcessKind,
    cluster_methods_lacking,
)
from distbelief.launch.deferred_signals import import_with_signals_deferred
from distbelief.launch.hints import shell_word
from distbelief.launch.hosts import check_hosts_are_here
from distbelief.launch.job_plan import (
    check_data,
    counts_examples,
    earlier_plan,
    plan_partitions,
    planned_steps,
)
from distbelief.launch.local import LocalCluster, check_processes_can_share
from distbelief.launch.resume import check_budgets_left
from distbelief.launch.resume_layout import check_resumed_layout, check_shards_fit_model
from distbelief.launch.run_lock import run_dir_locked
from distbelief.launch.run_records import NOT_ASKED_FOR, write_run_records
from distbelief.launch.rundir import (
    TRACEBACK_SUFFIX,
    interrupted_reshard,
    misplaced_run_entry,
    missing_run_folder,
    nothing_to_resume,
    prepare_run_dir,
    records_of_training,
    release_reserved,
    reserve_run_dir,
    reserved_for_this_launch,
    run_dir_path,
    write_text_atomic,
)
from distbelief.launch.stop_records import (
    add_what_the_stop_settled,
    describe_fault,
)
from distbelief.launch.summary import RunResult
from distbelief.launch.supervise import (
    EventRouter,
    job_result,
    stop_coordinator,
    supervise,
)
from distbelief.telemetry.metrics import check_appendable

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from distbelief.telemetry import Sink


logger = logging.getLogger(__name__)

SHARDS_READY_TIMEOUT_S = 60.0
"""Longest wait for every shard to listen."""

LOADED_BEFORE_THE_JOB = (
    "distbelief.telemetry.shard_stats",
    "distbelief.launch.warmstart",
    "tensorboard.summary.writer.event_file_writer",
    "tensorboard.compat.proto.event_pb2",
    "tensorboard.compat.proto.summary_pb2",
)
"""What the launcher uses while its job runs and after (the wire's client side and orjson,
TensorBoard's event writer; matplotlib, ``PLOTTING``, unless ``--no-plots``): loaded while its
processes' forkserver loads torch."""

PLOTTING = "distbelief.plots.run"

LOADED_FOR_THE_CHECKS = ("torch", "distbelief.data", "distbelief.server.checkpoint")
"""What the launcher loads itself to check a job against its training set, model or
checkpoints (a count of examples, a data file's check, a partition plan, a resume): torch's
initialisation is C code, where a Ctrl-C was lost, and the job then ran to its end."""


def _loads_torch_for_the_checks(config: JobConfig, resume: bool) -> bool:
    """Whether the launcher's checks of the job import torch (see ``LOADED_FOR_THE_CHECKS``)."""
    plans = config.pipeline.num_partitions > 1 or config.pipeline.max_stage_bytes is not None
    checks_files = config.data.name in FILE_DATASETS
    return resume or plans or checks_files or counts_examples(config)


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise LauncherInterrupted(f"stopped by signal {signal.Signals(signum).name}")


def _open_cluster(
    cluster_type: type[Cluster], config: JobConfig, run_dir: Path, *, remove_on_failure: bool
) -> Cluster:
    """The job's cluster. One that cannot be opened (Ray refuses the job: too few CPUs, no
    cluster at the address) has started no process of the job: the run folder this job has
    just made is removed again (``remove_on_failure``), so a refused job leaves nothing."""
    try:
        return cluster_type(config, run_dir)
    except BaseException:
        if remove_on_failure:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


LAUNCH_RECORDS = ("pids.json", "ray.json")
"""A launch's records of its processes in the run folder (``Cluster`` implementations')."""


def _prepare(config: JobConfig, run_dir: Path, resume: bool) -> JobConfig:
    """The config with the run folder's path filled in (and written there); refuses to mix
    runs."""
    interrupted = interrupted_reshard(run_dir)
    if interrupted is not None:  # its checkpoints are set aside, not gone
        raise CheckpointError(f"--{'resume' if resume else 'out'} {run_dir}: {interrupted}")
    checkpoints = run_dir / CHECKPOINT_DIR
    has_checkpoints = (
        any(checkpoints.glob("shard*.json"))
        or any(checkpoints.glob("group-*/shard*.json"))  # a model-parallel job's
        or any(checkpoints.glob("lbfgs-*/shard*.json"))  # Sandblaster's, its record lost
        or (checkpoints / RECORD_FILE).exists()
    )
    if resume and not has_checkpoints:
        raise nothing_to_resume(run_dir, run_dir / CHECKPOINT_DIR)
    # A `distbelief ps --checkpoint-dir` folder holds its shards' files itself.
    if not resume and (has_checkpoints or any(run_dir.glob("shard*.json"))):
        raise _checkpoints_refused(run_dir)
    if not resume and records_of_training(run_dir) and (run_dir / "config.json").exists():
        raise ValueError(
            f"--out {run_dir} holds the records of a run whose checkpoints are gone (its "
            "metrics.csv), which a new run would write over: give another folder"
        )
    if not resume and (run_dir / "metrics.csv").exists() and not (run_dir / "config.json").exists():
        # A run folder has its config.json from its start: these records are someone else's.
        raise ValueError(
            f"--out {run_dir} holds a metrics.csv of no run (an `eval --out` watch's?), which "
            "a new run would write over: give another folder"
        )
    if resume:  # refused as the metrics writer would refuse it, before config.json changes
        check_appendable(run_dir / "metrics.csv")
        # They name the last launch's processes, gone: this launch writes its own as its
        # processes start (a Ray run resumed by the local launcher writes no ray.json).
        for record in LAUNCH_RECORDS:
            (run_dir / record).unlink(missing_ok=True)
        # The last launch's failures: a resume that ends done would look failed beside them.
        for traceback in run_dir.glob(f"*{TRACEBACK_SUFFIX}"):
            traceback.unlink(missing_ok=True)
    config = config.with_fields({"reporting.out_dir": str(run_dir)})
    write_text_atomic(run_dir / "config.json", config.to_json())
    return config


def _run_whose_checkpoints_hold(path: Path) -> Path | None:
    """The run folder whose checkpoints folder ``path`` lies within, if any (a Sandblaster
    run's coordinator prunes its iteration folders there, a reshard moves it whole): as the
    file system finds it (links followed, ``..`` taken), beside a config.json of a run."""
    for folder in Path(path).resolve().parents:
        if folder.name == CHECKPOINT_DIR and _is_a_runs_config(folder.parent / "config.json"):
            return folder.parent
    return None


def _is_a_runs_config(path: Path) -> bool:
    try:
        JobConfig.from_file(path)
    except (OSError, ValueError):  # none there, or not a run's
        return False
    return True


def _checkpoints_refused(run_dir: Path) -> ValueError:
    """Why a new run may not take ``run_dir``, which holds checkpoints: another run's, which
    ``--resume`` continues, or, without a config.json beside them (a ``distbelief ps
    --checkpoint-dir`` folder's), no run's, which ``--resume`` cannot continue either."""
    if (run_dir / "config.json").exists():
        return ValueError(
            f"--out {run_dir} holds another run's checkpoints: use --resume {shell_word(run_dir)}"
        )
    return ValueError(
        f"--out {run_dir} holds checkpoints of no run (no config.json beside them: a "
        "`distbelief ps --checkpoint-dir` folder's?), which a new run would mix its own "
        "with: give another folder"
    )


def engine_cluster(engine: str) -> type[Cluster]:
    """The Cluster of a ``cluster.engine`` name (Ray's is imported only when named)."""
    if engine == "ray":
        from distbelief.launch.ray_cluster import RayCluster

        return RayCluster
    return LocalCluster


def _start(
    cluster: Cluster, config: JobConfig, shards_ready: Callable[[list[str]], None]
) -> list[str]:
    """Every process: the shards at once, then (they need the shards' addresses) the workers
    and the evaluator at once; nothing waits for a process but the shards' readiness (and, for
    Sandblaster's workers, the coordinator's). Returns the shards' addresses, given to
    ``shards_ready`` too as soon as the shards listen, before anything else starts."""
    # The launcher polls the shards too (the wire is loaded by now: the cluster's key).
    from distbelief.wire.channels.shm import apply_job_transport

    apply_job_transport(config.cluster.transport)
    for shard_id in range(config.cluster.num_shards):
        cluster.start(ProcessKind.SHARD, shard_id)
    addresses = cluster.wait_for_shards(SHARDS_READY_TIMEOUT_S)
    shards_ready(addresses)
    if config.optimizer.algorithm == "sandblaster":
        cluster.start(ProcessKind.COORDINATOR, 0)
        cluster.wait_for_coordinator(SHARDS_READY_TIMEOUT_S)
    # Workers first: the first step waits on them, while the evaluator has nothing to read
    # before their first push (each start is a fork of a large process: tens of ms).
    if config.pipeline.num_partitions > 1:
        _start_stages(cluster, config)
    else:
        for rank in range(config.cluster.num_workers):
            cluster.start(ProcessKind.WORKER, rank)
    cluster.start(ProcessKind.EVALUATOR, 0)
    return addresses


def _start_stages(cluster: Cluster, config: JobConfig) -> None:
    """Every replica's stages, last to first: a stage is told where its next stage listens."""
    ranks = range(config.cluster.num_workers)
    for stage in reversed(range(config.pipeline.num_partitions)):
        for rank in ranks:
            cluster.start(ProcessKind.STAGE, rank, stage)
        if stage > 0:
            for rank in ranks:
                cluster.wait_for_stage(rank, stage, SHARDS_READY_TIMEOUT_S)


def train(
    config: JobConfig,
    *,
    resume: bool = False,
    cluster_type: type[Cluster] | None = None,
) -> RunResult:
    """Run a whole job; returns when every process has stopped. Once its processes have
    started, the run folder's ``summary.json`` records how it ended, even when it raises, and
    ``staleness.json`` and the plots hold what it did until then.

    The job's processes start from a forkserver that imports the calling script first, as
    ``multiprocessing`` does: a script calls ``train`` under ``if __name__ == "__main__":``
    (else every process it starts runs the script again, fails, and the job fails with it).

    Args:
        config: The job.
        resume: Continue the run in ``config.reporting.out_dir`` from its shard checkpoints.
        cluster_type: What runs the processes; made with the config and the run folder.
            Default: the one ``config.cluster.engine`` names.

    Raises:
        ChildFailedError: a process reported an error, or could not be brought back; every
            process is stopped.
        LauncherInterrupted: Ctrl-C or SIGTERM; every process is stopped.
        RunFolderError: a file of the run folder could not be written (made read-only, a full
            disk): every process is stopped (or, the job done, its summary.json is missing).
        CheckpointError: a checkpoint to resume from is corrupt, or holds another model than
            the run's config.json names (names the file).
        TypeError: ``config`` is no ``JobConfig``, ``resume`` no bool, or ``cluster_type`` no
            ``Cluster`` class.
        ConfigFieldError: a bad setting (a shard or worker host that is not this machine's, or
            a data set's files missing, or a row setting for a model without embedding tables,
            among them), or the ray engine named where Ray is not installed.
        ValueError: a data file is corrupt or a split would be empty (names the file); or
            RAY_AUTH_MODE=token where Ray finds no token; or, with ``resume``, no such run
            folder (nothing is made) or one without shard checkpoints.
        ClusterError: the ray engine cannot join or start Ray, or place the job on it
            (``field`` names the setting the cluster refuses, if one is to blame).
    """
    if not isinstance(config, JobConfig):
        raise TypeError(f"config must be a JobConfig, got {type(config).__name__}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if cluster_type is not None and (
        not isinstance(cluster_type, type) or cluster_methods_lacking(cluster_type)
    ):
        raise TypeError(
            f"cluster_type must be a Cluster class (LocalCluster, RayCluster), got {cluster_type!r}"
        )
    cluster_type = cluster_type or engine_cluster(config.cluster.engine)
    if not resume and not config.reporting.out_dir:
        # Named once, and made at once: a launch in the same second takes another name.
        config = config.with_fields({"reporting.out_dir": str(reserve_run_dir())})
    out = run_dir_path(config.reporting.out_dir)
    try:
        config, partitions, total_steps = _check_and_plan(config, cluster_type, resume=resume)
        # After the checks, which name a path that cannot be looked at (too long, say).
        fresh = not resume and (reserved_for_this_launch(out) or not out.exists())
        run_dir = prepare_run_dir(config.reporting.out_dir)
        named = f"--resume {run_dir}" if resume else f"--out {run_dir}"
        # A folder this job found missing is removed only under its lock: a job that started
        # with it in the same instant and holds it is using it, and a job refused by the lock
        # has nothing of its own there.
        with run_dir_locked(run_dir, named):
            try:
                config = _prepare(config, run_dir, resume)
                return _run_job(
                    config,
                    run_dir,
                    cluster_type,
                    resume=resume,
                    fresh=fresh,
                    plan=partitions,
                    total_steps=total_steps,
                )
            except BaseException as e:
                if fresh:
                    _remove_if_unused(run_dir, interrupted=isinstance(e, INTERRUPTIONS))
                raise
    finally:
        release_reserved(out)  # made for this job and left empty (refused by its checks): gone


def _check_and_plan(
    config: JobConfig, cluster_type: type[Cluster], *, resume: bool
) -> tuple[JobConfig, dict, int]:
    """``train``'s checks, before anything is written: the settings, the hosts, the data, the
    run folder and a resume's layout; returns the config with the split points filled in,
    the split's description and the steps the workers will run in all."""
    # As the command line does: a row setting for a model without tables would be ignored.
    config.check_row_settings_apply()
    if resume and (missing := missing_run_folder(run_dir_path(config.reporting.out_dir))):
        # Checked before anything is made: a refused resume leaves no empty folder behind.
        raise ValueError(f"--resume {run_dir_path(config.reporting.out_dir)}: {missing}")
    if issubclass(cluster_type, LocalCluster):
        check_hosts_are_here(config.cluster)  # every process runs on this machine
        check_processes_can_share()
        config.check_row_caches_fit_here()
    require_data_files(config.data)  # before any process starts, which would fail on it
    flag, run_dir = "--resume" if resume else "--out", run_dir_path(config.reporting.out_dir)
    check_folder_can_be_made(run_dir, flag)
    if not resume and (holder := _run_whose_checkpoints_hold(run_dir)) is not None:
        raise ValueError(
            f"--out {run_dir}: inside the {CHECKPOINT_DIR} folder of run {holder}, whose "
            "resumes and reshards remove what they do not keep there: give another folder"
        )
    misplaced = misplaced_run_entry(run_dir)
    if misplaced is not None:  # before anything is written or started
        raise ValueError(f"{flag} {run_dir}: {misplaced}")
    # Counting examples loads the training set (torch): a forkserver's imports, say, overlap
    # it. Without counting, the steps are checked first: a refused --warmstart-steps starts no
    # process, as any bad flag.
    warm_up_first = counts_examples(config)
    if warm_up_first:
        cluster_type.warm_up(config)
        import_with_signals_deferred(*LOADED_FOR_THE_CHECKS)
    total_steps = sum(planned_steps(config))  # validates before anything is written
    if not warm_up_first:
        cluster_type.warm_up(config)  # overlapping the partition plan and the run folder
        if _loads_torch_for_the_checks(config, resume):
            import_with_signals_deferred(*LOADED_FOR_THE_CHECKS)
    check_data(config, counted=warm_up_first)
    if resume and config.pipeline.split_points is not None:
        check_resumed_layout(config)  # with the split points: each partition's is checked
        # Its own points (config.json's): sizes only, nothing measured, nothing logged.
        config, partitions = plan_partitions(config, announce=False)
        if partitions:
            partitions = earlier_plan(run_dir_path(config.reporting.out_dir), partitions)
    else:
        config, partitions = plan_partitions(config)
        if resume:
            check_resumed_layout(config)
        else:
            check_shards_fit_model(config)  # a resumed run's count was checked by its reshard
    if resume:
        check_budgets_left(run_dir_path(config.reporting.out_dir), config)
    return config, partitions, total_steps


INTERRUPTIONS = (KeyboardInterrupt, LauncherInterrupted)


def _remove_if_unused(run_dir: Path, *, interrupted: bool) -> None:
    """A run folder this job made, left holding nothing but its config.json, or, interrupted,
    the records of a job that started no process (no pids.json: Ctrl-C as the job started):
    removed, as a refused job leaves none. A failure's records stay: they say what failed."""
    with contextlib.suppress(OSError):
        names = {path.name for path in run_dir.iterdir()}
        if names <= {"config.json"} or (interrupted and "pids.json" not in names):
            shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``LauncherInterrupted`` within: a hang-up (the terminal closed,
    the SSH session dropped) stops the job as SIGTERM does, in order, with the shards' last
    checkpoints and summary.json. The handlers before are put back after."""
    stopping = (signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in stopping}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_job(
    config: JobConfig,
    run_dir: Path,
    cluster_type: type[Cluster],
    *,
    resume: bool,
    fresh: bool,
    plan: dict,
    total_steps: int,
) -> RunResult:
    """The job itself, in its prepared run folder: start, supervise, then record and plot
    what it did, however it ended."""
    # After the checks above, so a refused setting is reported without waiting for these.
    no_plots = None if config.reporting.draw_plots else NOT_ASKED_FOR
    import_with_signals_deferred(*LOADED_BEFORE_THE_JOB, *([] if no_plots else [PLOTTING]))
    display = telemetry.ProgressDisplay(
        total_steps=total_steps, num_workers=config.cluster.num_workers
    )
    started = time.time()
    result: RunResult | None = None  # set once the cluster is open, however the job ends
    trained = False  # the training and its final evaluation are over
    plots_skipped_by = no_plots
    with _stopped_by_signals():
        try:
            try:
                # Closing the FanOut closes the display too (twice is harmless); the cluster stops
                # last.
                with (
                    _open_cluster(
                        cluster_type, config, run_dir, remove_on_failure=fresh
                    ) as cluster,
                    display,
                    telemetry.FanOut(
                        [
                            metrics := telemetry.MetricsWriter(
                                run_dir / "metrics.csv", append=resume
                            ),
                            telemetry.TensorBoardLog(run_dir),
                            display,
                        ]
                    ) as sink,
                ):
                    display.time_offset_s = metrics.time_offset_s
                    shards_ready = _watch_cluster(cluster, config, run_dir, sink, resume=resume)
                    route = EventRouter(sink)
                    addresses: list[str] = []
                    try:
                        addresses = _start(cluster, config, shards_ready)
                        route.shard_poller = telemetry.ShardStatsPoller(
                            addresses, security=cluster.security
                        )
                        supervise(cluster, route, config)
                        trained = True
                    except BaseException:
                        cluster.begin_stop()  # nothing is left for a process brought back to do
                        raise
                    finally:
                        # Before the cluster stops: what its processes reported is known now.
                        stop_coordinator(cluster, route, config)
                        result = job_result(
                            cluster,
                            config,
                            run_dir,
                            time.time() - started,
                            route,
                            addresses,
                            time_offset_s=metrics.time_offset_s,
                        )
                        result.partitions = plan
            finally:
                # After the cluster's stop: what it saw while stopping is known only now.
                if result is not None:
                    add_what_the_stop_settled(
                        result, cluster, config, time_offset_s=metrics.time_offset_s
                    )
                    # The stop is the launch's too (the shards' last saves, a process that
                    # hung and was killed): the faults it saw fall within it.
                    result.elapsed_s = time.time() - started
        except BaseException as e:
            if not (trained and result is not None and isinstance(e, INTERRUPTIONS)):
                replacement = _record_the_end(e, result, run_dir, plots_skipped_by=no_plots)
                if replacement is None:
                    raise
                raise replacement from (e if isinstance(e, KeyboardInterrupt) else None)
            # The training and its final evaluation are over: a stop as the job ends cuts
            # short only its plots, and the run stays done.
            plots_skipped_by = no_plots or "stopped as the job ended"
    assert result is not None  # the job ran to its end
    _write_records(result, plots_skipped_by=plots_skipped_by)
    logger.info("run folder: %s (pid %d)", run_dir, os.getpid())
    return result


def _watch_cluster(
    cluster: Cluster, config: JobConfig, run_dir: Path, sink: Sink, *, resume: bool
) -> Callable[[list[str]], None]:
    """Has the cluster's faults said to ``sink`` and, with its processes' readiness, told to
    the warmstart's release; returns what to call once the shards listen (a resumed run's
    first line, the warmstart's shards)."""
    # Imported here, not at the top: it loads the wire's client (orjson), which is loaded
    # with the signals deferred before the job.
    from distbelief.launch.warmstart import WarmstartRelease

    warmstart = WarmstartRelease(config, cluster.security, sink.message)

    def on_fault(fault: Fault) -> None:
        sink.message(describe_fault(fault), fault.time_s)
        warmstart.on_fault(fault)

    cluster.on_fault = on_fault
    restored: dict[int, int | None] = {}  # shard id -> its first life's version

    def on_ready(event: Event) -> None:
        warmstart.on_ready(event)
        if event.source.kind is ProcessKind.SHARD:
            restored.setdefault(event.source.index, event.payload.get("restored_version"))

    cluster.on_ready = on_ready

    def shards_ready(shard_addresses: list[str]) -> None:
        if resume:
            sink.message(_resumed_from(run_dir, restored))
        warmstart.shards_ready(shard_addresses)

    return shards_ready


def _record_the_end(
    error: BaseException,
    result: RunResult | None,
    run_dir: Path,
    *,
    plots_skipped_by: str | None = None,
) -> BaseException | None:
    """Writes the run folder's records of a job ended by ``error`` (Ctrl-C, a signal, a failed
    process or engine, a run folder that cannot be written); returns what to raise in its
    place, if anything (None: ``error`` itself, recorded or not). ``plots_skipped_by``: as
    ``write_run_records`` takes it."""

    def write(outcome: str, reason: str) -> None:
        try:
            _write_records(result, outcome, reason, plots_skipped_by=plots_skipped_by)
        except INTERRUPTIONS:
            # A second stop while a stop is recorded (cutting its plots short) is the same
            # stop: the line printed stays the reason recorded, not "interrupted".
            if outcome != "interrupted":
                raise

    if isinstance(error, KeyboardInterrupt):
        write("interrupted", "stopped by Ctrl-C")
        return LauncherInterrupted("stopped by Ctrl-C")
    if isinstance(error, LauncherInterrupted):
        write("interrupted", str(error))
    elif isinstance(error, ChildFailedError):
        write("failed", error.short())
    elif isinstance(error, DistBeliefError):  # a cluster engine's failure (Ray lost), say
        write("failed", f"{type(error).__name__}: {error}")
    elif isinstance(error, OSError) and _in_run_folder(error, run_dir):
        # The run folder made read-only, or the disk full, mid-run: a metrics row, an event
        # file or pids.json could not be written. The cluster has stopped in order, as for a
        # failed process; summary.json is written if it still can be.
        failure = RunFolderError(
            f"cannot write {error.filename}: {error.strerror}; the job stopped"
        )
        write("failed", str(failure))
        return failure
    return None


def _resumed_from(run_dir: Path, restored: dict[int, int | None]) -> str:
    """The line a resumed run starts with: the version each shard restored from its last
    checkpoint (the sum over its parameter groups: a partitioned run's, a Sandblaster run's
    committed iteration)."""
    versions = ", ".join(
        f"shard{shard_id} version {restored[shard_id] or 0}" for shard_id in sorted(restored)
    )
    return f"resumed {run_dir} from its last checkpoints: {versions}"


def _in_run_folder(error: OSError, run_dir: Path) -> bool:
    """Whether ``error`` is about a file of the run folder (or the folder itself)."""
    if not isinstance(error.filename, str):
        return False
    path, folder = Path(error.filename).absolute(), run_dir.absolute()
    return path == folder or folder in path.parents


def _write_records(
    result: RunResult | None,
    outcome: str = "done",
    reason: str | None = None,
    *,
    plots_skipped_by: str | None = None,
) -> None:
    """``write_run_records``; a run folder that cannot take them (made read-only, the disk
    full) is said in one line: a job that ended otherwise keeps its outcome (a warning), one
    that was done fails (``RunFolderError``: its summary.json is missing)."""
    try:
        write_run_records(result, outcome, reason, plots_skipped_by=plots_skipped_by)
    except OSError as e:
        said = f"cannot write {e.filename}: {e.strerror}"
        if outcome == "done":
            raise RunFolderError(f"{said} (the job itself finished)") from None
        logger.warning("%s", said)
