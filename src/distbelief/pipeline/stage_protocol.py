"""The ops stages of one replica send each other over the wire, and the metadata each carries.

Transfers are pulled towards the previous stage, so a stage only needs the address of the stage
after it: stage s sends its activations to stage s + 1 and asks stage s + 1 for the gradients
of its output. Every request names its sender (``stage``), and the receiver refuses one that is
not the stage before it.

``ACTIVATION`` request (one tensor, ``activation``)::

    {"stage": int, "step": int, "micro": int}

reply ``{}`` once the receiver holds the tensor in its buffer for that micro-batch.

``GRADIENT`` request::

    {"stage": int, "step": int, "micro": int, "max_wait_s": float}

reply: the gradient (one tensor, ``gradient``) with ``{}``; ``{"held": true}`` and no tensor if
it was not deposited within ``max_wait_s`` (ask again); or ``{"closed": true}`` if the stage is
shutting down. A request for a step older than the one held is refused (that gradient is gone).

``STAGE_HELLO`` request ``{"stage": int, "num_stages": int, "plan": {name: value}}``, reply
the same of the answering stage: its place, which the caller checks, and its plan (what the
stages of one replica must agree on, e.g. ``pipeline.split_points``), which both sides compare.
"""

from __future__ import annotations

from collections.abc import Mapping

from distbelief.errors import ConfigFieldError
from distbelief.wire.ops import define_op

ACTIVATION = define_op("ACTIVATION", 20)
"""One micro-batch's output activation, sent to the next stage."""
GRADIENT = define_op("GRADIENT", 21)
"""Ask the next stage for the gradient of one micro-batch's output (a long poll)."""
STAGE_HELLO = define_op("STAGE_HELLO", 22)
"""Which stage of how many answers at this address."""

ACTIVATION_NAME = "activation"
"""The name of an ACTIVATION request's tensor."""
GRADIENT_NAME = "gradient"
"""The name of a GRADIENT reply's tensor."""

NUM_MICRO_KEY = "pipeline.num_micro_batches"
"""The plan's setting of micro-batches per batch: the indices a stage's requests may name."""

NUM_PARTITIONS_KEY = "pipeline.num_partitions"
"""The setting a hello's ``num_stages`` is: compared with the plan, and named before it."""

MAX_HOLD_S = 60.0
"""The longest a GRADIENT request may ask to be held."""


def check_index(name: str, value: object) -> int:
    """``value`` as a step or micro-batch index.

    Raises:
        ValueError: it is not an integer >= 0.
    """
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def micro_batch_key(meta: dict) -> tuple[int, int]:
    """(step, micro) of a request.

    Raises:
        ValueError: either is missing or not an integer >= 0.
    """
    return check_index("step", meta.get("step")), check_index("micro", meta.get("micro"))


def hold_of(meta: dict) -> float:
    """How long a GRADIENT request asks to be held.

    Raises:
        ValueError: ``max_wait_s`` is missing or not a number in [0, MAX_HOLD_S].
    """
    value = meta.get("max_wait_s")
    if type(value) not in (int, float) or not 0 <= value <= MAX_HOLD_S:
        raise ValueError(f"max_wait_s must be a number in [0, {MAX_HOLD_S:g}], got {value!r}")
    return float(value)


def wire_plan(plan: Mapping[str, object] | None) -> dict[str, object]:
    """``plan`` as it travels (and comes back): tuples as lists."""
    return {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in (plan or {}).items()
    }


def placed_plan(num_stages: object, plan: object) -> dict[str, object]:
    """A hello's plan with its number of stages first: a neighbour at the right place but cut
    into another number of partitions was given another ``--partitions``, which is named
    before the split that follows from it."""
    return {NUM_PARTITIONS_KEY: num_stages, **(plan if isinstance(plan, dict) else {})}


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def check_plans_agree(
    own: Mapping[str, object], theirs: object, own_side: str, their_side: str
) -> None:
    """Refuse a neighbour whose plan differs from this stage's (both as ``wire_plan`` gives
    them): the stages would train another model than either was given, without a word.

    Raises:
        ConfigFieldError: naming the first setting that differs (``field``: its name in
            ``own``) and both values.
    """
    found = theirs if isinstance(theirs, dict) else {}
    for name in [*own, *(name for name in found if name not in own)]:
        if own.get(name) != found.get(name):
            raise ConfigFieldError(
                name,
                f"is {_shown(own.get(name))} for {own_side} but {_shown(found.get(name))} for "
                f"{their_side}: give every stage of the replica the same",
            )
