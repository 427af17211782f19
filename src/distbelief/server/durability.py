"""What a shard tells its clients about its checkpoints, so that they can replay what a restart
loses: the shard's life, the checkpoint it restored, the checkpoints begun and saved since, and
what the clients replayed into this life. Pure bookkeeping under the shard's lock; no files.

Checkpoints are numbered as they begin (a snapshot taken under the lock). A push applied while
``taken`` is ``e`` belongs to *epoch* ``e``: it is in checkpoint ``n`` exactly when ``e < n``.
So a client may forget its pushes of epochs below ``saved``, and after a restart from checkpoint
``restored`` it must re-send those of epochs ``>= restored``. A save that failed is no restore
point: the epochs on either side of it are one, and a client may merge them (``void``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ShardDurability:
    """One shard's checkpoint numbers, as its replies describe them.

    ``tracking`` is off until periodic checkpoints start (without them a restart has nothing to
    replay onto, and the replies carry nothing more).
    """

    life: str
    """Names this process life of the shard (a restarted shard has another one)."""
    tracking: bool = False
    restored: int = 0
    """The number of the checkpoint this life started from (0: none)."""
    taken: int = 0
    """Checkpoints begun: the epoch of a push applied now."""
    saved: int = 0
    """The last checkpoint known to be on disk."""
    void: set[int] = field(default_factory=set)
    """Checkpoints above ``saved`` whose save failed."""
    replayed: int = 0
    """Updates clients re-sent into this life from their replay buffers."""
    resent: int = 0
    """Pushes that were in flight when a client found this life (re-sent by its retry)."""
    seen_before: int = 0
    """The highest version a client saw from the life before this one."""

    def begin(self) -> int:
        """A checkpoint's snapshot is being taken (under the shard's lock): its number."""
        self.taken += 1
        return self.taken

    def finish(self, number: int, saved: bool) -> None:
        """Checkpoint ``number`` is on disk (``saved``) or failed for good."""
        if saved:
            self.saved = max(self.saved, number)
        elif number > self.saved:
            self.void.add(number)
        self.void = {n for n in self.void if n > self.saved}

    def start_from(self, number: int) -> None:
        """This life restored checkpoint ``number``."""
        self.restored = self.taken = self.saved = number
        self.void = set()

    def note_replay(self, count: int, resent: int, seen_version: int) -> None:
        self.replayed += count
        self.resent += resent
        self.seen_before = max(self.seen_before, seen_version)

    def describe(self) -> dict | None:
        """What every reply carries (None while not tracking)."""
        if not self.tracking:
            return None
        described: dict = {"life": self.life, "restored": self.restored, "saved": self.saved}
        if self.void:
            described["void"] = sorted(self.void)
        return described

    def recovery(self) -> dict:
        """This life's recovery figures (for the launcher's lost-update count)."""
        return {
            "restored_checkpoint": self.restored,
            "updates_replayed": self.replayed,
            "pushes_resent": self.resent,
            "version_seen_before": self.seen_before,
        }
