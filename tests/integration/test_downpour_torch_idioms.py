"""DownpourSGD and ShardedEmbeddings used as torch.optim users use an optimizer, against real
shard processes: a GradScaler, LR schedulers, state-dict hooks, a compiled model; one worker,
blocking pushes and pulls and SGD on the shards at the worker's rate give torch.optim.SGD's
parameters."""

from __future__ import annotations

import copy
import math

import numpy
import pytest
import torch
from torch import nn

from distbelief.client.rows import RowClient
from distbelief.embeddings import ShardedEmbeddings
from distbelief.optim import DownpourSGD
from distbelief.server.row_table import seeded_normal_rows
from tests.integration.test_downpour import _batches, _model, _train


class _Recommender(nn.Module):
    """A table and a dense layer: names for both kinds of thing the shards hold."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.items = nn.Embedding(20, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.items(ids).sum(1))


def test_a_compiled_model_and_a_plain_one_name_their_tensors_and_tables_alike(shard_cluster):
    """torch.compile's wrapper lists its model's names under ``_orig_mod.``: a compiled replica
    initialised the shards with those, and a plain replica (or an evaluator) was refused; a
    compiled model's table is chosen by its path in the model, which names it."""
    addresses = shard_cluster(1, "--server-lr", "0.1")
    compiled = torch.compile(_Recommender(seed=0))
    tables = ShardedEmbeddings(compiled, ps=addresses, tables="items", timeout_s=30)
    optimizer = DownpourSGD(compiled.parameters(), model=compiled, ps=addresses, timeout_s=30)
    plain = _Recommender(seed=1)  # another init: the shards' values must win
    assert [spec.name for spec in optimizer.specs] == ["head.weight", "head.bias"]
    assert {module.table for module in tables.modules.values()} == {"items"}
    with ShardedEmbeddings(plain, ps=addresses, timeout_s=30) as plain_tables:
        assert set(plain_tables.dims) == {"items"}
        with DownpourSGD(plain.parameters(), model=plain, ps=addresses, timeout_s=30):
            for got, want in zip(plain.head.parameters(), compiled.head.parameters(), strict=True):
                assert torch.equal(got, want)
    optimizer.close()
    tables.close()


def _blocking_optimizer(model: nn.Module, addresses: list[str]) -> DownpourSGD:
    return DownpourSGD(
        model.parameters(), lr=0.1, model=model, ps=addresses, blocking=True, timeout_s=30
    )


def test_a_load_state_dict_pre_hook_may_adapt_a_torch_sgd_state_dict_with_momentum(shard_cluster):
    """The groups are checked as loaded, after the pre hooks: they were checked as given, and
    a hook that sets momentum to 0 could not make such a state dict load."""
    addresses = shard_cluster(1, "--server-lr", "0.1")
    momentum_sgd = torch.optim.SGD(_model().parameters(), lr=0.05, momentum=0.9)

    def without_momentum(optimizer, state_dict):
        groups = [{**group, "momentum": 0} for group in state_dict["param_groups"]]
        return {"state": {}, "param_groups": groups}

    model = _model()
    with _blocking_optimizer(model, addresses) as optimizer:
        with pytest.raises(ValueError, match=r"^param group 0: momentum is not applied"):
            optimizer.load_state_dict(momentum_sgd.state_dict())
        optimizer.register_load_state_dict_pre_hook(without_momentum)
        optimizer.load_state_dict(momentum_sgd.state_dict())
        assert optimizer.param_groups[0]["lr"] == 0.05
        assert optimizer.param_groups[0]["momentum"] == 0
        _train(model, optimizer, _batches(1))


def test_loading_a_torch_sgd_state_dict_keeps_the_step_count(shard_cluster):
    """A torch.optim state dict has no step count: the optimizer's own stays (it went back to
    0, and the pushes due every n_push steps with it)."""
    addresses = shard_cluster(1, "--server-lr", "0.1")
    model = _model()
    with DownpourSGD(
        model.parameters(), lr=0.1, n_push=2, model=model, ps=addresses, blocking=True
    ) as optimizer:
        _train(model, optimizer, _batches(3))
        optimizer.load_state_dict(torch.optim.SGD(_model().parameters(), lr=0.2).state_dict())
        assert (optimizer.num_steps, optimizer.param_groups[0]["lr"]) == (3, 0.2)
        _train(model, optimizer, _batches(1))  # the fourth step: a push is due
        assert [stats["num_pushes"] for stats in optimizer.client.stats()] == [2]
        saved = optimizer.state_dict()
        _train(model, optimizer, _batches(1))
        seen = []
        optimizer.register_load_state_dict_post_hook(lambda loaded: seen.append(loaded.num_steps))
        optimizer.load_state_dict(saved)  # a DownpourSGD state dict brings its count
        assert optimizer.num_steps == 4
        assert seen == [4]  # the post hooks see it too (they saw the count before the load)


@pytest.mark.parametrize(
    "lr",
    [
        torch.tensor(0.05),
        torch.tensor([0.05]),
        numpy.float32(0.05),
        numpy.array(0.05),
    ],
    ids=["0-d", "1-d", "numpy", "numpy-0-d"],
)
def test_a_one_element_tensor_or_numpy_lr_trains_as_torch_sgd_does(shard_cluster, lr):
    """torch.optim takes a tensor or a numpy number as a group's rate (LambdaLR times a numpy
    float32 sets one); they were refused as not 'a finite number'."""
    addresses = shard_cluster(1, "--server-lr", "0.05")
    model, reference = _model(), _model()
    with DownpourSGD(
        model.parameters(), lr=copy.copy(lr), model=model, ps=addresses, blocking=True
    ) as optimizer:
        _train(model, optimizer, _batches(2))
        optimizer.param_groups[0]["lr"] = copy.copy(lr)
        _train(model, optimizer, _batches(2))
        optimizer.pull_now()
    sgd = torch.optim.SGD(reference.parameters(), lr=copy.copy(lr))
    _train(reference, sgd, _batches(2))
    _train(reference, sgd, _batches(2))
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_one_cycle_lr_cycling_momentum_is_refused_saying_how_to_stop_it(shard_cluster):
    """OneCycleLR sets a momentum the user never gave: the refusal says where it comes from."""
    addresses = shard_cluster(1, "--server-lr", "0.1")
    model = _model()
    with _blocking_optimizer(model, addresses) as optimizer:
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=4)
        with pytest.raises(ValueError, match=r"momentum .* unless given cycle_momentum=False$"):
            _train(model, optimizer, _batches(1))
        optimizer.param_groups[0]["momentum"] = 0  # as it was before that scheduler
        reference = _model()
        sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
        schedulers = [
            torch.optim.lr_scheduler.OneCycleLR(opt, 0.5, total_steps=4, cycle_momentum=False)
            for opt in (optimizer, sgd)
        ]
        for batch in _batches(3):
            for net, opt, scheduler in zip(
                (model, reference), (optimizer, sgd), schedulers, strict=True
            ):
                _train(net, opt, [batch])
                scheduler.step()
        assert optimizer.param_groups[0]["lr"] == sgd.param_groups[0]["lr"]


def test_a_step_grad_scaler_skips_for_an_infinite_gradient_reaches_no_shard(shard_cluster):
    """torch.amp.GradScaler does not call step() for a gradient with an inf or NaN: the shards
    and a replica joining them hold torch.optim.SGD's parameters, all finite."""
    addresses = shard_cluster(2, "--server-lr", "0.1")

    def train_scaled(model, optimizer):
        scaler = torch.amp.GradScaler("cpu")
        for step, (images, labels) in enumerate(_batches(4)):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            scaler.scale(loss * (math.inf if step == 1 else 1.0)).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(optimizer)
            scaler.update()

    model, reference = _model(), _model()
    with _blocking_optimizer(model, addresses) as optimizer:
        train_scaled(model, optimizer)
        assert optimizer.num_steps == 3
    train_scaled(reference, torch.optim.SGD(reference.parameters(), lr=0.1))
    joined = _model(seed=5)
    with DownpourSGD(joined.parameters(), model=joined, ps=addresses, timeout_s=30):
        for got, want in zip(joined.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


ROWS, WIDTH, ROW_INIT_STD = 30, 4, 0.5


class _Ranker(nn.Module):
    """A sparse table and a dense head, as a recommendation model has."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(ROWS, WIDTH, sparse=True)
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.words(ids).sum(1)).squeeze(1)


def _train_ranker_scaled(model, optimizer, tables=None) -> None:
    """Steps of a GradScaler'd loop, the second one's loss infinite (the scaler skips it)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    generator = torch.Generator().manual_seed(3)
    for step in range(4):
        ids = torch.randint(0, ROWS, (8, 3), generator=generator)
        target = torch.randn(8, generator=generator)
        optimizer.zero_grad()
        loss = ((model(ids) - target) ** 2).mean() * (math.inf if step == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        if tables is not None:
            tables.step(grad_scaler=scaler)
        scaler.update()


def test_a_grad_scaler_given_to_the_tables_unscales_their_rows_and_skips_an_infinite_step(
    shard_cluster,
):
    """The rows' gradients were pushed as scaled (x1024 here), and the skipped step's infinite
    ones made the shards' rows NaN; now the rows equal nn.Embedding(sparse=True)'s trained by
    torch.optim.SGD under the same scaler."""
    addresses = shard_cluster(
        2,
        *("--server-lr", "0.1", "--row-optimizer", "sgd", "--row-lr", "0.1"),
        *("--row-init-std", str(ROW_INIT_STD)),
    )
    reference = _Ranker()
    with torch.no_grad():
        reference.words.weight.copy_(seeded_normal_rows(torch.arange(ROWS), WIDTH, ROW_INIT_STD, 0))
    _train_ranker_scaled(reference, torch.optim.SGD(reference.parameters(), lr=0.1))
    model = _Ranker()
    with ShardedEmbeddings(model, ps=addresses, blocking=True, timeout_s=30) as tables:
        with _blocking_optimizer(model, addresses) as optimizer:
            _train_ranker_scaled(model, optimizer, tables)
            with pytest.raises(TypeError, match=r"^grad_scaler must be a torch.amp.GradScaler"):
                tables.step(grad_scaler=1024.0)
        assert tables.num_steps == 4
    reader = RowClient(addresses, {"words": WIDTH}, timeout_s=30)
    try:
        reader.handshake()
        rows = reader.pull({"words": torch.arange(ROWS)})["words"]
    finally:
        reader.close()
    torch.testing.assert_close(rows, reference.words.weight.detach(), atol=1e-6, rtol=0)
    for got, want in zip(model.head.parameters(), reference.head.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_a_table_step_the_scaler_skips_backs_its_scale_off_as_a_skipped_optimizer_step_does(
    shard_cluster,
):
    """A scale at which only the tables' gradients overflow: the tables skipped their step but
    the scaler, seeing finite gradients in the optimizer's, kept (and grew) its scale, so every
    later step overflowed and was skipped too. Now its state after ``update()`` is the one an
    overflowing torch.optim.SGD step leaves: the scale backed off, the growth count reset."""
    addresses = shard_cluster(1, *("--row-optimizer", "sgd", "--row-lr", "0.1"))
    settings = {"init_scale": 1024.0, "growth_interval": 1}  # without the fix: grown to 2048
    overflowed = torch.amp.GradScaler("cpu", **settings)
    dense = nn.Parameter(torch.ones(3))
    skipped = torch.optim.SGD([dense], lr=0.1)
    skipped.zero_grad()
    overflowed.scale(dense.sum() * math.inf).backward()
    overflowed.step(skipped)
    overflowed.update()

    scaler = torch.amp.GradScaler("cpu", **settings)
    model, head = _Recommender(seed=0), nn.Parameter(torch.ones(3))
    with ShardedEmbeddings(model, ps=addresses, blocking=True, timeout_s=30) as tables:
        optimizer = torch.optim.SGD([head], lr=0.1)
        optimizer.zero_grad()
        rows = model.items(torch.tensor([[1, 2]])).sum()
        scaler.scale(rows * math.inf + head.sum()).backward()  # only the rows overflow
        scaler.step(optimizer)
        tables.step(grad_scaler=scaler)
        scaler.update()
        assert tables.take_figures()["rows_pushed"] == 0  # the table's step was skipped
    assert scaler.get_scale() == overflowed.get_scale() == 512.0
    assert scaler.state_dict() == overflowed.state_dict()
    torch.testing.assert_close(head.detach(), torch.full((3,), 0.9))  # the finite one stepped
