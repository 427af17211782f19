"""How one life of a job's process under Ray ended, as far as it can be known: the exit code its
actor saw (the process died while its actor lived), or, where the actor went with it, Ray's own
words on the actor's end. Pure mapping of a run's outcome or of Ray's exception; calls no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distbelief.launch.ray_actor import DIED
from distbelief.launch.zygote import EXIT_LOST


@dataclass(frozen=True)
class Ending:
    """How one life ended: ``exitcode`` where the actor saw its process end (-N: signal N),
    else None and ``cause``, Ray's reason on one line (None: nothing was told)."""

    exitcode: int | None
    cause: str | None = None


def ending_of_outcome(outcome: Any) -> Ending:
    """The ending of a run that returned: ``RoleActor.run``'s ``(outcome, exit code)``."""
    _, code = outcome
    if code == EXIT_LOST:
        return Ending(None, "its exit code went with its node's zygote")
    return Ending(code)


def ending_of_error(error: Exception) -> Ending:
    """The ending of a run whose call Ray failed (a ``RayActorError``): its actor died, so no
    exit code reached the launcher; Ray's reason is the cause."""
    return Ending(None, f"Ray: {ray_reason(error)}")


def ending_not_told(waited_s: float) -> Ending:
    """The ending of a run whose call had not ended ``waited_s`` after its process's link
    closed: its actor is being re-created (or is stuck), and Ray said nothing yet."""
    return Ending(None, f"its actor's end untold by Ray within {waited_s:g}s")


def ray_reason(error: Exception) -> str:
    """Ray's reason for a dead or unavailable actor, on one line: the cause in an
    ``ActorDiedError``'s message (e.g. "The actor is dead because it was killed by
    `ray.kill`."), what made an ``ActorUnavailableError``'s actor unavailable (e.g. "The actor
    is temporarily unavailable: IOError: The actor was restarted"), else its first line."""
    message = str(getattr(error, "error_msg", "") or error)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # ActorDiedError: a header line, the actor's details (tab-indented), then the cause.
    cause = [line for line in message.splitlines()[1:] if line and not line.startswith("\t")]
    if cause:
        return _first_sentence(" ".join(cause))
    unavailable = lines[0].partition(" is unavailable: ")[2]
    if unavailable:
        return unavailable.split(". The task may or may not", 1)[0]
    return lines[0]


def _first_sentence(text: str) -> str:
    """Up to the first full stop: Ray's cause goes on with its exit detail and advice."""
    head, stop, _ = text.partition(". ")
    return head + "." if stop else text


def is_death(outcome: Any) -> bool:
    """Whether a returned run's outcome is a death of its process (its actor lived on)."""
    return outcome[0] == DIED
