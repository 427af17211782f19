"""ParameterShard math against torch.optim on the unsharded tensors."""

import threading

import pytest
import torch

from distbelief.errors import ModelMismatchError, ShardEmptyError
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.sharding import FlatLayout, FlatPartitioner, TensorSpec

SPECS = [
    TensorSpec("w", (37, 11), torch.float32),
    TensorSpec("b", (11,), torch.float32),
    TensorSpec("v", (5,), torch.float64),
]


def _shards(num_shards: int, values: list[torch.Tensor], lr: float) -> list[ParameterShard]:
    flats = FlatLayout(SPECS).flatten(values)
    shards = []
    for shard_id, pieces in enumerate(FlatPartitioner().partition(SPECS, num_shards)):
        shard = ParameterShard(shard_id, num_shards, server_optimizer_factory("sgd", lr=lr))
        assert shard.initialize(SPECS, [flats[p.dtype][p.start : p.stop] for p in pieces])
        shards.append(shard)
    return shards


def _gather(shards: list[ParameterShard]) -> list[torch.Tensor]:
    layout = FlatLayout(SPECS)
    flats = layout.allocate()
    for shard in shards:
        for piece, value in zip(shard.slices, shard.parameters(), strict=True):
            flats[piece.dtype][piece.start : piece.stop] = value
    return layout.views(flats)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_sgd_shards_match_torch_sgd(num_shards):
    torch.manual_seed(0)
    values = [torch.randn(s.shape, dtype=s.dtype) for s in SPECS]
    reference = [v.clone().requires_grad_() for v in values]
    torch_sgd = torch.optim.SGD(reference, lr=0.1)
    shards = _shards(num_shards, values, lr=0.1)
    layout = FlatLayout(SPECS)
    for _ in range(5):
        grads = [torch.randn(s.shape, dtype=s.dtype) for s in SPECS]
        for param, grad in zip(reference, grads, strict=True):
            param.grad = grad.clone()
        torch_sgd.step()
        flat_grads = layout.flatten(grads)
        for shard in shards:
            shard.apply_gradient([flat_grads[p.dtype][p.start : p.stop] for p in shard.slices])
    for got, want in zip(_gather(shards), reference, strict=True):
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)
    assert all(shard.counters().version == 5 for shard in shards)


def test_initialize_is_first_writer_wins_and_checks_layout():
    shard = _shards(1, [torch.zeros(s.shape, dtype=s.dtype) for s in SPECS], lr=0.1)[0]
    ones = FlatLayout(SPECS).flatten([torch.ones(s.shape, dtype=s.dtype) for s in SPECS])
    assert not shard.initialize(SPECS, [ones[p.dtype] for p in shard.slices])
    assert float(shard.parameters()[0].abs().sum()) == 0.0
    other = [TensorSpec("w", (37, 12), torch.float32), *SPECS[1:]]
    with pytest.raises(ModelMismatchError, match="'w'"):
        shard.check_layout(other)


def test_a_shard_that_knows_its_model_adopts_only_a_layout_that_fits_it():
    """A ParameterServer's shard: matched by name (a replica may leave frozen parameters out),
    by position for a replica that gave no names; another model is refused before it is
    adopted."""
    values = FlatLayout(SPECS).flatten([torch.zeros(s.shape, dtype=s.dtype) for s in SPECS])

    def shard() -> ParameterShard:
        return ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1), model_specs=SPECS)

    unnamed = [TensorSpec(f"param.{i}", s.shape, s.dtype) for i, s in enumerate(SPECS)]
    for fitting in (SPECS, SPECS[:2], unnamed):
        shard().check_layout(fitting)
    wider = [TensorSpec("w", (37, 12), torch.float32), *SPECS[1:]]
    with pytest.raises(
        ModelMismatchError,
        match=r"'w' \[37, 12\] float32 does not match the server's model's 'w' \[37, 11\]",
    ):
        shard().check_layout(wider)
    with pytest.raises(
        ModelMismatchError, match="the model has 2 parameter tensors, the server's model 3"
    ):
        shard().check_layout(unnamed[:2])
    refusing = shard()
    wider_values = FlatLayout(wider).flatten([torch.zeros(s.shape, dtype=s.dtype) for s in wider])
    with pytest.raises(ModelMismatchError, match="'w'"):
        refusing.initialize(wider, [wider_values[torch.float32], wider_values[torch.float64]])
    assert not refusing.initialized
    assert refusing.initialize(SPECS, [values[torch.float32], values[torch.float64]])


def test_uninitialised_shard_refuses_updates():
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))
    with pytest.raises(ShardEmptyError, match="holds no parameters") as refused:
        shard.apply_gradient([torch.zeros(3)])
    assert isinstance(refused.value, ValueError)  # a bad request, as before it was typed


def test_concurrent_pushes_lose_no_update():
    values = [torch.zeros(s.shape, dtype=s.dtype) for s in SPECS]
    shard = _shards(1, values, lr=1.0)[0]
    grads = [-torch.ones(p.numel, dtype=p.dtype) for p in shard.slices]
    num_threads, pushes_each = 4, 50

    def push_many() -> None:
        for _ in range(pushes_each):
            shard.apply_gradient(grads)

    threads = [threading.Thread(target=push_many) for _ in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    expected = float(num_threads * pushes_each)
    assert all(bool((value == expected).all()) for value in shard.parameters())
    assert shard.counters().version == num_threads * pushes_each


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="shard_id 3"):
        ParameterShard(3, 2, server_optimizer_factory("sgd", lr=0.1))
    with pytest.raises(ValueError, match="unknown server optimizer 'lbfgs'"):
        server_optimizer_factory("lbfgs", lr=0.1)
    with pytest.raises(TypeError, match=r"^optimizer_factory must build the update rule"):
        ParameterShard(0, 1, None)
    with pytest.raises(TypeError, match=r"^consistency must be a ConsistencyConfig, got 'x'"):
        ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1), consistency="x")


def test_pull_copies_only_when_the_parameters_changed():
    shard = _shards(1, [torch.zeros(s.shape, dtype=s.dtype) for s in SPECS], lr=1.0)[0]
    outs = [torch.empty_like(p) for p in shard.parameters()]
    first = shard.pull_into(outs)
    for out in outs:
        out.fill_(7)  # a stale marker: a skipped copy leaves it in place
    same = shard.pull_into(outs, outs_generation=first.generation)
    assert same.generation == first.generation
    assert all(bool((out == 7).all()) for out in outs)
    grads = [torch.ones_like(p) for p in shard.parameters()]
    shard.apply_gradient(grads)
    changed = shard.pull_into(outs, outs_generation=first.generation)
    assert changed.generation != first.generation
    assert all(bool((out == -1).all()) for out in outs)
    state = shard.snapshot()
    shard.apply_gradient(grads)
    shard.restore(state)  # a restore changes the values without a push
    restored = shard.pull_into(outs, outs_generation=changed.generation)
    assert restored.generation != changed.generation
    assert all(bool((out == -1).all()) for out in outs)
