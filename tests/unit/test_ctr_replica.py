"""The click worker's replica: tables on the meta device (their rows are the shards'), those
``--tables`` leaves out built for real as dense parameters, unknown names refused by name; the
command line's table count of each click log is the log's; a table of another size than the
shards' is told the flag its size came from."""

import pytest
import torch

from distbelief.config import CLICK_LOG_TABLES, JobConfig
from distbelief.data.criteo import NUM_CATEGORICAL
from distbelief.data.ctr import CtrDataset
from distbelief.data.loading import table_size_source
from distbelief.data.movielens import load_movielens
from distbelief.data.synthetic_ctr import make_synthetic_ctr
from distbelief.embeddings import swap_embeddings
from distbelief.worker.ctr import build_ctr_replica, table_columns


def _clicks(num_tables: int = 3, table_size: int = 20_000_000) -> CtrDataset:
    return CtrDataset(
        dense=torch.zeros(4, 2),
        sparse=torch.zeros(4, num_tables, dtype=torch.int64),
        labels=torch.tensor([0.0, 1.0, 0.0, 1.0]),
        name="synthetic-ctr",
        table_sizes=(table_size,) * num_tables,
    )


def _config(**fields) -> JobConfig:
    return JobConfig.from_fields(
        {"model.name": "dlrm", "data.name": "synthetic-ctr", "model.embedding_dim": 4, **fields}
    )


def test_every_table_is_on_the_meta_device_by_default():
    model = build_ctr_replica(_config(), _clicks())
    assert all(table.weight.is_meta for table in model.tables)


def test_tables_left_out_of_the_list_are_dense_parameters():
    config = _config(**{"embeddings.tables": "tables.0,tables.2"})
    model = build_ctr_replica(config, _clicks(3, table_size=1000))
    assert [table.weight.is_meta for table in model.tables] == [True, False, True]
    swapped = swap_embeddings(model, ["tables.0", "tables.2"])
    assert sorted(swapped) == ["tables.0", "tables.2"]


def test_table_columns_follow_the_module_names():
    class Holder:
        modules = {"tables.0": None, "tables.11": None}

    assert table_columns(Holder()) == {"tables.0": 0, "tables.11": 11}


def test_an_unknown_table_is_refused_by_name():
    with pytest.raises(ValueError, match=r"--tables: .* no table 'tables.7' \(it has tables.0"):
        build_ctr_replica(_config(**{"embeddings.tables": "tables.7"}), _clicks(3))


def test_the_command_lines_table_counts_are_the_click_logs(tmp_path):
    # --tables is checked against CLICK_LOG_TABLES before any process loads a log.
    (tmp_path / "movielens").mkdir()
    (tmp_path / "movielens" / "u.data").write_text("1\t2\t4\t10\n3\t4\t2\t11\n")
    counts = {
        "synthetic-ctr": make_synthetic_ctr("test", 8).num_tables,
        "criteo": NUM_CATEGORICAL,
        "movielens": load_movielens("train", tmp_path).num_tables,
    }
    assert counts == CLICK_LOG_TABLES


@pytest.mark.parametrize(
    ("fields", "told"),
    [
        ({"data.name": "synthetic-ctr"}, "give the job's --table-size"),
        ({"data.name": "criteo", "data.table_size": 1000}, "give the job's --table-size"),
        ({"data.name": "criteo"}, "without --table-size keeps every raw id: give the job's"),
        ({"data.name": "movielens", "data.data_dir": "ml"}, "(this process read ml): give the"),
    ],
)
def test_a_table_of_another_size_is_told_the_flag_its_size_came_from(fields, told):
    # The shards' refusal names the table and both sizes; the process adds where its came from.
    config = JobConfig.from_fields({"model.name": "dlrm", **fields})
    assert told in table_size_source(config.data)


def test_an_evaluation_pass_of_wide_rows_takes_fewer_samples():
    """4096 test samples of 26 rows 65536 floats wide were 28 GB in one pass (the evaluator
    of a job at the widest --embedding-dim grew past 10 GB): a pass's rows stay within
    EVAL_BATCH_ROW_BYTES."""
    from distbelief.evaluator.ctr import EVAL_BATCH_ROW_BYTES, EVAL_BATCH_SIZE, samples_per_pass

    assert samples_per_pass([16] * 26) == EVAL_BATCH_SIZE
    wide = samples_per_pass([65536] * 26)
    assert wide == 39 and wide * 26 * 65536 * 4 <= EVAL_BATCH_ROW_BYTES
    assert samples_per_pass([1 << 40]) == 1  # at least one sample, however wide
