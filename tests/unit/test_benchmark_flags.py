"""The benchmark scripts refuse bad flags the way the command line does: one usage line naming
the flag, exit 2, before any run starts (a count of 0 no longer silently means the default, and
no bad value starts a job that ends in a traceback)."""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing.forkserver
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from distbelief.telemetry import make_record

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module", autouse=True)
def _benchmarks_importable():
    sys.path.insert(0, str(BENCHMARKS))
    yield
    sys.path.remove(str(BENCHMARKS))


SEEDED_SCRIPTS = [
    "adagrad_vs_sgd",
    "compare_ddp",
    "faults",
    "figure4",
    "sandblaster_balance",
    "sandblaster_round_trips",
    "scaling",
    "staleness_sweep",
]
"""The scripts with a --seed: each takes what ``distbelief train --seed`` takes."""

CASES = [
    ("figure4", ["--budget-s", "-1"], "--budget-s"),
    ("figure4", ["--history", "0"], "--history"),
    ("figure4", ["--workers", "0"], "--workers"),
    ("scaling", ["--repeats", "0"], "--repeats"),
    ("compare_ddp", ["--steps", "0"], "--steps"),
    ("sandblaster_round_trips", ["--iterations", "0"], "--iterations"),
    ("gpu", ["--batch-size", "0"], "--batch-size"),
    ("gpu", ["--models", "nosuchmodel"], "--models"),
    ("compression", ["--epochs", "0"], "--epochs"),
    ("faults", ["--steps", "-1"], "--steps"),
    ("faults", ["--checkpoint-every", "-1"], "--checkpoint-every"),
    ("ray_launcher", ["--workers", "0"], "--workers"),
    ("replay_cost", ["--pushes-per-checkpoint", "0"], "--pushes-per-checkpoint"),
    ("scaling", ["--replot", "/nonexistent/scaling.json"], "--replot"),
    # A seed the job's config refuses: a traceback once the run had started.
    *((script, ["--seed", "-1"], "--seed") for script in SEEDED_SCRIPTS),
    ("figure4", ["--seed", str(2**31)], "--seed"),
    # nan passed every comparison; inf ran (or slept) without end.
    ("fanin", ["--seconds", "nan"], "--seconds"),
    ("fanin", ["--seconds", "inf"], "--seconds"),
    ("fanin", ["--max-connections", "0"], "--max-connections"),
    ("sandblaster_balance", ["--slowdown", "nan"], "--slowdown"),
    ("sandblaster_balance", ["--slowdown", "inf"], "--slowdown"),
    ("sandblaster_balance", ["--slowdown", "0.5"], "--slowdown"),
    ("evaluator_cost", ["--workers", "0"], "--workers"),
    ("evaluator_cost", ["--shards", "0"], "--shards"),
    ("evaluator_cost", ["--eval-every", "0"], "--eval-every"),
]


@pytest.mark.parametrize(("script", "argv", "flag"), CASES, ids=lambda v: str(v))
def test_a_bad_flag_is_one_usage_line_naming_it(script, argv, flag, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info, _sigterm_kept():
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert flag in last, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("script", "argv", "typed"),
    [
        ("wire", ["--sizes", "1M,abc"], "abc"),
        ("overhead", ["--models", ","], ","),
        ("gpu", ["--models", ""], ""),
    ],
    ids=lambda v: str(v),
)
def test_a_bad_value_is_quoted_as_typed(script, argv, typed, capsys):
    # Not upper-cased ('ABC'), nor a word of the script's own ('none').
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.main(argv)
    assert repr(typed) in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_results_file_of_another_benchmark_is_refused_for_replot(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"benchmark": "wire", "rows": []}')
    module = importlib.import_module("scaling")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--replot", str(other)])
    assert exit_info.value.code == 2
    assert "--replot" in capsys.readouterr().err


@contextlib.contextmanager
def _sigterm_kept():
    """fanin.py takes SIGTERM as Ctrl-C once it starts: this test process keeps its own."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)


OUT_PATH_SCRIPTS = [
    "wire",
    "overhead",
    "figure4",
    "sandblaster_balance",
    "compression",
    "embeddings",
    "fanin",
    "gpu",
]
"""The scripts whose --out is a file or a file stem (those that run for minutes before they
write it included: a bad path found only then loses the run)."""


@pytest.mark.parametrize("script", OUT_PATH_SCRIPTS)
def test_an_out_path_that_cannot_be_written_is_refused_before_the_run(script, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    module = importlib.import_module(script)
    for bad in (str(a_file / "results.json"), str(tmp_path)):
        with pytest.raises(SystemExit) as exit_info, _sigterm_kept():
            module.main(["--out", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--out" in err.strip().splitlines()[-1], err
        assert "Traceback" not in err


def test_fanin_claims_no_throughput_target_from_a_single_replica_count():
    fanin = importlib.import_module("fanin")
    point = {"design": "pool", "replicas": 8, "pushes_per_s_per_shard": 100.0}
    point["max_min_pushes"] = 1.0
    assert not any("/ at N=" in line for line in fanin.ratio_lines([point], ["pool"], [8]))
    other = {**point, "replicas": 64, "pushes_per_s_per_shard": 90.0}
    lines = fanin.ratio_lines([point, other], ["pool"], [8, 64])
    assert any("at N=64 / at N=8 = 0.90" in line and "PASS" in line for line in lines)


def test_ray_launcher_names_steps_when_a_job_leaves_no_steady_state_to_time():
    ray_launcher = importlib.import_module("ray_launcher")
    rows = [{"rank": 0, "time_s": 0.0, "step": 1}, {"rank": 0, "time_s": 0.5, "step": 9}]
    with pytest.raises(ray_launcher.TooShort, match="--steps"):
        ray_launcher.steady_window(rows, [])


FOLDER_OUT_SCRIPTS = ["faults", "staleness_sweep", "adagrad_vs_sgd", "replay_cost"]
"""The scripts whose --out is a folder their results go into."""


@pytest.mark.parametrize("script", FOLDER_OUT_SCRIPTS)
def test_an_out_folder_in_a_missing_folder_or_a_file_in_its_place_is_refused(
    script, tmp_path, capsys
):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    module = importlib.import_module(script)
    for bad in (str(a_file), str(tmp_path / "missing" / "results")):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--out", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--out" in err.strip().splitlines()[-1] and bad in err, err
        assert "Traceback" not in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]


def _recorded_commands(script: str) -> list[list[str]]:
    """The flags of every command line benchmarks/results/*.md records for ``script``."""
    prefix = f"Command: `python benchmarks/{script}.py"
    commands = []
    for record in sorted((BENCHMARKS / "results").glob("*.md")):
        for line in record.read_text().splitlines():
            if line.startswith(prefix):
                commands.append(line.removeprefix(prefix).rstrip("`").split())
    return commands


@pytest.mark.parametrize("script", ["faults", "staleness_sweep", "adagrad_vs_sgd"])
def test_every_recorded_command_line_still_parses(script):
    module = importlib.import_module(script)
    commands = _recorded_commands(script)
    assert commands, f"no recorded command line of {script}.py"
    for argv in commands:
        assert module.get_args_parser().parse_args(argv).out is None, argv


def _leftovers(folder: Path) -> list[str]:
    # multiprocessing's own temp folder (pymp-*) lives as long as this process, not the run.
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith("pymp-"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("staleness_sweep", ["--quick", "--workers", "1", "--policies", "none"]),
        # "--out -" keeps no results, as --quick does and as the other benchmarks take it: not
        # a folder named "-".
        ("faults", ["--steps", "40", "--schedule", "worker1", "--no-baseline", "--out", "-"]),
    ],
)
def test_a_run_that_keeps_no_results_leaves_no_file_behind(script, argv, tmp_path, monkeypatch):
    # Their temp folders go to a folder of this test's, which must be as empty after the run.
    # multiprocessing's own temp folder, where the fork server's socket lives, is made first,
    # where it was: it outlives the test, and a socket's path under tmp_path can be too long.
    multiprocessing.forkserver.ensure_running()
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(script)
    assert module.main(argv) == 0
    assert _leftovers(temp_root) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tmp"]  # no results anywhere
    # Kept where the user asks: --runs-dir.
    assert module.main([*argv, "--runs-dir", str(tmp_path / "kept")]) == 0
    assert _leftovers(temp_root) == []
    assert _leftovers(tmp_path / "kept")


def test_the_sweeps_temp_run_folder_is_removed_when_the_sweep_fails(tmp_path, monkeypatch):
    # adagrad_vs_sgd.py shares this: a run that raised left its folder behind too.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    staleness_sweep = importlib.import_module("staleness_sweep")
    machine = importlib.import_module("machine")
    args = staleness_sweep.parse_args(["--quick"])
    with (
        pytest.raises(RuntimeError, match="failed sweep"),
        machine.output_dirs(args, "staleness_sweep", tmp_path / "results") as (out, runs_dir),
    ):
        assert out == runs_dir and runs_dir.parent == tmp_path
        (runs_dir / "w1_none").mkdir()
        raise RuntimeError("failed sweep")
    assert _leftovers(tmp_path) == []


def test_faults_places_a_kill_no_later_than_it_was_sent(tmp_path, monkeypatch):
    """faults.py maps its clock onto metrics.csv's axis from the newest row it reads. A row
    written while it reads (the launcher keeps writing; a loaded machine stalls the read) is
    newer than a clock taken before the read: the training start came out early and every
    kill late, after the launcher had already seen the death (2.65 s killed, 2.42 s seen)."""
    faults = importlib.import_module("faults")
    start_s = time.time() - 5.0
    row_written_s: list[float] = []

    def read_while_a_row_arrives(path):
        time.sleep(0.3)  # the read stalls; the launcher writes a row meanwhile
        row_written_s.append(time.time())
        return [make_record("worker", 0, time_s=row_written_s[0] - start_s, step=10)]

    monkeypatch.setattr(faults, "read_metrics", read_while_a_row_arrives)
    reader = faults.ProgressReader(tmp_path, total_steps=100)
    reader.progress()
    read_done_s = time.time()
    assert reader.train_start_s >= start_s
    # No later than a clock read once the read was done allows (however long a busy machine
    # took from the row to that clock).
    assert reader.train_start_s - start_s <= read_done_s - row_written_s[0]


def test_faults_times_a_kill_when_the_signal_is_sent(tmp_path, monkeypatch):
    """A kill's time is when SIGKILL was sent: the launcher sees the death at once, so a clock
    read after ``os.kill``, once the script runs again (a loaded machine stalls it), placed the
    kill after the launcher had seen it (killed 2.14 s, seen 2.07 s)."""
    faults = importlib.import_module("faults")
    start_s = time.time() - 5.0
    sent: list[float] = []

    class Launcher:
        """The job's launcher process, done once its worker is killed."""

        def poll(self):
            return 0 if sent else None

    def kill_then_stall(pid, signum):
        sent.append(time.time())
        time.sleep(0.3)  # the script is descheduled right after the signal

    monkeypatch.setattr(faults, "read_pids", lambda run_dir: {"worker1": 4242})
    monkeypatch.setattr(faults, "_descends_from", lambda pid, ancestor: True)
    monkeypatch.setattr(
        faults,
        "read_metrics",
        lambda path: [make_record("worker", 0, time_s=time.time() - start_s, step=100)],
    )
    monkeypatch.setattr(faults.os, "kill", kill_then_stall)
    job = SimpleNamespace(process=Launcher(), pid=1, run_dir=tmp_path, started_s=time.monotonic())
    (kill,) = faults.drive(job, ["worker1"], total_steps=100, timeout_s=30)
    assert kill["time_s"] <= sent[0] - start_s + 0.05


def test_wire_judges_only_the_sizes_its_targets_are_set_at():
    """wire.py's targets are at 4 MB and 100 MB (1M and 25M floats): ``--quick``'s 100K
    printed PASS or BELOW against them (a BELOW the smoke test does not mean)."""
    wire = importlib.import_module("wire")
    assert [wire._target_ratio(n) for n in (1, 100_000, 1_000_000, 25_000_000)] == [
        None,
        None,
        0.95,
        0.95,
    ]
    assert wire._shm_target_ratio(100_000) is None
    assert wire._shm_target_ratio(25_000_000) == 3.0


def _session_members(session_id: int) -> list[int]:
    """The processes still in ``session_id`` (a script started with start_new_session)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session_id:
                    members.append(int(entry.name))
    return members


def _interrupted(script: str, argv: list[str], ready: str, cwd: Path) -> tuple[int, str]:
    """Run benchmarks/``script``.py as a shell's background job does (SIGINT ignored), send it
    SIGINT once its stderr says ``ready``, and wait for its end: (exit status, stderr). Its
    processes are gone by then, or the assertion says so."""
    process = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), *argv],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent / "src")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr])
    reader.start()
    seen: list[str] = []
    try:
        while ready not in "".join(seen):
            seen.append(lines.get(timeout=120))
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        reader.join(timeout=30)
    deadline = time.monotonic() + 30
    while _session_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)  # the job's processes are on their way out
    assert _session_members(process.pid) == []
    return status, "".join(seen + list(lines.queue))


@pytest.mark.slow
def test_sigint_to_a_backgrounded_benchmark_stops_it_in_one_line(tmp_path):
    """A shell's background job ignores SIGINT, and the script inherited that: SIGINT sent to
    its pid let it run to the end (and write its results). It stops now, as by Ctrl-C: its
    job's processes stopped, one line, exit 130, no KeyboardInterrupt traceback."""
    argv = ["--workers", "1", "--shards", "1", "--repeats", "1", "--steps", "5000", "--out", "-"]
    status, err = _interrupted("scaling", argv, "scaling: run w1_s1_r0", tmp_path)
    assert status == 130, err
    assert err.strip().splitlines()[-1] == "scaling.py: interrupted", err
    assert "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_in_a_sweeps_job_ends_the_sweep(tmp_path):
    """staleness_sweep.py (and adagrad_vs_sgd.py, through the same run_job) took Ctrl-C in a
    job for that job's failure: the sweep ran every other job, then wrote its results."""
    argv = ["--quick", "--workers", "1", "--epochs", "200", "--out", str(tmp_path / "results")]
    status, err = _interrupted("staleness_sweep", argv, "progress t=0.0s", tmp_path)  # training
    assert status == 130, err
    assert "run 1 workers, scale" not in err
    assert not (tmp_path / "results").exists()


def test_startup_prints_each_median_within_its_own_min_max():
    startup = importlib.import_module("startup")
    keys = ["import_torch", "help", "train_help", "first_step", "job", "shard_serving"]
    keys += ["shard_first_init", "import_torch_cpu", "job_cpu", "shard_first_init_cpu"]
    times = {key: [0.18501646900040214] for key in keys}  # one repeat: median = min = max
    _, cells = startup.table(times)
    for _what, median, min_max, *_ in cells:
        assert min_max == f"{median}-{median}"


def test_a_report_that_cannot_be_written_leaves_the_last_one_whole(tmp_path):
    """Results are written to a temporary file, then renamed: a write that fails (here, text
    the file's encoding refuses; a full disk alike) leaves the last results as they were."""
    machine = importlib.import_module("machine")
    stem = tmp_path / "wire_cpu2_20261206"
    record = {**machine.environment("python benchmarks/wire.py"), "rows": [1, 2]}
    machine.write_report(stem, record, "Wire", "first", ["a"], [["1"]])
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(UnicodeEncodeError):
        machine.write_report(stem, record, "Wire", "second \ud800", ["a"], [["3"]])
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert after.keys() == before.keys()  # no temporary file left
    assert after[f"{stem.name}.md"] == before[f"{stem.name}.md"]


def test_compression_bytes_per_step_leave_out_the_closing_flush():
    """A worker's last record counts its closing flush (a whole push of what it accrued since
    its last): once a job, not per step. Counted in, bf16 read 0.205 model sizes a step, over
    its 0.2 target, and the top-k figures 25-45% above what each step moves."""
    compression = importlib.import_module("compression")
    size = 1000
    records = [
        {"role": "worker", "rank": "0", "step": "0", "bytes_pushed": "1000", "bytes_pulled": "0"},
        {"role": "worker", "rank": "0", "step": "10", "bytes_pushed": "200", "bytes_pulled": "300"},
        {"role": "worker", "rank": "0", "step": "20", "bytes_pushed": "200", "bytes_pulled": "300"},
        {"role": "worker", "rank": "0", "step": "22", "bytes_pushed": "900", "bytes_pulled": "0"},
    ]
    summary = compression.summarize(records, size)
    assert summary["pushed_model_sizes_per_step"] == 400 / 20 / size
    assert summary["pulled_model_sizes_per_step"] == 600 / 20 / size


def _pipeline_measured(pipeline, micro_batches: int) -> list[dict]:
    """One repeat of every configuration, each stage doing the same work in the same time."""
    stage = {"wait_s": 0.1, "wall_s": 1.0, "compute_s": 0.5, "cpu_s": 1.0}
    stage |= {"bytes_sent": 1000, "bytes_received": 1000}
    measured = []
    for config in pipeline.make_configs(micro_batches, ["1f1b"]):
        repeat = {"samples_per_s": 100.0, "cpu_s": 1.0, "wall_s": 1.0, "stages": [stage, stage]}
        measured.append({"config": config, "repeats": [repeat]})
    return measured


def test_pipeline_says_above_for_a_missed_ceiling_and_below_for_a_missed_floor():
    """The memory target is a ceiling (<= 0.6): a share of 0.967 printed BELOW, the opposite of
    what it missed by."""
    pipeline = importlib.import_module("pipeline")
    assert pipeline.verdict(0.967, 0.6, at_most=True) == "ABOVE"
    assert pipeline.verdict(0.5, 0.6, at_most=True) == "PASS"
    assert pipeline.verdict(1.0, 1.4) == "BELOW"
    assert pipeline.verdict(1.5, 1.4) == "PASS"
    args = SimpleNamespace(micro_batches=8, steps=1, batch_size=1)
    static = {"memory_ratio": 0.967, "boundary_bytes_per_sample": 1000}
    summary = pipeline.summarize(_pipeline_measured(pipeline, 8), args, static)
    assert (summary["memory_verdict"], summary["throughput_verdict"]) == ("ABOVE", "BELOW")


def test_fanin_says_above_for_a_missed_fairness_ceiling():
    """max/min <= 2 is a ceiling: a replica starved (max/min 5, or unbounded) printed BELOW."""
    fanin = importlib.import_module("fanin")
    points = [
        {"design": "pool", "replicas": count, "max_min_pushes": fairness}
        | {"pushes_per_s_per_shard": 100.0}
        for count, fairness in ((64, 1.2), (2000, 5.0))
    ]
    lines = fanin.ratio_lines(points, ["pool"], [64, 2000])
    fairness = [line for line in lines if "max/min" in line]
    assert [line.rsplit(" ", 1)[1] for line in fairness] == ["PASS)", "ABOVE)"], fairness
    points[1]["max_min_pushes"] = None
    assert fanin.ratio_lines(points, ["pool"], [64, 2000])[-1].endswith("ABOVE)")
