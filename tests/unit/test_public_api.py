"""The package's public API: every name in ``distbelief.__all__`` resolves, the version is the
installed one, importing the package alone does not import torch (fast ``--help``), a bad
argument is a typed error naming it, and every public method of a public class has a docstring
(what ``help()`` shows)."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
import subprocess
import sys
import types

import pytest

import distbelief


def test_version_is_the_installed_distribution_version():
    assert distbelief.__version__ == importlib.metadata.version("distbelief")


@pytest.mark.parametrize("name", [n for n in distbelief.__all__ if n != "__version__"])
def test_every_public_name_resolves(name):
    assert getattr(distbelief, name) is not None
    assert name in dir(distbelief)


def test_every_error_type_is_a_public_name():
    """What a public call raises can be caught as ``distbelief.<name>``, as the README says."""
    import distbelief.errors

    error_types = [
        name
        for name, value in vars(distbelief.errors).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == "distbelief.errors"
    ]
    assert error_types
    assert [name for name in error_types if name not in distbelief.__all__] == []


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        distbelief.no_such_thing  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    code = "import sys, distbelief; print('torch' in sys.modules)"
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def _bad_arguments():
    """(call, error type, message) for one obviously bad argument of each public class."""
    import torch
    from torch import nn

    from distbelief.client import ParameterServerClient
    from distbelief.data import worker_indices
    from distbelief.hosts import UnknownHostError
    from distbelief.models import build_model
    from distbelief.plots import plot_runs
    from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
    from distbelief.telemetry import poll_shard_stats
    from distbelief.worker import resolve_device

    net = nn.Linear(2, 1)

    def downpour(params=None, **options):
        # retry_timeout_s=0: an argument let through fails fast at the unreachable shard.
        params = net.parameters() if params is None else params
        return distbelief.DownpourSGD(params, ps="tcp://h:1", retry_timeout_s=0, **options)

    weight, bias = net.parameters()
    sgd = server_optimizer_factory("sgd", lr=0.1)
    return [
        (lambda: distbelief.ShardedEmbedding("t", -1, 4), ValueError, "num_embeddings must be"),
        (lambda: distbelief.ShardedEmbedding("t", 10, 0), ValueError, "embedding_dim must be"),
        (lambda: distbelief.ShardedEmbedding("", 10, 4), TypeError, "^table: must be a non-empty"),
        (lambda: distbelief.ShardedEmbedding(3, 10, 4), TypeError, "^table: must be a non-empty"),
        (
            lambda: distbelief.ShardedEmbeddingBag("t", 10, 4, include_last_offset="x"),
            TypeError,
            "include_last_offset must be True or False, got 'x'",
        ),
        (lambda: distbelief.RowClient([], {"t": 4}), ValueError, "no parameter-server address"),
        (lambda: distbelief.RowClient("tcp://h:1", {}), ValueError, "at least one table"),
        (lambda: distbelief.RowClient("tcp://h:1", {"t": -3}), ValueError, "'t' needs a dim"),
        (
            lambda: distbelief.RowClient("tcp://h:1", {"t": 4}, sizes={"t": 0}),
            ValueError,
            "^sizes: 't' needs a number of rows >= 1, got 0$",
        ),
        (lambda: distbelief.RowClient("tcp://h:1", ["t"]), TypeError, "^tables must be a mapping"),
        (lambda: distbelief.RowClient("tcp://h:1", {3: 4}), TypeError, "^tables: a table name"),
        (lambda: distbelief.ParameterServer("alexnet"), TypeError, "model must be a torch"),
        (lambda: distbelief.ParameterServer(nn.ReLU()), ValueError, "^model has no parameters"),
        (
            # run() loaded nothing into it, and said nothing.
            lambda: distbelief.ParameterServer(nn.Linear(2, 1, device="meta")),
            ValueError,
            "^model parameter 'weight' is on the meta device",
        ),
        (lambda: distbelief.ParameterServer(net, lr=-1), ValueError, "lr must be a finite number"),
        (
            lambda: distbelief.ParameterServer(net, lr=float("inf")),
            ValueError,
            "lr must be a finite number >= 0",
        ),
        (lambda: distbelief.ParameterServer(net, port=99999), ValueError, "port must be"),
        (lambda: distbelief.ParameterServer(net, timeout_s=0), ValueError, "timeout_s must be"),
        (
            lambda: distbelief.ParameterServer(net, consistency="sync"),
            TypeError,
            "consistency must be a ConsistencyConfig",
        ),
        (lambda: distbelief.ParameterServer(net, host=5), TypeError, "^host must be a str"),
        (
            lambda: distbelief.ParameterServer(net, host="tcp://127.0.0.1"),
            ValueError,
            "^host must be an IP address or host name .*got 'tcp://127.0.0.1'$",
        ),
        (
            lambda: distbelief.ParameterServer(net, host="127.0.0.1:7000"),
            ValueError,
            "^host must be an IP address or host name .*got '127.0.0.1:7000'$",
        ),
        (
            lambda: distbelief.ParameterServer(net, host="192.0.2.1"),
            ValueError,
            "^host 192.0.2.1 is not an address of this machine",
        ),
        (
            lambda: distbelief.DownpourSGD(net.parameters(), lr="x", ps="tcp://h:1"),
            ValueError,
            "lr must be a finite number >= 0, got 'x'",
        ),
        (
            lambda: distbelief.DownpourSGD(net.parameters(), lr=float("nan"), ps="tcp://h:1"),
            ValueError,
            "lr must be a finite number >= 0, got nan",
        ),
        (
            lambda: distbelief.DownpourSGD(net.parameters(), ps=123),
            TypeError,
            "ps must be 'tcp://HOST:PORT,...' or a list of such strings, got 123",
        ),
        (lambda: distbelief.reshard_run("no/such/run", 2), ValueError, "no such run folder"),
        (
            lambda: distbelief.DownpourSGD(net.parameters(), lr=1e308, ps="tcp://h:1"),
            ValueError,
            "lr must be <= 3.40282e.38, got 1e.308",
        ),
        (
            lambda: distbelief.DownpourSGD(net.parameters(), ps="tcp://h:1", timeout_s=1e308),
            ValueError,
            "timeout_s must be <= 604800, got 1e.308",
        ),
        (
            lambda: distbelief.DownpourSGD(
                net.parameters(), ps="tcp://h:1", retry_timeout_s=float("nan")
            ),
            ValueError,
            "retry_timeout_s must be a finite number >= 0, got nan",
        ),
        (
            lambda: distbelief.DownpourSGD(
                net.parameters(), ps="tcp://h:1", hold_timeout_s=float("inf")
            ),
            ValueError,
            "hold_timeout_s must be a finite number > 0, got inf",
        ),
        (
            lambda: distbelief.ParameterServer(net, timeout_s=1e9),
            ValueError,
            "timeout_s must be <= 604800, got 1000000000.0",
        ),
        (
            lambda: downpour([{"params": net.parameters(), "lr": float("nan")}], lr=0.1),
            ValueError,
            "^param group 0: lr must be a finite number >= 0, got nan$",
        ),
        (
            lambda: downpour([{"params": [weight]}, {"params": [bias], "lr": 1e308}]),
            ValueError,
            "^param group 1: lr must be <= 3.40282e.38, got 1e.308$",
        ),
        (
            lambda: downpour([{"params": [weight], "lr": torch.tensor([0.1, 0.2])}]),
            ValueError,
            "^param group 0: lr must be a finite number >= 0, got tensor",
        ),
        (lambda: downpour(auth_key=123), TypeError, "^auth_key must be bytes or a str .* got 123$"),
        (lambda: downpour(n_push=True), ValueError, "^n_push must be an integer >= 1, got True$"),
        (lambda: downpour(n_pull=True), ValueError, "^n_pull must be an integer >= 1, got True$"),
        (lambda: downpour(n_push=2**40), ValueError, "^n_push must be an integer <= 2147483647"),
        (
            lambda: downpour(start_after_version=-1),
            ValueError,
            "^start_after_version must be an integer >= 0, got -1$",
        ),
        (
            lambda: downpour(start_after_version=1.5),
            ValueError,
            "^start_after_version must be an integer >= 0, got 1.5$",
        ),
        (lambda: distbelief.JobConfig(cluster=5), TypeError, "^cluster must be a ClusterConfig"),
        (
            lambda: server_optimizer_factory("sgd", lr=float("nan")),
            ValueError,
            "^server lr must be a finite number >= 0, got nan$",
        ),
        (
            lambda: server_optimizer_factory("momentum", lr=0.1, momentum="0.9"),
            ValueError,
            "^server momentum must be in",
        ),
        (
            lambda: poll_shard_stats(["tcp://127.0.0.9:1"], float("nan")),
            ValueError,
            "^timeout_s must be a finite number > 0, got nan$",
        ),
        (lambda: plot_runs("runs/a", out_dir="x"), TypeError, "^run_dirs must be a list of two"),
        (lambda: ParameterServerClient(5, []), TypeError, "^addresses must be 'tcp://HOST:PORT"),
        (
            lambda: ParameterServerClient("tcp://127.0.0.9:1,,tcp://127.0.0.9:2", []),
            ValueError,
            "^the list 'tcp://127.0.0.9:1,,tcp://127.0.0.9:2' has an empty item$",
        ),
        (lambda: downpour(group=5), TypeError, "^group must be a str, got 5$"),
        (
            lambda: downpour(group="stage 0"),
            ValueError,
            "^parameter group name 'stage 0' must be 1-64 letters",
        ),
        (lambda: downpour(source_host=5), TypeError, "^source_host must be a str, got 5$"),
        (
            lambda: distbelief.DownpourSGD(
                net.parameters(), ps="tcp://127.0.0.9:1", retry_timeout_s=0, source_host="192.0.2.1"
            ),
            ValueError,
            "^source_host 192.0.2.1 is not an address of this machine",
        ),
        (lambda: downpour(model="net"), TypeError, "^model must be a torch.nn.Module, got str$"),
        (
            lambda: distbelief.ShardedEmbeddings(nn.EmbeddingBag(10, 4), ps="h:1", worker_id=5),
            TypeError,
            "^worker_id must be a str, got 5$",
        ),
        (lambda: downpour(worker_id=""), ValueError, "^worker_id is empty: give the replica's"),
        (
            lambda: distbelief.ShardedEmbeddings(nn.EmbeddingBag(10, 4), worker_id=""),
            ValueError,
            "^worker_id is empty: give the replica's",
        ),
        (
            lambda: downpour(on_push_applied="print"),
            TypeError,
            r"^on_push_applied must be a function \(or None\), got 'print'$",
        ),
        (
            lambda: distbelief.ShardedEmbeddings(nn.EmbeddingBag(10, 4), on_push_applied=0),
            TypeError,
            r"^on_push_applied must be a function \(or None\), got 0$",
        ),
        (lambda: build_model("lenet", (1, 32, 32), "10"), ValueError, "^num_classes must be an"),
        (lambda: build_model("lenet", (1, 32), 10), ValueError, "^input_shape must be .C, H, W."),
        (lambda: worker_indices("100", 0, 1), ValueError, "^num_samples must be an integer"),
        (lambda: worker_indices(100, 0, 1, seed="s"), ValueError, "^seed must be an integer"),
        (lambda: resolve_device("tpu"), ValueError, "^device 'tpu' is not a device name"),
        (lambda: resolve_device(None), TypeError, "^device must be a str or a torch.device"),
        (lambda: ParameterShard(0, 1.5, sgd), ValueError, "^num_shards must be an integer >= 1"),
        (lambda: ParameterShard(0, True, sgd), ValueError, "^num_shards must be an integer >= 1"),
        (lambda: ParameterShard(0, "2", sgd), ValueError, "^num_shards must be an integer >= 1"),
        (lambda: ParameterShard(0.0, 1, sgd), ValueError, "^shard_id must be an integer >= 0"),
        (lambda: ParameterShard(2, 2, sgd), ValueError, r"^shard_id 2 is not in \[0, 2\)$"),
        (
            lambda: ParameterShard(0, 1, sgd, num_workers=0),
            ValueError,
            "^num_workers must be an integer >= 1, got 0$",
        ),
        (lambda: ShardService("x"), TypeError, "^shard must be a ParameterShard, got str$"),
        (
            lambda: distbelief.DownpourSGD(
                net.parameters(), ps="tcp://127.0.0.9:1 tcp://127.0.0.9:2"
            ),
            ValueError,
            "^ps: 'tcp://127.0.0.9:1 tcp://127.0.0.9:2' holds a space: separate addresses with",
        ),
        (
            lambda: distbelief.DownpourSGD(net.parameters(), ps="tcp://127.0.0.9:99999"),
            ValueError,
            "^ps: address 'tcp://127.0.0.9:99999': port 99999 is out of range",
        ),
        (
            lambda: distbelief.DownpourSGD(net.parameters(), ps="tcp://127.0.0.9:0,127.0.0.9:1"),
            ValueError,
            "^ps: address 'tcp://127.0.0.9:0': port 0 cannot be connected to",
        ),
        (
            lambda: distbelief.DownpourSGD(
                net.parameters(), ps="tcp://nohost.invalid:7000", retry_timeout_s=0
            ),
            UnknownHostError,
            "^ps: host 'nohost.invalid' is not known here",
        ),
        (
            lambda: distbelief.ShardedEmbeddings(
                nn.Sequential(nn.EmbeddingBag(10, 4)),
                ps=["shm://nohost.invalid:7000"],
                retry_timeout_s=0,
            ),
            UnknownHostError,
            "^ps: host 'nohost.invalid' is not known here",
        ),
    ]


_NUM_BAD_ARGUMENTS = 76


def test_an_address_string_is_a_list_of_addresses_not_of_letters():
    import torch

    from distbelief.client import ParameterServerClient
    from distbelief.sharding import tensor_specs

    specs = tensor_specs([("w", torch.zeros(3))])
    client = ParameterServerClient("tcp://127.0.0.9:1,tcp://127.0.0.9:2", specs, retry_timeout_s=0)
    try:
        assert client.addresses == ["tcp://127.0.0.9:1", "tcp://127.0.0.9:2"]
    finally:
        client.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"base_versions": []},
            r"^base_versions must be one integer >= 0 per shard \(2\), got \[\]$",
        ),
        ({"base_versions": [1, 2, 3]}, "^base_versions must be one integer >= 0 per shard"),
        ({"base_versions": "ab"}, "^base_versions must be one integer >= 0 per shard"),
        ({"base_versions": [0, -1]}, "^base_versions must be one integer >= 0 per shard"),
        ({"after_versions": [1.5, 2]}, "^after_versions must be one integer >= 0 per shard"),
        ({"after_versions": 3}, "^after_versions must be one integer >= 0 per shard"),
        ({"clock": "x"}, "^clock must be an integer >= 0, got 'x'$"),
        ({"clock": 1.5}, "^clock must be an integer >= 0, got 1.5$"),
        ({"clock": None}, "^clock must be an integer >= 0, got None$"),
    ],
)
def test_a_push_or_pull_with_a_bad_clock_or_versions_is_refused_before_it_is_sent(options, message):
    import torch

    from distbelief.client import ParameterServerClient
    from distbelief.sharding import FlatLayout, tensor_specs

    specs = tensor_specs([("w", torch.zeros(3))])
    # Shards nobody serves, and no retry: a request that were sent would fail otherwise.
    client = ParameterServerClient("tcp://127.0.0.9:1,tcp://127.0.0.9:2", specs, retry_timeout_s=0)
    try:
        buffers = FlatLayout(specs).allocate()
        call = client.pull_now if "after_versions" in options else client.push_now
        with pytest.raises(ValueError, match=message):
            call(buffers, **options)
    finally:
        client.close()


def test_every_bad_argument_case_runs():
    assert len(_bad_arguments()) == _NUM_BAD_ARGUMENTS


@pytest.mark.parametrize("index", range(_NUM_BAD_ARGUMENTS))
def test_a_bad_argument_is_named_before_anything_is_started(index):
    call, error, message = _bad_arguments()[index]
    with pytest.raises(error, match=message):
        call()


def test_no_shard_address_names_both_ways_to_give_one(monkeypatch):
    from torch import nn

    monkeypatch.delenv("DISTBELIEF_PS", raising=False)
    with pytest.raises(ValueError, match=r"^no parameter-server address given: pass ps= or set "):
        distbelief.DownpourSGD(nn.Linear(2, 1).parameters())
    monkeypatch.setenv("DISTBELIEF_PS", " , ")
    with pytest.raises(ValueError, match=r"set DISTBELIEF_PS \(e\.g\. tcp://127\.0\.0\.1:7000\)"):
        distbelief.DownpourSGD(nn.Linear(2, 1).parameters())


def _public_classes() -> dict[str, type]:
    """Every class in ``__all__`` of the package and of each of its subpackages, by the name a
    user imports it under."""
    modules = ["distbelief"] + [
        f"distbelief.{info.name}"
        for info in pkgutil.iter_modules(distbelief.__path__)
        if info.ispkg
    ]
    classes: dict[str, type] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            if inspect.isclass(value) and value.__module__.startswith("distbelief"):
                classes.setdefault(f"{module_name}.{name}", value)
    return classes


def _public_methods(cls: type) -> list[str]:
    """The public methods and properties ``cls`` or a distbelief class it derives from defines
    (not those of torch's or the standard library's classes)."""
    names = set()
    for owner in cls.__mro__:
        if owner.__module__.startswith("distbelief"):
            names.update(
                name
                for name, value in vars(owner).items()
                if not name.startswith("_")
                and isinstance(value, property | staticmethod | classmethod | types.FunctionType)
            )
    return sorted(names)


def test_every_public_method_of_a_public_class_has_a_docstring():
    classes = _public_classes()
    assert "distbelief.launch.LocalCluster" in classes and "distbelief.DownpourSGD" in classes
    undocumented = [
        f"{name}.{method}"
        for name, cls in classes.items()
        for method in _public_methods(cls)
        if not inspect.getdoc(getattr(cls, method))
    ]
    assert undocumented == []
