"""The batch of a Sandblaster run and how it is cut into portions: one value (``BatchPlan``) the
coordinator sends with every task, so every worker cuts it alike. Knows nothing of the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchPlan:
    """The batch every evaluation of a run uses, and how it is cut into portions.

    The batch is a fixed list of example indices: the whole training set in order, or a seeded
    sample of ``batch_size`` of them. Portion ``p`` is positions ``[p*N//P, (p+1)*N//P)`` of
    that list (``N`` its length, ``P`` the number of portions).
    """

    num_examples: int
    """Examples in the training set the indices are drawn from."""
    num_portions: int
    """Portions each evaluation is cut into (at most the batch's size, so none is empty)."""
    batch_size: int | None = None
    """Examples per evaluation: None for the whole set, else a fixed seeded sample this big."""
    seed: int = 0
    """Seed of the sample (unused for the whole set)."""

    def __post_init__(self) -> None:
        if type(self.num_examples) is not int or self.num_examples < 1:
            raise ValueError(f"num_examples must be an integer >= 1, got {self.num_examples!r}")
        if self.batch_size is not None and (
            type(self.batch_size) is not int or not 1 <= self.batch_size <= self.num_examples
        ):
            raise ValueError(
                f"batch_size must be None or an integer in [1, {self.num_examples}], "
                f"got {self.batch_size!r}"
            )
        if type(self.num_portions) is not int or not 1 <= self.num_portions <= self.size:
            raise ValueError(
                f"num_portions must be an integer in [1, {self.size}] (the batch size), "
                f"got {self.num_portions!r}"
            )
        if type(self.seed) is not int or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def size(self) -> int:
        """Examples in the batch (N)."""
        return self.num_examples if self.batch_size is None else self.batch_size

    def portion_range(self, portion: int) -> tuple[int, int]:
        """Positions ``[start, stop)`` of ``portion`` in the batch's index list.

        Raises:
            ValueError: ``portion`` is not in ``[0, num_portions)``.
        """
        if type(portion) is not int or not 0 <= portion < self.num_portions:
            raise ValueError(f"portion must be in [0, {self.num_portions}), got {portion!r}")
        return portion * self.size // self.num_portions, (
            portion + 1
        ) * self.size // self.num_portions

    def indices(self) -> torch.Tensor:
        """The batch: int64 example indices, the same on every call and in every process."""
        if self.batch_size is None:
            return torch.arange(self.num_examples)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(self.num_examples, generator=generator)[: self.batch_size]

    def to_json(self) -> dict:
        """The plan as JSON-able settings (a checkpoint holds them)."""
        return {
            "num_examples": self.num_examples,
            "num_portions": self.num_portions,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, raw: object) -> BatchPlan:
        """Inverse of :meth:`to_json`; raises ValueError on anything malformed."""
        if not isinstance(raw, dict) or set(raw) != {
            "num_examples",
            "num_portions",
            "batch_size",
            "seed",
        }:
            raise ValueError(f"malformed batch plan {raw!r}")
        return cls(**raw)
