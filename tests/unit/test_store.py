"""ShardStore: named buffers, what export saves, and a load that continues exactly; plain SGD
without torch.optim."""

import subprocess
import sys

import pytest
import torch

from distbelief.server import server_optimizer_factory
from distbelief.server.store import PARAM, ShardStore


def _store(name: str = "adagrad") -> ShardStore:
    params = [torch.arange(6, dtype=torch.float32), torch.ones(3, dtype=torch.float64)]
    return ShardStore(server_optimizer_factory(name, lr=0.1), params)


def test_buffers_are_added_listed_and_shaped_like_the_slices():
    store = _store()
    history = store.add("sandblaster.w")
    assert store.names() == [PARAM, "sandblaster.w"]
    assert [(t.dtype, t.shape) for t in history] == [(p.dtype, p.shape) for p in store.params]
    assert all(bool((t == 0).all()) for t in history)
    assert store.get("sandblaster.w") is history and store.find("nothing") is None
    with pytest.raises(KeyError):
        store.get("nothing")


@pytest.mark.parametrize("name", [PARAM, "sandblaster.w", "optim.0", ""])
def test_taken_or_reserved_names_are_refused(name):
    store = _store()
    store.add("sandblaster.w")
    with pytest.raises(ValueError, match="taken or reserved"):
        store.add(name)


def test_export_holds_persistent_buffers_optimizer_state_and_values():
    store = _store()
    store.step([torch.ones(6), torch.ones(3, dtype=torch.float64)])
    store.add("direction", [torch.full((2,), 3.0)])
    store.add("cache", persistent=False)
    store.values["rho"] = [0.5, 0.25]
    tensors, plain = store.export()
    optimizer_state = {f"optim.{i}.{key}" for i in range(2) for key in ("sum", "step")}
    assert set(tensors) == {"param.0", "param.1", "direction.0", *optimizer_state}
    assert plain["buffers"] == {PARAM: 2, "direction": 1}
    assert plain["values"] == {"rho": [0.5, 0.25]}
    assert tensors["param.0"] is not store.params[0]  # copies: later steps do not change them
    assert torch.equal(tensors["param.0"], store.params[0])


def test_loaded_store_continues_exactly_like_the_original():
    original = _store("adam")
    grads = [torch.linspace(-1, 1, 6), torch.full((3,), 0.5, dtype=torch.float64)]
    original.step([g.clone() for g in grads])
    original.add("direction", [torch.full((2,), 3.0)])
    tensors, plain = original.export()
    loaded = ShardStore.load(server_optimizer_factory("adam", lr=0.1), tensors, plain)
    assert loaded.names() == [PARAM, "direction"]
    assert torch.equal(loaded.get("direction")[0], torch.full((2,), 3.0))
    for store in (original, loaded):
        store.step([g.clone() for g in grads])
    for a, b in zip(original.params, loaded.params, strict=True):
        assert torch.equal(a, b)


def test_load_refuses_another_optimizer_or_a_missing_tensor():
    tensors, plain = _store("adagrad").export()
    with pytest.raises(ValueError, match="Adagrad state, this shard runs SGD"):
        ShardStore.load(server_optimizer_factory("sgd", lr=0.1), tensors, plain)
    del tensors["param.1"]
    with pytest.raises(ValueError, match=r"'param\.1' is missing"):
        ShardStore.load(server_optimizer_factory("adagrad", lr=0.1), tensors, plain)


def test_load_refuses_optimizer_state_that_a_push_could_not_use():
    # Found at the first push otherwise ("push refused: 'exp_avg'"): refused on loading,
    # naming the tensor.
    adam = server_optimizer_factory("adam", lr=0.1)
    store = ShardStore(adam, [torch.arange(6, dtype=torch.float32)])
    store.step([torch.ones(6)])
    tensors, plain = store.export()
    for change, said in (
        (lambda t: t.pop("optim.0.exp_avg"), r"tensor 'optim\.0\.exp_avg' is missing"),
        (
            lambda t: t.update({"optim.0.exp_avg": torch.zeros(5)}),
            r"'optim\.0\.exp_avg' has shape \[5\]",
        ),
        (
            lambda t: t.update({"optim.0.extra": torch.zeros(6)}),
            r"unexpected tensor 'optim\.0\.extra'",
        ),
        (
            lambda t: t.update({"optim.3.step": torch.zeros(())}),
            r"unexpected tensor 'optim\.3\.step'",
        ),
        (lambda t: t.update({"bogus": torch.zeros(6)}), r"unexpected tensor 'bogus'"),
        (
            lambda t: t.update({"optim.0.exp_avg": torch.zeros(())}),
            r"'optim\.0\.exp_avg' is torch\.float32 \[\]: Adam keeps torch\.float32 \[6\]",
        ),
        (
            lambda t: t.update({"optim.0.step": torch.zeros(6)}),
            r"'optim\.0\.step' is torch\.float32 \[6\]: Adam keeps torch\.float32 \[\]",
        ),
        (
            lambda t: t.update({"optim.0.exp_avg_sq": torch.zeros(6, dtype=torch.float64)}),
            r"'optim\.0\.exp_avg_sq' is torch\.float64 \[6\]: Adam keeps torch\.float32",
        ),
    ):
        edited = dict(tensors)
        change(edited)
        with pytest.raises(ValueError, match=said):
            ShardStore.load(adam, edited, plain)
    ShardStore.load(adam, dict(tensors), plain)  # as saved
    never_stepped, plain = ShardStore(adam, [torch.zeros(6)]).export()
    assert ShardStore.load(adam, never_stepped, plain).optimizer.state_dict()["state"] == {}


def test_plain_sgd_makes_torch_sgds_update_and_writes_its_state_layout():
    grads = [torch.linspace(-1, 1, 6), torch.full((3,), 0.5, dtype=torch.float64)]
    plain = _store("sgd")
    params = [p.clone() for p in plain.params]
    reference = torch.optim.SGD(params, lr=0.1)
    for step in range(3):
        plain.step([g * (step + 1) for g in grads])
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad * (step + 1)
        reference.step()
    for a, b in zip(plain.params, params, strict=True):
        assert torch.equal(a, b)
    ours, torchs = plain.optimizer.state_dict(), reference.state_dict()
    assert ours["state"] == torchs["state"] == {}
    [group], [torch_group] = ours["param_groups"], torchs["param_groups"]
    assert group == {key: torch_group[key] for key in group}
    for param, grad in zip(plain.params, grads, strict=True):
        param.grad = grad.clone()
    before = [p.clone() for p in plain.params]
    plain.optimizer.step()  # step() on grads, as torch's: the same update
    for after, old, grad in zip(plain.params, before, grads, strict=True):
        assert torch.equal(after, old.add(grad, alpha=-0.1))


def test_plain_sgd_loads_torch_sgds_checkpoint_but_not_momentum_buffers():
    tensors, plain = _store("sgd").export()
    assert plain["optimizer"] == "SGD"
    torch_sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    ShardStore.load(torch_sgd, tensors, plain)  # and torch's SGD reads plain SGD's
    momentum = _store("momentum")
    momentum.step([torch.ones(6), torch.ones(3, dtype=torch.float64)])
    tensors, plain = momentum.export()
    with pytest.raises(ValueError, match="momentum buffers: this shard runs plain SGD"):
        ShardStore.load(server_optimizer_factory("sgd", lr=0.1), tensors, plain)


_TORCH_OPTIMIZERS = {
    "momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.1, eps=1e-10),
    "adam": lambda params: torch.optim.Adam(params, lr=0.1, betas=(0.9, 0.999), eps=1e-8),
}


@pytest.mark.parametrize("name", sorted(_TORCH_OPTIMIZERS))
def test_a_stateful_shard_optimizer_is_torchs_and_reads_and_writes_its_checkpoints(name):
    """Run without torch's compiler guards, the update and the saved state are torch's own
    class's, to the bit, and a checkpoint of either restores into the other."""
    grads = [torch.linspace(-1, 1, 6), torch.full((3,), 0.5, dtype=torch.float64)]
    ours = _store(name)
    reference = ShardStore(_TORCH_OPTIMIZERS[name], [p.clone() for p in ours.params])
    for step in range(3):
        ours.step([g * (step + 1) for g in grads])
        reference.step([g * (step + 1) for g in grads])
    for a, b in zip(ours.params, reference.params, strict=True):
        assert torch.equal(a, b)
    (tensors, plain), (torch_tensors, torch_plain) = ours.export(), reference.export()
    assert plain == torch_plain
    assert tensors.keys() == torch_tensors.keys()
    assert all(torch.equal(tensors[key], torch_tensors[key]) for key in tensors)
    factory = server_optimizer_factory(name, lr=0.1)
    ShardStore.load(factory, torch_tensors, torch_plain)
    ShardStore.load(_TORCH_OPTIMIZERS[name], tensors, plain)


def test_no_shard_optimizer_imports_torch_dynamo():
    """torch wraps its optimizers' methods in guards whose first call imports the compiler
    (as much CPU again as ``import torch``); a shard, which never compiles, runs without them."""
    code = (
        "import sys, torch\n"
        "from distbelief.server.store import ShardStore\n"
        "from distbelief.server import server_optimizer_factory\n"
        "for name in ('sgd', 'momentum', 'adagrad', 'adam'):\n"
        "    factory = server_optimizer_factory(name, lr=0.1)\n"
        "    store = ShardStore(factory, [torch.zeros(3)])\n"
        "    store.step([torch.ones(3)])\n"
        "    ShardStore.load(factory, *store.export()).step([torch.ones(3)])\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "False", result.stderr
