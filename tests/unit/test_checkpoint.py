"""Shard checkpoints: round trip, restore continues exactly, corruption is named, writes are
atomic."""

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distbelief.errors import CheckpointError
from distbelief.files import sha256_file
from distbelief.sealed_json import write_sealed_json
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.server import checkpoint as checkpoint_module
from distbelief.server.checkpoint import (
    Checkpointer,
    check_tensor_file,
    load_checkpoint,
    save_checkpoint,
)
from distbelief.sharding import (
    FlatLayout,
    FlatPartitioner,
    RowAlignedPartitioner,
    TensorSpec,
    specs_to_json,
)

SPECS = [TensorSpec("w", (9, 5), torch.float32), TensorSpec("b", (5,), torch.float32)]


def _shard(name: str, shard_id: int = 1, num_shards: int = 2) -> ParameterShard:
    torch.manual_seed(0)
    flats = FlatLayout(SPECS).flatten([torch.randn(spec.shape) for spec in SPECS])
    shard = ParameterShard(shard_id, num_shards, server_optimizer_factory(name, lr=0.05))
    pieces = FlatPartitioner().partition(SPECS, num_shards)[shard_id]
    shard.initialize(SPECS, [flats[p.dtype][p.start : p.stop] for p in pieces])
    return shard


def _push(shard: ParameterShard, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.numel, generator=generator) for p in shard.slices]
    shard.push(grads, worker="w", seq=("s", seed))


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam"])
def test_restored_shard_continues_exactly_like_the_original(tmp_path, name):
    original = _shard(name)
    for seed in range(3):
        _push(original, seed)
    save_checkpoint(original.snapshot(), tmp_path)
    restored = ParameterShard(1, 2, server_optimizer_factory(name, lr=0.05))
    restored.restore(load_checkpoint(tmp_path, 1))
    assert restored.version == original.version == 3
    for seed in range(3, 6):
        _push(original, seed)
        _push(restored, seed)
    for a, b in zip(original.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)


def test_restored_shard_still_deduplicates_retried_pushes(tmp_path):
    shard = _shard("sgd")
    _push(shard, 7)
    save_checkpoint(shard.snapshot(), tmp_path)
    restored = ParameterShard(1, 2, server_optimizer_factory("sgd", lr=0.05))
    restored.restore(load_checkpoint(tmp_path, 1))
    _push(restored, 7)  # the same (session, number): a retry, not a new gradient
    assert restored.version == 1


def test_no_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path, 0) is None


def test_corrupt_tensor_file_is_named(tmp_path):
    save_checkpoint(_shard("sgd").snapshot(), tmp_path)
    tensor_file = next(tmp_path.glob("shard1-v*.safetensors"))
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(tensor_file.name)):
        load_checkpoint(tmp_path, 1)


def test_garbled_metadata_and_missing_tensor_file_are_named(tmp_path):
    save_checkpoint(_shard("sgd").snapshot(), tmp_path)
    meta = tmp_path / "shard1.json"
    next(tmp_path.glob("shard1-v*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path, 1)
    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"shard1\.json"):
        load_checkpoint(tmp_path, 1)


def test_checkpoint_of_another_shard_or_optimizer_is_refused(tmp_path):
    save_checkpoint(_shard("sgd").snapshot(), tmp_path)
    state = load_checkpoint(tmp_path, 1)
    with pytest.raises(ValueError, match="shard 1 of 2, not shard 1 of 3"):
        ParameterShard(1, 3, server_optimizer_factory("sgd", lr=0.1)).restore(state)
    with pytest.raises(ValueError, match="SGD state, this shard runs Adam"):
        ParameterShard(1, 2, server_optimizer_factory("adam", lr=0.1)).restore(state)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    shard = _shard("sgd")
    save_checkpoint(shard.snapshot(), tmp_path)
    before = json.loads((tmp_path / "shard1.json").read_text())
    _push(shard, 1)

    def broken_save(tensors, path):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(shard.snapshot(), tmp_path)
    assert json.loads((tmp_path / "shard1.json").read_text()) == before
    assert load_checkpoint(tmp_path, 1).version == 0
    assert not list(tmp_path.glob(".*tmp"))


def test_checkpointer_saves_at_once_then_on_change_and_at_stop(tmp_path):
    shard = _shard("sgd")
    checkpointer = Checkpointer(shard, tmp_path, every_s=0.2).start()
    try:
        # The first save is the checkpointer thread's: on a busy machine it can take seconds.
        deadline = time.monotonic() + 60
        while not (tmp_path / "shard1.json").exists():
            assert time.monotonic() < deadline, "no checkpoint saved at the start"
            time.sleep(0.05)
        assert load_checkpoint(tmp_path, 1).version == 0
        _push(shard, 1)
    finally:
        checkpointer.stop()
    assert load_checkpoint(tmp_path, 1).version == 1
    assert len(list(tmp_path.glob("shard1-v*.safetensors"))) == 1


def test_store_round_trip_keeps_extra_named_vectors_and_values(tmp_path):
    shard = _shard("momentum")
    _push(shard, 0)
    direction = shard.store.add("sandblaster.direction")
    torch.manual_seed(1)
    for tensor in direction:
        tensor.copy_(torch.randn_like(tensor))
    shard.store.add("scratch", persistent=False)
    shard.store.values["sandblaster.rho"] = [0.5, 0.125]
    save_checkpoint(shard.snapshot(), tmp_path)
    restored = ParameterShard(1, 2, server_optimizer_factory("momentum", lr=0.05))
    restored.restore(load_checkpoint(tmp_path, 1))
    assert restored.store.names() == ["param", "sandblaster.direction"]
    for saved, again in zip(direction, restored.store.get("sandblaster.direction"), strict=True):
        assert torch.equal(saved, again)
    assert restored.store.values == {"sandblaster.rho": [0.5, 0.125]}
    _push(shard, 1)
    _push(restored, 1)
    for a, b in zip(shard.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)


def _write_format1_checkpoint(directory, shard: ParameterShard) -> None:
    """A checkpoint as format 1 wrote it: param.I and optim.I.KEY tensors, flat metadata."""
    tensor_name = f"shard1-v{shard.version:012d}.safetensors"
    optimizer_state = shard.store.optimizer.state_dict()["state"]
    tensors = {f"param.{i}": p.clone() for i, p in enumerate(shard.store.params)}
    tensors.update(
        {
            f"optim.{i}.{key}": value.clone()
            for i, entries in optimizer_state.items()
            for key, value in entries.items()
        }
    )
    save_file(tensors, str(directory / tensor_name))
    meta = {
        "format": 1,
        "shard_id": 1,
        "num_shards": 2,
        "specs": specs_to_json(SPECS),
        "num_params": len(shard.store.params),
        "optimizer": "Adagrad",
        "optimizer_plain_state": {},
        "version": shard.version,
        "num_pushes": shard.counters().num_pushes,
        "last_push": {k: list(v) for k, v in shard.last_push.items()},
        "tensor_file": tensor_name,
        "tensor_sha256": sha256_file(directory / tensor_name),
    }
    (directory / "shard1.json").write_text(json.dumps(meta))


def test_format1_checkpoint_is_still_restored(tmp_path):
    original = _shard("adagrad")
    for seed in range(2):
        _push(original, seed)
    _write_format1_checkpoint(tmp_path, original)
    restored = ParameterShard(1, 2, server_optimizer_factory("adagrad", lr=0.05))
    restored.restore(load_checkpoint(tmp_path, 1))
    assert restored.version == 2
    _push(restored, 1)  # a retry of an applied push: deduplicated after the restore too
    assert restored.version == 2
    _push(original, 5)
    _push(restored, 5)
    for a, b in zip(original.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_of_another_partitioner_is_refused(tmp_path):
    save_checkpoint(_shard("sgd").snapshot(), tmp_path)
    shard = ParameterShard(
        1, 2, server_optimizer_factory("sgd", lr=0.05), partitioner=RowAlignedPartitioner()
    )
    with pytest.raises(ValueError, match=r"partitioned with .*flat.* this shard partitions"):
        shard.restore(load_checkpoint(tmp_path, 1))


def test_unknown_format_is_named(tmp_path):
    save_checkpoint(_shard("sgd").snapshot(), tmp_path)
    meta_path = tmp_path / "shard1.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(CheckpointError, match="unknown format 99"):
        load_checkpoint(tmp_path, 1)


def test_a_failing_first_save_is_retried_at_the_interval_not_at_every_poll(tmp_path):
    """A checkpoint folder that cannot be written costs one error per interval, not a log
    line every poll (about 10 a second) for the shard's whole life."""
    attempts = []

    def failing_save(state, directory):
        attempts.append(time.monotonic())
        raise OSError("read-only file system")

    checkpointer = Checkpointer(_shard("sgd"), tmp_path, every_s=60.0, save=failing_save)
    checkpointer.start()
    try:
        deadline = time.monotonic() + 30.0
        while not attempts and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # ten polls
        periodic_attempts = len(attempts)
    finally:
        with pytest.raises(OSError, match="read-only"):
            checkpointer.stop()  # its last save fails too, and says so
    assert periodic_attempts == 1


def _edit_meta(directory, **fields) -> None:
    """Change fields of shard 1's JSON as a text editor would: its digest left as it was."""
    path = directory / "shard1.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields, indent=1))


@pytest.mark.parametrize(
    "fields",
    [{"version": 7}, {"num_shards": 3}, {"values": {}}],
    ids=["version", "num_shards", "values"],
)
def test_metadata_edited_by_hand_is_refused_as_corrupt_by_name(tmp_path, fields):
    save_checkpoint(_shard("sgd").snapshot(), tmp_path)
    assert "meta_sha256" in json.loads((tmp_path / "shard1.json").read_text())
    _edit_meta(tmp_path, **fields)
    expected = f"{tmp_path / 'shard1.json'}: corrupt (its fields do not match the SHA-256 it holds)"
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}$"):
        load_checkpoint(tmp_path, 1)


def test_a_checkpoint_written_without_a_metadata_digest_still_loads(tmp_path):
    shard = _shard("sgd")
    _push(shard, 3)
    save_checkpoint(shard.snapshot(), tmp_path)
    path = tmp_path / "shard1.json"
    meta = json.loads(path.read_text())
    del meta["meta_sha256"]  # as checkpoints were written before the digest
    path.write_text(json.dumps(meta, indent=1))
    restored = ParameterShard(1, 2, server_optimizer_factory("sgd", lr=0.05))
    restored.restore(load_checkpoint(tmp_path, 1))
    assert restored.version == shard.version == 1
    for a, b in zip(shard.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_tensor_file_that_cannot_be_written_is_an_os_error_naming_it(tmp_path, monkeypatch):
    """safetensors reports a failed write (a full disk, say) as its own error type: it reaches
    the callers that log and retry failed saves as the OSError every other write raises."""

    def full_disk(tensors, path):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*shard1-v0+\.safetensors: .*No space left"):
        save_checkpoint(_shard("sgd").snapshot(), tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_a_folder_refusing_the_save_is_an_os_error_naming_the_tensor_file(tmp_path, monkeypatch):
    """A checkpoint folder made read-only refuses the temporary folder the tensor file is
    written in: the error (logged at every periodic try, and the last save's) names the
    checkpoint file, not that temporary, which exists nowhere and changes at every try."""

    def read_only_folder(dir, prefix, suffix):  # os.mkdir's error there, as mkdtemp passes it on
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}k3x9q2mz{suffix}")

    monkeypatch.setattr(checkpoint_module.tempfile, "mkdtemp", read_only_folder)
    expected = f"[Errno 13] Permission denied: '{tmp_path / 'shard1-v000000000000.safetensors'}'"
    with pytest.raises(PermissionError, match=f"^{re.escape(expected)}$"):
        save_checkpoint(_shard("sgd").snapshot(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_where_the_tensor_file_goes_is_an_error_naming_the_tensor_file(tmp_path):
    """It named the staged file in its temporary folder, and the rename's two paths."""
    (tmp_path / "shard1-v000000000000.safetensors").mkdir()
    expected = f"[Errno 21] Is a directory: '{tmp_path / 'shard1-v000000000000.safetensors'}'"
    with pytest.raises(IsADirectoryError, match=f"^{re.escape(expected)}$"):
        save_checkpoint(_shard("sgd").snapshot(), tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["shard1-v000000000000.safetensors"]


def test_the_periodic_saves_go_on_after_a_save_fails_unexpectedly(tmp_path):
    """A save that fails with something other than an OSError is logged, and the next
    interval's save is tried as after any failure: the thread does not end."""
    shard, attempts = _shard("sgd"), []

    def flaky_save(state, directory):
        attempts.append(state.version)
        if len(attempts) == 1:
            raise RuntimeError("unexpected")
        return save_checkpoint(state, directory)

    checkpointer = Checkpointer(shard, tmp_path, every_s=0.2, save=flaky_save)
    checkpointer.start()
    try:
        deadline = time.monotonic() + 60.0
        while len(attempts) < 2:
            assert time.monotonic() < deadline, "no save was tried after the failed one"
            _push(shard, len(attempts))
            time.sleep(0.05)
    finally:
        checkpointer.stop()
    assert load_checkpoint(tmp_path, 1).version == shard.version


def edit_tensor_file(directory: Path, shard_id: int, edit: Callable[[dict], object]) -> Path:
    """Change the tensors of shard ``shard_id``'s checkpoint in ``directory`` with ``edit``,
    and seal its JSON with the new file's SHA-256, as a hand that knows the format would: its
    digests match. Returns the tensor file."""
    path = directory / f"shard{shard_id}.json"
    meta = json.loads(path.read_text())
    tensor_file = directory / meta["tensor_file"]
    tensors = load_file(tensor_file)
    edit(tensors)
    save_file(tensors, tensor_file)
    write_sealed_json(path, meta | {"tensor_sha256": sha256_file(tensor_file)})
    return tensor_file


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda t: t.update({"param.x": t.pop("param.0")}), "tensor 'param.0' is missing"),
        (
            lambda t: t.update({"param.0": t["param.0"].double()}),
            "tensor 'param.0' is torch.float64 [25]; its slice, float32[25:50], is "
            "torch.float32 [25]",
        ),
        (
            lambda t: t.update({"d.0": t["d.0"][:-1].clone()}),
            "tensor 'd.0' is torch.float32 [24]; its slice, float32[25:50], is torch.float32 [25]",
        ),
        (lambda t: t.pop("optim.0.exp_avg_sq"), "tensor 'optim.0.exp_avg_sq' is missing"),
        (
            lambda t: t.update({"optim.0.extra": torch.zeros(25)}),
            "unexpected tensor 'optim.0.extra' (Adam keeps no such state)",
        ),
        (
            lambda t: t.update({"optim.0.step": t["optim.0.step"].double()}),
            "tensor 'optim.0.step' is torch.float64 []: Adam keeps torch.float32 []",
        ),
    ],
    ids=["renamed", "dtype", "vector-shape", "missing", "extra", "state-dtype"],
)
def test_a_tensor_file_edited_and_resealed_is_refused_from_its_header(tmp_path, edit, said):
    """Its digests match: the header's names, dtypes and shapes tell, before a shard loads it,
    what the shard refuses on restoring it."""
    shard = _shard("adam")
    _push(shard, 0)
    shard.store.add("d")  # a Sandblaster vector
    save_checkpoint(shard.snapshot(), tmp_path)
    adam = server_optimizer_factory("adam", lr=0.05)
    check_tensor_file(tmp_path, 1, adam)  # as saved
    tensor_file = edit_tensor_file(tmp_path, 1, edit)
    expected = f"{tensor_file}: shard 1 would not restore it: {said}"
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}$"):
        check_tensor_file(tmp_path, 1, adam)
    with pytest.raises(ValueError, match=f"^{re.escape(said)}$"):
        ParameterShard(1, 2, adam).restore(load_checkpoint(tmp_path, 1))


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (
            lambda data: (1 << 62).to_bytes(8, "little") + data[8:],
            "a header of 4611686018427387904",
        ),
        (lambda data: data[:5], "a header of"),
        (lambda data: data[:8] + b"[" + data[9:], "not a JSON object|Expecting"),
        (lambda data: data.replace(b'"F32"', b'"Q32"', 1), "unknown dtype 'Q32'"),
        (lambda data: data[:-4], "do not fill its"),
        (lambda data: data + b"more", "do not fill its"),
    ],
    ids=["absurd-length", "truncated-header", "not-json", "dtype", "short-data", "long-data"],
)
def test_a_tensor_file_whose_header_does_not_describe_it_is_refused_by_name(tmp_path, damage, said):
    save_checkpoint(_shard("sgd").snapshot(), tmp_path)
    [tensor_file] = tmp_path.glob("shard1-v*.safetensors")
    tensor_file.write_bytes(damage(tensor_file.read_bytes()))
    expected = f"^{re.escape(f'{tensor_file}: unreadable tensor file: ')}.*({said})"
    with pytest.raises(CheckpointError, match=expected):
        check_tensor_file(tmp_path, 1, server_optimizer_factory("sgd", lr=0.05))
