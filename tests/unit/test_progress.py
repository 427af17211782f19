"""Unit tests of distbelief.telemetry.progress in both modes, writing into a StringIO."""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest

from distbelief.telemetry import ProgressDisplay, make_record

TOTAL_STEPS = 100


def _feed(display: ProgressDisplay) -> None:
    for step in range(1, 51):
        for rank in range(2):
            display.write(
                make_record(
                    "worker",
                    rank,
                    time_s=0.1 * step,
                    step=step,
                    loss=1.0 / step,
                    accuracy=min(1.0, 0.02 * step),
                )
            )
        if step % 20 == 0:
            display.write(
                make_record(
                    "evaluator",
                    0,
                    time_s=0.1 * step,
                    version=step,
                    test_loss=0.5,
                    test_accuracy=0.8,
                )
            )
    display.write(make_record("shard", 0, time_s=5.0, version=60))
    display.message("worker 1 exited")


def _parse(line: str) -> tuple[str, dict[str, str]]:
    kind, *pairs = shlex.split(line)
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        assert sep == "=" and key and value, f"not key=value: {pair!r} in {line!r}"
        fields[key] = value
    return kind, fields


def test_non_interactive_lines_are_key_value() -> None:
    stream = io.StringIO()
    with ProgressDisplay(
        total_steps=TOTAL_STEPS, num_workers=2, interactive=False, stream=stream, log_every_s=1.0
    ) as display:
        _feed(display)
    text = stream.getvalue()
    assert "\x1b" not in text and text.isascii()
    parsed = [_parse(line) for line in text.splitlines()]
    kinds = [kind for kind, _ in parsed]
    assert set(kinds) == {"progress", "eval", "message"}
    # Rate limited: 5 s of run time at 1 s apart, plus the final line written on close.
    assert 4 <= kinds.count("progress") <= 7
    assert kinds.count("eval") == 2
    last_progress = [fields for kind, fields in parsed if kind == "progress"][-1]
    assert last_progress["steps"] == f"100/{TOTAL_STEPS}"
    assert last_progress["t"] == "5.0s"
    assert float(last_progress["worker1.loss"]) == pytest.approx(0.02)
    assert float(last_progress["worker0.steps_per_s"]) == pytest.approx(10.0)
    assert float(last_progress["ps.test_acc"]) == pytest.approx(0.8)
    eval_fields = next(fields for kind, fields in parsed if kind == "eval")
    assert eval_fields == {"t": "2.0s", "version": "20", "test_loss": "0.5", "test_acc": "0.8000"}
    message = next(fields for kind, fields in parsed if kind == "message")
    assert message["text"] == "worker 1 exited"


def test_non_interactive_is_the_default_for_a_non_terminal_stream() -> None:
    display = ProgressDisplay(total_steps=10, num_workers=1, stream=io.StringIO())
    assert display.interactive is False


def test_message_with_control_characters_stays_one_clean_line() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(total_steps=10, num_workers=1, interactive=False, stream=stream)
    with display:
        display.message("bad\x1b[31m\nname")
    (line,) = stream.getvalue().splitlines()
    assert "\x1b" not in line


def test_a_message_is_timed_when_it_happened_not_at_the_latest_record() -> None:
    """A fault's line says when the process died (its time on metrics.csv's axis), not when the
    last record came in (0.0 s before the first one); a message without a time keeps that."""
    stream = io.StringIO()
    display = ProgressDisplay(total_steps=10, num_workers=1, interactive=False, stream=stream)
    with display:
        display.message("shard0 died (exit code -9); restarted", 2.3)
        display.write(make_record("worker", 0, time_s=4.0, step=1, loss=0.3))
        display.message("worker0 finished after 1 steps")
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("message")]
    assert lines == [
        'message t=2.3s text="shard0 died (exit code -9); restarted"',
        'message t=4.0s text="worker0 finished after 1 steps"',
    ]


def test_interactive_mode_renders_without_crashing() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(
        total_steps=TOTAL_STEPS, num_workers=2, interactive=True, stream=stream
    )
    with display:
        _feed(display)
        display.write(make_record("worker", 3, time_s=5.1, step=1, loss=0.3))  # a rank beyond 2
    text = stream.getvalue()
    assert "worker 1 exited" in text
    assert "PS test accuracy 0.8000" in text
    assert "\x1b[" in text  # forced terminal: it really drew with escape codes


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"total_steps": 0, "num_workers": 1}, "total_steps"),
        ({"total_steps": 1, "num_workers": 0}, "num_workers"),
        ({"total_steps": 1, "num_workers": 1, "log_every_s": -1.0}, "log_every_s"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ProgressDisplay(stream=io.StringIO(), **kwargs)


def test_unknown_role_is_rejected() -> None:
    display = ProgressDisplay(total_steps=1, num_workers=1, interactive=False, stream=io.StringIO())
    with pytest.raises(ValueError, match="supervisor"):
        display.write({"role": "supervisor", "rank": 0, "time_s": 0.0})


def _shard_record(shard_id: int, time_s: float) -> dict:
    return make_record(
        "shard",
        shard_id,
        time_s=time_s,
        version=120 + shard_id,
        pushes_per_s=40.0,
        bytes_per_s=2.5e6,
        staleness=1.25,
    )


def test_progress_lines_carry_shard_fields() -> None:
    stream = io.StringIO()
    with ProgressDisplay(
        total_steps=TOTAL_STEPS, num_workers=1, interactive=False, stream=stream, log_every_s=1.0
    ) as display:
        display.write(make_record("worker", 0, time_s=0.5, step=10, loss=1.0))
        display.write(_shard_record(1, 0.6))
        display.write(_shard_record(0, 0.7))
    *_, (kind, fields) = [_parse(line) for line in stream.getvalue().splitlines()]
    assert kind == "progress"
    assert fields["shard0.version"] == "120" and fields["shard1.version"] == "121"
    assert fields["shard0.pushes_per_s"] == "40.0"
    assert fields["shard1.bytes_per_s"] == "2500000"
    assert fields["shard0.staleness"] == "1.25"
    # Shard fields come after the worker fields, in shard order.
    keys = list(fields)
    assert keys.index("worker0.loss") < keys.index("shard0.version") < keys.index("shard1.version")


def test_interactive_mode_shows_a_shard_table() -> None:
    stream = io.StringIO()
    with ProgressDisplay(
        total_steps=TOTAL_STEPS, num_workers=1, interactive=True, stream=stream
    ) as display:
        display.write(_shard_record(0, 0.5))
    text = stream.getvalue()
    assert "pushes/s" in text and "MB/s" in text and "2.50" in text


def test_a_sandblaster_run_counts_iterations_and_shows_the_lbfgs_figures() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(
        total_steps=10, num_workers=2, interactive=False, stream=stream, log_every_s=0.0
    )
    with display:
        display.write(make_record("worker", 0, time_s=1.0, step=3, portions=7))
        display.write(make_record("coordinator", 0, time_s=1.0, step=3, loss=0.25, grad_norm=0.5))
    line = stream.getvalue().strip().splitlines()[-1]
    assert "steps=3/10" in line
    assert "lbfgs.iteration=3 lbfgs.loss=0.25 lbfgs.grad_norm=0.5" in line


def test_a_partitioned_replicas_steps_per_s_follows_one_stage() -> None:
    # Both stages of replica 0 report steps 10, 20, ... on their own clocks (the first stage a
    # little later): interleaved, the last two records (one step, two stages) read 0 steps/s.
    stream = io.StringIO()
    with ProgressDisplay(
        total_steps=TOTAL_STEPS, num_workers=1, interactive=False, stream=stream
    ) as display:
        for step in range(10, 60, 10):
            display.write(make_record("worker", 0, time_s=0.1 * step, step=step, loss=1.0, stage=1))
            display.write(make_record("worker", 0, time_s=0.1 * step + 0.01, step=step, stage=0))
    last = [fields for kind, fields in map(_parse, stream.getvalue().splitlines())][-1]
    assert last["worker0.step"] == "50"
    assert float(last["worker0.steps_per_s"]) == pytest.approx(10.0)


def test_a_sandblaster_workers_rate_is_its_portions_per_s() -> None:
    # Its step is the coordinator's iteration, the same for every worker: steps/s showed each
    # worker at the iteration rate. Worker 0 commits 3 portions an iteration, worker 1 one.
    stream = io.StringIO()
    with ProgressDisplay(
        total_steps=TOTAL_STEPS, num_workers=2, interactive=False, stream=stream
    ) as display:
        for iteration in range(1, 6):
            for rank, portions in ((0, 3), (1, 1)):
                display.write(
                    make_record("worker", rank, time_s=iteration, step=iteration, portions=portions)
                )
    last = [fields for kind, fields in map(_parse, stream.getvalue().splitlines())][-1]
    assert float(last["worker0.portions_per_s"]) == pytest.approx(3.0)
    assert float(last["worker1.portions_per_s"]) == pytest.approx(1.0)
    assert not any(key.endswith("steps_per_s") for key in last)


def test_the_readme_names_every_kind_of_line() -> None:
    """A log parser written from the README's "Live progress" bullet knows every line's first
    word: ``progress``, ``eval`` and the one-off ``message`` lines (a worker finished, a fault)."""
    stream = io.StringIO()
    with ProgressDisplay(
        total_steps=TOTAL_STEPS, num_workers=2, interactive=False, stream=stream
    ) as display:
        _feed(display)
    kinds = {line.split(" ", 1)[0] for line in stream.getvalue().splitlines()}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    bullet = " ".join(readme.split("- **Live progress.**", 1)[1].split("\n- **", 1)[0].split())
    named = set(re.findall(r"`(\w+) (?:key=value|t=)", bullet))
    assert kinds == {"progress", "eval", "message"}
    assert kinds <= named
