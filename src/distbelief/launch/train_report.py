"""What ``distbelief train`` says of a finished job beside its result: the final evaluation's
version(s) and, per restored shard or rolled-back coordinator, what its restart cost. Words
only: it reads the launcher's fault records and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from distbelief.launch.cluster import CHECKPOINT_DIR, Fault

ROWS_LOST = "; its row tables went back to their last save: the row updates since are lost"
"""What a restored Downpour shard with embedding tables adds: the workers re-send dense updates
only, and its lines' count of updates lost is theirs."""


def versions_said(final: dict) -> str:
    """The final evaluation's version, or a partitioned model's, one per partition: each
    partition's stages push to a version of their own."""
    partitions = final.get("partition_versions")
    if partitions is None:
        return f"version {final.get('version')}"
    return f"partition versions {', '.join(map(str, partitions))}"


def restore_lines(faults: Sequence[Fault], run_dir: Path | None = None) -> list[str]:
    """One line per restored shard (or rolled-back coordinator), ``describe_restore``'s, and
    one per shard whose restarted life died again before it restored anything (its later
    fault has a line of its own). A Downpour shard whose checkpoints in ``run_dir`` hold row
    tables adds ``ROWS_LOST``: their updates since their last save are not re-sent, and not
    in the count of updates lost."""
    lines = []
    for i, fault in enumerate(faults):
        if fault.version_restored is not None or fault.updates_redone is not None:
            line = describe_restore(fault)
            if not fault.rolled_back and _has_row_tables(run_dir, fault.process):
                line += ROWS_LOST
            lines.append(line)
        elif (
            fault.process.startswith("shard")
            and fault.action == "restarted"
            and any(later.process == fault.process for later in faults[i + 1 :])
        ):
            lines.append(
                f"{fault.process}: died again before it restored its checkpoint; updates lost "
                "unknown"
            )
    return lines


def describe_restore(fault: Fault) -> str:
    """What a shard's restart cost: ``shard1: restored version 81; the workers re-sent 44
    updates it lacked and 1 push in flight; 0 updates lost`` (Downpour), or ``shard1: restored
    version 22; the job went back to that checkpoint and redid 2 updates`` (Sandblaster; a
    coordinator's: ``coordinator: the job went back to its last checkpoint and redid 3
    updates``; with nothing since the checkpoint, ``shard1: restored version 22, every update
    it had applied: nothing to redo``)."""
    if fault.version_restored is None:  # the coordinator: its checkpoint has no version
        if fault.updates_redone == 0:
            return f"{fault.process}: its last checkpoint held every update: nothing to redo"
        redid = f"redid {_count(fault.updates_redone, 'update')}"
        return f"{fault.process}: the job went back to its last checkpoint and {redid}"
    text = f"{fault.process}: restored version {fault.version_restored}"
    if fault.rolled_back:
        redone = fault.redone or 0
        if redone == 0:  # nothing was rolled back (the coordinator had finished, say)
            return text + ", every update it had applied: nothing to redo"
        return text + f"; the job went back to that checkpoint and redid {_count(redone, 'update')}"
    if fault.updates_replayed is not None:
        text += (
            f"; the workers re-sent {_count(fault.updates_replayed, 'update')} it lacked and "
            f"{_count(fault.pushes_resent, 'push', 'pushes')} in flight"
        )
    lost = fault.lost_updates
    if lost is None and fault.recovery_cut_short:
        return text + "; it died again before it counted the workers' replays: updates lost unknown"
    return text + ("" if lost is None else f"; {_count(lost, 'update')} lost")


def _has_row_tables(run_dir: Path | None, process: str) -> bool:
    """Whether ``process`` is a shard whose checkpoints in ``run_dir`` hold row tables."""
    if run_dir is None or not process.startswith("shard"):
        return False
    return (Path(run_dir) / CHECKPOINT_DIR / f"rows-{process}.json").is_file()


def _count(number: int | None, one: str, many: str | None = None) -> str:
    """``1 update``, ``2 updates``."""
    return f"{number} {one if number == 1 else many or one + 's'}"
