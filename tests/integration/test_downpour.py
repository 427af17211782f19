"""DownpourSGD against real shards on 127.0.0.1 (processes, or served by the test itself)."""

import copy
import gc
import math
import os
import pickle
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

from distbelief.errors import (
    ClosedError,
    ModelMismatchError,
    ShardListError,
    ShardTimeoutError,
)
from distbelief.launch.warmstart import end_warmstart
from distbelief.optim import DownpourSGD
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.wire import serve


def _model(seed: int = 0, hidden: int = 24) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def _batches(num_batches: int):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 10, generator=generator), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(num_batches)
    ]


def _train(model, optimizer, batches):
    for images, labels in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


@pytest.mark.parametrize("num_shards", [1, 3])
def test_synchronous_downpour_equals_torch_sgd(shard_cluster, num_shards):
    addresses = shard_cluster(num_shards, "--server-lr", "0.1")
    model, reference = _model(), _model()
    optimizer = DownpourSGD(
        model.parameters(),
        lr=0.1,
        n_push=1,
        n_pull=1,
        model=model,
        ps=addresses,
        blocking=True,
        timeout_s=5,
    )
    batches = _batches(12)
    _train(model, optimizer, batches)
    _train(reference, torch.optim.SGD(reference.parameters(), lr=0.1), batches)
    optimizer.pull_now()  # the model now holds exactly the shards' parameters
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert optimizer.version == 12
    optimizer.close()


def test_second_worker_starts_from_the_shards_parameters(shard_cluster):
    addresses = shard_cluster(2, "--server-lr", "0.1")
    first = _model(seed=0)
    optimizer = DownpourSGD(first.parameters(), lr=0.1, model=first, ps=addresses, timeout_s=5)
    _train(first, optimizer, _batches(5))
    optimizer.flush()
    optimizer.pull_now()
    late = _model(seed=123)  # a different init: the shards' values must win
    late_optimizer = DownpourSGD(late.parameters(), lr=0.1, model=late, ps=addresses, timeout_s=5)
    for a, b in zip(first.parameters(), late.parameters(), strict=True):
        assert torch.equal(a, b)
    late_optimizer.close()
    optimizer.close()


def test_async_downpour_loses_no_gradient(shard_cluster):
    """With SGD on the shards, final = initial - server_lr * (sum of every gradient computed),
    whatever the timing of the background pushes and pulls."""
    addresses = shard_cluster(2, "--server-lr", "0.1")
    model = _model()
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = DownpourSGD(
        model.parameters(), lr=0.1, n_push=3, n_pull=2, model=model, ps=addresses, timeout_s=5
    )
    total_grads = [torch.zeros_like(p) for p in model.parameters()]
    for images, labels in _batches(10):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        for total, param in zip(total_grads, model.parameters(), strict=True):
            total += param.grad
        optimizer.step()
    optimizer.flush()  # pushes the last partial accumulation (step 10)
    stats = optimizer.client.stats()
    assert [s["num_pushes"] for s in stats] == [4, 4]  # steps 3, 6, 9 and the flush
    optimizer.pull_now()
    for param, start, total in zip(model.parameters(), initial, total_grads, strict=True):
        torch.testing.assert_close(param, start - 0.1 * total, atol=1e-5, rtol=0)
    optimizer.close()


def test_model_mismatch_is_a_clear_error(shard_cluster):
    addresses = shard_cluster(2)
    model = _model()
    DownpourSGD(model.parameters(), model=model, ps=addresses, timeout_s=5).close()
    other = _model(hidden=25)
    with pytest.raises(ModelMismatchError, match=r"'0.weight' \[25, 10\]"):
        DownpourSGD(other.parameters(), model=other, ps=addresses, timeout_s=5)


def test_shards_listed_out_of_order_are_refused(shard_cluster):
    addresses = shard_cluster(2)
    model = _model()
    with pytest.raises(ShardListError, match=r"serves shard 1 of 2.*order of the addresses"):
        DownpourSGD(model.parameters(), model=model, ps=addresses[::-1], timeout_s=5)
    with pytest.raises(ShardListError, match=r"one of 2 shards, but 1 was given"):
        DownpourSGD(model.parameters(), model=model, ps=addresses[:1], timeout_s=5)


def test_missing_address_is_a_value_error(monkeypatch):
    monkeypatch.delenv("DISTBELIEF_PS", raising=False)
    model = _model()
    with pytest.raises(ValueError, match="no parameter-server address"):
        DownpourSGD(model.parameters(), model=model)


@pytest.mark.parametrize("given_by", ["ps", "DISTBELIEF_PS"])
def test_an_shm_address_under_transport_tcp_is_refused_naming_it(given_by, monkeypatch):
    """As distbelief worker --ps refuses it: one of the two would be ignored without a word."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")
    monkeypatch.setenv("DISTBELIEF_PS", "tcp://127.0.0.1:1,shm://127.0.0.1:2")
    model = _model()
    options = {"ps": os.environ["DISTBELIEF_PS"]} if given_by == "ps" else {}
    with pytest.raises(
        ValueError,
        match=rf"^{given_by}: shm://127.0.0.1:2 asks for shared memory, which "
        r"DISTBELIEF_TRANSPORT=tcp rules out: give tcp://127.0.0.1:2, ",
    ):
        DownpourSGD(model.parameters(), model=model, **options)


@pytest.mark.parametrize("given_by", ["ps", "DISTBELIEF_PS"])
def test_an_empty_item_in_the_addresses_is_refused_naming_where_it_came_from(given_by, monkeypatch):
    """A list with one address left out would otherwise be a job with one shard too few."""
    monkeypatch.setenv("DISTBELIEF_PS", "tcp://127.0.0.1:1,,tcp://127.0.0.1:2")
    model = _model()
    options = {"ps": ["tcp://127.0.0.1:1", "", "tcp://127.0.0.1:2"]} if given_by == "ps" else {}
    with pytest.raises(
        ValueError,
        match=rf"^{given_by}: the list 'tcp://127.0.0.1:1,,tcp://127.0.0.1:2' has an empty item$",
    ):
        DownpourSGD(model.parameters(), model=model, **options)


@pytest.mark.parametrize("num_workers", [0, 2.0])
def test_a_bad_number_of_workers_is_a_value_error_naming_it(num_workers):
    model = _model()
    with pytest.raises(
        ValueError, match=rf"^num_workers must be an integer >= 1, got {num_workers}$"
    ):
        DownpourSGD(model.parameters(), ps="tcp://127.0.0.1:1", num_workers=num_workers)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("momentum", 0.9), ("weight_decay", 1e-4), ("nesterov", True), ("maximize", True)],
)
def test_a_param_group_setting_sgd_would_apply_is_refused_naming_it(setting, value):
    """A group ported from torch.optim.SGD would otherwise train without its setting."""
    model = _model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), setting: value}]
    with pytest.raises(ValueError, match=rf"^param group 1: {setting} is not applied by "):
        DownpourSGD(groups, lr=0.1, ps="tcp://127.0.0.1:1")
    plain = [{"params": model.parameters(), "momentum": 0, "weight_decay": 0.0, "name": "all"}]
    with pytest.raises(ValueError, match="no parameter-server address"):  # past the check
        DownpourSGD(plain, lr=0.1, ps=[])


@pytest.mark.parametrize("timeout_s", [0, 0.0, -1, math.nan])
def test_a_timeout_of_zero_is_refused_like_a_negative_one(timeout_s, monkeypatch):
    monkeypatch.delenv("DISTBELIEF_TIMEOUT_S", raising=False)
    model = _model()
    with pytest.raises(ValueError, match=r"^timeout_s must be a finite number > 0, got "):
        DownpourSGD(model.parameters(), ps="tcp://127.0.0.1:1", timeout_s=timeout_s)


@pytest.fixture
def served_shard():
    """The address of one shard (SGD, rate 0.1) served by this process, as a list."""
    server = serve(
        "tcp://127.0.0.1:0",
        ShardService(ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))),
    )
    try:
        yield [server.address]
    finally:
        server.stop()


def test_a_warm_start_ended_early_releases_a_waiting_worker(served_shard):
    """A worker waiting for a warm start whose replica is gone for good starts once a shard is
    told the warm start is over (what the launcher does), from the parameters as they are."""
    first = _model(seed=0)
    trainer = DownpourSGD(first.parameters(), lr=0.1, model=first, ps=served_shard, blocking=True)
    _train(first, trainer, _batches(3))
    late = _model(seed=123)
    joined: list[DownpourSGD] = []
    waiting = threading.Thread(
        target=lambda: joined.append(
            DownpourSGD(
                late.parameters(),
                lr=0.1,
                model=late,
                ps=served_shard,
                start_after_version=1000,  # never reached: the trainer has stopped
                hold_timeout_s=120,
            )
        ),
        daemon=True,
    )
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive()  # waiting for updates that will not come
    versions, failed = end_warmstart(served_shard, timeout_s=10)
    assert (versions, failed) == ([3], {})
    waiting.join(timeout=60)
    assert not waiting.is_alive() and len(joined) == 1
    trainer.pull_now()
    for a, b in zip(first.parameters(), late.parameters(), strict=True):
        assert torch.equal(a, b)
    joined[0].close()
    trainer.close()


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("lr", math.nan, "lr must be "),
        ("lr", math.inf, "lr must be "),
        ("lr", 1e308, "lr must be "),
        ("weight_decay", 1e-4, "weight_decay is not applied by "),
        ("momentum", 0.9, "momentum is not applied by "),
    ],
)
def test_a_group_setting_changed_after_construction_is_refused_by_step_before_anything_changes(
    setting, value, message, served_shard
):
    """A rate as an LR scheduler sets it, or an SGD setting the step would ignore."""
    model = _model()
    optimizer = DownpourSGD(model.parameters(), lr=0.1, model=model, ps=served_shard, blocking=True)
    _train(model, optimizer, _batches(1))
    version = optimizer.version
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.param_groups[0][setting] = value
    images, labels = _batches(1)[0]
    nn.functional.cross_entropy(model(images), labels).backward()
    with pytest.raises(ValueError, match=rf"^param group 0: {message}"):
        optimizer.step()
    assert optimizer.num_steps == 1
    optimizer.pull_now()
    assert optimizer.version == version  # nothing was pushed
    for got, want in zip(model.parameters(), before, strict=True):
        assert torch.equal(got, want)
    optimizer.close()


def test_a_torch_sgd_state_dict_with_momentum_is_refused_and_loads_nothing(served_shard):
    """Loaded, its momentum would be ignored: the step is plain SGD."""
    model = _model()
    optimizer = DownpourSGD(model.parameters(), lr=0.1, model=model, ps=served_shard, blocking=True)
    _train(model, optimizer, _batches(2))
    saved = optimizer.state_dict()
    torch_sgd = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    with pytest.raises(ValueError, match=r"^param group 0: momentum is not applied by "):
        optimizer.load_state_dict(torch_sgd.state_dict())
    assert optimizer.param_groups[0]["lr"] == 0.1 and optimizer.param_groups[0]["momentum"] == 0
    optimizer.num_steps = 0
    optimizer.load_state_dict(saved)  # its own loads
    assert optimizer.num_steps == 2
    optimizer.close()


def test_steps_done_again_from_an_earlier_state_dict_are_pushed(served_shard):
    """A script that goes back to a state it saved (a loss that diverged, say) does the steps
    after it again: new updates, each pushed to the shards and reported applied, not taken for
    a restarted replica's steps the shards hold already."""
    model, applied = _model(), []
    with DownpourSGD(
        model.parameters(),
        lr=0.1,
        model=model,
        ps=served_shard,
        blocking=True,
        on_push_applied=applied.append,
    ) as optimizer:
        _train(model, optimizer, _batches(2))
        saved_model, saved = copy.deepcopy(model.state_dict()), optimizer.state_dict()
        _train(model, optimizer, _batches(2))
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved)
        assert (optimizer.num_steps, optimizer.applied_step) == (2, 2)
        _train(model, optimizer, _batches(2))
        assert [stats["num_pushes"] for stats in optimizer.client.stats()] == [6]
    assert applied == [1, 2, 3, 4, 3, 4]


def test_a_state_dict_step_count_that_is_no_count_is_refused_and_loads_nothing(served_shard):
    """A count below 0 would leave the next steps unpushed (taken for steps the shards hold);
    one of another type would fail later, far from the load."""
    model = _model()
    with DownpourSGD(
        model.parameters(), lr=0.1, model=model, ps=served_shard, blocking=True
    ) as optimizer:
        _train(model, optimizer, _batches(1))
        for num_steps in (-1, 2.5, "3", None):
            saved = optimizer.state_dict()
            saved["downpour"]["num_steps"] = num_steps
            saved["param_groups"][0]["lr"] = 0.5
            with pytest.raises(
                ValueError, match=r"^state_dict\['downpour'\]\['num_steps'\] must be an integer"
            ):
                optimizer.load_state_dict(saved)
            assert (optimizer.num_steps, optimizer.param_groups[0]["lr"]) == (1, 0.1)
        saved = {**optimizer.state_dict(), "downpour": [1]}
        with pytest.raises(ValueError, match=r"^state_dict\['downpour'\] must be a dict"):
            optimizer.load_state_dict(saved)


def test_named_parameters_carry_their_names_to_the_shards(served_shard):
    """Given as ``model.named_parameters()`` (torch's named param groups), parameters are the
    shards' tensors of those names: a replica given ``model=`` joins the same shards."""
    model = _model()
    named_params = list(model.named_parameters())
    named = DownpourSGD(
        [{"params": named_params[:2], "lr": 0.2}, {"params": named_params[2:]}],
        lr=0.1,
        ps=served_shard,
        blocking=True,
    )
    _train(model, named, _batches(2))
    named.close()
    other = _model(seed=1)
    with DownpourSGD(other.parameters(), lr=0.1, model=other, ps=served_shard) as joined:
        assert [spec.name for spec in joined.specs] == [
            name for name, _ in model.named_parameters()
        ]
        for got, want in zip(other.parameters(), model.parameters(), strict=True):
            assert torch.equal(got, want)  # it starts from the named replica's parameters


def test_a_parameter_without_a_gradient_is_pushed_as_zeros_which_momentum_applies():
    """As the README says: the shards' momentum moves it, as torch.optim does for a zero
    gradient (torch.optim would skip a parameter whose grad is None)."""
    server = serve(
        "tcp://127.0.0.1:0",
        ShardService(ParameterShard(0, 1, server_optimizer_factory("momentum", lr=0.1))),
    )
    try:
        model, reference = _model(), _model()
        optimizer = DownpourSGD(
            model.parameters(), lr=0.1, model=model, ps=[server.address], blocking=True
        )
        torch_sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
        for net, step in ((model, optimizer), (reference, torch_sgd)):
            _train(net, step, _batches(2))
            step.zero_grad()
            for param in net.parameters():
                param.grad = torch.zeros_like(param) if step is torch_sgd else None
            step.step()
        optimizer.pull_now()
        for got, want in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        optimizer.close()
    finally:
        server.stop()


def test_torch_sgd_loads_the_optimizers_state_dict_and_trains_on(served_shard):
    """A model trained with DownpourSGD goes on alone with torch.optim.SGD from its state."""
    model = _model()
    optimizer = DownpourSGD(model.parameters(), lr=0.1, model=model, ps=served_shard, blocking=True)
    _train(model, optimizer, _batches(2))
    optimizer.param_groups[0]["lr"] = 0.05
    saved = optimizer.state_dict()
    optimizer.close()
    reference = copy.deepcopy(model)
    alone = torch.optim.SGD(model.parameters(), lr=0.5)
    alone.load_state_dict(saved)
    _train(model, alone, _batches(3))
    _train(reference, torch.optim.SGD(reference.parameters(), lr=0.05), _batches(3))
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want)


def test_every_use_after_close_raises_closed_error_and_changes_nothing():
    server = serve(
        "tcp://127.0.0.1:0",
        ShardService(ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))),
    )
    try:
        model = _model()
        optimizer = DownpourSGD(
            model.parameters(), lr=0.1, n_push=5, n_pull=5, model=model, ps=[server.address]
        )
        _train(model, optimizer, _batches(2))
        optimizer.close()
        before = [p.detach().clone() for p in model.parameters()]
        for images, labels in _batches(6):  # past the push and pull due at step 5
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            with pytest.raises(ClosedError, match=r"^DownpourSGD: step after close\(\)$"):
                optimizer.step()
        for call in ("pull_now", "flush"):
            with pytest.raises(ClosedError, match=rf"^DownpourSGD: {call} after close\(\)$"):
                getattr(optimizer, call)()
        with pytest.raises(ClosedError, match=r"^DownpourSGD: resume after close\(\)$"):
            optimizer.resume(0)
        assert optimizer.num_steps == optimizer.applied_step == 2
        for got, want in zip(model.parameters(), before, strict=True):
            assert torch.equal(got, want)
        optimizer.close()  # closing twice does nothing
    finally:
        server.stop()


def test_add_param_group_after_the_constructor_is_refused_and_changes_nothing(served_shard):
    model = _model()
    optimizer = DownpourSGD(model.parameters(), lr=0.1, model=model, ps=served_shard)
    extra = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"^add_param_group: the shards hold"):
        optimizer.add_param_group({"params": [extra], "lr": 0.5})
    assert len(optimizer.param_groups) == 1
    _train(model, optimizer, _batches(1))
    optimizer.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda w: [w, w], r"^parameter 'param\.1' is given twice \(also as 'param\.0'\)"),
        (
            lambda w: [nn.Parameter(torch.empty(3, 4, device="meta"))],
            r"^parameter 'param\.0' is on the meta device",
        ),
        (
            lambda w: [nn.Parameter(torch.zeros(3, dtype=torch.complex64))],
            r"^parameter 'param\.0': dtype torch\.complex64 cannot travel",
        ),
        (
            lambda w: [nn.Parameter(torch.zeros(1, 4).expand(3, 4))],
            r"^parameter 'param\.0': its elements share memory",
        ),
        (
            lambda w: [w, nn.Parameter(torch.arange(3), requires_grad=False)],
            r"^parameter 'param\.1': dtype torch\.int64 is not floating",
        ),
    ],
    ids=["twice", "meta", "complex", "expanded", "integer"],
)
def test_a_parameter_the_shards_cannot_hold_is_refused_by_name(make, message):
    """Refused before anything is reached (no address is listening): they used to reach the
    shards, initialise them with a duplicate, or fail in torch with no name."""
    weight = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=message):
        DownpourSGD(make(weight), ps="tcp://127.0.0.1:9", timeout_s=1, retry_timeout_s=0)


def test_views_and_sparse_gradients_train_as_torch_sgd_does(served_shard):
    """A non-contiguous parameter, a slice of a larger tensor and a sparse gradient: pushed,
    applied and pulled back exactly as torch.optim.SGD steps them."""
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))

    def make():
        return [nn.Parameter(base[:, 1:5].clone().t()), nn.Parameter(base[:3].clone())]

    def loss(params, step):
        transposed, table = params
        rows = nn.functional.embedding(torch.tensor([1, step % 3, 1]), table, sparse=True)
        return (transposed * (step + 1)).pow(2).sum() + rows.pow(2).sum()

    params, reference = make(), make()
    assert not params[0].is_contiguous()
    optimizer = DownpourSGD(params, lr=0.1, ps=served_shard, blocking=True, timeout_s=5)
    sgd = torch.optim.SGD(reference, lr=0.1)
    for step in range(4):
        for opt, ps in ((optimizer, params), (sgd, reference)):
            opt.zero_grad()
            loss(ps, step).backward()
            opt.step()
    optimizer.close()
    for got, want in zip(params, reference, strict=True):
        torch.testing.assert_close(got, want)


def test_a_parameter_changed_after_the_constructor_is_refused_by_name(served_shard):
    """Its .data replaced by another shape, or another dtype: step() and pull_now() name it
    (they failed in torch's copy with no name), before anything changes."""
    model = _model()
    optimizer = DownpourSGD(model.parameters(), lr=0.1, model=model, ps=served_shard)
    _train(model, optimizer, _batches(1))
    original = model[2].weight.data
    for changed in (torch.zeros(5, 24), original.double()):
        model[2].weight.data = changed
        steps = optimizer.num_steps
        for call in (optimizer.step, optimizer.pull_now):
            with pytest.raises(ValueError, match=r"^parameter '2\.weight' changed since"):
                call()
        assert optimizer.num_steps == steps
        assert model[2].weight.data_ptr() == changed.data_ptr()  # left as the user set it
    model[2].weight.data = original  # back as it was: it trains on
    _train(model, optimizer, _batches(1))
    optimizer.close()


def test_close_after_a_changed_parameter_was_refused_closes_cleanly(served_shard):
    """The pull still in flight when step() refused the changed parameter is not loaded into
    it by close() (torch's copy failed there, a RuntimeError naming no parameter, on the
    try/finally close a script makes after the refusal)."""
    model = _model()
    optimizer = DownpourSGD(model.parameters(), lr=0.1, model=model, ps=served_shard)
    _train(model, optimizer, _batches(3))
    changed = torch.zeros(5)
    model[2].bias.data = changed
    with pytest.raises(ValueError, match=r"^parameter '2\.bias' changed since"):
        optimizer.step()
    optimizer.close()
    assert model[2].bias.data_ptr() == changed.data_ptr()
    assert not changed.any()  # nothing pulled was written into it
    with pytest.raises(ClosedError):
        optimizer.step()


def test_a_with_block_closes_the_optimizer(served_shard):
    model = _model()
    with DownpourSGD(model.parameters(), lr=0.1, model=model, ps=served_shard) as optimizer:
        _train(model, optimizer, _batches(2))
    with pytest.raises(ClosedError, match=r"^DownpourSGD: step after close\(\)$"):
        optimizer.step()


def test_pickling_or_copying_the_optimizer_is_refused(served_shard):
    """torch's Optimizer pickles only its groups: the copy had no connections, and failed on
    its first step with an AttributeError."""
    model = _model()
    optimizer = DownpourSGD(model.parameters(), lr=0.1, model=model, ps=served_shard)
    try:
        for copy_it in (pickle.dumps, copy.deepcopy, copy.copy):
            with pytest.raises(TypeError, match=r"^cannot pickle or copy a DownpourSGD"):
                copy_it(optimizer)
        _train(model, optimizer, _batches(1))
    finally:
        optimizer.close()


def _lane_threads() -> int:
    return sum(thread.name.startswith("ps-shard") for thread in threading.enumerate())


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled(count, want: int, within_s: float = 30.0) -> int:
    """``count()`` once it has come down to ``want`` (closed sockets and ended threads go
    on their own time), or its value after ``within_s``."""
    deadline = time.monotonic() + within_s
    while (now := count()) > want and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def _initialised_shard():
    """A served SGD shard that one optimizer initialised and closed: its connections gone."""
    server = serve(
        "tcp://127.0.0.1:0",
        ShardService(ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))),
    )
    model = _model()
    DownpourSGD(model.parameters(), model=model, ps=[server.address], timeout_s=5).close()
    assert _settled(lambda: server.num_connections, 0) == 0  # the server's end closed too
    return server, model


@pytest.mark.parametrize(
    ("hidden", "options", "error"),
    [
        (25, {}, ModelMismatchError),
        (24, {"start_after_version": 5, "hold_timeout_s": 1}, ShardTimeoutError),
    ],
    ids=["another-model", "warmstart-timeout"],
)
def test_a_failed_constructor_leaves_no_thread_or_socket(hidden, options, error):
    server, _ = _initialised_shard()
    try:
        threads, descriptors = _lane_threads(), _open_descriptors()
        for _ in range(3):
            failing = _model(hidden=hidden)
            with pytest.raises(error):
                DownpourSGD(
                    failing.parameters(), model=failing, ps=[server.address], timeout_s=5, **options
                )
        assert _settled(_lane_threads, threads) == threads
        assert _settled(lambda: server.num_connections, 0) == 0
        assert _settled(_open_descriptors, descriptors) <= descriptors
    finally:
        server.stop()


def test_an_optimizer_dropped_without_close_leaves_no_thread_or_socket():
    """An optimizer that is garbage-collected unclosed (a script that forgot close(), one made
    per trial of a sweep) releases its lane threads, its connections (and the shard's end of
    them) and its shared memory, as close() would."""
    server, model = _initialised_shard()
    try:
        threads, descriptors = _lane_threads(), _open_descriptors()
        for _ in range(3):
            optimizer = DownpourSGD(model.parameters(), model=model, ps=[server.address])
            _train(model, optimizer, _batches(2))
            del optimizer
            gc.collect()
        assert _settled(_lane_threads, threads) == threads
        assert _settled(lambda: server.num_connections, 0) == 0
        assert _settled(_open_descriptors, descriptors) <= descriptors
    finally:
        server.stop()


def test_a_replica_that_never_compiles_never_imports_torch_dynamo():
    """DownpourSGD's construction, zero_grad, steps, pushes, pulls and state_dict, with a click
    model's tables on the meta device, load no ``torch._dynamo`` (a fresh interpreter: this one
    has it loaded)."""
    code = """
import sys, torch
from torch import nn
from distbelief.models.dlrm import DLRM
from distbelief.optim import DownpourSGD
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.wire import serve

server = serve(
    "tcp://127.0.0.1:0",
    ShardService(ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))),
)
try:
    click_model = DLRM(3, [50, 60], embedding_dim=4, embedding_device="meta")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = DownpourSGD(
        model.parameters(), lr=0.1, n_push=2, n_pull=2, model=model, ps=[server.address]
    )
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.zeros(5).long()).backward()
        optimizer.step()
    optimizer.load_state_dict(optimizer.state_dict())
    optimizer.close()
finally:
    server.stop()
print(optimizer.num_steps, "torch._dynamo" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["4", "False"]


@pytest.mark.parametrize("blocking", [True, False])
def test_on_push_applied_may_close_the_optimizer_and_the_next_step_is_refused(
    shard_cluster, blocking
):
    """A script that stops from ``on_push_applied`` (after so many applied steps): the step
    the close runs in ends there, every step that returned is pushed and applied once, and
    the next step is refused with ClosedError, as after any close."""
    [address] = shard_cluster(1, "--server-lr", "0.1")
    model = _model()
    optimizers: list[DownpourSGD] = []
    applied: list[int] = []

    def stop_after_three(step: int) -> None:
        applied.append(step)
        if step >= 3:
            optimizers[0].close()

    optimizer = DownpourSGD(
        model.parameters(),
        lr=0.1,
        model=model,
        ps=address,
        blocking=blocking,
        timeout_s=10,
        on_push_applied=stop_after_three,
    )
    optimizers.append(optimizer)
    returned = 0
    with pytest.raises(ClosedError, match="step"):
        for batch in _batches(10):
            _train(model, optimizer, [batch])
            returned += 1
    # Blocking, step 3's push is applied within it; otherwise within step 4 (whose own
    # gradient the close then pushes), or before step 4 starts (which is then refused).
    assert returned in ((3,) if blocking else (3, 4))
    assert applied == list(range(1, returned + 1)) and optimizer.applied_step == returned
    reader = DownpourSGD(model.parameters(), model=model, ps=address, timeout_s=10)
    try:
        assert reader.version == returned
    finally:
        reader.close()


def test_each_push_is_told_once_every_shard_applied_it_and_a_restart_learns_the_last(
    shard_cluster,
):
    """``on_push_applied`` hears the step of every push (every third step, and the flush's
    last one) once both shards have answered it; a later optimizer of the same worker id (a
    restarted worker) learns from each shard the step of the last push it took."""
    addresses = shard_cluster(2, "--server-lr", "0.1")
    model = _model()
    applied: list[int] = []
    optimizer = DownpourSGD(
        model.parameters(),
        lr=0.1,
        n_push=3,
        model=model,
        ps=addresses,
        timeout_s=5,
        worker_id="worker1",
        on_push_applied=applied.append,
    )
    _train(model, optimizer, _batches(10))
    optimizer.close()  # the flush pushes steps 10's leftover: its push is step 10's
    assert applied == [3, 6, 9, 10]
    assert optimizer.applied_step == 10
    again: list[int] = []
    restarted = DownpourSGD(
        model.parameters(),
        model=model,
        ps=addresses,
        timeout_s=5,
        worker_id="worker1",
        on_push_applied=again.append,
    )
    other = DownpourSGD(
        model.parameters(), model=model, ps=addresses, timeout_s=5, worker_id="worker0"
    )
    try:
        assert restarted.client.pushed_steps == [10, 10]
        assert other.client.pushed_steps == [None, None]
        # Resumed at step 7 with the shards holding its pushes up to step 10 (a stage a push
        # ahead of its replica): steps 8 to 10 are done again, not pushed again.
        before = restarted.version
        restarted.resume(7, 10)
        _train(model, restarted, _batches(5))
        restarted.flush()
        assert (restarted.num_steps, again, restarted.version) == (12, [11, 12], before + 2)
    finally:
        restarted.close()
        other.close()
