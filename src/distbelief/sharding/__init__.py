"""Which shard owns which bytes of a model: pure functions, no I/O."""

from distbelief.sharding.partitioner import (
    FlatLayout,
    ShardSlice,
    TensorSpec,
    describe_mismatch,
    layout_fingerprint,
    partition,
    specs_from_json,
    specs_to_json,
    tensor_specs,
)

__all__ = [
    "FlatLayout",
    "ShardSlice",
    "TensorSpec",
    "describe_mismatch",
    "layout_fingerprint",
    "partition",
    "specs_from_json",
    "specs_to_json",
    "tensor_specs",
]
