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

``STAGE_HELLO`` request ``{"stage": int, "num_stages": int}``, reply
``{"stage": int, "num_stages": int}``: the answering stage's place, which the caller checks.
"""

from __future__ import annotations

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
