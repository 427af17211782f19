"""Dense resharding: the slices a set of shard checkpoints holds put back together into whole
flat vectors (parameters, every other persistent buffer, elementwise optimizer state), then cut
again with the same partitioner for another shard count. Pure: ShardStates in and out; no files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from distbelief.errors import CheckpointError
from distbelief.server.shard import ShardState
from distbelief.sharding import ShardSlice, partitioner_from_json, specs_from_json
from distbelief.sharding.layout import group_sizes
from distbelief.wire.dtypes import dtype_name

logger = logging.getLogger(__name__)

_OPTIM = "optim."
_SHARED_VALUES = ("specs", "partitioner")
_SHARED_STORE = ("optimizer", "buffers", "values")
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(slots=True)
class WholeModel:
    """Every shard's slices of one checkpoint folder put back together."""

    specs: list
    """The layout, as ``specs_to_json`` writes it."""
    partitioner: dict
    """The partitioner's description."""
    version: int
    num_pushes: int
    optimizer: str
    """The server optimizer's class name."""
    store_values: dict
    """The store's plain values (equal on every shard)."""
    buffers: dict[str, dict[torch.dtype, torch.Tensor]] = field(default_factory=dict)
    """Buffer name (``param`` first) -> dtype -> the whole flat vector."""
    state: dict[torch.dtype, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Dtype -> optimizer state name -> a whole flat vector (elementwise) or a 0-d tensor."""
    plain_state: dict[torch.dtype, dict[str, object]] = field(default_factory=dict)
    """Dtype -> optimizer state name -> a plain value."""


def _check_one_set(states: Sequence[ShardState]) -> None:
    """CheckpointError naming the first shard that is not part of one set with shard 0."""
    first = states[0].values
    for shard_id, state in enumerate(states):
        if (state.shard_id, state.num_shards) != (shard_id, len(states)):
            raise CheckpointError(
                f"shard{shard_id}.json: holds shard {state.shard_id} of {state.num_shards}, "
                f"expected shard {shard_id} of {len(states)}"
            )
        differs = [key for key in _SHARED_VALUES if state.values[key] != first[key]]
        differs += [
            f"store {key}"
            for key in _SHARED_STORE
            if state.values["store"][key] != first["store"][key]
        ]
        if differs:
            raise CheckpointError(
                f"shard{shard_id}.json: its {differs[0]} differs from shard0.json's"
            )


def assemble_model(states: Sequence[ShardState]) -> WholeModel:
    """The whole model that ``states`` (every shard of one folder, in shard order) hold.

    Optimizer state that is not elementwise (Adam's and Adagrad's ``step``, plain values) is
    one value per dtype group: the old slices hold equal ones when every push reached every
    shard; where they differ no new slice can be exact, and the largest is taken (logged).
    Version and push count: the largest. Sessions' last pushes are dropped: a resumed run's
    clients start new sessions.

    Raises:
        CheckpointError: the shards are not one set (ids, count, layout, partitioner, buffers,
            optimizer differ) or a tensor does not fit its slice; the message names the shard.
    """
    try:
        return _assemble(states)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"the shards' checkpoints are incomplete: {e!r}") from e


def _assemble(states: Sequence[ShardState]) -> WholeModel:
    _check_one_set(states)
    num_shards = len(states)
    first = states[0].values
    specs = specs_from_json(first["specs"])
    slices = partitioner_from_json(first["partitioner"]).partition(specs, num_shards)
    model = WholeModel(
        specs=first["specs"],
        partitioner=first["partitioner"],
        version=max(state.version for state in states),
        num_pushes=max(int(state.values["num_pushes"]) for state in states),
        optimizer=first["store"]["optimizer"],
        store_values=first["store"]["values"],
    )
    sizes = group_sizes(specs)
    scalars: dict[torch.dtype, dict[str, list]] = {}
    plain: dict[torch.dtype, dict[str, list]] = {}
    _check_state_fields_alike(states)
    for shard_id, state in enumerate(states):
        pieces = slices[shard_id]
        _place_buffers(model, state, pieces, sizes)
        _place_state(model, state, pieces, sizes, scalars)
        _collect_plain(state, pieces, plain)
    for dtype, entries in scalars.items():
        for key, found in entries.items():
            if key in model.state.get(dtype, {}):
                raise CheckpointError(f"optimizer state {key!r} is elementwise on some shards")
            model.state.setdefault(dtype, {})[key] = _largest(key, found).clone()
    for dtype, entries in plain.items():
        model.plain_state[dtype] = {key: _largest(key, found) for key, found in entries.items()}
    return model


def _check_state_fields_alike(states: Sequence[ShardState]) -> None:
    """CheckpointError naming the first slice whose optimizer state has other fields than the
    first slice with state has: every push steps every slice, so a slice holds all of them or,
    never stepped, none (and reads as zeros). A field missing from one slice is damage that
    the zeros would hide."""
    first: tuple[str, set[str]] | None = None
    for state in states:
        fields: dict[str, set[str]] = {}
        for key in state.tensors:
            if key.startswith(_OPTIM):
                index, _, name = key.removeprefix(_OPTIM).partition(".")
                fields.setdefault(index, set()).add(name)
        for index, entries in state.values["store"]["optimizer_plain_state"].items():
            fields.setdefault(str(index), set()).update(entries)
        for index, names in sorted(fields.items()):
            where = f"shard{state.shard_id}.json: slice {index}"
            if first is None:
                first = (where, names)
            elif names != first[1]:
                odd = sorted(names ^ first[1])[0]
                held = "lacks" if odd in first[1] else "has"
                raise CheckpointError(
                    f"{where}'s optimizer state {held} {odd!r}, unlike {first[0]}'s "
                    f"({', '.join(sorted(first[1]))})"
                )


def _place_buffers(
    model: WholeModel, state: ShardState, pieces: list[ShardSlice], sizes: dict
) -> None:
    counts = state.values["store"]["buffers"]
    names = [f"{name}.{index}" for name, count in counts.items() for index in range(count)]
    unknown = sorted(k for k in state.tensors if not k.startswith(_OPTIM) and k not in names)
    if unknown:
        raise CheckpointError(f"shard{state.shard_id}.json: unexpected tensor {unknown[0]!r}")
    for name, count in counts.items():
        if count != len(pieces):
            raise CheckpointError(
                f"shard{state.shard_id}.json: buffer {name!r} has {count} tensors for "
                f"{len(pieces)} slices"
            )
        for index, piece in enumerate(pieces):
            tensor = state.tensors.get(f"{name}.{index}")
            if tensor is None or tensor.shape != (piece.numel,):
                raise CheckpointError(
                    f"shard{state.shard_id}.json: tensor {name}.{index} does not fit slice "
                    f"{piece.name}"
                )
            _flat(model.buffers.setdefault(name, {}), piece.dtype, sizes, tensor)[
                piece.start : piece.stop
            ] = tensor


def _flat(flats: dict, dtype: torch.dtype, sizes: dict, like: torch.Tensor) -> torch.Tensor:
    """``flats[dtype]``, a zeroed whole vector of ``like``'s dtype when first asked for."""
    if dtype not in flats:
        flats[dtype] = torch.zeros(sizes[dtype], dtype=like.dtype)
    return flats[dtype]


def _place_state(
    model: WholeModel,
    state: ShardState,
    pieces: list[ShardSlice],
    sizes: dict,
    scalars: dict[torch.dtype, dict[str, list]],
) -> None:
    for key, tensor in state.tensors.items():
        if not key.startswith(_OPTIM):
            continue
        index, _, name = key.removeprefix(_OPTIM).partition(".")
        if not index.isdigit() or int(index) >= len(pieces) or not name:
            raise CheckpointError(f"shard{state.shard_id}.json: unexpected tensor {key!r}")
        piece = pieces[int(index)]
        if tensor.dim() == 0:
            scalars.setdefault(piece.dtype, {}).setdefault(name, []).append(tensor)
        elif tensor.shape == (piece.numel,):
            # Slices that lack it (never stepped) read as zeros: what an optimizer starts at.
            flats = model.state.setdefault(piece.dtype, {})
            if name not in flats:
                flats[name] = torch.zeros(sizes[piece.dtype], dtype=tensor.dtype)
            flats[name][piece.start : piece.stop] = tensor
        else:
            raise CheckpointError(
                f"shard{state.shard_id}.json: optimizer state {key!r} of shape "
                f"{list(tensor.shape)} is neither one value nor one per element"
            )


def _collect_plain(
    state: ShardState, pieces: list[ShardSlice], plain: dict[torch.dtype, dict[str, list]]
) -> None:
    for index, entries in state.values["store"]["optimizer_plain_state"].items():
        if not str(index).isdigit() or int(index) >= len(pieces):
            raise CheckpointError(f"shard{state.shard_id}.json: optimizer state of slice {index!r}")
        dtype = pieces[int(index)].dtype
        for key, value in entries.items():
            plain.setdefault(dtype, {}).setdefault(key, []).append(value)


def _largest(name: str, found: list) -> object:
    """The one value ``found`` holds; if the slices disagree, the largest (logged)."""
    if all(_same(value, found[0]) for value in found[1:]):
        return found[0]
    tensors = all(isinstance(value, torch.Tensor) for value in found)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in found)
    if not (tensors or numbers):
        raise CheckpointError(f"optimizer state {name!r} differs between the old shards")
    largest = torch.stack(found).max() if tensors else max(found)
    logger.warning(
        "optimizer state %r differs between the old shards' slices (%s); the new ones take %s",
        name,
        sorted({float(value) for value in found}),
        float(largest),
    )
    return largest


def split_model(model: WholeModel, num_shards: int) -> list[ShardState]:
    """The checkpoints of ``model`` cut for ``num_shards`` shards, as ``ShardState``s."""
    specs = specs_from_json(model.specs)
    slices = partitioner_from_json(model.partitioner).partition(specs, num_shards)
    states = []
    for shard_id, pieces in enumerate(slices):
        tensors: dict[str, torch.Tensor] = {}
        plain_state: dict[str, dict[str, object]] = {}
        for name, flats in model.buffers.items():
            for index, piece in enumerate(pieces):
                tensors[f"{name}.{index}"] = flats[piece.dtype][piece.start : piece.stop].clone()
        for index, piece in enumerate(pieces):
            for name, value in model.state.get(piece.dtype, {}).items():
                cut = value if value.dim() == 0 else value[piece.start : piece.stop]
                tensors[f"{_OPTIM}{index}.{name}"] = cut.clone()
            for name, value in model.plain_state.get(piece.dtype, {}).items():
                plain_state.setdefault(str(index), {})[name] = value
        store = {
            "buffers": {name: len(pieces) for name in model.buffers},
            "optimizer": model.optimizer,
            "optimizer_plain_state": plain_state,
            "values": dict(model.store_values),
        }
        values = {
            "specs": model.specs,
            "partitioner": model.partitioner,
            "num_pushes": model.num_pushes,
            "last_push": {},
            "store": store,
        }
        states.append(
            ShardState(
                shard_id=shard_id,
                num_shards=num_shards,
                version=model.version,
                tensors=tensors,
                values=values,
            )
        )
    return states


def _same(a: object, b: object) -> bool:
    """Equal, tensors bit for bit (a NaN equals the same NaN)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return a == b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        kind = _INT_OF_SIZE[a.element_size()]
        return torch.equal(a.contiguous().view(kind), b.contiguous().view(kind))
    return torch.equal(a, b)


def describe_difference(old: WholeModel, new: WholeModel) -> str | None:
    """The first thing that differs between two whole models, or None if they are equal."""
    for key in ("specs", "partitioner", "version", "num_pushes", "optimizer", "store_values"):
        if getattr(old, key) != getattr(new, key):
            return f"{key} differs"
    for what, mine, theirs in (
        ("buffer", old.buffers, new.buffers),
        ("optimizer state", _by_name(old.state), _by_name(new.state)),
        ("plain optimizer state", _by_name(old.plain_state), _by_name(new.plain_state)),
    ):
        if mine.keys() != theirs.keys():
            return f"{what}s {sorted(mine)} became {sorted(theirs)}"
        for name, per_dtype in mine.items():
            other = theirs[name]
            if per_dtype.keys() != other.keys():
                return f"{what} {name!r} covers other dtypes"
            for dtype, value in per_dtype.items():
                if not _same(value, other[dtype]):
                    return f"{what} {name!r} ({dtype_name(dtype)}) differs"
    return None


def _by_name(per_dtype: dict[torch.dtype, dict[str, object]]) -> dict[str, dict]:
    by_name: dict[str, dict] = {}
    for dtype, entries in per_dtype.items():
        for name, value in entries.items():
            by_name.setdefault(name, {})[dtype] = value
    return by_name
