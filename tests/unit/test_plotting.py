"""Unit tests of distbelief.plots: a synthetic run folder becomes valid PNG plots."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import matplotlib.image
import pytest

from distbelief.config import JobConfig, dotted_fields
from distbelief.launch.cli import main
from distbelief.plots import (
    RunData,
    load_run,
    plot_run,
    plot_runs,
    run_labels,
    run_title,
    total_rate,
)
from distbelief.plots import compare as compare_plots
from distbelief.plots import run as run_plots
from distbelief.plots.run import batch_size_of, rates_by_life
from distbelief.telemetry import MetricsWriter, make_record

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _make_run_dir(run_dir: Path, *, with_config: bool = True) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        for step in range(1, 41):
            for rank in range(2):
                progress = 1.0 - math.exp(-step / (10.0 + 3 * rank))
                writer.write(
                    make_record(
                        "worker",
                        rank,
                        time_s=0.1 * step + 0.03 * rank,
                        step=step,
                        loss=2.3 * (1.0 - progress),
                        accuracy=0.1 + 0.85 * progress,
                    )
                )
            if step % 10 == 0:
                writer.write(
                    make_record(
                        "evaluator",
                        0,
                        time_s=0.1 * step,
                        version=2 * step,
                        test_loss=2.0 * math.exp(-step / 10),
                        test_accuracy=0.9 - 0.8 * math.exp(-step / 10),
                    )
                )
    if with_config:
        config = {"model": "mlp", "dataset": "mnist", "num_workers": 2, "num_shards": 2}
        (run_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return run_dir


@pytest.mark.parametrize("with_config", [True, False])
def test_plot_run_writes_valid_pngs(tmp_path: Path, with_config: bool) -> None:
    run_dir = _make_run_dir(tmp_path / "run", with_config=with_config)
    paths = plot_run(run_dir)
    assert [p.name for p in paths] == [
        "accuracy_vs_time.png",
        "loss_vs_time.png",
        "throughput_vs_time.png",
    ]
    for path in paths:
        assert path.parent == run_dir
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        height, width, channels = image.shape
        assert 300 < height < width < 2000 and channels in (3, 4)
    # The atomic save leaves no temp files behind.
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


def test_plot_run_overwrites_existing_plots(tmp_path: Path) -> None:
    run_dir = _make_run_dir(tmp_path / "run")
    (run_dir / "accuracy_vs_time.png").write_bytes(b"stale")
    plot_run(run_dir)
    assert (run_dir / "accuracy_vs_time.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_run_with_header_only_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "empty_run"
    MetricsWriter(run_dir / "metrics.csv").close()
    for path in plot_run(run_dir):
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_of_a_run_without_records_yet_is_one_line_and_writes_no_png(tmp_path, capsys):
    """The launcher draws no plots of a run stopped before its first record; nor does plot."""
    empty = tmp_path / "stopped_early"
    MetricsWriter(empty / "metrics.csv").close()
    run_dir = _make_run_dir(tmp_path / "run")
    for args in ([str(empty)], [str(run_dir), str(empty), "--out", str(tmp_path / "compare")]):
        assert main(["plot", *args]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert errors == [
            f"distbelief plot: error: {empty}: no records yet (metrics.csv has only its header)"
        ]
    assert not list(tmp_path.rglob("*.png"))


def test_plot_of_an_empty_metrics_file_says_it_is_empty(tmp_path, capsys):
    """0 bytes (a run cut off before its header) has no header: "has only its header" misled."""
    empty = tmp_path / "cut_off"
    empty.mkdir()
    (empty / "metrics.csv").write_bytes(b"")
    assert main(["plot", str(empty)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"distbelief plot: error: {empty}: no records yet (metrics.csv is empty)"]
    assert not list(tmp_path.rglob("*.png"))


def test_plot_of_a_metrics_file_that_is_no_run_s_says_what_it_is(tmp_path, capsys):
    """A line that is no metrics header was taken for "only its header"; a folder at
    metrics.csv's name for none there."""
    garbage, folder = tmp_path / "garbage", tmp_path / "folder"
    garbage.mkdir()
    (garbage / "metrics.csv").write_text("garbage,,,\n")
    (folder / "metrics.csv").mkdir(parents=True)
    said = {}
    for run_dir in (garbage, folder):
        assert main(["plot", str(run_dir)]) == 2
        [said[run_dir]] = [
            line for line in capsys.readouterr().err.splitlines() if "error:" in line
        ]
    assert (
        f"{garbage / 'metrics.csv'}: wrong metrics header ['garbage', '', '', '']" in said[garbage]
    )
    assert said[folder].endswith(f"not a run folder: {folder} (its metrics.csv is a folder)")
    assert not list(tmp_path.rglob("*.png"))
    # Its header and a blank line (the rest never written): no records yet, as before.
    blank = tmp_path / "blank"
    MetricsWriter(blank / "metrics.csv").close()
    with (blank / "metrics.csv").open("a") as metrics:
        metrics.write("\n")
    assert main(["plot", str(blank)]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.endswith(f"{blank}: no records yet (metrics.csv has only its header)"), line


@pytest.mark.parametrize(
    ("content", "holds"),
    [
        ("[]", "it holds a list"),
        ('{"0": [1, 2]}', "shard '0' holds a list"),
        ("3", "it holds a number"),
    ],
)
def test_plot_of_a_staleness_file_of_the_wrong_shape_says_what_was_expected(
    tmp_path, capsys, content, holds
):
    """``[]`` read as 'list' object has no attribute 'values': Python's words, not the file's."""
    run_dir = _make_run_dir(tmp_path / "run")
    (run_dir / "staleness.json").write_text(content, encoding="utf-8")
    assert main(["plot", str(run_dir)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        f"distbelief plot: error: {run_dir / 'staleness.json'}: not a staleness histogram: "
        f"expected an object of shards, each an object of staleness -> count; {holds}"
    ]


def test_folder_without_metrics_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"not a run folder: .*not_a_run"):
        plot_run(folder)


def test_a_file_given_as_a_run_folder_is_called_a_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text("a file")
    with pytest.raises(ValueError, match=r"not a run folder: .*notes.md \(a file, not a folder\)$"):
        plot_run(path)


def test_bad_config_json_is_named(tmp_path: Path) -> None:
    run_dir = _make_run_dir(tmp_path / "run")
    (run_dir / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"config\.json"):
        plot_run(run_dir)


def test_sectioned_and_flat_config_json_read_the_same(tmp_path: Path) -> None:
    flat = load_run(_make_run_dir(tmp_path / "flat")).config
    sectioned_dir = _make_run_dir(tmp_path / "sectioned", with_config=False)
    job = JobConfig.from_fields({"model.name": "mlp", "data.name": "mnist"})
    (sectioned_dir / "config.json").write_text(job.to_json(), encoding="utf-8")
    sectioned = load_run(sectioned_dir).config
    assert run_title(flat, "x") == run_title(sectioned, "x") == "mlp on mnist, 2 workers, 2 shards"
    assert batch_size_of(sectioned) == 32  # the default mini-batch


def _run_data(name: str, **config: object) -> RunData:
    return RunData(Path(name), [], dotted_fields(config))


def test_run_labels_show_the_config_and_what_differs() -> None:
    base = {"num_workers": 4, "num_shards": 2, "server_optimizer": "adagrad", "n_push": 1}
    labels = run_labels(
        [
            _run_data("a", **base, lr=0.05, sync=False),
            _run_data("b", **base, lr=0.1, sync=False),
            _run_data("c", **{**base, "num_workers": 2}, lr=0.05, sync=True),
        ]
    )
    assert labels == [
        "4w x 2s, adagrad, n_push=1, lr=0.05, async",
        "4w x 2s, adagrad, n_push=1, lr=0.1, async",
        "2w x 2s, adagrad, n_push=1, lr=0.05, sync",
    ]
    # A batch size given as the default's is no difference.
    assert run_labels([_run_data("x", **base), _run_data("y", **base, batch_size=32)]) == [
        "4w x 2s, adagrad, n_push=1 (x)",
        "4w x 2s, adagrad, n_push=1 (y)",
    ]
    # Identical configs are told apart by their folder names.
    assert run_labels([_run_data("x", **base), _run_data("y", **base)]) == [
        "4w x 2s, adagrad, n_push=1 (x)",
        "4w x 2s, adagrad, n_push=1 (y)",
    ]


def _job_run(name: str, records: list[dict], **fields: object) -> RunData:
    """A run of a real job's config.json: every field, as ``distbelief train`` writes it."""
    config = JobConfig.from_fields({"cluster.num_workers": 2, "cluster.num_shards": 2, **fields})
    return RunData(Path(name), records, dotted_fields(json.loads(config.to_json())))


def test_run_labels_name_every_setting_of_the_results_that_differs() -> None:
    """Two click-model runs of other row optimizers and table sizes were labelled alike
    (the labels knew no embedding setting), told apart only by their folder names."""
    click = {"model.name": "dlrm", "data.name": "synthetic-ctr", "optimizer.steps": 30}
    labels = run_labels(
        [
            _job_run("ro1", [], **click, **{"embeddings.row_optimizer": "sgd"}),
            _job_run(
                "ro2",
                [],
                **click,
                **{"embeddings.row_optimizer": "adagrad", "data.table_size": 500},
            ),
        ]
    )
    assert labels == [
        "2w x 2s, sgd, n_push=1, row_optimizer=sgd",
        "2w x 2s, sgd, n_push=1, table_size=500, row_optimizer=adagrad",
    ]


def test_runs_that_differ_in_how_their_shards_serve_say_so_and_by_timeouts_alone_by_folder():
    """Runs of another --transport, --server-design or --checkpoint-every were told apart by
    their folders alone, as runs of another --timeout are."""
    labels = run_labels(
        [
            _job_run("c0", []),
            _job_run("c1", [], **{"cluster.transport": "tcp", "server.design": "threads"}),
            _job_run("c2", [], **{"server.checkpoint_every_s": 5.0}),
            _job_run("c3", [], **{"faults.timeout_s": 60.0}),
        ]
    )
    assert "transport=tcp, server_design=threads" in labels[1]
    assert "checkpoint_every_s=5.0" in labels[2]
    assert labels[0].endswith("(c0)") and labels[3].endswith("(c3)")
    assert labels[0].removesuffix("(c0)") == labels[3].removesuffix("(c3)")


def _iterations(role: str, **fields: object) -> list[dict]:
    return [make_record(role, 0, time_s=0.5 * step, step=step, **fields) for step in range(1, 9)]


def test_runs_that_differ_in_their_wire_encoding_say_so_in_their_labels() -> None:
    runs = [
        _job_run("a", []),
        _job_run("b", [], **{"optimizer.wire_dtype": "bf16"}),
        _job_run("c", [], **{"optimizer.push_compression": "topk:0.01"}),
    ]
    assert run_labels(runs) == [
        "2w x 2s, sgd, n_push=1, wire_dtype=fp32, push_compression=none",
        "2w x 2s, sgd, n_push=1, wire_dtype=bf16, push_compression=none",
        "2w x 2s, sgd, n_push=1, wire_dtype=fp32, push_compression=topk:0.01",
    ]


def test_partitioned_runs_that_differ_in_their_pipeline_say_so_in_their_labels() -> None:
    pipeline = {"pipeline.num_partitions": 3, "model.name": "mlp"}
    runs = [
        _job_run("a", [], **pipeline, **{"pipeline.num_micro_batches": 4}),
        _job_run(
            "b", [], **pipeline, **{"pipeline.num_micro_batches": 4, "pipeline.schedule": "gpipe"}
        ),
        _job_run("c", [], **pipeline, **{"pipeline.split_points": [2, 4]}),
    ]
    assert run_labels(runs) == [
        "2w x 2s, sgd, n_push=1, micro_batches=4, schedule=1f1b",
        "2w x 2s, sgd, n_push=1, micro_batches=4, schedule=gpipe",
        "2w x 2s, sgd, n_push=1, micro_batches=1, schedule=1f1b, split_points=[2, 4]",
    ]


def test_sandblaster_runs_that_differ_in_their_search_say_so_and_downpour_runs_say_none():
    sandblaster = {"optimizer.algorithm": "sandblaster"}
    runs = [
        _job_run("a", [], **sandblaster),
        _job_run("b", [], **sandblaster, **{"sandblaster.line_search": "fixed"}),
        _job_run("c", [], **sandblaster, **{"sandblaster.step_size": 0.5}),
        _job_run("d", []),
    ]
    labels = run_labels(runs)
    assert labels[:3] == [
        "2w x 2s, sandblaster L-BFGS, history=10, line_search=strong-wolfe, step_size=1.0",
        "2w x 2s, sandblaster L-BFGS, history=10, line_search=fixed, step_size=1.0",
        "2w x 2s, sandblaster L-BFGS, history=10, line_search=strong-wolfe, step_size=0.5",
    ]
    assert "line_search" not in labels[3] and "step_size" not in labels[3]


def test_a_sandblaster_run_is_compared_as_one_and_not_in_downpour_terms(tmp_path) -> None:
    downpour = _job_run("downpour", [], **{"consistency.sync": True})
    sandblaster_records = _iterations("worker", portions=4) + _iterations("coordinator", loss=1.0)
    sandblaster = _job_run("lbfgs", sandblaster_records, **{"optimizer.algorithm": "sandblaster"})
    pipeline = _job_run("pipe", [], **{"pipeline.num_partitions": 2, "model.name": "mlp"})
    # Its shards run no SGD, it pushes no Downpour steps and is not "async": none of it shows
    # (its batch is the whole training set); a partitioned replica says so.
    assert run_labels([downpour, sandblaster, pipeline]) == [
        "2w x 2s, sgd, n_push=1, model=lenet, batch_size=32, sync, partitions=1",
        "2w x 2s, sandblaster L-BFGS, history=10, model=lenet",
        "2w x 2s, sgd, n_push=1, model=mlp, batch_size=32, async, partitions=2",
    ]
    # Its training loss is the coordinator's batch loss; its steps are iterations, which an
    # axis of samples/s does not show.
    assert compare_plots._mean_train_loss(sandblaster)[1] == [1.0] * 8
    assert compare_plots._throughput(sandblaster) == ([], [])
    assert compare_plots._throughput(_job_run("d", _iterations("worker")))[1][-1] == 64.0
    # So the axis says: it read "mean of workers" over a coordinator's curve.
    train_loss = next(spec for spec in compare_plots._COMPARISONS if "train_loss" in spec.file_name)
    assert compare_plots._y_label(train_loss, [sandblaster, sandblaster]) == (
        "training loss, the coordinator's batch loss"
    )
    assert compare_plots._y_label(train_loss, [downpour, sandblaster]) == (
        "training loss, mean of workers\n(Sandblaster: the coordinator's batch loss)"
    )
    assert compare_plots._y_label(train_loss, [downpour, pipeline]) == (
        "training loss, mean of workers"
    )


def test_total_rate_sums_the_workers() -> None:
    records = [
        make_record("worker", rank, time_s=float(t), step=10 * t * (rank + 1))
        for t in range(1, 6)
        for rank in range(2)
    ]
    times_s, rates = total_rate(records)
    assert times_s == [2.0, 3.0, 4.0, 5.0]
    assert rates == pytest.approx([30.0, 30.0, 30.0, 30.0])


def test_a_worker_between_two_lives_counts_nothing() -> None:
    """A resumed run (or a restarted worker) starts its steps again: its rate was drawn, and
    summed, at its old rate over the time it was not running (a worker that did nothing for
    0.7 s added 4,500 samples/s to "all workers")."""
    first = [(0.0, 0), (1.0, 10), (2.0, 20)]  # 10 steps/s
    second = [(6.0, 0), (7.0, 20), (8.0, 40)]  # 20 steps/s, after 4 s of nothing
    records = [make_record("worker", 0, time_s=t, step=step) for t, step in first + second]
    records += [make_record("worker", 1, time_s=float(t), step=t) for t in range(9)]
    lives = rates_by_life([t for t, _ in first + second], [s for _, s in first + second])
    # A life's first record only starts it.
    assert lives == [([1.0, 2.0], [10.0, 10.0]), ([7.0, 8.0], [20.0, 20.0])]
    grid_s, summed = total_rate(records)
    totals = dict(zip(grid_s, summed, strict=True))
    assert totals[4.0] == pytest.approx(1.0)  # worker 1 alone: worker 0 was not running
    assert totals[2.0] == pytest.approx(11.0) and totals[8.0] == pytest.approx(21.0)
    # Drawn, the sum steps down just after the first life and up just before the second.
    after, before = grid_s[grid_s.index(2.0) + 1], grid_s[grid_s.index(7.0) - 1]
    assert 2.0 < after < 2.001 and 6.999 < before < 7.0
    assert totals[after] == pytest.approx(1.0) and totals[before] == pytest.approx(1.0)


def test_a_life_of_one_rate_is_drawn(tmp_path: Path) -> None:
    """A worker restarted near the end has a last life of one rate: drawn as a point, in the
    worker's colour (as one line with breaks between lives it was not drawn at all)."""
    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        for t, step in [(0.0, 0), (1.0, 10), (2.0, 20), (3.0, 0), (4.0, 10)]:
            writer.write(make_record("worker", 0, time_s=t, step=step))
    figure = run_plots._make_throughput_figure(run_plots.load_run(run_dir), "run")
    lines = [line for line in figure.axes[0].get_lines() if line.get_label() != "all workers"]
    assert [list(line.get_xdata()) for line in lines] == [[1.0, 2.0], [4.0]]
    assert lines[1].get_marker() not in (None, "None", "")
    assert lines[0].get_color() == lines[1].get_color()
    assert lines[0].get_label() == "worker 0" and lines[1].get_label().startswith("_")  # once


def test_a_run_of_one_worker_record_plots_without_a_warning(tmp_path: Path) -> None:
    """A 5-step run's one worker row has no rate: its throughput figure had nothing labelled,
    and matplotlib printed a warning with its source line at every `distbelief plot`."""
    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        writer.write(make_record("worker", 0, time_s=0.04, step=5, loss=2.3, accuracy=0.2))
        writer.write(make_record("evaluator", 0, time_s=0.13, test_accuracy=0.1, version=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = plot_run(run_dir)
    assert all(path.read_bytes().startswith(PNG_SIGNATURE) for path in written)


def test_plot_runs_compares_two_folders(tmp_path: Path) -> None:
    first = _make_run_dir(tmp_path / "first")
    second = _make_run_dir(tmp_path / "second", with_config=False)
    paths = plot_runs([first, second], out_dir=tmp_path / "out")
    assert len(paths) == 4
    for path in paths:
        assert path.parent == tmp_path / "out" and path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="two or more"):
        plot_runs([first], out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"not a run folder: .*nowhere"):
        plot_runs([first, tmp_path / "nowhere"], out_dir=tmp_path / "out")


def test_a_sandblaster_run_plots_the_coordinators_batch_loss(tmp_path: Path) -> None:
    run_dir = tmp_path / "sandblaster"
    run_dir.mkdir()
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        for iteration in range(6):
            writer.write(
                make_record(
                    "coordinator",
                    0,
                    time_s=0.2 * iteration,
                    step=iteration,
                    loss=2.0 / (1 + iteration),
                )
            )
            for rank in range(2):
                writer.write(
                    make_record("worker", rank, time_s=0.2 * iteration, step=iteration, portions=4)
                )
    written = plot_run(run_dir)
    assert all(path.read_bytes().startswith(PNG_SIGNATURE) for path in written)
    figure = run_plots._make_figure(load_run(run_dir).records, run_plots._PLOTS[1], "sandblaster")
    labels = [line.get_label() for line in figure.axes[0].lines]
    assert labels == [run_plots.COORDINATOR_LABEL]


@pytest.mark.parametrize(
    ("num_shards", "tested_model", "label"),
    [
        (2, None, "PS (test)"),
        (0, None, "worker 0 (test)"),
        (1, "worker", "worker 0 (test)"),
        (1, "ps", "PS (test)"),
    ],
)
def test_the_test_curve_is_the_ps_only_when_the_evaluator_tested_the_shards(
    tmp_path: Path, monkeypatch, num_shards: int, tested_model: str | None, label: str
) -> None:
    """A model trained alone (``examples/main.py --no-distributed``: no shards), or a node
    that tested its own replica (the example's distributed nodes), has its test curve labelled
    as the worker's, not as a parameter server's."""
    run_dir = _make_run_dir(tmp_path / "run", with_config=False)
    config: dict = {"cluster": {"num_workers": 1, "num_shards": num_shards}}
    if tested_model is not None:
        config["reporting"] = {"tested_model": tested_model}
    (run_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    drawn = {}
    monkeypatch.setattr(
        run_plots,
        "save_pngs_atomic",
        lambda figures: drawn.update({path.name: figure for path, figure in figures.items()}),
    )
    plot_run(run_dir)
    lines = drawn["accuracy_vs_time.png"].axes[0].lines
    assert [line.get_label() for line in lines][-1] == label


def test_a_run_without_a_field_adds_no_difference_to_the_labels() -> None:
    # A folder without config.json, or one whose config.json records a few fields (the seed's
    # example writes these), against a full job's: only the fields both have can differ.
    job = _job_run("job", [], **{"optimizer.lr": 0.1})
    partial = _run_data("node1", num_workers=2, num_shards=1, n_push=5, lr=0.03)
    assert run_labels([job, _run_data("bare")]) == ["2w x 2s, sgd, n_push=1", "bare"]
    assert run_labels([job, partial]) == [
        "2w x 2s, sgd, n_push=1, lr=0.1",
        "2w x 1s, n_push=5, lr=0.03",
    ]


def test_a_series_of_one_point_is_drawn(tmp_path: Path) -> None:
    # Two records of a worker give one rate: a line alone draws nothing of it.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        for step in (20, 40):
            record = make_record("worker", 0, time_s=step / 100, step=step, loss=1.0, accuracy=0.5)
            writer.write(record)
    run = load_run(run_dir)
    throughput = run_plots._make_throughput_figure(run, "one rate")
    (line,) = throughput.axes[0].get_lines()
    assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "")
    compared = compare_plots._make_comparison(
        [run, run], ["a", "b"], compare_plots._COMPARISONS[-1]
    )
    for line in compared.axes[0].get_lines():
        assert line.get_marker() not in (None, "None", "")


def test_a_long_label_leaves_the_axes_their_width(tmp_path: Path) -> None:
    run = load_run(_make_run_dir(tmp_path / "run"))
    for settings in (8, 20):  # the figure's width or more: the axes shrank, or the legend cut
        long_label = ", ".join(f"setting_{i}={i / 7:.4f}" for i in range(settings))
        for spec in compare_plots._COMPARISONS:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # "Tight layout not applied"
                figure = compare_plots._make_comparison([run, run], [long_label, "short"], spec)
            assert figure.axes[0].get_position().width > 0.6, spec.file_name


def test_a_partitioned_run_is_told_from_a_whole_model_run_that_records_no_partitions() -> None:
    # A config.json without pipeline fields (one written before them, or an example node's)
    # is of a whole model: against a --partitions 2 run, both labels give the count.
    partitioned = _job_run("pipe", [], **{"pipeline.num_partitions": 2})
    flat = _run_data("old", num_workers=2, num_shards=2, server_optimizer="sgd", n_push=1)
    assert run_labels([flat, partitioned]) == [
        "2w x 2s, sgd, n_push=1, partitions=1",
        "2w x 2s, sgd, n_push=1, partitions=2",
    ]
    # Runs that all record no partitions, or all the same count, show none.
    assert run_labels([flat, _job_run("whole", [])]) == [
        "2w x 2s, sgd, n_push=1 (old)",
        "2w x 2s, sgd, n_push=1 (whole)",
    ]


def _node_run(rank: int) -> RunData:
    """An example node's run: its evaluator records (its worker rank's) test its own replica."""
    config = {
        "cluster": {"num_workers": 2, "num_shards": 1},
        "reporting": {"tested_model": "worker"},
    }
    records = [
        make_record(
            "evaluator", rank - 1, time_s=float(t), step=t, test_accuracy=0.5, test_loss=1.0
        )
        for t in (1, 2)
    ]
    return RunData(Path(f"node{rank}"), records, dotted_fields(config))


def test_compared_nodes_title_the_axis_for_their_own_replicas_test_metric() -> None:
    nodes = [_node_run(1), _node_run(2)]
    job = _job_run("job", _iterations("evaluator", test_accuracy=0.5, test_loss=1.0))
    accuracy, loss = compare_plots._COMPARISONS[:2]
    expected = {
        (accuracy, "nodes"): "test accuracy, each worker's own replica",
        (loss, "nodes"): "test loss (cross-entropy), each worker's own replica",
        (accuracy, "jobs"): "PS test accuracy",
        (accuracy, "mixed"): "test accuracy (PS, or a worker's own replica)",
    }
    runs = {"nodes": nodes, "jobs": [job, job], "mixed": [job, nodes[1]]}
    for (spec, which), y_label in expected.items():
        figure = compare_plots._make_comparison(runs[which], ["a", "b"], spec)
        assert figure.axes[0].get_ylabel() == y_label
    # node2's evaluator records carry its worker rank, 1: its curve is drawn too.
    figure = compare_plots._make_comparison(nodes, ["a", "b"], accuracy)
    assert [list(line.get_xdata()) for line in figure.axes[0].get_lines()] == [[1.0, 2.0]] * 2


def test_a_diverged_sandblaster_run_reads_back_nan_and_plots(tmp_path: Path) -> None:
    # metrics.csv keeps a diverged loss as nan (an empty cell is a column the row does not
    # report); summary.json, strict JSON, says null instead.
    run_dir = tmp_path / "diverged"
    run_dir.mkdir()
    losses = [2.0, 1.0, float("inf"), float("nan"), float("nan")]
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        for iteration, loss in enumerate(losses):
            grad_norm = 0.5 if math.isfinite(loss) else float("nan")
            fields = {"step": iteration, "loss": loss, "grad_norm": grad_norm}
            writer.write(make_record("coordinator", 0, time_s=0.2 * iteration, **fields))
    lines = (run_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert lines[-1].split(",")[4] == "nan" and lines[-1].split(",")[5] == ""
    records = load_run(run_dir).records
    assert [record["loss"] for record in records[:3]] == [2.0, 1.0, float("inf")]
    assert all(math.isnan(record["grad_norm"]) for record in records[2:])
    assert records[-1]["accuracy"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = plot_run(run_dir)
        compared = plot_runs([run_dir, _make_run_dir(tmp_path / "fine")], out_dir=tmp_path / "c")
    for path in written + compared:
        assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_a_sandblaster_runs_throughput_is_its_workers_portions_per_s(tmp_path: Path) -> None:
    """A Sandblaster worker's step is the iteration, the same for every worker: steps/s would
    draw each worker at the coordinator's rate and their sum at N times it. Its throughput is
    the portions each worker computes (a faster worker does more)."""
    run_dir = tmp_path / "sandblaster"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(
        json.dumps({"optimizer": {"algorithm": "sandblaster"}}), encoding="utf-8"
    )
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        for iteration in range(1, 7):
            time_s = 0.5 * iteration
            writer.write(make_record("coordinator", 0, time_s=time_s, step=iteration, loss=1.0))
            for rank, portions in ((0, 1), (1, 3)):
                writer.write(
                    make_record("worker", rank, time_s=time_s, step=iteration, portions=portions)
                )
    figure = run_plots._make_throughput_figure(load_run(run_dir), "sandblaster")
    axes = figure.axes[0]
    assert axes.get_ylabel() == "throughput (portions/s)"
    rates = {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}
    assert rates["worker 0"] == pytest.approx([2.0] * 5)
    assert rates["worker 1"] == pytest.approx([6.0] * 5)
    assert rates["all workers"] == pytest.approx([8.0] * 5)


def test_a_partitioned_replicas_throughput_follows_one_stage(tmp_path: Path) -> None:
    """Both stages of a replica report steps 10, 20, ... on their own clocks, the first a
    step ahead: interleaved, a rate over a few records swung between half and twice the
    replica's 100 steps/s. Its throughput is its last stage's."""
    run_dir = tmp_path / "partitioned"
    run_dir.mkdir()
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        for step in range(10, 110, 10):
            for rank in range(2):
                writer.write(
                    make_record("worker", rank, time_s=step / 100, step=step, loss=1.0, stage=1)
                )
                ahead = make_record("worker", rank, time_s=step / 100 + 0.001, step=step + 10)
                writer.write({**ahead, "stage": 0})
    run = load_run(run_dir)
    figure = run_plots._make_throughput_figure(run, "partitioned")
    rates = {line.get_label(): list(line.get_ydata()) for line in figure.axes[0].get_lines()}
    assert rates["worker 0"] == pytest.approx([100.0 * 32] * len(rates["worker 0"]))
    assert total_rate(run.records)[1] == pytest.approx([200.0] * len(total_rate(run.records)[1]))


def test_plot_names_the_png_it_cannot_write_and_writes_none(tmp_path, capsys):
    """A folder where a plot goes: the error named the temporary file the rename left, and
    the plots before it in the list were written (the refused command half done)."""
    run_dir = _make_run_dir(tmp_path / "run")
    (run_dir / "loss_vs_time.png").mkdir()
    before = sorted(path.name for path in run_dir.iterdir())
    assert main(["plot", str(run_dir)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        f"distbelief plot: error: {run_dir}: cannot be written: Is a directory (loss_vs_time.png)"
    ]
    assert sorted(path.name for path in run_dir.iterdir()) == before


def test_a_comparison_that_cannot_write_one_png_writes_none(tmp_path, capsys):
    runs = [str(_make_run_dir(tmp_path / name)) for name in ("a", "b")]
    out = tmp_path / "compared"
    (out / "compare_train_loss_vs_time.png").mkdir(parents=True)
    assert main(["plot", *runs, "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        f"distbelief plot: error: --out {out}: cannot be written: Is a directory "
        "(compare_train_loss_vs_time.png)"
    ]
    assert [path.name for path in out.iterdir()] == ["compare_train_loss_vs_time.png"]


def test_a_comparison_of_sandblaster_runs_draws_no_empty_throughput_figure(tmp_path) -> None:
    """Their steps are iterations, not samples: the throughput figure said only "no data
    yet"."""
    runs = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        config = JobConfig.from_fields({"optimizer.algorithm": "sandblaster"})
        (run_dir / "config.json").write_text(config.to_json())
        with MetricsWriter(run_dir / "metrics.csv") as writer:
            for record in _iterations("worker", portions=4) + _iterations("coordinator", loss=1.0):
                writer.write(record)
        runs.append(run_dir)
    written = plot_runs(runs, out_dir=tmp_path / "out")
    assert not any("throughput" in path.name for path in written)
    assert not any("throughput" in path.name for path in (tmp_path / "out").iterdir())
    assert any("train_loss" in path.name for path in written)


def test_a_run_folder_whose_name_the_file_system_refuses_is_named(tmp_path, capsys):
    """A name too long: `OSError: [Errno 36] File name too long`, exit 1."""
    run_dir = str(tmp_path / ("a" * 300))
    assert main(["plot", run_dir]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"distbelief plot: error: not a run folder: {run_dir} (File name too long)"
    )
