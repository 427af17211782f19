"""ParameterServer in a real torch.distributed (gloo) job: a seed-style server script as rank 0
in a subprocess, this test process as the training rank, finding the server through the store."""

from __future__ import annotations

import contextlib
import datetime
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distbelief.errors import ModelMismatchError, RendezvousError
from distbelief.optim import DownpourSGD
from distbelief.server import ParameterServer
from distbelief.wire.process_group import GroupStore
from tests.conftest import (
    CHILD_ENV,
    free_port,
    run_scripts_together,
    start_scripts,
    stop_processes,
)

SERVER_SCRIPT = """
import sys
import threading
import torch
import torch.distributed as dist
from torch import nn
from distbelief.errors import ClosedError
from distbelief.server import ConsistencyConfig, ParameterServer

init_method, world_size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
options = {}
if len(sys.argv) > 5:  # the liveness and join timeouts, in seconds (then "sync": rounds)
    options["consistency"] = ConsistencyConfig(
        liveness_timeout_s=float(sys.argv[4]), sync=sys.argv[6:] == ["sync"]
    )
    options["join_timeout_s"] = float(sys.argv[5])
dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=world_size)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3))
server = ParameterServer(model, **options)
if len(sys.argv) == 5 and sys.argv[4] == "stop-on-stdin":  # another thread calls stop()
    watchdog = threading.Thread(target=lambda: sys.stdin.readline() and server.stop())
    watchdog.start()
summary = server.run()
torch.save(model.state_dict(), out)
print("server done", summary["version"], summary["finished"], summary["lost_ranks"], flush=True)
try:
    server.run()  # its ranks have finished with it: refused, not served to nobody
except ClosedError as e:
    print("run again:", e, flush=True)
dist.destroy_process_group()
"""
pytestmark = pytest.mark.timeout(400)
"""Each test starts a fresh Python process importing torch: minutes on a busy 2-core machine."""
GROUP_TIMEOUT = datetime.timedelta(seconds=120)
SCRIPTS_TIMEOUT_S = 300
STEPS_PER_EPOCH = 3
NUM_EPOCHS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3))


def _batches(num_batches: int):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 10, generator=generator), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(num_batches)
    ]


def _train_two_batches(model: nn.Module, optimizer: DownpourSGD) -> None:
    for images, labels in _batches(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


def _expect_loaded(server: subprocess.Popen) -> None:
    """The server ended well and loaded the final parameters into its model."""
    _, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-2000:]
    assert "final parameters not loaded" not in err


def _take_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def server_and_group(tmp_path):
    """Rank 0 runs the seed-style server script; this process joins as rank 1 of 2."""
    with _serving_group(tmp_path) as (server, out):
        yield server, out


@contextlib.contextmanager
def _serving_group(
    tmp_path, *server_args: str, others: tuple[tuple[str, ...], ...] = (), stdin: bool = False
):
    """Rank 0 runs the seed-style server script (given ``server_args``; ``stdin``: its stdin a
    pipe), ranks 2.. the scripts ``others`` name (each given the init method, its rank, the
    world size, then the other arguments); this process joins as rank 1. Yields the server's
    process and its model file, then the others' processes."""
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT)
    # A file store: a port picked free beforehand could be taken by another test's server in
    # between, and this rank would then wait its whole group timeout on a stranger.
    init_method = f"file://{tmp_path / 'store'}"
    out = tmp_path / "server_model.pt"
    world_size = 2 + len(others)
    server = subprocess.Popen(
        [sys.executable, str(script), init_method, str(world_size), str(out), *server_args],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
        # A shell ignores SIGINT in background jobs and children inherit that: let the server
        # get Ctrl-C as it would in a terminal, wherever the tests run.
        preexec_fn=_take_ctrl_c,
    )
    processes = [server]
    try:
        processes += start_scripts(
            [
                [script, init_method, str(rank), str(world_size), *args]
                for rank, (script, *args) in enumerate(others, 2)
            ]
        )
        dist.init_process_group(
            "gloo", init_method=init_method, rank=1, world_size=world_size, timeout=GROUP_TIMEOUT
        )
        yield server, out, *processes[1:]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        stop_processes(processes)


def _make_scheduler(kind: str, optimizer: torch.optim.Optimizer):
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)


def _train_with_scheduler(kind: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    scheduler = _make_scheduler(kind, optimizer)
    batches = _batches(STEPS_PER_EPOCH * NUM_EPOCHS)
    for epoch in range(NUM_EPOCHS):
        for images, labels in batches[epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH]:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        if kind == "step":
            scheduler.step()
        else:
            scheduler.step(float(epoch))  # a worsening metric: the rate halves every epoch


@pytest.mark.parametrize("kind", ["step", "plateau"])
def test_no_rate_server_follows_the_workers_lr_scheduler(server_and_group, kind):
    server, server_out = server_and_group
    model, reference = _model(), _model()
    optimizer = DownpourSGD(
        model.parameters(), lr=0.4, n_push=1, n_pull=1, model=model, blocking=True, timeout_s=10
    )
    assert optimizer.apply_worker_lr
    _train_with_scheduler(kind, model, optimizer)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.4)
    _train_with_scheduler(kind, reference, reference_optimizer)
    assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"] < 0.1
    optimizer.pull_now()  # the model now holds exactly the server's parameters
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    optimizer.close()  # this rank is finished: the server stops by itself

    out, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-2000:]
    assert f"server done {STEPS_PER_EPOCH * NUM_EPOCHS} True" in out
    served = torch.load(server_out)
    for name, param in model.named_parameters():
        torch.testing.assert_close(served[name], param, atol=0, rtol=0)


def test_no_rate_server_applies_each_param_groups_rate(server_and_group):
    server, _ = server_and_group
    model, reference = _model(), _model()

    def groups(net: nn.Module) -> list[dict]:
        return [
            {"params": net[0].parameters(), "lr": 0.3},
            {"params": net[2].parameters(), "lr": 0.05},
        ]

    optimizer = DownpourSGD(
        groups(model), lr=0.1, n_push=2, n_pull=2, model=model, blocking=True, timeout_s=10
    )
    reference_optimizer = torch.optim.SGD(groups(reference), lr=0.1)
    for images, labels in _batches(8):
        for net, opt in ((model, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(images), labels).backward()
            opt.step()
    optimizer.pull_now()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    optimizer.close()
    _, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-2000:]


def test_a_rank_training_another_model_is_refused_as_it_joins(server_and_group):
    """The server's model is Linear(10, 24), ReLU, Linear(24, 3): a replica of another model
    is refused at its handshake (it would set the layout, train the whole job, and leave the
    server's model unchanged); the right model then trains, and the server ends by itself."""
    server, out = server_and_group
    other = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(ModelMismatchError, match=r"'0.weight' \[32, 10\] float32 does not match"):
        DownpourSGD(other.parameters(), lr=0.1, model=other, timeout_s=10)
    model = _model()
    with DownpourSGD(model.parameters(), lr=0.1, model=model, blocking=True) as optimizer:
        _train_two_batches(model, optimizer)
    _expect_loaded(server)
    torch.testing.assert_close(torch.load(out)["2.bias"], model[2].bias.detach())


@pytest.mark.parametrize("given", ["the last layer, by name", "no names"])
def test_the_servers_model_gets_what_the_workers_trained_also_when_they_named_less(
    server_and_group, given
):
    """run() loads the shards' parameters into the server's model by name (a worker that left
    frozen layers out of its optimizer), or by position (one that gave DownpourSGD no model=,
    naming its tensors param.<i>); what the workers did not train stays as it was."""
    server, out = server_and_group
    model, initial = _model(), _model()
    if given == "no names":
        optimizer = DownpourSGD(model.parameters(), lr=0.1, blocking=True)
    else:
        optimizer = DownpourSGD(model[2].parameters(), lr=0.1, model=model, blocking=True)
    with optimizer:
        _train_two_batches(model, optimizer)
    _expect_loaded(server)
    served = torch.load(out)
    trained = initial if given != "no names" else model
    torch.testing.assert_close(served["0.weight"], trained[0].weight.detach())
    torch.testing.assert_close(served["2.bias"], model[2].bias.detach())
    assert not torch.equal(served["2.bias"], initial[2].bias.detach())


def test_ctrl_c_stops_the_server_before_every_rank_finished(server_and_group):
    server, _ = server_and_group
    GroupStore().find_server(timeout_s=120)  # serving: published its address
    server.send_signal(signal.SIGINT)
    out, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-2000:]
    assert "server done 0 False" in out  # run() returned; no worker had pushed anything
    assert "run again: ParameterServer: run() after its first run()" in out
    assert "interrupted before every rank finished" in err


def test_stop_from_another_thread_ends_run_with_the_parameters_it_holds(tmp_path):
    with _serving_group(tmp_path, "stop-on-stdin", stdin=True) as (server, out):
        model = _model()
        optimizer = DownpourSGD(model.parameters(), lr=0.1, model=model, blocking=True)
        for images, labels in _batches(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        optimizer.pull_now()
        trained = [p.detach().clone() for p in model.parameters()]
        output, err = server.communicate("stop\n", timeout=120)
        assert server.returncode == 0, err[-2000:]
        assert "server done 3 False []" in output  # three pushes applied; this rank unfinished
        saved = torch.load(out)
        for got, want in zip(saved.values(), trained, strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        optimizer.close()  # nothing left to push: it closes without the server


WORKER_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch import nn
from distbelief.optim import DownpourSGD

init_method, rank, world_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
num_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 5  # 0: until killed
dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3))
optimizer = DownpourSGD(net.parameters(), lr=0.1, n_push=2, n_pull=2, model=net)
generator = torch.Generator().manual_seed(rank)
while optimizer.num_steps < num_steps or not num_steps:
    optimizer.zero_grad()
    images, labels = torch.randn(16, 10, generator=generator), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(net(images), labels).backward()
    optimizer.step()
    if optimizer.num_steps == 3:
        print("training", flush=True)
print("worker done", flush=True)
"""


@pytest.mark.slow
def test_seed_scripts_that_never_call_close_end_by_themselves(tmp_path):
    """Three processes, the seed's way: no address, no close(); every one exits 0 by itself."""
    (tmp_path / "server.py").write_text(SERVER_SCRIPT)
    (tmp_path / "worker.py").write_text(WORKER_SCRIPT)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    commands = [[str(tmp_path / "server.py"), init_method, "3", str(tmp_path / "server.pt")]]
    commands += [[str(tmp_path / "worker.py"), init_method, str(rank), "3"] for rank in (1, 2)]
    outputs = [out for out, _ in run_scripts_together(commands, SCRIPTS_TIMEOUT_S)]
    # Pushes at steps 2 and 4, and step 5's gradient flushed at exit: 3 per worker.
    assert "server done 6 True" in outputs[0]
    assert all("worker done" in out for out in outputs[1:])


TWO_JOBS_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch import nn
from distbelief.optim import DownpourSGD
from distbelief.server import ParameterServer

init_method, rank = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
for job in range(2):
    torch.manual_seed(job)
    net = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3))
    if rank == 0:
        summary = ParameterServer(net, join_timeout_s=120).run()
        print("job", job, "server", summary["version"], summary["finished"], flush=True)
    else:
        optimizer = DownpourSGD(net.parameters(), lr=0.1, n_push=1, n_pull=1, model=net)
        for _ in range(3):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(torch.randn(8, 10)), torch.randint(0, 3, (8,)))
            loss.backward()
            optimizer.step()
        optimizer.close()
        print("job", job, "worker done", flush=True)
    dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_second_parameter_server_in_the_group_is_the_one_its_workers_find(tmp_path):
    """The first server's address stayed in the group's store once it had ended: the second
    job's DownpourSGD read it, retried it for 60 s and failed, while the new server waited
    for ranks that never came."""
    (tmp_path / "jobs.py").write_text(TWO_JOBS_SCRIPT)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    commands = [[str(tmp_path / "jobs.py"), init_method, str(rank)] for rank in (0, 1)]
    server, worker = (out for out, _ in run_scripts_together(commands, SCRIPTS_TIMEOUT_S))
    for job in (0, 1):
        assert f"job {job} server 3 True" in server, server
        assert f"job {job} worker done" in worker, worker


DESTROYING_WORKER_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch import nn
from distbelief.optim import DownpourSGD

init_method, rank, world_size, then = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3))
optimizer = DownpourSGD(net.parameters(), lr=0.1, n_push=2, n_pull=2, model=net)
for _ in range(3):
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(torch.randn(16, 10)), torch.randint(0, 3, (16,))).backward()
    optimizer.step()
dist.destroy_process_group()
if then == "close":
    optimizer.close()
print("worker done", flush=True)
"""


def test_scripts_that_destroy_the_group_before_close_end_cleanly(tmp_path):
    """Rank 1 destroys its process group, then calls close(); rank 2 destroys it and leaves
    close() to the exit: both exit 0 without a traceback, and the server hears both finish
    (rather than waiting out its liveness timeout for ranks it then calls lost)."""
    (tmp_path / "server.py").write_text(SERVER_SCRIPT)
    (tmp_path / "worker.py").write_text(DESTROYING_WORKER_SCRIPT)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    commands = [[str(tmp_path / "server.py"), init_method, "3", str(tmp_path / "server.pt")]]
    commands += [
        [str(tmp_path / "worker.py"), init_method, str(rank), "3", then]
        for rank, then in ((1, "close"), (2, "exit"))
    ]
    outputs = run_scripts_together(commands, SCRIPTS_TIMEOUT_S)  # each exits 0
    for _, err in outputs:
        assert "Traceback" not in err, err[-2000:]
    # A push at step 2 and step 3's gradient flushed by close(): 2 per worker.
    assert "server done 4 True []" in outputs[0][0]
    assert all("worker done" in out for out, _ in outputs[1:])


SECOND_OF_RANK_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch import nn
from distbelief.errors import RendezvousError
from distbelief.optim import DownpourSGD

init_method, rank, world_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3))
try:
    DownpourSGD(net.parameters(), lr=0.1, model=net)  # its exit would mark the rank finished
except RendezvousError as e:
    sys.exit(f"refused: {e}")
print("joined", flush=True)
"""


def test_a_second_process_of_a_training_rank_is_refused(tmp_path):
    """A process started with the rank of one that trains (a lazily connecting group, as
    gloo's with TORCH_GLOO_LAZY_INIT=1 or nccl's, lets it past init_process_group) is refused
    in one line naming the rank; the rank's own process trains on, and the server waits for
    it rather than ending on the second one's finish."""
    script = tmp_path / "second.py"
    script.write_text(SECOND_OF_RANK_SCRIPT)
    with _serving_group(tmp_path) as (server, _):
        model = _model()
        optimizer = DownpourSGD(model.parameters(), lr=0.1, n_push=1, n_pull=1, model=model)
        second = subprocess.run(
            [sys.executable, str(script), f"file://{tmp_path / 'store'}", "1", "2"],
            env={**CHILD_ENV, "TORCH_GLOO_LAZY_INIT": "1"},
            capture_output=True,
            text=True,
            timeout=SCRIPTS_TIMEOUT_S,
        )
        assert second.returncode == 1, second.stderr[-2000:]
        assert "Traceback" not in second.stderr, second.stderr[-2000:]
        assert re.fullmatch(
            r"refused: rank 1 is taken: process \S+:\d+:\w+ \(host:pid:token\) trains as "
            r"rank 1 with the ParameterServer; give this process a rank of its own\n",
            second.stderr,
        ), second.stderr
        _train_with_scheduler("step", model, optimizer)
        optimizer.close()
        out, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-2000:]
    assert f"server done {STEPS_PER_EPOCH * NUM_EPOCHS} True []" in out, out


LIVENESS_TIMEOUT_S = "2"
"""The server's grace for a rank whose connections all closed (its default is 10 s)."""


@contextlib.contextmanager
def _rank_2_killed(tmp_path):
    """A group of 3 whose server gives a rank up 2 s after its connections closed; rank 2
    (tmp_path/worker.py) is SIGKILLed once it has pushed. Yields the server's process, and
    this rank's (1) model and blocking DownpourSGD, connected before the kill."""
    worker_script = tmp_path / "worker.py"
    worker_script.write_text(WORKER_SCRIPT)
    until_killed = (str(worker_script), "0")
    with _serving_group(tmp_path, LIVENESS_TIMEOUT_S, "300", others=(until_killed,)) as (
        server,
        _,
        doomed,
    ):
        model = _model()
        optimizer = DownpourSGD(
            model.parameters(), lr=0.1, n_push=1, n_pull=1, model=model, blocking=True
        )
        assert doomed.stdout.readline() == "training\n"  # it has pushed: it is connected
        doomed.kill()
        doomed.wait()
        yield server, model, optimizer


def test_the_server_ends_by_itself_when_a_rank_is_killed(tmp_path):
    """Rank 2 is SIGKILLed while it trains: the server ends once rank 1 has finished."""
    with _rank_2_killed(tmp_path) as (server, model, optimizer):
        _train_with_scheduler("step", model, optimizer)
        optimizer.close()
        out, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-2000:]
    assert re.search(r"server done \d+ False \[2\]", out), out
    assert re.search(r"rank 2 left without finishing \(its connections closed \d+s ago\)", err)


def test_a_rank_given_up_as_lost_may_be_taken_by_a_new_process(tmp_path):
    """Rank 2 is SIGKILLed while it trains; a process started again as rank 2 (a lazily
    connecting group lets it past init_process_group) is refused until the server has given
    the killed one up, then trains its steps: the server ends with every rank finished."""
    with _rank_2_killed(tmp_path) as (server, model, optimizer):
        init_method = f"file://{tmp_path / 'store'}"
        restart = [sys.executable, str(tmp_path / "worker.py"), init_method, "2", "3"]
        deadline = time.monotonic() + 60  # the liveness timeout is 2 s
        while (
            restarted := subprocess.run(
                restart,
                env={**CHILD_ENV, "TORCH_GLOO_LAZY_INIT": "1"},
                capture_output=True,
                text=True,
                timeout=SCRIPTS_TIMEOUT_S,
            )
        ).returncode != 0:
            assert "rank 2 is taken" in restarted.stderr, restarted.stderr[-2000:]
            assert time.monotonic() < deadline, "rank 2 stayed taken"
        assert restarted.stdout.endswith("worker done\n"), restarted.stdout
        _train_with_scheduler("step", model, optimizer)
        optimizer.close()
        out, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-2000:]
    assert re.search(r"server done \d+ True \[\]", out), out


def test_a_with_block_ended_by_ctrl_c_still_tells_the_server_this_rank_finished(tmp_path):
    """``with DownpourSGD(...)`` ended by Ctrl-C closes at once, without its flush, and still
    marks the rank finished: the server ends by itself at once, every rank finished (not
    after its liveness timeout, 300 s here, with this rank lost)."""
    with _serving_group(tmp_path, "300", "300") as (server, _):
        model = _model()
        batch, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 0])
        optimizer = DownpourSGD(model.parameters(), lr=0.1, model=model)
        with pytest.raises(KeyboardInterrupt), optimizer:
            nn.functional.cross_entropy(model(batch), labels).backward()
            optimizer.step()
            raise KeyboardInterrupt
        out, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-2000:]
    assert re.search(r"server done \d+ True \[\]", out), out


def test_sync_rounds_wait_for_every_training_rank(tmp_path):
    """With ``ConsistencyConfig(sync=True)`` a round is one gradient of each other rank: 5
    steps of 2 ranks are 5 rounds. The server ran rounds of 1 worker (its shard's default),
    so a DownpourSGD told the job's 2 workers was refused, and one not told made 10 rounds
    of one gradient each, not synchronous."""
    worker_script = tmp_path / "worker.py"
    worker_script.write_text(WORKER_SCRIPT)
    with _serving_group(tmp_path, "60", "300", "sync", others=((str(worker_script), "5"),)) as (
        server,
        _,
        other,
    ):
        model = _model()
        with DownpourSGD(model.parameters(), lr=0.1, model=model, num_workers=2) as optimizer:
            generator = torch.Generator().manual_seed(1)
            for _ in range(5):
                optimizer.zero_grad()
                images = torch.randn(16, 10, generator=generator)
                labels = torch.randint(0, 3, (16,), generator=generator)
                nn.functional.cross_entropy(model(images), labels).backward()
                optimizer.step()
        assert other.wait(120) == 0
        out, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-2000:]
    assert "server done 5 True []" in out, out


def test_the_server_ends_by_itself_when_a_rank_never_connects(tmp_path):
    with _serving_group(tmp_path, LIVENESS_TIMEOUT_S, "3") as (server, _):
        out, err = server.communicate(timeout=120)  # this rank never makes its DownpourSGD
    assert server.returncode == 0, err[-2000:]
    assert "server done 0 False [1]" in out
    assert "rank 1 never connected (waited 3s for its DownpourSGD)" in err


@pytest.fixture
def group_of_one(tmp_path):
    # A file store: a port picked free beforehand could be taken by another test in between.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=GROUP_TIMEOUT,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


GROUP_THEN_EXIT_SCRIPT = """
import sys
import torch.distributed as dist

dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=2)
"""

GONE_STORE_WORKER_SCRIPT = """
import pathlib, sys, time
import torch.distributed as dist
from torch import nn
from distbelief.errors import RendezvousError
from distbelief.optim import DownpourSGD

init_method, go = sys.argv[1], pathlib.Path(sys.argv[2])
dist.init_process_group("gloo", init_method=init_method, rank=1, world_size=2)
print("joined", flush=True)
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:  # rank 0, the store's, has exited
    time.sleep(0.05)
net = nn.Linear(4, 2)
started = time.monotonic()
try:
    DownpourSGD(net.parameters(), lr=0.1, model=net, hold_timeout_s=3)
except RendezvousError as e:
    print(f"refused after {time.monotonic() - started:.0f}s: {e}", flush=True)
"""


def test_downpour_whose_group_store_is_gone_is_a_rendezvous_error(tmp_path):
    """Rank 0 (the group's store) exits before rank 1 builds its optimizer: rank 1's DownpourSGD
    raises RendezvousError within its hold_timeout_s instead of waiting out the group's own
    timeout (30 minutes) on its connection to the store."""
    (tmp_path / "rank0.py").write_text(GROUP_THEN_EXIT_SCRIPT)
    (tmp_path / "rank1.py").write_text(GONE_STORE_WORKER_SCRIPT)
    init_method, go = f"tcp://127.0.0.1:{free_port()}", tmp_path / "go"
    rank0, rank1 = start_scripts(
        [
            [str(tmp_path / "rank0.py"), init_method],
            [str(tmp_path / "rank1.py"), init_method, str(go)],
        ]
    )
    try:
        rank0.communicate(timeout=SCRIPTS_TIMEOUT_S)
        go.touch()
        out, err = rank1.communicate(timeout=SCRIPTS_TIMEOUT_S)
    finally:
        stop_processes([rank0, rank1])
    assert rank1.returncode == 0, err[-2000:]
    assert "process group store: no connection within 3s" in out, out + err[-2000:]


def test_downpour_finds_no_server_is_a_rendezvous_error(group_of_one, monkeypatch, caplog):
    # Waiting (minutes by default), it says what for, once: a silent script looked hung.
    monkeypatch.setattr("distbelief.wire.process_group._SAY_WAITING_AFTER_S", 0.5)
    model = _model()
    with pytest.raises(RendezvousError, match=r"no ParameterServer published .* within 2s"):
        DownpourSGD(model.parameters(), model=model, hold_timeout_s=2)
    said = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert said == [
        "waiting up to 2s (hold_timeout_s) for a ParameterServer to publish its address in the "
        "process group's store: run ParameterServer(model).run() on one rank"
    ]


def test_parameter_server_needs_another_rank(group_of_one):
    with pytest.raises(ValueError, match="world_size >= 2"):
        ParameterServer(_model())
