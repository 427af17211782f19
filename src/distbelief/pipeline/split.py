"""Where to cut a model into partitions: per-layer costs and the contiguous split that
balances them.

A layer's cost is either its measured forward+backward time or its parameter bytes; the split
minimises the largest partition's cost, with every partition holding at least one layer with
parameters. User-given split points are validated here too. Nothing here keeps a model's
parameters: costs are found on a meta build, one materialised layer at a time.
"""

from __future__ import annotations

import itertools
import math
import operator
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from distbelief.config import check_count
from distbelief.pipeline.layers import (
    StageModule,
    build_on_meta,
    check_bounds,
    layer_has_parameters,
    materialise_layer,
    pipeline_layers,
)

_BASIS_WORDS = {
    "time": "by measured time",
    "bytes": "by parameter bytes",
    "given": "at the given points (share of parameter bytes)",
}


@dataclass(frozen=True)
class StageSplit:
    """A model's layers cut into contiguous partitions.

    Attributes:
        bounds: P+1 increasing layer indices; partition ``s`` is layers
            ``[bounds[s], bounds[s + 1])``.
        layer_costs: One cost per layer (seconds or bytes, per ``basis``).
        basis: How the bounds were chosen: ``"time"`` (balancing measured time), ``"bytes"``
            (balancing parameter bytes) or ``"given"`` (the user's points; costs are
            parameter bytes).
    """

    bounds: tuple[int, ...]
    layer_costs: tuple[float, ...]
    basis: str

    def __post_init__(self) -> None:
        check_bounds(self.bounds, len(self.layer_costs))
        if self.basis not in _BASIS_WORDS:
            raise ValueError(f"basis {self.basis!r} must be one of {tuple(_BASIS_WORDS)}")

    @property
    def num_stages(self) -> int:
        """Number of partitions (P)."""
        return len(self.bounds) - 1

    @property
    def stage_costs(self) -> tuple[float, ...]:
        """Sum of the layer costs of each partition."""
        return tuple(
            sum(self.layer_costs[start:stop]) for start, stop in itertools.pairwise(self.bounds)
        )

    @property
    def imbalance(self) -> float:
        """Largest partition cost over the mean partition cost (1.0 is perfect balance)."""
        costs = self.stage_costs
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean > 0 else 1.0

    def describe(self, layer_names: Sequence[str]) -> str:
        """One log line, e.g. ``3 partitions by measured time: [features.0..features.5] 41% |
        ... (imbalance 1.23)``.

        Raises:
            ValueError: If ``layer_names`` does not have one name per layer.
        """
        if len(layer_names) != len(self.layer_costs):
            raise ValueError(
                f"layer_names has {len(layer_names)} names for {len(self.layer_costs)} layers"
            )
        total = sum(self.layer_costs)
        parts = []
        for (start, stop), cost in zip(
            itertools.pairwise(self.bounds), self.stage_costs, strict=True
        ):
            span = layer_names[start]
            if stop - start > 1:
                span += f"..{layer_names[stop - 1]}"
            share = 100.0 * cost / total if total > 0 else 0.0
            parts.append(f"[{span}] {share:.0f}%")
        noun = "partition" if self.num_stages == 1 else "partitions"
        return (
            f"{self.num_stages} {noun} {_BASIS_WORDS[self.basis]}: "
            f"{' | '.join(parts)} (imbalance {self.imbalance:.2f})"
        )


def parameter_bytes_costs(layers: Sequence[tuple[str, nn.Module]]) -> list[float]:
    """Parameter bytes of each layer (meta-device layers work: no storage is touched).

    Args:
        layers: ``(name, layer)`` pairs, as ``pipeline_layers`` returns them.
    """
    return [
        float(sum(p.numel() * p.element_size() for p in layer.parameters())) for _, layer in layers
    ]


def measure_layer_costs(
    build: Callable[[], nn.Module], sample_input: torch.Tensor, *, seed: int, repeats: int = 3
) -> list[float]:
    """Median seconds of one forward+backward pass of each layer on the CPU.

    The model is built on the meta device and its layers are materialised one at a time: each
    is timed on the activation it receives from the layer before, then freed, so at most one
    layer's parameters are held at once. The global RNG is left as it was.

    Args:
        build: Builds the full model.
        sample_input: A batch of inputs as a stage would see them (its batch size is the one
            timed, e.g. one micro-batch).
        seed: Seeds the layers' initial values (timing does not depend on them).
        repeats: Timed passes per layer, after one untimed warm-up pass.

    Returns:
        One cost in seconds per layer of ``pipeline_layers(build())``.

    Raises:
        ValueError: If the model cannot be split or ``repeats`` is below 1, or a layer cannot
            run on what it receives from ``sample_input`` (of another shape, dtype or device
            than the model takes: named, with torch's error).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    costs: list[float] = []
    with torch.random.fork_rng(devices=[]):
        model = build_on_meta(build, seed=seed)
        x = sample_input.detach()
        for index, (name, layer) in enumerate(pipeline_layers(model)):
            materialise_layer(layer)
            # The first stage gets no gradient for its input; every other one does.
            try:
                seconds, x = _time_layer(layer, x, input_grad=index > 0, repeats=repeats)
            except RuntimeError as e:  # torch's word for an input of the wrong shape or dtype
                raise ValueError(
                    f"sample_input {list(sample_input.shape)} {sample_input.dtype} on "
                    f"{sample_input.device}: layer {index} ({name}) cannot run on what it "
                    f"receives, {list(x.shape)} {x.dtype} on {x.device} (the layers are timed "
                    f"on the CPU): {e}"
                ) from e
            costs.append(seconds)
            layer.to_empty(device="meta")
    return costs


def _time_layer(
    layer: nn.Module, x: torch.Tensor, *, input_grad: bool, repeats: int
) -> tuple[float, torch.Tensor]:
    """Median seconds of forward+backward of ``layer`` on ``x``, and its output (detached)."""
    stage = StageModule([layer])
    wants_grad = input_grad and x.is_floating_point()
    samples = []
    out = x
    for attempt in range(repeats + 1):
        for param in layer.parameters():
            param.grad = None
        start = time.perf_counter()
        inp = x.detach().requires_grad_() if wants_grad else x
        out = stage(inp)
        if out.requires_grad:
            out.backward(torch.ones_like(out))
        if attempt > 0:  # the first pass warms up allocators and kernels
            samples.append(time.perf_counter() - start)
    return statistics.median(samples), out.detach()


def balanced_bounds(
    costs: Sequence[float], num_stages: int, has_parameters: Sequence[bool]
) -> tuple[int, ...]:
    """The contiguous split of layers into ``num_stages`` partitions with the smallest largest
    partition cost, each partition holding at least one layer with parameters (a partition
    with nothing to train would have nothing to push).

    Args:
        costs: One non-negative cost per layer.
        num_stages: Number of partitions P (>= 1).
        has_parameters: Per layer, whether it has parameters.

    Returns:
        P+1 bounds: partition ``s`` is layers ``[bounds[s], bounds[s + 1])``.

    Raises:
        ValueError: If the arguments disagree in length, a cost is negative, or fewer layers
            have parameters than there are partitions.
    """
    num_layers = len(costs)
    if len(has_parameters) != num_layers:
        raise ValueError(
            f"has_parameters has {len(has_parameters)} entries for {num_layers} layer costs"
        )
    if any(not cost >= 0 for cost in costs):
        raise ValueError(f"layer costs must be >= 0, got {list(costs)}")
    _check_num_stages(num_stages, has_parameters)
    cost_before = [0.0]
    params_before = [0]
    for cost, has in zip(costs, has_parameters, strict=True):
        cost_before.append(cost_before[-1] + cost)
        params_before.append(params_before[-1] + bool(has))

    # best[k][j]: the smallest largest cost splitting layers [0, j) into k partitions;
    # cut[k][j]: where the last of those k partitions starts.
    best = [[math.inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(1, num_layers + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == math.inf or params_before[j] == params_before[i]:
                    continue
                worst = max(best[k - 1][i], cost_before[j] - cost_before[i])
                if worst < best[k][j]:
                    best[k][j] = worst
                    cut[k][j] = i
    assert best[num_stages][num_layers] < math.inf
    bounds = [num_layers]
    for k in range(num_stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return tuple(reversed(bounds))


def _check_num_stages(num_stages: int, has_parameters: Sequence[bool]) -> None:
    num_with_parameters = sum(bool(has) for has in has_parameters)
    if num_stages < 1:
        raise ValueError(f"number of partitions must be >= 1, got {num_stages}")
    if num_stages > num_with_parameters:
        raise ValueError(
            f"cannot split into {num_stages} partitions: only {num_with_parameters} of the "
            f"model's {len(has_parameters)} layers have parameters, and every partition needs one"
        )


def check_split_points(
    points: Sequence[int], num_layers: int, num_stages: int, has_parameters: Sequence[bool]
) -> tuple[int, ...]:
    """Validates user-given split points: P-1 increasing layer indices in (0, num_layers).

    A point ``k`` starts a new partition at layer ``k``.

    Args:
        points: The cut points as the user gave them.
        num_layers: Number of layers of the model.
        num_stages: Number of partitions P.
        has_parameters: Per layer, whether it has parameters.

    Returns:
        The P+1 bounds ``(0, *points, num_layers)``.

    Raises:
        ValueError: Naming the points as given, if they are not P-1 increasing ints inside
            the model, or leave a partition without parameters.
    """
    try:
        given = list(points)
    except TypeError:
        raise ValueError(
            f"split points must be a sequence of ints, got points={points!r}"
        ) from None
    if len(has_parameters) != num_layers:
        raise ValueError(
            f"has_parameters has {len(has_parameters)} entries for {num_layers} layers"
        )
    if num_stages < 1:
        raise ValueError(f"number of partitions must be >= 1, got {num_stages}")
    try:
        # operator.index takes a bool as 0 or 1; refuse it, as seed and stage are refused.
        if any(isinstance(point, bool) for point in given):
            raise TypeError
        cuts = [operator.index(point) for point in given]
    except TypeError:
        raise ValueError(f"split points {given} must be ints") from None
    if len(cuts) != num_stages - 1:
        raise ValueError(
            f"split points {given} make {len(cuts) + 1} partitions, not {num_stages} "
            f"(give {num_stages - 1} points)"
        )
    if any(not 0 < cut < num_layers for cut in cuts):
        raise ValueError(f"split points {given} must lie between 1 and {num_layers - 1}")
    if any(b <= a for a, b in itertools.pairwise(cuts)):
        raise ValueError(f"split points {given} must be increasing")
    bounds = (0, *cuts, num_layers)
    for stage, (start, stop) in enumerate(itertools.pairwise(bounds)):
        if not any(has_parameters[start:stop]):
            raise ValueError(f"split points {given} leave partition {stage} without parameters")
    return bounds


def split_model(
    build: Callable[[], nn.Module],
    num_stages: int,
    *,
    seed: int,
    points: Sequence[int] | None = None,
    sample_input: torch.Tensor | None = None,
) -> StageSplit:
    """Chooses where to cut a model into ``num_stages`` partitions.

    Given ``points``, they are the cuts (basis ``"given"``, costs in parameter bytes; a sample
    input is then not needed and not used). Otherwise, given a ``sample_input``, each layer's
    forward+backward time is measured and balanced (``"time"``); else parameter bytes are
    balanced (``"bytes"``).

    Args:
        build: Builds the full model (it is only built on the meta device here).
        num_stages: Number of partitions P.
        seed: The model's seed (for the measurement's layers).
        points: User-given cut points, see ``check_split_points``.
        sample_input: A batch of inputs as stage 0 sees them, for measuring time.

    Returns:
        The split.

    Raises:
        ValueError: If the model cannot be split, or not into ``num_stages`` partitions (or
            that is no integer >= 1), or the points are invalid, or the model cannot run on
            ``sample_input`` (another shape, dtype or device than it takes).
        TypeError: ``build`` is no function, ``seed`` no int or ``sample_input`` no tensor.
    """
    check_count("num_stages", num_stages)
    if sample_input is not None and not isinstance(sample_input, torch.Tensor):
        raise TypeError(f"sample_input must be a tensor, got {type(sample_input).__name__}")
    with torch.random.fork_rng(devices=[]):
        layers = pipeline_layers(build_on_meta(build, seed=seed))
    has_parameters = [layer_has_parameters(layer) for _, layer in layers]
    if points is not None:
        bounds = check_split_points(points, len(layers), num_stages, has_parameters)
        return StageSplit(bounds, tuple(parameter_bytes_costs(layers)), "given")
    if sample_input is not None:
        costs = measure_layer_costs(build, sample_input, seed=seed)
        basis = "time"
    else:
        costs = parameter_bytes_costs(layers)
        basis = "bytes"
    bounds = balanced_bounds(costs, num_stages, has_parameters)
    return StageSplit(bounds, tuple(costs), basis)
