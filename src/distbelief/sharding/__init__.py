"""Which shard owns which bytes of a model: pure functions, no I/O."""

from distbelief.sharding.layout import (
    FlatLayout,
    ShardSlice,
    TensorSpec,
    describe_misfit,
    describe_mismatch,
    layout_fingerprint,
    matched_to_model,
    specs_from_json,
    specs_to_json,
    tensor_specs,
)
from distbelief.sharding.partitioner import (
    FlatPartitioner,
    ParameterGroupPartitioner,
    Partitioner,
    RowAlignedPartitioner,
    describe_partitioner,
    partitioner_from_json,
)

__all__ = [
    "FlatLayout",
    "FlatPartitioner",
    "ParameterGroupPartitioner",
    "Partitioner",
    "RowAlignedPartitioner",
    "ShardSlice",
    "TensorSpec",
    "describe_misfit",
    "describe_mismatch",
    "describe_partitioner",
    "layout_fingerprint",
    "matched_to_model",
    "partitioner_from_json",
    "specs_from_json",
    "specs_to_json",
    "tensor_specs",
]
