"""In-process shards for the coordinator's math: each shard a real ShardStore run by the real
VectorExecutor over its FlatPartitioner slices, and an evaluation that adds a model's batch
gradient sum, in bundles staged and committed as the workers' would be, at a named vector."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distbelief.config import ServerConfig
from distbelief.server.optimizers import server_optimizer_from_config
from distbelief.server.store import ShardStore
from distbelief.server.vectors import EvaluationAccumulator, VectorExecutor
from distbelief.sharding import FlatLayout, FlatPartitioner, tensor_specs
from distbelief.wire.vector_program import Program, combine_partials


@dataclass
class Sums:
    loss_sum: float
    num_examples: int


class LocalShards:
    """``num_shards`` stores holding their slices of ``model``'s parameters."""

    def __init__(self, model: nn.Module, num_shards: int) -> None:
        self.specs = tensor_specs(model.named_parameters())
        self.layout = FlatLayout(self.specs)
        flats = self.layout.flatten([p for p in model.parameters()])
        self.slices = FlatPartitioner().partition(self.specs, num_shards)
        factory = server_optimizer_from_config(ServerConfig())
        self.executors = []
        for pieces in self.slices:
            params = [flats[piece.dtype][piece.start : piece.stop].clone() for piece in pieces]
            store = ShardStore(factory, params)
            self.executors.append(VectorExecutor(store, EvaluationAccumulator()))
        self.num_programs = 0

    def run(self, program: Program) -> list:
        self.num_programs += 1
        instructions = program.to_json()
        return combine_partials(instructions, [ex.run(instructions) for ex in self.executors])

    def gather(self, name: str) -> dict[torch.dtype, torch.Tensor]:
        """The whole vector ``name`` (only tests may hold one)."""
        flats = self.layout.allocate()
        for executor, pieces in zip(self.executors, self.slices, strict=True):
            for piece, tensor in zip(pieces, executor.store.get(name), strict=True):
                flats[piece.dtype][piece.start : piece.stop] = tensor
        return flats

    def snapshot(self) -> list[tuple[dict, dict]]:
        """Every store's export, as a checkpoint holds it."""
        return [executor.store.export() for executor in self.executors]

    def restore(self, saved: list[tuple[dict, dict]]) -> None:
        """Every store replaced by one loaded from ``snapshot()``'s output."""
        factory = server_optimizer_from_config(ServerConfig())
        self.executors = [
            VectorExecutor(ShardStore.load(factory, tensors, plain), EvaluationAccumulator())
            for tensors, plain in saved
        ]

    def scatter_bundle(self, evaluation: int, bundle: str, flat: dict) -> None:
        for executor, pieces in zip(self.executors, self.slices, strict=True):
            grads = [flat[p.dtype][p.start : p.stop].clone() for p in pieces]
            executor.accumulator.stage(evaluation, bundle, grads)


def batch_evaluator(
    shards: LocalShards,
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_portions: int = 1,
    loss_fn: Callable = nn.functional.cross_entropy,
) -> Callable[[int, str], Sums]:
    """``evaluate(evaluation, point)``: loss and gradient sums of the whole batch at ``point``,
    one bundle per portion, each committed once."""

    def evaluate(evaluation: int, point: str) -> Sums:
        flats = shards.gather(point)
        with torch.no_grad():
            for param, value in zip(model.parameters(), shards.layout.views(flats), strict=True):
                param.copy_(value)
        total = 0.0
        bounds = [len(labels) * p // num_portions for p in range(num_portions + 1)]
        for portion in range(num_portions):
            start, stop = bounds[portion], bounds[portion + 1]
            model.zero_grad()
            loss = loss_fn(model(inputs[start:stop]), labels[start:stop], reduction="sum")
            loss.backward()
            total += loss.detach().item()
            grads = shards.layout.flatten([p.grad for p in model.parameters()])
            bundle = f"portion{portion}"
            shards.scatter_bundle(evaluation, bundle, grads)
            commit = Program()
            commit.commit(evaluation, bundle)
            shards.run(commit)
        return Sums(total, len(labels))

    return evaluate


def torch_lbfgs(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, **settings
) -> tuple[torch.optim.LBFGS, Callable[[], torch.Tensor]]:
    """torch.optim.LBFGS over ``model`` with ``settings``, and the closure of its whole-batch
    cross-entropy."""
    optimizer = torch.optim.LBFGS(model.parameters(), **settings)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    return optimizer, closure


def torch_lbfgs_sequence(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    history: int,
    line_search: str | None,
    lr: float,
    iterations: int,
) -> list[torch.Tensor]:
    """torch.optim.LBFGS on the whole batch, one iteration per step() (max_iter=1), the
    parameters after each: the sequence the coordinator must follow."""
    optimizer, closure = torch_lbfgs(
        model,
        inputs,
        labels,
        lr=lr,
        max_iter=1,
        max_eval=26,  # 1 evaluation at the start of step() + at most 25 in the line search
        history_size=history,
        line_search_fn=line_search,
    )
    sequence = []
    for _ in range(iterations):
        optimizer.step(closure)
        sequence.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return sequence
