"""ShardStore: the named buffers of one shard and the optimizer over its parameter slices.

A buffer is a list of tensors (by default one per parameter slice, shaped like it): ``param``
is the slice values, and algorithms add their own (a policy's per-worker copies, Sandblaster's
per-slice vectors). ``export``/``load`` turn everything into ``{name: tensor}`` plus JSON-able
values and back, so a checkpoint saves a store without knowing what its buffers mean. No locking:
the shard that owns the store serialises access.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from distbelief.server.optimizers import ServerOptimizerFactory, apply_update, optimizer_name

PARAM = "param"
"""The buffer holding the shard's parameter slices."""
_OPTIMIZER_PREFIX = "optim."


def _tensor_key(name: str, index: int) -> str:
    return f"{name}.{index}"


class ShardStore:
    """Named tensor buffers; the ``param`` buffer is updated by the server optimizer.

    Args:
        optimizer_factory: Builds the update rule over the parameter slices.
        params: The slice values (kept, not copied).
    """

    def __init__(
        self, optimizer_factory: ServerOptimizerFactory, params: Sequence[torch.Tensor]
    ) -> None:
        self.params = list(params)
        self.optimizer = optimizer_factory(self.params)
        self._buffers: dict[str, list[torch.Tensor]] = {PARAM: self.params}
        self._persistent: set[str] = {PARAM}
        self.values: dict[str, object] = {}
        """Plain JSON-able values an algorithm keeps with its buffers (saved in checkpoints)."""

    def step(self, grads: Sequence[torch.Tensor]) -> None:
        """One optimizer step of the parameters with ``grads`` (used, not copied)."""
        apply_update(self.optimizer, self.params, grads)

    def add(
        self,
        name: str,
        tensors: Sequence[torch.Tensor] | None = None,
        *,
        persistent: bool = True,
    ) -> list[torch.Tensor]:
        """Register a buffer: ``tensors`` (kept, not copied), or zeros shaped like the slices.

        Args:
            name: A new name; not ``param``, not starting with ``optim.``.
            tensors: The buffer's tensors; None: one zeroed tensor per parameter slice.
            persistent: Saved by :meth:`export` (a checkpoint). False for caches that are
                cheap to lose, as torch's non-persistent module buffers are.

        Raises:
            ValueError: the name is taken or reserved.
        """
        if not name or name in self._buffers or name.startswith(_OPTIMIZER_PREFIX):
            raise ValueError(f"buffer name {name!r} is taken or reserved")
        buffer = [torch.zeros_like(p) for p in self.params] if tensors is None else list(tensors)
        self._buffers[name] = buffer
        if persistent:
            self._persistent.add(name)
        return buffer

    def get(self, name: str) -> list[torch.Tensor]:
        """The buffer ``name`` (its tensors themselves, not copies).

        Raises:
            KeyError: no such buffer.
        """
        return self._buffers[name]

    def remove(self, name: str) -> None:
        """Forget the buffer ``name`` (nothing happens if there is none).

        Raises:
            ValueError: ``name`` is ``param``.
        """
        if name == PARAM:
            raise ValueError("the parameter buffer cannot be removed")
        self._buffers.pop(name, None)
        self._persistent.discard(name)

    def find(self, name: str) -> list[torch.Tensor] | None:
        """The buffer ``name``, or None if there is none."""
        return self._buffers.get(name)

    def names(self) -> list[str]:
        """Every buffer's name, ``param`` first, then in the order they were added."""
        return list(self._buffers)

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """Copies of the persistent buffers and the optimizer state, and the plain values.

        Returns:
            ``{"NAME.INDEX": tensor}`` (optimizer state as ``optim.INDEX.KEY``) and a JSON-able
            dict that :meth:`load` reads back with them.
        """
        tensors: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for name, buffer in self._buffers.items():
            if name not in self._persistent:
                continue
            counts[name] = len(buffer)
            for index, tensor in enumerate(buffer):
                tensors[_tensor_key(name, index)] = tensor.detach().clone()
        optimizer_plain: dict[str, dict[str, object]] = {}
        for index, entries in self.optimizer.state_dict()["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"{_OPTIMIZER_PREFIX}{index}.{key}"] = value.detach().clone()
                else:
                    optimizer_plain.setdefault(str(index), {})[key] = value
        plain = {
            "buffers": counts,
            "optimizer": optimizer_name(self.optimizer),
            "optimizer_plain_state": optimizer_plain,
            "values": dict(self.values),
        }
        return tensors, plain

    @classmethod
    def load(
        cls,
        optimizer_factory: ServerOptimizerFactory,
        tensors: dict[str, torch.Tensor],
        plain: dict,
        *,
        check_buffer: Callable[[str, list[torch.Tensor], list[str]], None] | None = None,
    ) -> ShardStore:
        """The store :meth:`export` described.

        Args:
            check_buffer: Called with each buffer's name, tensors and their names in
                ``tensors``, before the optimizer state is read (a shard refuses buffers not
                shaped as its slices).

        Raises:
            ValueError: a tensor is missing, or the state is of another optimizer; or what
                ``check_buffer`` raises.
            KeyError: ``plain`` lacks a field.
        """
        counts = {str(name): int(count) for name, count in plain["buffers"].items()}
        keys = {
            name: [_tensor_key(name, index) for index in range(n)] for name, n in counts.items()
        }
        buffers = {name: [_take(tensors, key) for key in keys[name]] for name in counts}
        known = {key for named in keys.values() for key in named}
        unknown = sorted(
            k for k in tensors if k not in known and not k.startswith(_OPTIMIZER_PREFIX)
        )
        if unknown:
            raise ValueError(f"unexpected tensor {unknown[0]!r}")
        if check_buffer is not None:
            for name, buffer in buffers.items():
                check_buffer(name, buffer, keys[name])
        store = cls(optimizer_factory, buffers.pop(PARAM))
        if optimizer_name(store.optimizer) != plain["optimizer"]:
            raise ValueError(
                f"checkpoint holds {plain['optimizer']} state, this shard runs "
                f"{optimizer_name(store.optimizer)}"
            )
        state: dict[int, dict[str, object]] = {}
        for index, entries in plain["optimizer_plain_state"].items():
            if not str(index).isdigit() or int(index) >= len(store.params):
                raise ValueError(f"optimizer state of slice {index!r}, of {len(store.params)}")
            state[int(index)] = dict(entries)
        for key, tensor in tensors.items():
            if key.startswith(_OPTIMIZER_PREFIX):
                index, _, field = key.removeprefix(_OPTIMIZER_PREFIX).partition(".")
                if not index.isdigit() or int(index) >= len(store.params) or not field:
                    raise ValueError(f"unexpected tensor {key!r}")
                param = store.params[int(index)]
                if tensor.dim() != 0 and tensor.shape != param.shape:
                    raise ValueError(
                        f"tensor {key!r} has shape {list(tensor.shape)}: neither one value nor "
                        f"one per element of its slice {list(param.shape)}"
                    )
                state.setdefault(int(index), {})[field] = tensor
        _check_state_fields(optimizer_factory, store.params, state)
        # load_state_dict copies the state onto the optimizer's own parameters, which are
        # store.params: the restored tensors are used, not copied again.
        store.optimizer.load_state_dict(
            {"state": state, "param_groups": store.optimizer.state_dict()["param_groups"]}
        )
        for name, buffer in buffers.items():
            store.add(name, buffer)
        store.values = dict(plain["values"])
        return store


def _check_state_fields(
    optimizer_factory: ServerOptimizerFactory,
    params: Sequence[torch.Tensor],
    state: dict[int, dict[str, object]],
) -> None:
    """Refuse a slice's saved optimizer state that lacks a field the optimizer keeps, has one
    it does not, or holds a tensor of another dtype than the optimizer's or not shaped as its
    (one value, or one per element of the slice) (ValueError naming the tensor): loaded, the
    shard would fail at its first push, or go on from state it never wrote. A slice without
    state (never stepped) is taken."""
    kept: dict[torch.dtype, dict[str, object]] = {}
    name = ""
    for index, entries in sorted(state.items()):
        if not entries:
            continue
        param = params[index]
        if param.dtype not in kept:
            probe = torch.zeros(1, dtype=param.dtype)
            optimizer = optimizer_factory([probe])
            apply_update(optimizer, [probe], [torch.zeros(1, dtype=param.dtype)])
            kept[param.dtype] = dict(optimizer.state_dict()["state"].get(0, {}))
            name = optimizer_name(optimizer)
        expected = kept[param.dtype]
        missing = sorted(set(expected) - set(entries))
        extra = sorted(set(entries) - set(expected))
        if missing:
            raise ValueError(f"tensor '{_OPTIMIZER_PREFIX}{index}.{missing[0]}' is missing")
        if extra and expected:  # one that keeps none says so when loading it
            raise ValueError(
                f"unexpected tensor '{_OPTIMIZER_PREFIX}{index}.{extra[0]}' "
                f"({name} keeps no such state)"
            )
        for field, value in entries.items():
            ours = expected.get(field)
            if not (torch.is_tensor(value) and torch.is_tensor(ours)):
                continue
            shape = [] if ours.dim() == 0 else list(param.shape)
            if value.dtype != ours.dtype or list(value.shape) != shape:
                raise ValueError(
                    f"tensor '{_OPTIMIZER_PREFIX}{index}.{field}' is {value.dtype} "
                    f"{list(value.shape)}: {name} keeps {ours.dtype} {shape}"
                )


def _take(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    tensor = tensors.get(key)
    if tensor is None:
        raise ValueError(f"tensor {key!r} is missing")
    return tensor
