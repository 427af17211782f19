"""ShardedEmbeddings names a bad argument before it swaps a module or connects (a typed error
that names it), takes its tables and addresses as a list or one comma-separated string, takes a
table's ids as an integer tensor or a list of ints, and refuses to be used after close()."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from distbelief.embeddings import (
    ShardedEmbedding,
    ShardedEmbeddingBag,
    ShardedEmbeddings,
    swap_embeddings,
)
from distbelief.embeddings import tables as tables_module
from distbelief.errors import ClosedError, ShardListError, ShardUnavailableError

ADDRESS = "tcp://127.0.0.1:1"


class _NoShards:
    """Stands in for RowClient, with no sockets: the handshake answers nothing, a pull answers
    zero rows, a push is dropped."""

    unreachable = False  # as RowClient's: no request has given up on a shard

    def __init__(self, addresses, tables, **_options) -> None:
        self.addresses, self.tables = list(addresses), dict(tables)

    def handshake(self) -> list[dict]:
        return []

    def start_pull(self, ids_by_table):
        rows = {
            name: torch.zeros(ids.numel(), self.tables[name]) for name, ids in ids_by_table.items()
        }
        return type("_Pulled", (), {"result": lambda self: rows})()

    def push(self, updates) -> list:
        return []

    def push_now(self, updates) -> None:
        pass

    def wait(self, futures) -> list:
        return []

    def close(self, wait: bool = True) -> None:
        pass


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.bag = nn.EmbeddingBag(10, 4)


@pytest.fixture
def no_shards(monkeypatch):
    monkeypatch.setattr(tables_module, "RowClient", _NoShards)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"row_cache_mb": float("nan")}, ValueError, "row_cache_mb must be a finite number >= 0"),
        ({"row_cache_mb": float("inf")}, ValueError, "row_cache_mb must be a finite number >= 0"),
        ({"row_cache_mb": "64"}, TypeError, "row_cache_mb must be a finite number >= 0"),
        ({"lr": "0.1"}, TypeError, "lr must be a finite number >= 0, got '0.1'"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number >= 0, got nan"),
        ({"ps": 123}, TypeError, "ps must be a str .* got 123"),
        ({"ps": [ADDRESS, 7]}, TypeError, "ps must be a str"),
        ({"tables": 5}, TypeError, "tables must be a str .* got 5"),
        ({"tables": ","}, ValueError, "tables must name at least one module"),
        ({"tables": "emb,,bag"}, ValueError, "^tables has an empty item in the list 'emb,,bag'$"),
        ({"tables": "emb,emb"}, ValueError, "^tables names 'emb' twice$"),
        ({"model": None}, TypeError, "model must be a torch.nn.Module, got NoneType"),
        ({"timeout_s": 0}, ValueError, "timeout_s must be a finite number > 0, got 0"),
        ({"n_push": True}, ValueError, "^n_push must be an integer >= 1, got True$"),
        ({"n_pull": True}, ValueError, "^n_pull must be an integer >= 1, got True$"),
        ({"n_pull": 0}, ValueError, "^n_pull must be an integer >= 1, got 0$"),
        ({"auth_key": 123}, TypeError, "^auth_key must be bytes or a str .* got 123$"),
        ({"blocking": "yes"}, TypeError, "^blocking must be True or False, got 'yes'$"),
        ({"blocking": 1}, TypeError, "^blocking must be True or False, got 1$"),
    ],
    ids=[
        *("cache-nan", "cache-inf", "cache-str", "lr-str", "lr-nan", "ps-int", "ps-item"),
        *(
            "tables-int",
            "tables-empty",
            "tables-gap",
            "tables-twice",
            "model-none",
            "timeout-zero",
            "push-bool",
            "pull-bool",
        ),
        *("pull-zero", "key-int", "blocking-str", "blocking-int"),
    ],
)
def test_a_bad_argument_is_named_before_anything_is_swapped(options, error, message, no_shards):
    model = _Model()
    arguments = {"model": model, "ps": ADDRESS, **options}
    with pytest.raises(error, match=message):
        ShardedEmbeddings(arguments.pop("model"), **arguments)
    assert isinstance(model.emb, nn.Embedding) and isinstance(model.bag, nn.EmbeddingBag)


def test_settings_from_the_environment_are_named_when_bad_or_missing(no_shards, monkeypatch):
    monkeypatch.delenv("DISTBELIEF_PS", raising=False)
    with pytest.raises(ValueError, match=r"^no parameter-server address given: pass ps= or set "):
        ShardedEmbeddings(_Model())
    monkeypatch.setenv("DISTBELIEF_TIMEOUT_S", "abc")
    with pytest.raises(ValueError, match=r"^DISTBELIEF_TIMEOUT_S 'abc': must be a finite number"):
        ShardedEmbeddings(_Model(), ps=ADDRESS)


def _state(model: nn.Module) -> list:
    """What a failed constructor must leave as it was: each module's path, type and settings,
    and each tensor of the state dict."""
    modules = [(name, type(module), repr(module)) for name, module in model.named_modules()]
    return [modules, {name: value.clone() for name, value in model.state_dict().items()}]


def _assert_same_state(before: list, after: list) -> None:
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    for name, value in before[1].items():
        assert torch.equal(after[1][name], value), name


class _Refusing(_NoShards):
    """A client whose shards refuse the handshake with ``error``."""

    error: Exception = ShardListError("shard 0 is shard 1 of 2")

    def handshake(self) -> list[dict]:
        raise self.error


@pytest.mark.parametrize("option", ["padding_idx", "max_norm", "scale_grad_by_freq"])
def test_a_refused_second_table_leaves_the_model_as_it_was(option, no_shards):
    model = _Model()
    model.later = nn.Embedding(10, 4, **{option: 0 if option == "padding_idx" else True})
    before = _state(model)
    with pytest.raises(ValueError, match=rf"^table later: {option} is not supported"):
        ShardedEmbeddings(model, ps=ADDRESS)
    _assert_same_state(before, _state(model))
    with pytest.raises(ValueError, match=rf"^table later: {option} is not supported"):
        swap_embeddings(model)
    _assert_same_state(before, _state(model))


def test_a_frozen_table_is_refused_by_name_and_leaves_the_model_as_it_was(no_shards):
    model = _Model()
    model.later = nn.Embedding.from_pretrained(torch.ones(10, 4), freeze=True)
    before = _state(model)
    message = r"^table later: a frozen weight \(requires_grad=False\) is not supported"
    with pytest.raises(ValueError, match=message):
        ShardedEmbeddings(model, ps=ADDRESS)
    _assert_same_state(before, _state(model))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_table_of_another_dtype_than_the_shards_rows_is_refused_by_name(dtype, no_shards):
    model = _Model()
    model.later = nn.Embedding(10, 4, dtype=dtype)
    before = _state(model)
    message = rf"^table later: a {dtype} weight \(the shards hold float32 rows\) is not"
    with pytest.raises(ValueError, match=message):
        ShardedEmbeddings(model, ps=ADDRESS)
    _assert_same_state(before, _state(model))


def test_a_module_built_by_hand_keeps_the_table_it_names(no_shards):
    model = _Model()
    model.users = ShardedEmbedding("user_ids", 10, 4)
    model.again = ShardedEmbeddingBag("user_ids", 10, 4, mode="sum")
    tables = ShardedEmbeddings(model, ps=ADDRESS, tables="users,again")
    assert tables.client.tables == {"user_ids": 4}
    tables.prefetch({"user_ids": [1, 2]})
    assert model.users(torch.tensor([1, 2])).shape == (2, 4)
    assert model.again(torch.tensor([[1, 2]])).shape == (1, 4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's imports' own
def test_prefetch_takes_a_table_by_its_module_path_too(no_shards):
    """``tables.modules`` is keyed by module path: a compiled model's (``_orig_mod.emb``) and a
    hand-built module's differ from their tables' names, and a loop that built its prefetch
    from ``tables.modules`` was refused (``table '_orig_mod.emb' was not declared``)."""
    compiled = torch.compile(_Model())  # the wrapper only: nothing is compiled before a call
    tables = ShardedEmbeddings(compiled, ps=ADDRESS)
    assert sorted(tables.modules) == ["_orig_mod.bag", "_orig_mod.emb"]
    tables.prefetch({path: [1, 2] for path in tables.modules})
    tables.prefetch_next({"_orig_mod.emb": [3]})
    assert sorted(tables._batch) == ["bag", "emb"]
    tables.prefetch({"emb": [1], "_orig_mod.emb": torch.tensor([[2], [5]])})  # one table
    assert tables._batch["emb"][0].tolist() == [1, 2, 5]
    model = _Model()
    model.users = ShardedEmbedding("user_ids", 10, 4)
    model.again = ShardedEmbeddingBag("user_ids", 10, 4, mode="sum")  # shares its rows
    by_hand = ShardedEmbeddings(model, ps=ADDRESS, tables="users,again")
    by_hand.prefetch({path: [4, 6 + i] for i, path in enumerate(by_hand.modules)})
    assert by_hand._batch["user_ids"][0].tolist() == [4, 6, 7]
    assert model.users(torch.tensor([4, 6])).shape == (2, 4)
    assert model.again(torch.tensor([[4, 7]])).shape == (1, 4)


@pytest.mark.parametrize("table", [nn.Embedding(10, 4), nn.EmbeddingBag(10, 4)])
def test_a_model_that_is_itself_a_table_is_refused_unless_sharded_already(table):
    with pytest.raises(ValueError, match=r"^the model is itself an Embedding(Bag)?, which cannot"):
        swap_embeddings(table)
    solo = ShardedEmbedding("solo", 10, 4)
    assert swap_embeddings(solo) == {"": solo}
    assert list(solo.children()) == []  # it was made its own child: state_dict() recursed
    assert solo.state_dict() == {}


def test_modules_sharing_a_table_with_another_width_are_refused(no_shards):
    model = _Model()
    model.users = ShardedEmbedding("user_ids", 10, 4)
    model.again = ShardedEmbedding("user_ids", 10, 8)
    before = _state(model)
    with pytest.raises(ValueError, match=r"^table 'user_ids': the modules at 'users' and 'again'"):
        ShardedEmbeddings(model, ps=ADDRESS)
    _assert_same_state(before, _state(model))


@pytest.mark.parametrize(
    ("refusal", "options"),
    [
        (ShardListError("shard 0 is shard 1 of 2"), {}),
        (ShardUnavailableError("shard 0: connection refused"), {}),
        (None, {"retry_timeout_s": float("nan")}),  # the client's own check, before connecting
    ],
    ids=["shard-list", "unavailable", "bad-retry-timeout"],
)
def test_a_failure_to_connect_leaves_the_model_as_it_was(refusal, options, monkeypatch):
    if refusal is not None:
        monkeypatch.setattr(_Refusing, "error", refusal)
        monkeypatch.setattr(tables_module, "RowClient", _Refusing)
    model = _Model()
    before = _state(model)
    with pytest.raises(type(refusal) if refusal else ValueError, match=str(refusal or "retry")):
        ShardedEmbeddings(model, ps=ADDRESS, **options)
    _assert_same_state(before, _state(model))
    model.emb(torch.tensor([1, 2]))  # still the model's own table


def test_a_dead_shard_leaves_the_model_as_it_was():
    model = _Model()
    before = _state(model)
    with pytest.raises(ShardUnavailableError, match="rows_hello failed"):
        ShardedEmbeddings(model, ps=ADDRESS, retry_timeout_s=0)  # nothing listens on port 1
    _assert_same_state(before, _state(model))


def test_tables_and_addresses_may_be_one_comma_separated_string(no_shards):
    tables = ShardedEmbeddings(_Model(), ps=f"{ADDRESS},tcp://127.0.0.1:2", tables="emb")
    assert list(tables.modules) == ["emb"]
    assert tables.client.addresses == [ADDRESS, "tcp://127.0.0.1:2"]
    assert list(ShardedEmbeddings(_Model(), ps=ADDRESS, tables="emb, bag").modules) == [
        "emb",
        "bag",
    ]


def test_ids_may_be_a_list_of_ints_and_are_refused_by_table_when_not_integers(no_shards):
    model = _Model()
    tables = ShardedEmbeddings(model, ps=ADDRESS)
    tables.prefetch({"emb": [1, 2, 2]})
    assert tables._batch["emb"][0].tolist() == [1, 2]
    for ids in ([1.5, 2.0], torch.tensor([1.5, 2.0]), "12"):
        with pytest.raises(TypeError, match="table 'emb': ids must be"):
            tables.prefetch({"emb": ids})
        with pytest.raises(TypeError, match="table 'emb': ids must be"):
            tables.prefetch_next({"emb": ids})
    with pytest.raises(TypeError, match=r"table 'emb': ids must be integers, got torch\.float32"):
        model.emb(torch.tensor([1.0]))


def test_ids_off_the_cpu_are_refused_by_table(no_shards):
    model = _Model()
    tables = ShardedEmbeddings(model, ps=ADDRESS)
    ids = torch.tensor([1, 2], device="meta")  # stands in for a GPU's: not where rows are served
    message = r"^table 'emb': ids must be on the CPU, where sharded tables serve their rows"
    for call in (
        lambda: model.emb(ids),
        lambda: tables.prefetch({"emb": ids}),
        lambda: tables.prefetch_next({"emb": ids}),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_every_call_after_close_raises_the_same_typed_error(no_shards):
    tables = ShardedEmbeddings(_Model(), ps=ADDRESS)
    tables.close()
    for call in (
        lambda: tables.step(),
        lambda: tables.prefetch({"emb": torch.tensor([1])}),
        lambda: tables.prefetch_next({"emb": torch.tensor([1])}),
        lambda: tables.flush(),
        lambda: tables.resume(0),
    ):
        with pytest.raises(ClosedError, match=r"^ShardedEmbeddings: \w+ after close\(\)$"):
            call()
    tables.close()  # closing twice still does nothing


def test_a_with_block_closes_the_tables(no_shards):
    with ShardedEmbeddings(_Model(), ps=ADDRESS) as tables:
        pass
    with pytest.raises(ClosedError, match=r"^ShardedEmbeddings: step after close\(\)$"):
        tables.step()


def test_a_deep_copy_of_a_model_shares_its_tables_and_pickling_is_refused_by_name(no_shards):
    model = _Model()
    tables = ShardedEmbeddings(model, ps=ADDRESS)
    twin = copy.deepcopy(model)
    assert twin is not model and twin.emb is not model.emb
    assert twin.emb.source is tables and twin.bag.source is tables
    assert twin.emb(torch.tensor([1, 2])).shape == (2, 4)
    with pytest.raises(TypeError, match=r"^cannot pickle table 'emb': its rows live on the shards"):
        pickle.dumps(model)
    for action in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(
            TypeError, match=r"^cannot pickle or copy a ShardedEmbeddings \(tables 'emb', 'bag'\)"
        ):
            action(tables)
    detached = ShardedEmbedding("users", 10, 4)
    assert pickle.loads(pickle.dumps(detached)).table == "users"
