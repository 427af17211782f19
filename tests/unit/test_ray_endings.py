"""How a Ray job's process ended, as its fault records it: the exit code its actor saw, or, where
the actor went with it, Ray's own reason from the exception Ray raises for the run's call (built
here as Ray builds it); and the line the launcher prints for such a fault."""

from __future__ import annotations

import signal

import pytest

from distbelief.launch.cluster import Fault
from distbelief.launch.ray_actor import DIED
from distbelief.launch.ray_endings import (
    Ending,
    ending_not_told,
    ending_of_error,
    ending_of_outcome,
    gone_for_good,
)
from distbelief.launch.stop_records import describe_fault
from distbelief.launch.zygote import EXIT_LOST

pytest.importorskip("ray")

_ACTOR_ID = bytes(range(16))


def _actor_died(error_message: str) -> Exception:
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError

    context = ActorDiedErrorContext(
        error_message=error_message,
        actor_id=_ACTOR_ID,
        class_name="RoleActor",
        pid=4242,
        name="shard0",
        ray_namespace="distbelief-0123",
        node_ip_address="127.0.0.2",
    )
    return ActorDiedError(context)


def test_a_process_that_died_while_its_actor_lived_keeps_its_exit_code():
    assert ending_of_outcome((DIED, -signal.SIGKILL)) == Ending(-signal.SIGKILL)
    assert ending_of_outcome((DIED, 3)) == Ending(3)


def test_an_exit_code_lost_with_the_zygote_is_unknown_not_a_signal():
    ending = ending_of_outcome((DIED, EXIT_LOST))
    assert ending.exitcode is None
    assert ending.cause == "its exit code went with its node's zygote"


def test_an_actor_given_up_after_ray_kill_says_so():
    error = _actor_died("The actor is dead because it was killed by `ray.kill`.")
    assert ending_of_error(error) == Ending(
        None, "Ray: The actor is dead because it was killed by `ray.kill`."
    )


def test_an_actor_whose_worker_died_gives_rays_reason_without_its_advice():
    error = _actor_died(
        "The actor is dead because its worker process has died. Worker exit type: "
        "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error "
        "code 2. End of file. Some common causes include: (1) the process was killed"
    )
    assert ending_of_error(error).cause == (
        "Ray: The actor is dead because its worker process has died."
    )


def test_an_actor_with_no_cause_gives_rays_base_message():
    from ray.exceptions import ActorDiedError

    assert ending_of_error(ActorDiedError()).cause == (
        "Ray: The actor died unexpectedly before finishing this task."
    )


@pytest.mark.parametrize(
    "told",
    [
        "The actor is temporarily unavailable: IOError: The actor was restarted",
        "The actor is temporarily unavailable: RpcError: RPC error: Socket closed rpc_code: 14",
    ],
    ids=["ray.kill", "SIGKILL of the actor"],
)
def test_a_restarted_actors_call_gives_what_made_it_unavailable(told):
    from ray.exceptions import ActorUnavailableError

    ending = ending_of_error(ActorUnavailableError(told, _ACTOR_ID))
    assert ending == Ending(None, f"Ray: {told}")


def test_the_fault_line_says_the_exit_code_or_else_the_cause():
    killed = Fault("worker1", 3.0, -signal.SIGKILL, "restarted")
    assert describe_fault(killed) == "worker1 died (exit code -9); restarted"
    cause = "Ray: The actor is dead because it was killed by `ray.kill`."
    gone = Fault("shard0", 3.0, None, "given up", cause=cause)
    assert describe_fault(gone) == f"shard0 died ({cause}); given up"
    untold = Fault("shard0", 3.0, None, "restarted", cause=ending_not_told(10.0).cause)
    assert describe_fault(untold) == (
        "shard0 died (its actor's end untold by Ray within 10s); restarted"
    )


def test_an_actor_whose_state_cannot_be_read_is_left_to_ray_to_re_create():
    # No Ray joined here: nothing says the actor is gone for good, so it is not given up.
    class Handle:
        _actor_id = type("ActorID", (), {"hex": lambda self: "00" * 16})()

    assert gone_for_good(Handle()) is False
    assert gone_for_good(object()) is False
