"""Workers re-send what a restarted shard's checkpoint lacks. In this process: shards on loopback,
stopped without a last save (as a SIGKILL leaves them) and restarted from their checkpoint files
on the same address, where two workers' pushes all end up applied exactly once. In a real job: a
shard SIGKILLed mid-run ends with the parameters of the same job left alone (run by the same role
functions in this process's threads)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.config import ConsistencyConfig, JobConfig
from distbelief.launch.cluster import ProcessKind, ProcessSpec
from distbelief.launch.entry import run_role
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.server import checkpoint as checkpoint_module
from distbelief.server.checkpoint import Checkpointer, load_checkpoint, save_checkpoint
from distbelief.server.groups import ShardGroups
from distbelief.sharding import TensorSpec
from distbelief.telemetry import read_metrics
from distbelief.wire import serve
from distbelief.wire.security import WireSecurity
from tests.conftest import CHILD_ENV, CLI, stop_processes

SPECS = [TensorSpec("w", (6, 4), torch.float32), TensorSpec("b", (6,), torch.float32)]
NUM_ELEMENTS = 30
LR = 0.5


class _ServedShard:
    """One shard with periodic-checkpoint bookkeeping (saves are made by the test), served."""

    def __init__(
        self,
        shard_id: int,
        directory,
        address: str = "tcp://127.0.0.1:0",
        num_shards: int = 2,
        *,
        sync_workers: int | None = None,
    ) -> None:
        """``sync_workers``: synchronous rounds of that many workers (default: async)."""
        self.shard = ParameterShard(
            shard_id,
            num_shards,
            server_optimizer_factory("sgd", lr=LR),
            ConsistencyConfig(sync=sync_workers is not None),
            num_workers=sync_workers or 1,
        )
        state = load_checkpoint(directory, shard_id)
        if state is not None:
            self.shard.restore(state)
        self.shard.track_checkpoints()
        self.directory = directory
        self.checkpointer = Checkpointer(
            self.shard, directory, 3600.0, on_finished=self.shard.checkpoint_finished
        )
        self.server = serve(address, ShardService(self.shard))
        self.address = self.server.address

    def kill(self) -> None:
        """Stop serving with no last checkpoint, as SIGKILL would."""
        self.server.stop()


def _gradient(k: int) -> dict[torch.dtype, torch.Tensor]:
    return {torch.float32: torch.linspace(-1.0, 1.0, NUM_ELEMENTS) * (k + 1) + 0.1 * k}


def _client(addresses: list[str], worker: str) -> ParameterServerClient:
    return ParameterServerClient(
        addresses, SPECS, timeout_s=30, retry_timeout_s=30, worker_id=worker
    )


def test_a_restarted_shard_gets_every_push_of_two_workers_back_exactly_once(tmp_path):
    shards = [_ServedShard(i, tmp_path) for i in range(2)]
    addresses = [s.address for s in shards]
    first, second = _client(addresses, "w1"), _client(addresses, "w2")
    initial = {torch.float32: torch.linspace(0.0, 3.0, NUM_ELEMENTS)}
    pushed = []

    def push(client, k):
        client.push_now(_gradient(k))
        pushed.append(k)

    try:
        first.handshake(initial)
        second.handshake(initial)
        push(first, 0)
        push(second, 1)
        for shard in shards:
            shard.checkpointer.save_if_changed()  # checkpoint 1 (or 2): pushes 0 and 1
        push(first, 2)
        push(second, 3)
        # Checkpoint of shard 1 begins; a push lands after its snapshot, then the save ends
        # unannounced (the shard dies before any reply says so).
        state = shards[1].shard.snapshot()
        push(first, 4)
        save_checkpoint(state, tmp_path)
        push(second, 5)
        assert first.replays[1].held == 2 and second.replays[1].held == 2
        shards[1].kill()
        shards[1] = _ServedShard(1, tmp_path, address=addresses[1])
        restored = shards[1].shard.version
        assert restored == 4  # pushes 0-3; 4 and 5 were lost with the process
        push(first, 6)  # finds the restart: re-sends push 4 first
        pulled = {torch.float32: torch.zeros(NUM_ELEMENTS)}
        versions = second.pull_now(pulled)  # finds the restart: re-sends push 5, pulls again
        assert versions == [7, 7]
        assert first.replays[1].held == 2 and second.replays[1].held == 1
    finally:
        first.close()
        second.close()
        for shard in shards:
            shard.kill()
    expected = initial[torch.float32] - LR * sum(_gradient(k)[torch.float32] for k in pushed)
    torch.testing.assert_close(pulled[torch.float32], expected, rtol=0, atol=1e-6)
    assert shards[1].shard.recovery() == {
        "restored_checkpoint": state.values["checkpoint_number"],
        "updates_replayed": 2,
        "pushes_resent": 1,  # push 6 was in flight when the first worker found the restart
        "version_seen_before": 6,
    }


def _hold_next_push(shard: ParameterShard, applied: threading.Event, release: threading.Event):
    """The shard's next push is applied, then its reply waits for ``release``."""
    push = shard.push

    def applied_then_held(*args, **kwargs):
        shard.push = push
        result = push(*args, **kwargs)
        applied.set()
        release.wait(30)
        return result

    shard.push = applied_then_held


@pytest.mark.parametrize("checkpointed", [False, True], ids=["after-checkpoint", "in-checkpoint"])
def test_a_push_applied_whose_reply_died_with_the_shard_counts_once(tmp_path, checkpointed):
    served = _ServedShard(0, tmp_path, num_shards=1)
    client = ParameterServerClient(
        [served.address], SPECS, timeout_s=30, retry_timeout_s=30, worker_id="w"
    )
    initial = {torch.float32: torch.linspace(0.0, 3.0, NUM_ELEMENTS)}
    applied, release = threading.Event(), threading.Event()
    try:
        client.handshake(initial)
        client.push_now(_gradient(0))
        served.checkpointer.save_if_changed()
        client.push_now(_gradient(1))
        _hold_next_push(served.shard, applied, release)
        futures = client.push(_gradient(2))
        assert applied.wait(30)
        if checkpointed:  # the held push is in the checkpoint the shard restarts from
            served.checkpointer.save_if_changed()
        # Connections are closed at once; the held reply can only go to a closed socket.
        served.server.stop(timeout_s=0.5)
        release.set()
        served = _ServedShard(0, tmp_path, address=served.address, num_shards=1)
        assert client.wait(futures) == [3]
        pulled = {torch.float32: torch.zeros(NUM_ELEMENTS)}
        assert client.pull_now(pulled) == [3]
    finally:
        release.set()
        client.close()
        served.kill()
    expected = initial[torch.float32] - LR * sum(_gradient(k)[torch.float32] for k in range(3))
    torch.testing.assert_close(pulled[torch.float32], expected, rtol=0, atol=1e-6)
    recovery = served.shard.recovery()
    if checkpointed:  # the retry was answered as a duplicate; nothing to re-send
        assert (recovery["updates_replayed"], recovery["pushes_resent"]) == (0, 0)
    else:  # the retry applied push 2 again (the first time died with the shard); 1 re-sent
        assert (recovery["updates_replayed"], recovery["pushes_resent"]) == (1, 1)


def test_sync_workers_report_the_last_version_they_saw_to_a_restarted_shard(tmp_path):
    """Under sync rounds nothing is re-sent (a round's averaged update is no worker's own), but
    each worker that finds the restart reports the last version the dead shard answered it
    with: the launcher's count of the rounds lost needs the highest."""
    served = _ServedShard(0, tmp_path, num_shards=1, sync_workers=2)
    addresses = [served.address]
    first, second = _client(addresses, "w1"), _client(addresses, "w2")
    try:
        first.handshake({torch.float32: torch.linspace(0.0, 3.0, NUM_ELEMENTS)})
        second.handshake(None)

        def round_from(version: int) -> list[int]:
            """One round: the first worker's gradient opens it, the second's closes it."""
            assert first.push_now(_gradient(0), base_versions=[version]) == [version]
            return second.push_now(_gradient(1), base_versions=[version])

        assert round_from(0) == [1]
        served.checkpointer.save_if_changed()  # holds round 1
        assert round_from(1) == [2]
        assert round_from(2) == [3]  # the first worker last saw 2, the second 3
        served.kill()
        served = _ServedShard(0, tmp_path, address=addresses[0], num_shards=1, sync_workers=2)
        assert served.shard.version == 1  # rounds 2 and 3 died with the process
        # Each worker's next gradient finds the restart, reports, and joins the next round.
        assert second.push_now(_gradient(1), base_versions=[3]) == [1]
        assert first.push_now(_gradient(0), base_versions=[2]) == [2]
        assert first.replays[0].held == second.replays[0].held == 0  # no push kept for replay
    finally:
        first.close()
        second.close()
        served.kill()
    recovery = served.shard.recovery()
    assert (recovery["updates_replayed"], recovery["pushes_resent"]) == (0, 0)
    assert recovery["version_seen_before"] == 3


# ------------------------------------------------------------------ a SIGKILL in a real job


STEPS = 1500
"""~4 s of steps on a quiet machine (300 took 1 s): the kill at step 100, chosen from
metrics.csv (which the launcher writes, seconds behind the worker on a busy machine), lands
long before the end."""


def _train(run_dir: Path) -> subprocess.Popen:
    """One worker, blocking, plain SGD on the shards: the pushes are the same in every run.

    The MLP, not LeNet: the replayed sum differs from the pushes applied one by one by float
    rounding (~1e-7), which LeNet's training amplifies to ~1e-3 within 300 steps. The MLP's
    amplifies it less, but by how much depends on where the kill lands: measured 2.6e-7 to
    2.6e-6 at the end after replays of 17-101 updates, and 1.2e-4 once (a replay of 109 from
    no checkpoint, on a busy machine). A lost or repeated update shows in the versions.
    """
    flags = ["--workers", "1", "--shards", "2", "--steps", str(STEPS), "--blocking"]
    flags += ["--model", "mlp"]
    flags += ["--server-optimizer", "sgd", "--checkpoint-every", "0.5", "--no-eval", "--no-plots"]
    return subprocess.Popen(
        [*CLI, "train", *flags, "--out", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )


def _run_undisturbed(config: JobConfig) -> None:
    """The same job's shards and worker (the launcher's role functions) in this process's
    threads, left alone to the end; the shards' last checkpoints hold its parameters."""
    addresses: dict[int, str] = {}
    stop = threading.Event()

    def emit(kind: str, payload: dict) -> None:
        if kind == "ready":
            addresses[payload["shard_id"]] = payload["address"]

    def shard(shard_id: int) -> None:
        spec = ProcessSpec(ProcessKind.SHARD, shard_id, bind="tcp://127.0.0.1:0")
        run_role(emit, spec, config, [], WireSecurity(), stop)

    shards = [threading.Thread(target=shard, args=(i,), daemon=True) for i in range(2)]
    for thread in shards:
        thread.start()
    threads = torch.get_num_threads()  # the worker sets this process's threads to the job's
    try:
        deadline = time.monotonic() + 60
        while len(addresses) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        worker = ProcessSpec(ProcessKind.WORKER, 0)
        run_role(emit, worker, config, [addresses[0], addresses[1]], WireSecurity(), stop)
    finally:
        torch.set_num_threads(threads)
        stop.set()
        for thread in shards:
            thread.join(30)


def _worker_step(run_dir: Path) -> int:
    try:
        rows = read_metrics(run_dir / "metrics.csv")
    except (OSError, ValueError):  # not written yet, or a row caught half-written
        return 0
    return max((row["step"] for row in rows if row["role"] == "worker"), default=0)


def _wait_for(predicate, job: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not predicate():
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard_id in range(2):
        state = load_checkpoint(run_dir / "checkpoints", shard_id)
        assert state is not None
        tensors |= {f"{shard_id}.{k}": v for k, v in state.tensors.items() if "param" in k}
    return tensors


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_of_a_shard_loses_no_update(tmp_path):
    killed, left_alone = tmp_path / "killed", tmp_path / "left-alone"
    job = _train(killed)
    try:
        _wait_for((killed / "config.json").exists, job, "the job's config")
        config = JobConfig.from_file(killed / "config.json")
        reference = threading.Thread(
            target=_run_undisturbed,
            args=(config.with_fields({"reporting.out_dir": str(left_alone)}),),
            daemon=True,
        )
        reference.start()
        _wait_for(lambda: _worker_step(killed) >= 100, job, "step 100")
        os.kill(json.loads((killed / "pids.json").read_text())["shard1"], signal.SIGKILL)
        _, err = job.communicate(timeout=180)
        reference.join(120)
    finally:
        stop_processes([job])
    assert job.returncode == 0, err[-3000:]
    assert not reference.is_alive()
    summary = json.loads((killed / "summary.json").read_text())
    [fault] = summary["faults"]
    assert (fault["process"], fault["action"], fault["lost_updates"]) == ("shard1", "restarted", 0)
    recovered = fault["version_restored"] + fault["updates_replayed"] + fault["pushes_resent"]
    assert recovered >= fault["version_before"] >= fault["version_restored"]
    assert summary["final"]["version"] == STEPS
    after_kill, undisturbed = _final_parameters(killed), _final_parameters(left_alone)
    assert after_kill.keys() == undisturbed.keys()
    for name, tensor in after_kill.items():
        # Rounding of the replayed sum, amplified by the steps after it (see _train): a lost
        # or repeated update shows in the versions above, not in this tolerance.
        torch.testing.assert_close(tensor, undisturbed[name], rtol=0, atol=1e-3, msg=name)


def test_the_first_checkpoint_is_on_disk_before_the_initialising_client_is_answered(
    tmp_path, monkeypatch
):
    # A shard killed right after a worker initialised it restarts with the layout: had the
    # save been left to the checkpointer's thread (stopped here), it would restart empty and
    # refuse every push ("holds no parameters").
    monkeypatch.setattr(checkpoint_module, "_POLL_S", 3600.0)
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=LR))
    groups = ShardGroups(shard, checkpoint_dir=tmp_path, checkpoint_every_s=3600.0)
    groups.start_checkpoints({})
    server = serve("tcp://127.0.0.1:0", ShardService(shard, groups=groups))
    client = _client([server.address], "w1")
    try:
        client.handshake({torch.float32: torch.linspace(0.0, 3.0, NUM_ELEMENTS)})
        state = load_checkpoint(tmp_path, 0)
        assert state is not None and state.version == 0
    finally:
        client.close()
        server.stop()
        groups.stop_checkpoints()
    restarted = _ServedShard(0, tmp_path, num_shards=1)
    client = _client([restarted.address], "w1")
    try:
        client.handshake({torch.float32: torch.zeros(NUM_ELEMENTS)})  # the shard's win
        assert client.push_now(_gradient(0)) == [1]
    finally:
        client.close()
        restarted.kill()
