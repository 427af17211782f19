"""The job config: sections validate their fields, errors name ``section.field``, config.json
round-trips, and a flat config.json of an older run still reads as the same job."""

import dataclasses
import json

import pytest

from distbelief.config import (
    FLAT_FIELDS,
    MAX_RATE,
    MAX_WAIT_S,
    ConsistencyConfig,
    JobConfig,
    OptimizerConfig,
    amount_problem,
    check_count,
    dotted_fields,
    is_amount,
)
from distbelief.errors import ConfigFieldError
from distbelief.launch.cli import main


@pytest.mark.parametrize(
    ("values", "field", "problem"),
    [
        ({"cluster.num_workers": 0}, "cluster.num_workers", "must be an integer >= 1, got 0"),
        (
            {"cluster.shard_hosts": ("127.0.0.2", "127.0.0.3:7000")},
            "cluster.shard_hosts",
            "must be IP addresses or host names (without a port or scheme), got '127.0.0.3:7000'",
        ),
        (
            {"cluster.worker_host": "127.0.0.300"},
            "cluster.worker_host",
            "must be an IP address or host name (without a port or scheme), got '127.0.0.300'",
        ),
        ({"optimizer.lr": -1.0}, "optimizer.lr", "must be a finite number >= 0, got -1.0"),
        (
            {"model.name": "resnet"},
            "model.name",
            "must be one of lenet, alexnet, mlp, wide-mlp, wide-cnn",
        ),
        ({"server.momentum": 1.0}, "server.momentum", "must be in [0, 1), got 1.0"),
        ({"server.betas": (0.9, 1.5)}, "server.betas", "two numbers in [0, 1)"),
        (
            {"server.momentum": 0.5},
            "server.momentum",
            "only applies to server optimizer momentum, not 'sgd'",
        ),
        (
            {"server.optimizer": "adagrad", "server.betas": (0.8, 0.9)},
            "server.betas",
            "only applies to server optimizer adam, not 'adagrad'",
        ),
        (
            {"server.optimizer": "momentum", "server.eps": 1e-6},
            "server.eps",
            "only applies to server optimizer adagrad or adam, not 'momentum'",
        ),
        ({"faults.timeout_s": 0.0}, "faults.timeout_s", "must be a finite number > 0, got 0.0"),
        ({"optimizer.steps": 3, "optimizer.epochs": 2}, "optimizer.epochs", "with steps"),
        (
            {"consistency.sync": True, "consistency.max_staleness": 2},
            "consistency.max_staleness",
            "sync rounds",
        ),
        (
            {"consistency.sync": True, "consistency.backup_workers": 2},
            "consistency.backup_workers",
            "must be < the number of workers (2), got 2",
        ),
        (
            {"consistency.sync": True, "optimizer.warmstart_steps": 5},
            "optimizer.warmstart_steps",
            "needs asynchronous training",
        ),
        (
            {"consistency.sync": True, "optimizer.n_push": 5},
            "optimizer.n_push",
            "must be 1 with sync rounds (they push and pull every step), got 5",
        ),
        (
            {"consistency.sync": True, "optimizer.n_pull": 3},
            "optimizer.n_pull",
            "must be 1 with sync rounds (they push and pull every step), got 3",
        ),
        ({"pipeline.num_partitions": 0}, "pipeline.num_partitions", "an integer >= 1, got 0"),
        (
            {"pipeline.num_partitions": 3, "pipeline.split_points": (4,)},
            "pipeline.split_points",
            "must be 2 layer indices for 3 partitions, got 4",
        ),
        (
            {"pipeline.num_partitions": 2, "pipeline.split_points": (4, 6)},
            "pipeline.split_points",
            "must be 1 layer index for 2 partitions, got 4,6",
        ),
        (
            {"pipeline.split_points": "3,x"},
            "pipeline.split_points",
            "must be integers like 3,7, got '3,x'",
        ),
        (
            {
                "optimizer.batch_size": 8,
                "pipeline.num_partitions": 2,
                "pipeline.num_micro_batches": 9,
            },
            "pipeline.num_micro_batches",
            "must be <= the batch size (8), got 9",
        ),
        (
            {"pipeline.split_points": "3"},
            "pipeline.split_points",
            "only applies to partitioned replicas (partitions > 1), got 3",
        ),
        (
            {"pipeline.schedule": "gpipe"},
            "pipeline.schedule",
            "only applies to partitioned replicas (partitions > 1), got gpipe",
        ),
        (
            {"pipeline.num_micro_batches": 4},
            "pipeline.num_micro_batches",
            "only applies to partitioned replicas (partitions > 1), got 4",
        ),
        (
            {"consistency.backup_workers": 1},
            "consistency.backup_workers",
            "only applies to sync rounds, got 1",
        ),
        (
            {"consistency.dc_lambda": 0.1},
            "consistency.dc_lambda",
            "only applies to staleness policy dc-asgd, not 'none'",
        ),
        (
            {"consistency.staleness_policy": "dc-asgd", "consistency.dc_lambda": -1.0},
            "consistency.dc_lambda",
            "must be a finite number >= 0, got -1.0",
        ),
        (
            {"model.name": "dlrm", "data.name": "synthetic-ctr", "embeddings.tables": "nope"},
            "embeddings.tables",
            "'nope' is not a table of model dlrm",
        ),
        (
            {"optimizer.algorithm": "sandblaster", "pipeline.num_partitions": 2},
            "pipeline.num_partitions",
            "only applies to algorithm downpour",
        ),
        ({"pipeline.max_stage_bytes": 0}, "pipeline.max_stage_bytes", "an integer >= 1, got 0"),
        (
            {"model.name": "dlrm", "data.name": "synthetic-ctr", "embeddings.row_ttl_steps": 2**63},
            "embeddings.row_ttl_steps",
            "must be <= 9223372036854775807, got 9223372036854775808",
        ),
        (
            {"model.name": "dlrm", "embeddings.max_rows_per_shard": 10**20},
            "embeddings.max_rows_per_shard",
            "must be <= 9223372036854775807, got 100000000000000000000",
        ),
        (
            {"cluster.threads_per_worker": 100_000},
            "cluster.threads_per_worker",
            "must be <= 1024, got 100000",
        ),
        ({"server.threads": 1025}, "server.threads", "must be <= 1024, got 1025"),
        (
            {"model.name": "dlrm", "data.name": "synthetic-ctr", "data.table_size": 2**31 + 1},
            "data.table_size",
            "must be <= 2147483648 (2**31), got 2147483649",
        ),
        (
            # Past 2**63 the bound of any size was named (9223372036854775807), not this one.
            {"model.name": "dlrm", "data.name": "synthetic-ctr", "data.table_size": 10**20},
            "data.table_size",
            "must be <= 2147483648 (2**31), got 100000000000000000000",
        ),
        (
            {"model.name": "dlrm", "data.name": "criteo", "data.table_size": 10**18},
            "data.table_size",
            "must be <= 144115188075855871: a table of 1000000000000000000 rows of 16 values",
        ),
    ],
)
def test_a_bad_value_names_its_section_and_field(values, field, problem):
    with pytest.raises(ConfigFieldError) as caught:
        JobConfig.from_fields(values)
    assert caught.value.field == field
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{field} ")


def test_a_table_as_large_as_torch_can_size_is_taken():
    largest = {"model.name": "dlrm", "data.name": "criteo", "model.embedding_dim": 1}
    config = JobConfig.from_fields({**largest, "data.table_size": (2**63 - 1) // 4})
    assert config.data.table_size == (2**63 - 1) // 4
    synthetic = {"model.name": "dlrm", "data.name": "synthetic-ctr", "data.table_size": 2**31}
    assert JobConfig.from_fields(synthetic).data.table_size == 2**31


def test_a_section_alone_names_its_field():
    with pytest.raises(ConfigFieldError, match=r"^n_push must be an integer >= 1, got 0$"):
        OptimizerConfig(n_push=0)
    with pytest.raises(ConfigFieldError, match="staleness_policy"):
        ConsistencyConfig(staleness_policy="magic")


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match=r"'optimizer\.momentum'"):
        JobConfig.from_fields({"optimizer.momentum": 0.9})
    with pytest.raises(ValueError, match="'lr'"):
        JobConfig.from_fields({"lr": 0.1})
    for key in (5, None, ("cluster", "num_workers")):  # not an AttributeError
        with pytest.raises(ValueError, match=r"^unknown config field .*: a field is named"):
            JobConfig.from_fields({key: 1})


def test_json_round_trip_is_sectioned(tmp_path):
    config = JobConfig.from_fields(
        {"server.optimizer": "adam", "server.betas": (0.8, 0.9), "cluster.num_workers": 3}
    )
    raw = json.loads(config.to_json())
    assert raw["cluster"]["num_workers"] == 3
    assert raw["server"]["betas"] == [0.8, 0.9]
    (tmp_path / "config.json").write_text(config.to_json())
    assert JobConfig.from_file(tmp_path / "config.json") == config


def test_flat_config_of_an_older_run_reads_as_the_same_job(tmp_path):
    config = JobConfig.from_fields(
        {
            **{"model.name": "mlp", "data.name": "mnist", "server.optimizer": "adam"},
            **{"server.lr": 0.2, "server.betas": (0.8, 0.9)},
        }
    )
    flat = {old: config.to_fields()[new] for old, new in FLAT_FIELDS.items()}
    # Every field that runs wrote before the sections has its old name; later fields keep
    # their defaults when an old config.json is read.
    newer = {"consistency.apply_worker_lr", "optimizer.algorithm", "data.table_size"}
    newer |= {"model.embedding_dim", "cluster.device", "optimizer.wire_dtype"}
    newer |= {"optimizer.push_compression"}
    newer |= {"cluster.shard_hosts", "cluster.worker_host"}
    newer |= {"server.design", "server.max_connections", "server.threads"}
    newer |= {"cluster.transport"}
    newer |= {"cluster.engine", "cluster.ray_address"}
    newer |= {"reporting.draw_plots"}
    newer |= {
        path
        for path in config.to_fields()
        if path.startswith(("sandblaster.", "pipeline.", "embeddings."))
    }
    assert set(FLAT_FIELDS.values()) == set(config.to_fields()) - newer
    (tmp_path / "config.json").write_text(json.dumps(flat))
    assert JobConfig.from_file(tmp_path / "config.json") == config


def test_bad_config_file_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"cluster": {"num_workers": 0}}))
    with pytest.raises(ValueError, match=r"config\.json: .*cluster\.num_workers"):
        JobConfig.from_file(path)


def test_dotted_fields_reads_both_shapes_and_keeps_unknown_keys():
    assert dotted_fields({"model": {"name": "mlp"}, "lr": 0.1, "other": 1}) == {
        "model.name": "mlp",
        "optimizer.lr": 0.1,
        "other": 1,
    }


def test_with_fields_validates_again():
    config = JobConfig().with_fields({"reporting.out_dir": "runs/x"})
    assert config.reporting.out_dir == "runs/x"
    assert dataclasses.replace(config, reporting=JobConfig().reporting) == JobConfig()
    with pytest.raises(ConfigFieldError, match=r"cluster\.num_shards"):
        config.with_fields({"cluster.num_shards": 0})


def _float_fields() -> list[tuple[str, str]]:
    """(section, field) of every float field of the job config."""
    return [
        (section.name, item.name)
        for section in dataclasses.fields(JobConfig)
        for item in dataclasses.fields(section.default_factory)
        if str(item.type).removesuffix(" | None") == "float"
    ]


def test_the_float_fields_are_found():
    found = _float_fields()
    for known in (("sandblaster", "step_size"), ("embeddings", "row_cache_mb"), ("server", "eps")):
        assert known in found


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize(("section", "name"), _float_fields())
def test_no_float_field_takes_an_infinity_or_nan(section, name, value):
    with pytest.raises(ConfigFieldError) as caught:
        JobConfig.from_fields({f"{section}.{name}": value})
    assert caught.value.field == f"{section}.{name}"
    assert caught.value.problem.endswith(f"got {value!r}")


def test_an_amount_is_a_finite_number():
    assert is_amount(0.5) and is_amount(3) and is_amount(0.0, zero_ok=True)
    for value in (0.0, -1.0, float("inf"), float("nan"), True, "1", None):
        assert not is_amount(value), value
    assert not is_amount(float("inf"), zero_ok=True)


def test_row_settings_for_a_model_without_tables_are_refused_where_the_model_is_chosen():
    config = JobConfig.from_fields({"embeddings.row_optimizer": "adagrad"})  # a shard's
    with pytest.raises(ConfigFieldError, match="only applies to model dlrm, not 'lenet'"):
        config.check_row_settings_apply()
    dlrm = {"model.name": "dlrm", "data.name": "synthetic-ctr"}
    JobConfig.from_fields(
        {**dlrm, "embeddings.row_optimizer": "adagrad"}
    ).check_row_settings_apply()
    JobConfig.from_fields({}).check_row_settings_apply()
    with pytest.raises(ConfigFieldError, match="only applies to model dlrm, not 'mlp'") as caught:
        JobConfig.from_fields(
            {"model.name": "mlp", "model.embedding_dim": 8}
        ).check_row_settings_apply()
    assert caught.value.field == "model.embedding_dim"
    JobConfig.from_fields({**dlrm, "model.embedding_dim": 8}).check_row_settings_apply()
    # Another model's --tables is refused as a flag of dlrm's, whatever names it lists.
    with pytest.raises(ConfigFieldError, match="only applies to model dlrm, not 'mlp'") as caught:
        JobConfig.from_fields(
            {"model.name": "mlp", "embeddings.tables": ["layers.1"]}
        ).check_row_settings_apply()
    assert caught.value.field == "embeddings.tables"


@pytest.mark.parametrize(
    ("dataset", "tables", "problem"),
    [
        (
            "synthetic-ctr",
            "tables.0,tables.99",
            "the dlrm model of synthetic-ctr has no table 'tables.99' (it has tables.0 .. "
            "tables.25)",
        ),
        ("criteo", "tables.26", "criteo has no table 'tables.26'"),
        (
            "movielens",
            "tables.2",
            "movielens has no table 'tables.2' (it has tables.0 .. tables.1)",
        ),
    ],
)
def test_a_table_the_click_log_lacks_is_refused_where_the_model_is_chosen(dataset, tables, problem):
    config = JobConfig.from_fields(
        {"model.name": "dlrm", "data.name": dataset, "embeddings.tables": tables}
    )
    with pytest.raises(ConfigFieldError) as caught:
        config.check_row_settings_apply()
    assert caught.value.field == "embeddings.tables"
    assert problem in caught.value.problem
    last = {"synthetic-ctr": "tables.25", "criteo": "tables.25", "movielens": "tables.1"}[dataset]
    # criteo's tables left out are dense: folded by --table-size (raw, they would be refused).
    folded = {"data.table_size": 1000} if dataset == "criteo" else {}
    config.with_fields(
        {"embeddings.tables": f"tables.0,{last}", **folded}
    ).check_row_settings_apply()


@pytest.mark.parametrize(("section", "name"), _float_fields())
def test_no_float_field_takes_a_number_too_large_for_its_use(section, name):
    # 1e308 is finite, but overflows a float32 rate, a clock's deadline or a size in bytes.
    with pytest.raises(ConfigFieldError) as caught:
        JobConfig.from_fields({f"{section}.{name}": 1e308})
    assert caught.value.field == f"{section}.{name}"


def test_an_amount_may_have_a_ceiling():
    assert is_amount(MAX_WAIT_S, most=MAX_WAIT_S) and not is_amount(MAX_WAIT_S + 1, most=MAX_WAIT_S)
    assert amount_problem(MAX_WAIT_S + 1, most=MAX_WAIT_S) == "must be <= 604800"
    assert amount_problem(-1.0, most=MAX_WAIT_S) == "must be a finite number > 0"
    assert amount_problem(0.5, most=MAX_WAIT_S) is None
    assert not is_amount(1e39, zero_ok=True, most=MAX_RATE)


@pytest.mark.parametrize("section", [item.name for item in dataclasses.fields(JobConfig)])
def test_a_section_of_the_wrong_type_is_a_type_error_naming_it(section):
    section_type = type(getattr(JobConfig(), section)).__name__
    with pytest.raises(TypeError, match=rf"^{section} must be a {section_type}, got 5$"):
        JobConfig(**{section: 5})
    with pytest.raises(TypeError, match=rf"^{section} must be a {section_type}, got \{{\}}$"):
        JobConfig(**{section: {}})  # a section's fields as a dict: from_fields takes those


@pytest.mark.parametrize(
    ("value", "least", "problem"),
    [
        (True, 1, "an integer >= 1, got True"),
        (0, 1, "an integer >= 1, got 0"),
        (-1, 0, "an integer >= 0, got -1"),
        (1.5, 0, "an integer >= 0, got 1.5"),
        (2**31, 0, "an integer <= 2147483647, got 2147483648"),
    ],
)
def test_a_count_is_an_int_in_range_and_never_a_bool(value, least, problem):
    with pytest.raises(ValueError, match=rf"^n_push must be {problem}$"):
        check_count("n_push", value, least=least)
    check_count("n_push", least, least=least)


@pytest.mark.parametrize(
    "field",
    [
        "data.table_size",
        "sandblaster.portions",
        "pipeline.max_stage_bytes",
        "embeddings.max_rows_per_shard",
        "embeddings.row_ttl_steps",
        "faults.max_restarts",
    ],
)
@pytest.mark.parametrize("value", [2.5, True, "3", [3]])
def test_an_integer_field_refuses_any_other_type_naming_itself(field, value):
    # config.json may hold any JSON value; a float or a text must not pass for an integer.
    with pytest.raises(ConfigFieldError) as caught:
        JobConfig.from_fields({field: value})
    assert caught.value.field == field
    assert caught.value.problem.startswith("must be an integer >= ")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("cluster.shard_hosts", 5, "must be a list of IP addresses or host names"),
        ("cluster.shard_hosts", "127.0.0.2", "must be a list of IP addresses or host names"),
        ("cluster.shard_hosts", (5,), "must be IP addresses or host names"),
        ("cluster.worker_host", 5, "must be an IP address or host name"),
        ("server.momentum", "0.5", "must be in [0, 1)"),
        ("server.momentum", None, "must be in [0, 1)"),
        ("server.betas", 0.9, "must be two numbers in [0, 1)"),
        ("server.betas", ("0.9", 0.99), "must be two numbers in [0, 1)"),
        ("pipeline.split_points", 3, "must be integers like 3,7"),
        ("pipeline.split_points", (1.5,), "must be integers like 3,7"),
        ("pipeline.split_points", (True,), "must be integers like 3,7"),
        ("embeddings.tables", 3, "must be module names like a,b"),
        ("data.data_dir", 5, "must be a string, got 5"),
        ("reporting.out_dir", ["runs"], "must be a string, got ['runs']"),
        ("cluster.host", 5, "must be a string, got 5"),
        ("cluster.ray_address", None, "must be a string, got None"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_naming_itself(field, value, problem):
    values = {field: value}
    if field == "pipeline.split_points":
        values["pipeline.num_partitions"] = 2
    with pytest.raises(ConfigFieldError) as caught:
        JobConfig.from_fields(values)
    assert caught.value.field == field
    assert caught.value.problem.startswith(problem)


def test_a_resumed_config_with_a_number_for_a_path_is_refused_in_one_line(tmp_path, capsys):
    # It passed for a path, and the launcher's check of the data files raised a TypeError.
    raw = json.loads(JobConfig().to_json())
    raw["data"]["data_dir"] = 5
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert main(["train", "--resume", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        f"distbelief train: error: argument --resume: {tmp_path / 'config.json'}: not a valid "
        "run config: data.data_dir must be a string, got 5"
    ]


def test_split_points_are_read_from_text_a_list_or_a_tuple():
    for points in ("3", [3], (3,), ["3"]):
        config = JobConfig.from_fields(
            {"pipeline.num_partitions": 2, "pipeline.split_points": points}
        )
        assert config.pipeline.split_points == (3,)
