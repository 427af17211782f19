"""What a job leaves in its run folder once it has ended, however it ended (done, failed,
interrupted): ``summary.json``, ``staleness.json`` and the PNG plots of ``metrics.csv``, each
from what the launcher knew when the job ended, each written whole (a temporary file, then a
rename). Drawing never decides how the job ended: a plot that cannot be drawn is logged, not
raised. It knows nothing of processes: the launcher fills the result in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from distbelief import plots, telemetry
from distbelief.deferred_signals import signals_deferred
from distbelief.errors import LauncherInterrupted
from distbelief.files import write_text_atomic
from distbelief.launch.hints import shell_word
from distbelief.launch.summary import RunResult, write_summary

logger = logging.getLogger(__name__)

STALENESS_FILE = "staleness.json"
"""Per shard: how many pushes arrived with each staleness."""


def write_run_records(
    result: RunResult | None,
    outcome: str = "done",
    reason: str | None = None,
    *,
    plots_skipped_by: str | None = None,
) -> None:
    """Writes the run folder's ``summary.json`` (``result`` ended by ``outcome`` for
    ``reason``), ``staleness.json`` and plots. Summary first: it says how the job ended, and
    must be there even if a second Ctrl-C cuts the drawing short. None (the job ended before
    its cluster was open: no process had started) writes nothing. ``plots_skipped_by`` (a
    stop as the job ended, say) draws no plots: a line says why, and how to draw them later.

    Raises:
        ValueError: ``outcome`` is not one of ``summary.OUTCOMES``.
    """
    # A stop while they are written comes too late for a job that is done: it would have
    # exited 130 with summary.json saying "done". They are written, and only the plots are
    # skipped; a job that ended otherwise is stopped once they are written.
    with signals_deferred(raise_noted=outcome != "done") as noted:
        write_summary(result, outcome, reason)
        if result is not None:
            staleness = json.dumps(result.staleness, indent=2)
            write_text_atomic(result.run_dir / STALENESS_FILE, staleness)
    if result is None:
        return
    if outcome == "interrupted" and not telemetry.has_records(result.run_dir / "metrics.csv"):
        # Stopped before its first record: nothing to draw, now or later (and the folder of a
        # job that started no process is removed next: a line would name a folder gone).
        return
    if noted and plots_skipped_by is None:
        plots_skipped_by = "stopped as the job ended"
    if plots_skipped_by is not None:
        # With no record, there is nothing to draw later (a job stopped before its first
        # row: its folder may be removed next, and a command naming it would find nothing).
        if telemetry.has_records(result.run_dir / "metrics.csv"):
            _say_not_drawn(result.run_dir, plots_skipped_by)
        return
    draw_plots(result.run_dir, job_done=outcome == "done")


NOT_ASKED_FOR = "--no-plots"
"""``plots_skipped_by`` of a job run with ``--no-plots``: a choice, said at INFO, not a warning."""


def _earlier_pngs(run_dir: Path) -> str:
    """What a line saying the plots were not drawn adds where the folder has PNGs: a resumed
    run's of its earlier launch look current, but lack this launch's rows."""
    return " (its PNGs are of an earlier launch)" if any(run_dir.glob("*.png")) else ""


def _say_not_drawn(run_dir: Path, why: str) -> None:
    logger.log(
        logging.INFO if why == NOT_ASKED_FOR else logging.WARNING,
        "plots of %s not drawn (%s)%s; draw them later with: distbelief plot %s",
        run_dir,
        why,
        _earlier_pngs(run_dir),
        shell_word(run_dir),
    )


def draw_plots(run_dir: Path, *, job_done: bool = False) -> list[Path]:
    """The run folder's PNGs, drawn from its ``metrics.csv`` as it stands; returns the files
    written. None when it holds no record yet (a job stopped before its first): plots of
    nothing would only say "no data yet". A plot that cannot be drawn is logged with the
    command that draws it later, and none is returned: the job's outcome, and its exit code,
    are its training's. Ctrl-C or SIGTERM while drawing stops the drawing; it is raised
    again unless the job is done (``job_done``), whose outcome it must not change."""
    if not telemetry.has_records(run_dir / "metrics.csv"):
        logger.info("no plots: %s records no metrics yet", run_dir / "metrics.csv")
        return []
    try:
        return plots.plot_run(run_dir)
    except (KeyboardInterrupt, LauncherInterrupted):
        # The user wants the launcher gone, not plots, but is told how to get them, as for a
        # plot that failed. A stop that ends a stopped job's drawing is its second: the
        # launcher leaves as interrupted. A done job stays done (summary.json says so).
        _say_not_drawn(run_dir, "stopped while drawing them" if job_done else "stopped again")
        if not job_done:
            raise
        return []
    except Exception as e:  # matplotlib's errors have no common base; none may end the run
        logger.warning(
            "could not draw the plots of %s (%s: %s)%s; draw them later with: distbelief plot %s",
            run_dir,
            type(e).__name__,
            e,
            _earlier_pngs(run_dir),
            shell_word(run_dir),
        )
        return []
