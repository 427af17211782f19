"""How a training job ended (``RunResult``) and its record in the run folder, ``summary.json``:
written however the job ends (done, failed, interrupted), atomically. It knows nothing of
processes: the launcher fills the result in.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from distbelief.files import write_text_atomic
from distbelief.launch.cluster import Fault

SUMMARY_FILE = "summary.json"

OUTCOMES = ("done", "failed", "interrupted")
"""How a job ends: every worker finished; a process failed or could not be brought back;
Ctrl-C or SIGTERM."""


@dataclass
class RunResult:
    """How a training job ended."""

    run_dir: Path
    final: dict = field(default_factory=dict)
    worker_steps: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    staleness: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per shard: how many pushes arrived with each staleness."""
    faults: list[Fault] = field(default_factory=list)
    """Processes that died during the run, or reported an error while it stopped, and what
    became of them."""
    coordinator: dict = field(default_factory=dict)
    """Sandblaster: the coordinator's result (iterations, loss, why it stopped)."""
    partitions: dict = field(default_factory=dict)
    """Model parallelism: the split (points, basis, per-stage cost and state bytes)."""
    shards: dict[str, dict] = field(default_factory=dict)
    """Per shard: the address it served at and the host each worker connected from."""
    outcome: str = "done"
    """One of ``OUTCOMES``."""
    reason: str | None = None
    """Why a job that is not "done" ended (the failed process and its error, or the signal)."""


def write_summary(
    result: RunResult | None, outcome: str = "done", reason: str | None = None
) -> None:
    """Writes ``result`` as the run folder's ``summary.json``, ended by ``outcome`` for
    ``reason``. None (the job ended before its cluster was open: no process had started)
    writes nothing.

    Raises:
        ValueError: ``outcome`` is not one of ``OUTCOMES``.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    if result is None:
        return
    result.outcome, result.reason = outcome, reason
    write_text_atomic(result.run_dir / SUMMARY_FILE, summary_json(result))


def _strict(value: object) -> object:
    """``value`` with every non-finite float (a diverged loss) as None: strict JSON, which has
    no NaN or Infinity, so any JSON reader takes the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def summary_json(result: RunResult) -> str:
    """The text of ``summary.json``: strict JSON, a non-finite number written as null."""
    fields = _strict(
        {
            "outcome": result.outcome,
            "reason": result.reason,
            "final": result.final,
            "worker_steps": result.worker_steps,
            "elapsed_s": round(result.elapsed_s, 3),
            **({"coordinator": result.coordinator} if result.coordinator else {}),
            **({"partitions": result.partitions} if result.partitions else {}),
            "shards": result.shards,
            "faults": [
                {
                    **dataclasses.asdict(fault),
                    # What the launcher's line says was redone, where the coordinator did not.
                    "updates_redone": fault.redone,
                    "lost_updates": fault.lost_updates,
                }
                for fault in result.faults
            ],
        }
    )
    return json.dumps(fields, indent=2, allow_nan=False)
