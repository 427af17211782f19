"""``distbelief train --cluster ray`` for real: a job of 2 shards x 4 workers on a two-node Ray
cluster started on this machine (nodes on 127.0.0.2 and 127.0.0.3) survives ``ray.kill`` of a
worker actor and of a shard actor and reaches the usual accuracy (a worker killed for good is
given up at once); a node host killed by its pid takes none of the job's processes; Ctrl-C
stops every actor, a Sandblaster coordinator first (it commits the iteration under way, and a
resume goes on from it); a cluster too small for a job is refused; a job on a cluster busy with
another ends; a job on the embedded Ray instance; and the one-line refusals that need no Ray
running."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CHILD_ENV, CLI, run_cli, run_forked
from tests.forked import run_command

STEPS = 800
"""Steps per worker of the two-node job: enough that both kills land mid-run even when, on a
busy machine, the metrics the test reads lag seconds behind the workers."""

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (the ray extra)"
)

# Connects to the cluster once; "find NAME..." looks the actors up ahead (waiting for the job to
# make them), so that a kill lands at once; "kill NAME" kills one (Ray re-creates it), "end
# NAME" kills one for good (no_restart=True), each answering once its process is gone. Run
# beside the job, as a user's script would.
_KILLER = """
import json, os, sys, time, ray
# A lookup loads the actor's class here: its import is paid before any kill.
import distbelief.launch.ray_actor
address, run_dir = sys.argv[1:3]
ray.init(address=address, logging_level="ERROR")
print("connected", flush=True)
actors = {}
def find(names, timeout_s=120):
    # Waits for the job to make them: an actor exists before its process starts.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            namespace = json.load(open(os.path.join(run_dir, "ray.json")))["namespace"]
            for name in names:
                if name not in actors:
                    actors[name] = ray.get_actor(name, namespace=namespace)
            return
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
for line in sys.stdin:
    command, *names = line.split()
    try:
        find(names)
        if command == "find":
            print("found", *names, flush=True)
            continue
        record = json.load(open(os.path.join(run_dir, "ray.json")))
        name = names[0]
        pid = record["processes"][name]["pid"]
        ray.kill(actors[name], no_restart=command == "end")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        print("still alive", name, pid, flush=True)
    except ProcessLookupError:
        print("killed", name, pid, flush=True)
    except Exception as e:
        print("failed", line.strip(), repr(e), flush=True)
"""


# Takes every CPU of the two nodes but one, as another job's actors would, until its stdin
# ends; "actors NAMESPACE" lists the live actors of that namespace.
_HOLDER = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
@ray.remote
class Busy:
    def ready(self):
        return True
held = [Busy.options(num_cpus=cpus).remote() for cpus in (4, 3)]
ray.get([actor.ready.remote() for actor in held], timeout=120)
print("held", flush=True)
for line in sys.stdin:
    namespace = line.split()[1]
    actors = ray.util.list_named_actors(all_namespaces=True)
    print("actors", *[a["name"] for a in actors if a["namespace"] == namespace], flush=True)
"""


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator:
    """Two Ray nodes on this machine, each with its own CPUs and resource, shared by the
    module's tests (a node takes seconds to start on 2 cores)."""
    from tests.ray_nodes import RayNodes

    nodes = RayNodes()
    try:
        nodes.add_node(num_cpus=4, resource="head_node")
        nodes.add_node(num_cpus=4, resource="second_node")
        yield nodes
    finally:
        nodes.stop()


def _rows(run_dir: Path, role: str) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as file:
        return [row for row in csv.DictReader(file) if row["role"] == role]


def _worker_steps(run_dir: Path) -> dict[str, int]:
    steps: dict[str, int] = {}
    for row in _rows(run_dir, "worker"):
        steps[row["rank"]] = max(steps.get(row["rank"], 0), int(row["step"]))
    return steps


def _wait_for(predicate, timeout_s: float, what: str, run_dir: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    steps = "" if run_dir is None else f" (worker steps: {_worker_steps(run_dir)})"
    raise AssertionError(f"timed out waiting for {what}{steps}")


def _history(summary: dict, run_dir: Path, err: str) -> str:
    """What a low final accuracy needs explained: the summary, each evaluation, the workers'
    last losses and the launcher's warnings."""
    evaluations = [
        (row["time_s"], row["version"], row["test_accuracy"]) for row in _rows(run_dir, "evaluator")
    ]
    losses: dict[str, list] = {}
    for row in _rows(run_dir, "worker"):
        losses.setdefault(row["rank"], []).append((row["step"], row["loss"]))
    lines = [line for line in err.splitlines() if "WARNING" in line or "restarted" in line]
    return (
        f"summary: {json.dumps(summary)}\nevaluations (time, version, accuracy): {evaluations}"
        f"\nworker losses: { {rank: rows[-5:] for rank, rows in losses.items()} }"
        "\nlauncher warnings:\n" + "\n".join(lines[-40:])
    )


def _ask(killer: subprocess.Popen, command: str, log: Path) -> None:
    assert killer.stdin is not None and killer.stdout is not None
    killer.stdin.write(f"{command}\n")
    killer.stdin.flush()
    answer = killer.stdout.readline()
    expected = "found" if command.startswith("find") else f"killed {command.split()[1]}"
    assert answer.startswith(expected), f"{answer}\nthe launcher:\n{log.read_text()[-3000:]}"


def _launch_on(ray_nodes, log: Path, *args: str) -> subprocess.Popen:
    """``distbelief train --cluster ray`` joined to ``ray_nodes`` with ``args``; its stderr goes
    to ``log`` (a file, not a pipe: nothing blocks the launcher)."""
    address = ["--ray-address", ray_nodes.address]
    with log.open("w") as log_file:
        return subprocess.Popen(
            # --no-plots: what these tests check is in the records.
            [*CLI, "train", "--cluster", "ray", *address, *args, "--no-plots"],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=ray_nodes.env,
        )


def _stop_with_ctrl_c(launcher: subprocess.Popen, log: Path) -> str:
    """Ctrl-C to the launcher; its log, once it has ended by it (exit code 130)."""
    launcher.send_signal(signal.SIGINT)
    launcher.wait(timeout=60)
    err = log.read_text()
    assert launcher.returncode == 130, err[-3000:]
    return err


def _placed(run_dir: Path) -> set[str]:
    """The processes ray.json lists (written as each one starts)."""
    try:
        return set(json.loads((run_dir / "ray.json").read_text())["processes"])
    except (OSError, ValueError):
        return set()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--ray-address", "127.0.0.1:6379"],
            "argument --ray-address: only applies with engine ray (--cluster ray)",
        ),
        (
            ["--cluster", "ray", "--ray-address", "ray://head:10001"],
            "argument --ray-address: cannot be a Ray Client address",
        ),
        (
            ["--cluster", "ray", "--ray-address", "head"],
            "argument --ray-address: must be HOST:PORT of a Ray head, auto or local, got 'head'",
        ),
        (
            ["--cluster", "ray", "--ray-address", "http://127.0.0.1:6379"],
            "argument --ray-address: must be HOST:PORT of a Ray head, auto or local, got 'http://",
        ),
        (
            ["--cluster", "ray", "--ray-address", "[::1"],
            "argument --ray-address: must be HOST:PORT of a Ray head, auto or local, got '[::1'",
        ),
        (
            ["--cluster", "ray", "--ray-address", "bad host:6379"],
            "argument --ray-address: must be HOST:PORT of a Ray head, auto or local, got 'bad host",
        ),
        (
            # Digits that str.isdigit() takes and int() refuses (or reads, and Ray's client not).
            ["--cluster", "ray", "--ray-address", "127.0.0.1:\u00b2"],
            "argument --ray-address: must be HOST:PORT of a Ray head, auto or local, got '127.0.0",
        ),
        (
            ["--cluster", "ray", "--ray-address", "127.0.0.1:\u0663\u0663"],
            "argument --ray-address: must be HOST:PORT of a Ray head, auto or local, got '127.0.0",
        ),
        (
            ["--cluster", "ray", "--ray-address", ":6379"],
            "argument --ray-address: must be HOST:PORT of a Ray head, auto or local, got ':6379'",
        ),
        (
            ["--cluster", "ray", "--partitions", "2"],
            "argument --partitions: must be 1 with the ray engine",
        ),
        (
            ["--cluster", "ray", "--ray-address", "127.0.0.1:1"],
            "argument --ray-address: no Ray head answers at 127.0.0.1:1",
        ),
        (
            ["--cluster", "ray", "--ray-address", ""],
            "argument --ray-address: expected a value, got ''",
        ),
    ],
)
def test_bad_ray_flags_are_one_line_errors_and_write_nothing(tmp_path, args, message):
    run_dir = tmp_path / "run"
    result = run_cli("train", *args, "--out", str(run_dir), timeout_s=60)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not run_dir.exists()


def test_missing_ray_is_a_one_line_error_naming_the_extra(tmp_path):
    run_dir = tmp_path / "run"
    # As if Ray were not installed: importing it fails.
    code = "import sys; sys.modules['ray'] = None; from distbelief.launch.cli import main; "
    code += "sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "train", "--cluster", "ray", "--out", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=CHILD_ENV,
    )
    assert result.returncode == 2
    expected = (
        "distbelief train: error: argument --cluster: ray needs Ray, which is not installed: "
        "pip install 'distbelief[ray]'"
    )
    assert result.stderr.strip().splitlines()[-1] == expected, result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


@needs_ray
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_job_on_the_embedded_ray_instance(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        *("train", "--cluster", "ray", "--workers", "1", "--shards", "1", "--steps", "200"),
        *("--out", str(run_dir)),
        timeout_s=200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["worker_steps"] == {"0": 200}
    assert summary["final"]["test_accuracy"] >= 0.7
    record = json.loads((run_dir / "ray.json").read_text())
    # On loopback only, and gone at the end: its processes and its folder.
    assert {p["node_ip"] for p in record["processes"].values()} == {"127.0.0.1"}
    assert not Path(record["temp_dir"]).exists()
    pids = json.loads((run_dir / "pids.json").read_text()).values()
    assert not [pid for pid in pids if _alive(pid)]
    assert (run_dir / "accuracy_vs_time.png").exists()


@needs_ray
@pytest.mark.slow
@pytest.mark.xdist_group("ray_nodes")  # one cluster for both tests, in one process
@pytest.mark.timeout(300)
def test_job_on_two_nodes_survives_ray_kill_of_a_worker_and_a_shard(ray_nodes, tmp_path):
    """Ray re-creates a killed worker's and a killed shard's actors and the job goes on; a
    worker whose actor was killed for good (``no_restart``) is given up at once, once."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = _launch_on(
        ray_nodes,
        log,
        *("--workers", "4", "--shards", "2", "--steps", str(STEPS)),
        *("--checkpoint-every", "1", "--out", str(run_dir)),
    )
    killer = subprocess.Popen(
        [sys.executable, "-c", _KILLER, ray_nodes.address, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ray_nodes.env,
    )
    try:
        assert killer.stdout is not None and killer.stdout.readline() == "connected\n"
        ranks = [str(rank) for rank in range(4)]
        names = ["shard0", *(f"worker{r}" for r in ranks)]
        # Found as their actors are made, before their processes train (they start at once).
        _ask(killer, "find " + " ".join(names), log)
        _wait_for(lambda: set(names) <= _placed(run_dir), 180, "the processes to start")
        _wait_for(
            lambda: min(_worker_steps(run_dir).get(r, 0) for r in ranks) >= 1,
            120,
            "the four workers to train",
            run_dir,
        )
        # Actors start at different times: the slowest worker is surely mid-run.
        before = _worker_steps(run_dir)
        victim = min(ranks, key=lambda r: before[r])
        assert before[victim] < STEPS - 100, before
        _ask(killer, f"kill worker{victim}", log)
        ended = min((r for r in ranks if r != victim), key=lambda r: before[r])
        assert before[ended] < STEPS - 100, before
        _ask(killer, f"end worker{ended}", log)
        others = [r for r in ranks if r not in (victim, ended)]
        _wait_for(
            lambda: all(_worker_steps(run_dir)[r] >= min(before[r] + 30, STEPS) for r in others),
            60,
            "the other workers to keep training",
            run_dir,
        )
        _ask(killer, "kill shard0", log)  # while the victim, restarted, still has most of its steps
        launcher.wait(timeout=200)
    finally:
        for process in (launcher, killer):
            if process.poll() is None:
                process.kill()
                process.wait(10)
    err = log.read_text()
    assert launcher.returncode == 0, err[-3000:]
    # The actors' lines Ray printed into the log file (the workers' warnings of the shard
    # lost) carry no colour codes, as the launcher's own carry none there.
    assert "(NodeHost pid=" in err and "\x1b[" not in err, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    faults = {fault["process"]: fault for fault in summary["faults"]}
    # One fault each: the worker ended for good is not "restarted" again and again.
    assert len(summary["faults"]) == 3, summary["faults"]
    assert set(faults) == {f"worker{victim}", f"worker{ended}", "shard0"}, summary["faults"]
    actions = {name: fault["action"] for name, fault in faults.items()}
    assert actions == {
        f"worker{victim}": "restarted",
        f"worker{ended}": "given up",
        "shard0": "restarted",
    }
    assert faults["shard0"]["version_restored"] is not None
    # Their actors went with them: no exit code reached the launcher, Ray's reason stands for it.
    for fault in faults.values():
        assert fault["exitcode"] is None and fault["cause"], fault
        assert f"{fault['process']} died ({fault['cause']}); {fault['action']}" in err
    # The victim went on after its last push the shards applied: at least the push before the
    # step it had reported when it was killed (its pushes' events came over its link).
    assert before[victim] - 1 <= faults[f"worker{victim}"]["resumed_at_step"] < STEPS
    assert summary["worker_steps"][ended] < STEPS
    assert summary["worker_steps"] == {
        **dict.fromkeys(ranks, STEPS),
        ended: summary["worker_steps"][ended],
    }
    assert summary["final"]["test_accuracy"] >= 0.9, _history(summary, run_dir, err)
    # The placement group spread the shards over the two nodes; each bound its node's address.
    processes = json.loads((run_dir / "ray.json").read_text())["processes"]
    assert {processes[f"shard{i}"]["node_ip"] for i in range(2)} == {"127.0.0.2", "127.0.0.3"}
    assert {p["node_ip"] for p in processes.values()} <= set(ray_nodes.node_ips)


@needs_ray
@pytest.mark.slow
@pytest.mark.xdist_group("ray_nodes")
@pytest.mark.timeout(300)
def test_ctrl_c_stops_every_actor_after_the_coordinator_commits_its_iteration(ray_nodes, tmp_path):
    """A Sandblaster job, whose coordinator is an actor too: asked to stop first, it commits a
    checkpoint of the iteration under way (the default --checkpoint-every, 30 s, saves only
    iteration 0's in a run this short), which is summary.json's and metrics.csv's last, and a
    resume goes on from it."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = _launch_on(
        ray_nodes,
        log,
        *("--algorithm", "sandblaster", "--max-iterations", "100000", "--out", str(run_dir)),
    )
    try:
        names = {"coordinator", "evaluator", "shard0", "shard1", "worker0", "worker1"}
        _wait_for(lambda: names <= _placed(run_dir), 120, "every process to start")
        _wait_for(lambda: len(_rows(run_dir, "coordinator")) >= 4, 120, "iteration 3")
        pids = json.loads((run_dir / "pids.json").read_text())
        err = _stop_with_ctrl_c(launcher, log)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
    assert err.strip().splitlines()[-1] == "distbelief train: stopped by Ctrl-C"
    assert set(pids) == names
    _wait_for(lambda: not any(map(_alive, pids.values())), 10, "every actor's process to end")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["outcome"] == "interrupted"
    assert summary["coordinator"]["stop_reason"] == "stopped"
    iteration = summary["coordinator"]["iterations"]
    assert iteration >= 3, summary["coordinator"]
    record = json.loads((run_dir / "checkpoints" / "coordinator.json").read_text())
    assert record["iteration"] == iteration
    assert int(_rows(run_dir, "coordinator")[-1]["step"]) == iteration

    result = run_command(
        ["train", "--resume", str(run_dir), "--max-iterations", str(iteration + 2)],
        ray_nodes.env,
        timeout_s=200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [int(row["step"]) for row in _rows(run_dir, "coordinator")]
    assert steps == list(range(iteration + 3))  # on from the committed iteration, not from 1
    assert json.loads((run_dir / "summary.json").read_text())["coordinator"]["iterations"] == (
        iteration + 2
    )


@needs_ray
@pytest.mark.slow
@pytest.mark.xdist_group("ray_nodes")
@pytest.mark.timeout(300)
def test_a_shard_killed_or_failing_as_the_job_stops_is_in_the_summary_and_not_restarted(
    ray_nodes, tmp_path
):
    """SIGKILL to a shard's process right after Ctrl-C: the launcher, stopping, brings nothing
    back, and summary.json lists the death (it was made before the stop, which saw it); the
    other shard cannot save its last checkpoint (a folder is where its record goes), and its
    error is listed too."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = _launch_on(ray_nodes, log, *("--steps", "1000000", "--out", str(run_dir)))
    try:
        names = {"evaluator", "shard0", "shard1", "worker0", "worker1"}
        _wait_for(lambda: names <= _placed(run_dir), 120, "every process to start")
        _wait_for(lambda: len(_rows(run_dir, "worker")) >= 4, 120, "four worker rows")
        pid = json.loads((run_dir / "pids.json").read_text())["shard1"]
        record = run_dir / "checkpoints" / "shard0.json"
        record.unlink()
        record.mkdir()
        launcher.send_signal(signal.SIGINT)
        os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=60)
        err = log.read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
    assert launcher.returncode == 130, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["outcome"] == "interrupted"
    faults = {
        f["process"]: (f["action"], f["while_stopping"], f.get("error")) for f in summary["faults"]
    }
    assert faults.keys() == {"shard0", "shard1"}, err[-3000:]
    assert faults["shard1"] == ("given up", True, None)
    # Its actor lived on and saw its process end: the exit code, as the local launcher's.
    killed = next(f for f in summary["faults"] if f["process"] == "shard1")
    assert (killed["exitcode"], killed["cause"]) == (-signal.SIGKILL, None), killed
    assert faults["shard0"][:2] == ("given up", True)
    assert faults["shard0"][2].startswith("IsADirectoryError"), faults["shard0"]
    assert "shard1 died (exit code -9) while the job stopped; given up" in err
    assert "shard0 failed while the job stopped: IsADirectoryError" in err
    assert json.loads((run_dir / "pids.json").read_text())["shard1"] == pid  # no second life


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@needs_ray
@pytest.mark.slow
@pytest.mark.xdist_group("ray_nodes")
@pytest.mark.timeout(240)
def test_a_killed_node_host_takes_none_of_the_processes_its_zygote_forked(ray_nodes, tmp_path):
    """Ray ends a dead actor's process group: the node host's (``zygote-NODE``) held every
    process its zygote had forked, and a kill of it by its pid took them all, each a fault and
    a restart (a shard's with updates lost)."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = _launch_on(
        ray_nodes,
        log,
        *("--workers", "1", "--shards", "1", "--steps", "100000", "--out", str(run_dir)),
    )
    try:
        names = {"evaluator", "shard0", "worker0"}
        _wait_for(lambda: names <= _placed(run_dir), 120, "every process to start")
        _wait_for(lambda: _worker_steps(run_dir).get("0", 0) >= 1, 120, "the worker to train")
        pids = json.loads((run_dir / "pids.json").read_text())
        zygote = _parent_of(pids["worker0"])
        assert b"distbelief.launch.zygote" in Path(f"/proc/{zygote}/cmdline").read_bytes()
        node_host = _parent_of(zygote)  # the zygote's keeper
        os.kill(node_host, signal.SIGKILL)
        _wait_for(lambda: not _alive(node_host), 10, "the node host to end")
        step = _worker_steps(run_dir)["0"]
        _wait_for(lambda: _worker_steps(run_dir)["0"] >= step + 50, 60, "the worker to go on")
        err = _stop_with_ctrl_c(launcher, log)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
    assert json.loads((run_dir / "summary.json").read_text())["faults"] == [], err[-3000:]
    assert json.loads((run_dir / "pids.json").read_text()) == pids


@needs_ray
@pytest.mark.xdist_group("ray_nodes")
@pytest.mark.timeout(120)
def test_a_cluster_too_small_for_the_job_is_one_clear_error(ray_nodes, tmp_path):
    # Forked with torch loaded (tests/forked.py): refused once it has asked the cluster.
    result = run_command(
        [
            *("train", "--cluster", "ray", "--ray-address", ray_nodes.address),
            *("--workers", "8", "--out", str(tmp_path / "run")),
        ],
        ray_nodes.env,
        timeout_s=100,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"distbelief train: error: argument --workers: the Ray cluster at {ray_nodes.address} "
        "has 8 CPUs; this job needs 11 (2 shards, 8 workers x 1 thread (--threads), the "
        "evaluator)"
    )
    assert not (tmp_path / "run").exists()  # a refused job leaves no run folder behind


PLACEMENT_TIMEOUT_S = 20
"""A third of the default bound (DISTBELIEF_PLACEMENT_TIMEOUT_S): the shard, which finds a free
CPU, is still placed well within it on a busy machine (its actor starts in seconds)."""


@needs_ray
@pytest.mark.slow
@pytest.mark.xdist_group("ray_nodes")
@pytest.mark.timeout(300)
def test_a_job_whose_actors_find_no_free_cpu_ends_with_one_clear_error(ray_nodes, tmp_path):
    """Enough CPUs in all, one free: the shard is placed, the worker and the evaluator never
    are; the job ends after the placement bound, leaving no actor behind."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, ray_nodes.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ray_nodes.env,
    )
    assert holder.stdin is not None and holder.stdout is not None

    def actors_of(namespace: str) -> list[str]:
        holder.stdin.write(f"actors {namespace}\n")
        holder.stdin.flush()
        return holder.stdout.readline().split()[1:]

    try:
        assert holder.stdout.readline() == "held\n"
        started = time.monotonic()
        result = subprocess.run(
            [
                *(*CLI, "train", "--cluster", "ray", "--ray-address", ray_nodes.address),
                *("--workers", "1", "--shards", "1", "--steps", "20", "--out", str(run_dir)),
            ],
            capture_output=True,
            text=True,
            timeout=PLACEMENT_TIMEOUT_S + 150,
            env={**ray_nodes.env, "DISTBELIEF_PLACEMENT_TIMEOUT_S": str(PLACEMENT_TIMEOUT_S)},
        )
        took_s = time.monotonic() - started
        namespace = json.loads((run_dir / "ray.json").read_text())["namespace"]
        _wait_for(lambda: not actors_of(namespace), 30, "the job's actors to go")
    finally:
        holder.stdin.close()  # its driver leaves: its actors' CPUs are free for the next test
        try:
            holder.wait(30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(10)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "distbelief train: ClusterError: Ray could not place worker0, evaluator within "
        f"{PLACEMENT_TIMEOUT_S:g}s (the cluster at {ray_nodes.address} is busy or too small)"
    )
    assert took_s < PLACEMENT_TIMEOUT_S + 120
    assert json.loads((run_dir / "summary.json").read_text())["outcome"] == "failed"
    pids = json.loads((run_dir / "pids.json").read_text())
    assert set(pids) == {"shard0"}
    _wait_for(lambda: not _alive(pids["shard0"]), 10, "the shard's process to end")


@needs_ray
@pytest.mark.xdist_group("ray_nodes")
@pytest.mark.timeout(60)
def test_the_probe_tells_a_ray_head_from_its_ray_client_server(ray_nodes):
    from distbelief.launch.ray_probe import GRPC_UNAUTHENTICATED, GRPC_UNIMPLEMENTED, ask_gcs

    host, port = ray_nodes.address.rsplit(":", 1)
    token = {"authorization": f"Bearer {ray_nodes.env['RAY_AUTH_TOKEN']}"}
    assert ask_gcs(host, int(port), headers=token, timeout_s=5).status == 0
    assert ask_gcs(host, int(port), headers={}, timeout_s=5).status == GRPC_UNAUTHENTICATED
    client = ask_gcs(host, ray_nodes.client_port, headers=token, timeout_s=5)
    assert client.status == GRPC_UNIMPLEMENTED


@needs_ray
@pytest.mark.xdist_group("ray_nodes")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["ray-client-port", "no-token"])
def test_joining_what_is_no_ray_head_for_this_job_is_refused_at_once(ray_nodes, tmp_path, case):
    run_dir, host = tmp_path / "run", ray_nodes.address.rsplit(":", 1)[0]
    if case == "ray-client-port":
        address, env = f"{host}:{ray_nodes.client_port}", ray_nodes.env
        expected = f"no Ray head answers at {address} (a gRPC server without Ray's GCS"
    else:
        address, env = ray_nodes.address, {**ray_nodes.env, "RAY_AUTH_MODE": "disabled"}
        expected = f"the Ray head at {address} refuses this process's token (InvalidAuthToken"
    started = time.monotonic()
    result = subprocess.run(
        [*CLI, "train", "--cluster", "ray", "--ray-address", address, "--out", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"distbelief train: error: argument --ray-address: {expected}"), last
    assert "Traceback" not in result.stderr and "gcs_client" not in result.stderr
    assert time.monotonic() - started < 60  # Ray's own client took 20 s and more
    assert not run_dir.exists()


@needs_ray
def test_auto_with_no_ray_running_names_the_flag(monkeypatch):
    import ray._private.services

    from distbelief.errors import ConfigFieldError
    from distbelief.launch.ray_session import check_address

    def none_running(address: str, temp_dir: str | None = None) -> str:
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray._private.services, "canonicalize_bootstrap_address", none_running)
    with pytest.raises(ConfigFieldError, match="auto finds no Ray running on this machine") as e:
        check_address("auto")
    assert e.value.field == "cluster.ray_address"


def _processes_naming(folder: Path) -> list[str]:
    """Command lines of the live processes that name ``folder`` (every process of a Ray
    instance names its temporary folder)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in text and _alive(int(cmdline.parent.name)):
            found.append(text)
    return found


@needs_ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_while_the_embedded_instance_starts_leaves_nothing_behind(tmp_path):
    """Sent to the launcher's whole group, as Ctrl-C at a terminal sends SIGINT: the launcher,
    away from its group while Ray starts, gets it from the group's stand-in."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [
            *(*CLI, "train", "--cluster", "ray", "--workers", "1", "--shards", "1"),
            *("--steps", "5", "--out", str(run_dir)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
        process_group=0,  # a group of its own, which it leads: as a shell's job
    )
    # Ray names its session's folder after the process that starts it: this launcher's.
    pattern = f"distbelief-ray-*/session_*_{launcher.pid}"
    try:
        _wait_for(
            lambda: any(Path(tempfile.gettempdir()).glob(pattern)) or launcher.poll() is not None,
            200,
            "Ray's session folder",
        )
        sessions = list(Path(tempfile.gettempdir()).glob(pattern))
        assert sessions, "the launcher ended before Ray started"
        os.killpg(launcher.pid, signal.SIGTERM)
        _, err = launcher.communicate(timeout=200)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
    assert launcher.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "distbelief train: stopped by signal SIGTERM"
    temp_dir = sessions[0].parent
    assert not temp_dir.exists()
    assert not run_dir.exists()
    _wait_for(lambda: not _processes_naming(temp_dir), 10, "the instance's processes to end")


@needs_ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_launchers_process_group_stops_the_job_in_order(tmp_path):
    """What ``timeout`` and ``kill -TERM -PGID`` send: the embedded Ray instance's own
    processes are not in that group, so they are not gone before the launcher stops the job."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    with log.open("w") as log_file:
        launcher = subprocess.Popen(
            [
                *(*CLI, "train", "--cluster", "ray", "--workers", "1", "--shards", "1"),
                *("--steps", "100000", "--out", str(run_dir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=CHILD_ENV,
            process_group=0,  # a group of its own, which it leads: as a shell's job
        )
    try:
        names = {"evaluator", "shard0", "worker0"}
        _wait_for(lambda: names <= _placed(run_dir), 150, "every process to start")
        _wait_for(lambda: _rows(run_dir, "worker"), 120, "the worker to train")
        pids = json.loads((run_dir / "pids.json").read_text())
        temp_dir = json.loads((run_dir / "ray.json").read_text())["temp_dir"]
        os.killpg(launcher.pid, signal.SIGTERM)
        launcher.wait(timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(10)
    err = log.read_text()
    assert launcher.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "distbelief train: stopped by signal SIGTERM"
    assert (run_dir / "checkpoints" / "shard0.json").exists()
    assert not Path(temp_dir).exists()
    _wait_for(lambda: not any(map(_alive, pids.values())), 10, "every actor's process to end")


@needs_ray
def test_a_resumed_runs_ray_head_gone_is_named_with_its_config_file(tmp_path):
    # The run's Ray head was not typed: the refusal says where the address comes from.
    run_dir = tmp_path / "run"
    first = run_forked(
        "train", "--model", "mlp", "--steps", "3", "--no-eval", "--out", str(run_dir)
    )
    assert first.returncode == 0, first.stderr[-3000:]
    config_file = run_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["cluster"].update(engine="ray", ray_address="127.0.0.1:1")
    config_file.write_text(json.dumps(config))
    result = run_forked("train", "--resume", str(run_dir), timeout_s=60)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"distbelief train: error: cluster.ray_address (in {config_file}): no Ray head answers "
        "at 127.0.0.1:1"
    ), result.stderr
    # ... and the way out: the flag that overrides it.
    assert last.endswith(
        "give --ray-address HOST:PORT of its cluster now, or --ray-address local to resume it "
        "on this machine alone"
    ), last


_START_AFTER_STOP = """
import sys
from pathlib import Path

from distbelief.config import JobConfig
from distbelief.errors import ClosedError
from distbelief.launch.cluster import ProcessKind
from distbelief.launch.ray_cluster import RayCluster

run_dir = Path(sys.argv[2])
config = JobConfig().with_fields(
    {"cluster.engine": "ray", "cluster.ray_address": sys.argv[1], "reporting.out_dir": str(run_dir)}
)
with RayCluster(config, run_dir) as cluster:
    pass
try:
    cluster.start(ProcessKind.SHARD, 0)
except ClosedError as e:
    print(f"ClosedError: {e}")
"""


@needs_ray
@pytest.mark.xdist_group("ray_nodes")
@pytest.mark.timeout(180)
def test_a_ray_cluster_starts_nothing_after_stop_all(ray_nodes, tmp_path):
    # As a LocalCluster: a start after the with block (Ray left) started an actor nothing
    # watched, on a cluster the job had left.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _START_AFTER_STOP, ray_nodes.address, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=150,
        env=ray_nodes.env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1:] == [
        "ClosedError: RayCluster: start of shard0 after stop_all()"
    ], result.stderr[-3000:]


@needs_ray
def test_auto_naming_no_ray_head_names_where_it_came_from(monkeypatch):
    from distbelief.errors import ConfigFieldError
    from distbelief.launch.ray_session import check_address

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        stale = f"127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setenv("RAY_ADDRESS", stale)
    with pytest.raises(
        ConfigFieldError, match=rf"at auto \(RAY_ADDRESS={stale}\), which Ray dials"
    ):
        check_address("auto")
