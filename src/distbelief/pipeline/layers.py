"""A model as an ordered list of layers, and building one partition of it.

Owns the two facts model parallelism needs of a model: which layers, in which order, compose
its forward (``pipeline_layers``), and how one stage gets exactly its partition's parameters,
with the values a full build from the same seed gives them, without ever holding the whole
model in memory (``build_stage``).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence

import torch
from torch import nn


def pipeline_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as an ordered list of layers whose sequential composition is its forward.

    ``nn.Sequential`` containers are flattened recursively; so is a module whose class declares
    ``pipeline_order`` (the names of the children whose composition, in that order, is its
    forward). Any other module is one layer.

    Args:
        model: The model to list.

    Returns:
        ``(qualified name, layer)`` pairs in forward order, names as in
        ``model.named_modules()`` (e.g. ``features.3``).

    Raises:
        ValueError: If the model is neither an ``nn.Sequential`` nor declares
            ``pipeline_order``, if ``pipeline_order`` names a missing child or leaves out a
            child with parameters, or if a flattened container holds parameters of its own.
    """
    if not _is_container(model):
        raise ValueError(
            f"model {type(model).__name__} cannot be split into partitions: its forward must "
            "be an nn.Sequential, or its class must name the children its forward composes, "
            "in order, in pipeline_order"
        )
    layers: list[tuple[str, nn.Module]] = []
    _flatten(model, "", layers)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no layers to split")
    return layers


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) or hasattr(module, "pipeline_order")


def _flatten(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    if not _is_container(module):
        out.append((prefix, module))
        return
    label = prefix or type(module).__name__
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        order = list(children)
    else:
        order = list(module.pipeline_order)
        missing = [name for name in order if name not in children]
        if missing:
            raise ValueError(f"{label}.pipeline_order names {missing}, which are not children")
        left_out = [
            name
            for name, child in children.items()
            if name not in order and any(True for _ in child.parameters())
        ]
        if left_out:
            raise ValueError(f"{label}.pipeline_order leaves out {left_out}, which have parameters")
    # A container's own parameters would belong to no layer, so no stage would train them.
    if _has_own_state(module):
        raise ValueError(f"{label} holds parameters or buffers outside its layers")
    for name in order:
        _flatten(children[name], f"{prefix}.{name}" if prefix else name, out)


def layer_has_parameters(layer: nn.Module) -> bool:
    """Whether ``layer`` (or a module inside it) has a parameter."""
    return any(True for _ in layer.parameters())


class StageModule(nn.Module):
    """One partition's layers, run in order: the model a stage trains.

    Its ``parameters()`` are exactly that partition's parameters (the layer objects are shared
    with the full model, so the full model's ``named_parameters()`` names them).

    Args:
        layers: The partition's layers in forward order (at least one).

    Raises:
        ValueError: If ``layers`` is empty.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(layers) == 0:
            raise ValueError("a partition needs at least one layer, got none")
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the partition's layers in order on ``x``."""
        # A partition may begin with an in-place layer (e.g. ReLU(inplace=True) after a
        # boundary). On a leaf input that would fail (a leaf that requires grad) or overwrite
        # the caller's tensor (the batch, or a link's receive buffer), so work on a copy.
        if x.grad_fn is None and getattr(self.layers[0], "inplace", False):
            x = x.clone()
        for layer in self.layers:
            x = layer(x)
        return x


def check_bounds(bounds: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Validates partition bounds: P+1 strictly increasing ints from 0 to ``num_layers``.

    Returns:
        The bounds as a tuple of ints.

    Raises:
        ValueError: If the bounds are not of that form.
        TypeError: ``bounds`` is no sequence.
    """
    if not isinstance(bounds, Sequence):
        raise TypeError(f"bounds must be a sequence of ints, got {bounds!r}")
    given = list(bounds)
    try:
        given = [operator.index(b) for b in given]
    except TypeError:
        raise ValueError(f"bounds {given} must be ints") from None
    if len(given) < 2:
        raise ValueError(f"bounds {given} must hold at least two ints")
    if given[0] != 0 or given[-1] != num_layers:
        raise ValueError(f"bounds {given} must run from 0 to the number of layers {num_layers}")
    if any(b <= a for a, b in itertools.pairwise(given)):
        raise ValueError(f"bounds {given} must be strictly increasing")
    return tuple(given)


def _has_own_state(module: nn.Module) -> bool:
    own_tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return len(own_tensors) > 0


def _stateful_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding parameters or buffers of their own, in registration order; raises
    ValueError for one that cannot re-initialise them."""
    stateful = [(name, m) for name, m in model.named_modules() if _has_own_state(m)]
    for name, module in stateful:
        if not callable(getattr(module, "reset_parameters", None)):
            raise ValueError(
                f"model cannot be built one partition at a time: {name} "
                f"({type(module).__name__}) has parameters or buffers but no reset_parameters()"
            )
    return stateful


def _materialise(module: nn.Module) -> None:
    """Gives ``module``'s own tensors CPU storage and initialises them as its constructor did."""
    module.to_empty(device="cpu", recurse=False)
    module.reset_parameters()


def materialise_layer(layer: nn.Module) -> None:
    """Gives a meta-device layer CPU storage and fresh initial values (from the global RNG).

    Raises:
        ValueError: If a module in the layer has parameters but no ``reset_parameters()``.
    """
    for _, module in _stateful_modules(layer):
        _materialise(module)


def check_build(build: object, seed: object) -> None:
    """Refuses a ``build`` that is no function making the model (a model itself is callable:
    calling it would run its forward with no input) and a ``seed`` that is no int (a float
    would be truncated, another type fail inside torch).

    Raises:
        TypeError: naming the argument.
    """
    if isinstance(build, nn.Module) or not callable(build):
        raise TypeError(
            f"build must be a function that returns the model, got {type(build).__name__}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def build_on_meta(build: Callable[[], nn.Module], *, seed: int) -> nn.Module:
    """``build()`` on the meta device (shapes only, no storage), after seeding the RNG.

    Raises:
        TypeError: ``build`` is no function or ``seed`` no int (``check_build``).
    """
    check_build(build, seed)
    torch.manual_seed(seed)
    with torch.device("meta"):
        return build()


def build_stage(
    build: Callable[[], nn.Module], bounds: Sequence[int], stage: int, *, seed: int
) -> tuple[nn.Module, StageModule]:
    """Builds partition ``stage`` of a model, with the values a full build would give it.

    The full model is built on the meta device. Its modules are then initialised one at a time
    in registration order, each on the CPU with its own ``reset_parameters()``, so the global
    RNG is drawn from exactly as ``torch.manual_seed(seed); build()`` draws from it; a module
    of another partition goes back to the meta device right after. At most this partition and
    one other module hold storage at any time, and afterwards the RNG is where the full build
    leaves it.

    This assumes what holds for torch's layers and this project's models: construction draws
    random numbers only in each module's ``reset_parameters()``, called once per module in
    registration order, and each one initialises only the module's own tensors.

    Args:
        build: Builds the full model (e.g. ``lambda: build_model(name, shape, classes)``).
        bounds: P+1 increasing indices into ``pipeline_layers(model)``; partition ``s`` is
            ``layers[bounds[s]:bounds[s + 1]]``.
        stage: Which partition to build, in ``[0, P)``.
        seed: The seed a full build would start from.

    Returns:
        ``(model, stage_module)``: the full model (on the meta device except this partition,
        whose parameters it names in ``named_parameters()``) and the partition to train.

    Raises:
        ValueError: If the model cannot be split, the bounds or stage are invalid, or a module
            with parameters has no ``reset_parameters()``.
        TypeError: ``build`` is no function, ``seed`` or ``stage`` no int, ``bounds`` no
            sequence.
    """
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise TypeError(f"stage must be an int, got {stage!r}")
    model = build_on_meta(build, seed=seed)
    layers = pipeline_layers(model)
    bounds = check_bounds(bounds, len(layers))
    num_stages = len(bounds) - 1
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not in [0, {num_stages})")
    own_layers = [layer for _, layer in layers[bounds[stage] : bounds[stage + 1]]]
    kept = {id(module) for layer in own_layers for module in layer.modules()}
    stateful = _stateful_modules(model)
    # The meta build draws nothing from the RNG; seed again so the walk below starts exactly
    # where a full build's first reset_parameters() would.
    torch.manual_seed(seed)
    for _, module in stateful:
        _materialise(module)
        if id(module) not in kept:
            module.to_empty(device="meta", recurse=False)
    return model, StageModule(own_layers)
