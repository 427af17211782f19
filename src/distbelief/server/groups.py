"""Parameter groups on one shard process: independent sets of parameters (each partition of a
model-parallel replica, say), each a ParameterShard of its own with its own layout, version,
server optimizer, consistency clocks and checkpoint folder. A client names its group in every
request; a group is created when a client first names it. The default group ``""`` is the shard
the process was started with, and checkpoints of group ``G`` go to ``<checkpoint_dir>/group-G/``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from distbelief.errors import CheckpointError
from distbelief.server.checkpoint import Checkpointer, load_checkpoint, remove_unfinished_saves
from distbelief.server.checkpoint_meta import meta_path
from distbelief.server.shard import ParameterShard
from distbelief.wire.group_names import DEFAULT_GROUP, check_group_name

logger = logging.getLogger(__name__)

_GROUP_DIR_PREFIX = "group-"


def group_dir(checkpoint_dir: str | Path, name: str) -> Path:
    """Where group ``name``'s checkpoints go (the default group's: ``checkpoint_dir``)."""
    directory = Path(checkpoint_dir)
    return directory if name == DEFAULT_GROUP else directory / f"{_GROUP_DIR_PREFIX}{name}"


class ShardGroups:
    """One shard process's parameter groups, their creation and their checkpoints.

    Args:
        default: The default group's shard.
        make_shard: Builds an empty shard for a new group (same shard id, optimizer and
            consistency as the default); None: the process serves the default group only.
        checkpoint_dir: Where every group's checkpoints go (None: no checkpoints).
        checkpoint_every_s: Seconds between periodic saves (None: no periodic saves).
    """

    def __init__(
        self,
        default: ParameterShard,
        make_shard: Callable[[], ParameterShard] | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every_s: float | None = None,
    ) -> None:
        self.default = default
        self._make_shard = make_shard
        self._checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self._checkpoint_every_s = checkpoint_every_s
        self._lock = threading.Lock()
        self._shards: dict[str, ParameterShard] = {DEFAULT_GROUP: default}
        self._checkpointers: dict[str, Checkpointer] = {}
        self._started = False

    def get(self, name: object) -> ParameterShard:
        """Group ``name``'s shard, created empty when first named.

        Raises:
            ValueError: ``name`` is not a valid group name, or this process serves no groups.
        """
        name = check_group_name(name)
        with self._lock:
            shard = self._shards.get(name)
            if shard is not None:
                return shard
            if self._make_shard is None:
                raise ValueError(f"this shard serves no parameter groups (asked for {name!r})")
            shard = self._shards[name] = self._make_shard()
            shard.group = name
            if self._started:
                self._start_checkpointer(name, shard, saved_version=None)
        logger.info("shard %d: new parameter group %r", shard.shard_id, name)
        return shard

    def shards(self) -> dict[str, ParameterShard]:
        """Every group's shard, by name."""
        with self._lock:
            return dict(self._shards)

    def totals(self) -> dict:
        """Counters summed over every group: ``version``, ``num_pushes``, ``num_pulls``,
        ``num_dropped`` and the ``staleness`` histogram (staleness -> pushes)."""
        totals = {"version": 0, "num_pushes": 0, "num_pulls": 0, "num_dropped": 0}
        staleness: Counter[int] = Counter()
        for shard in self.shards().values():
            counters = shard.counters()
            totals["version"] += counters.version
            totals["num_pushes"] += counters.num_pushes
            totals["num_pulls"] += counters.num_pulls
            totals["num_dropped"] += counters.num_dropped
            # A copy first (one step, under the GIL): the heartbeat thread sums while
            # connection threads record pushes, and iterating a histogram that gains a key
            # meanwhile raises.
            staleness.update(dict(shard.staleness.counts))
        return {**totals, "staleness": {str(s): n for s, n in sorted(staleness.items())}}

    def recovery(self) -> dict:
        """The recovery figures of this life (``ShardDurability.recovery``) summed over every
        group; ``version_seen_before`` counts a group no client reported on at its restored
        version (its clients had nothing to replay)."""
        totals = {"updates_replayed": 0, "pushes_resent": 0, "version_seen_before": 0}
        for shard in self.shards().values():
            figures = shard.recovery()
            totals["updates_replayed"] += figures["updates_replayed"]
            totals["pushes_resent"] += figures["pushes_resent"]
            totals["version_seen_before"] += figures["version_seen_before"]
        return totals

    def restore(self, directory: str | Path | None) -> dict[str, int]:
        """Loads the last checkpoint of the default group and of every group found in
        ``directory``; returns the restored versions by group (empty: nothing restored).

        Raises:
            CheckpointError: a checkpoint is corrupt or belongs to another shard.
        """
        if directory is None:
            return {}
        directory = Path(directory)
        names = [DEFAULT_GROUP]
        if self._make_shard is not None and directory.is_dir():
            names += sorted(
                path.name[len(_GROUP_DIR_PREFIX) :]
                for path in directory.glob(f"{_GROUP_DIR_PREFIX}*")
                if path.is_dir()
            )
        restored = {}
        for name in names:
            version = _restore_one(self.get(name), group_dir(directory, name))
            if version is not None:
                restored[name] = version
        return restored

    def start_checkpoints(self, restored: dict[str, int]) -> None:
        """Periodic saves of every group from now on (and of groups created later)."""
        if self._checkpoint_dir is None or self._checkpoint_every_s is None:
            return
        with self._lock:
            self._started = True
            for name, shard in self._shards.items():
                self._start_checkpointer(name, shard, restored.get(name))

    def save_first_checkpoint(self, name: str) -> None:
        """Group ``name`` was just initialised: its first checkpoint is written now, before the
        initialising client is answered, so a shard killed at any time after that reply
        restarts with the layout (the checkpointer's thread would write it up to a poll
        later). A failed save is logged, and the thread tries again, as with any save."""
        with self._lock:
            checkpointer = self._checkpointers.get(name)
        if checkpointer is None:
            return  # no checkpoints in this process
        try:
            checkpointer.save_if_changed()
        except OSError as e:
            logger.error("first checkpoint of group %r failed: %s", name, e)

    def _start_checkpointer(self, name: str, shard: ParameterShard, saved_version) -> None:
        assert self._checkpoint_dir is not None and self._checkpoint_every_s is not None
        checkpointer = Checkpointer(
            shard,
            group_dir(self._checkpoint_dir, name),
            self._checkpoint_every_s,
            on_finished=shard.checkpoint_finished,
        )
        checkpointer.saved_version = saved_version
        # Periodic saves: the shard's replies now say which pushes are on disk.
        shard.track_checkpoints()
        self._checkpointers[name] = checkpointer.start()

    def stop_checkpoints(self) -> None:
        """Stop the periodic saves; every group writes a last checkpoint."""
        with self._lock:
            self._started = False
            checkpointers = list(self._checkpointers.values())
            self._checkpointers.clear()
        for checkpointer in checkpointers:
            checkpointer.stop()


def _restore_one(shard: ParameterShard, directory: Path) -> int | None:
    # What a save of this shard killed midway left (a restart's checkpoints go on here).
    remove_unfinished_saves(directory, (f"shard{shard.shard_id}-v", f"shard{shard.shard_id}.json."))
    state = load_checkpoint(directory, shard.shard_id)
    if state is None:
        return None
    try:
        shard.restore(state)
    except ValueError as e:
        raise CheckpointError(f"{meta_path(Path(directory), shard.shard_id)}: {e}") from e
    logger.info("shard %d restored version %d from %s", shard.shard_id, state.version, directory)
    return state.version
