"""How one life of a job's process under Ray ended, as far as it can be known: the exit code its
actor saw (the process died while its actor lived), or, where the actor went with it, Ray's own
words on the actor's end: read off the run's call (``ending_of_call``, ``death_of_call``), or
mapped from its outcome or from Ray's exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distbelief.launch.ray_actor import DIED
from distbelief.launch.zygote import EXIT_LOST

ENDING_TIMEOUT_S = 10.0
"""Longest wait, once a running process's link closed, for its run's call to say how it ended:
at once where its actor lives (the exit code), once Ray has re-created a dead actor (Ray's
reason) or given it up."""


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


def gone_for_good(actor: Any) -> bool:
    """Whether Ray will not re-create ``actor`` (killed with ``no_restart``, out of Ray's
    restarts): its state in Ray's control store is DEAD. Read there, as the state API is not
    served by Ray's minimal install; False where it cannot be read (another Ray version)."""
    try:
        from ray._private import state

        return state.actors(actor._actor_id.hex()).get("State") == "DEAD"
    except Exception:  # any failure to read it: Ray is left to re-create it
        return False


def _first_sentence(text: str) -> str:
    """Up to the first full stop: Ray's cause goes on with its exit detail and advice."""
    head, stop, _ = text.partition(". ")
    return head + "." if stop else text


def is_death(outcome: Any) -> bool:
    """Whether a returned run's outcome is a death of its process (its actor lived on)."""
    return outcome[0] == DIED


def ending_of_call(ray: Any, ref: Any, timeout_s: float = ENDING_TIMEOUT_S) -> Ending:
    """How a life whose link closed while it ran ended: its run's call ``ref`` tells, once it
    ends (waited for up to ``timeout_s``: the restart of a dead actor waits on Ray's
    re-creating it anyway)."""
    from ray.exceptions import GetTimeoutError, RayError

    try:
        return ending_of_outcome(ray.get(ref, timeout=timeout_s))
    except GetTimeoutError:
        return ending_not_told(timeout_s)
    except RayError as e:
        return ending_of_error(e)


def death_of_call(ray: Any, ref: Any, timeout_s: float) -> Ending | None:
    """The ending of a run whose call ``ref`` ended in a death (its process died, or its actor
    with it); None where it returned its role's end (done or failed)."""
    from ray.exceptions import RayError

    try:
        outcome = ray.get(ref, timeout=timeout_s)
    except RayError as e:
        return ending_of_error(e)
    return ending_of_outcome(outcome) if is_death(outcome) else None
