"""Model parallelism: one replica split into contiguous partitions, each run by its own stage,
which exchange each micro-batch's activations forward and their gradients backward on a
pipeline schedule. (The link makers ``local_links`` and ``wire_links`` are imported from
their modules, whose names they share.)
"""

from distbelief.pipeline.engine import PipelineStage, StageStepFigures
from distbelief.pipeline.layers import StageModule, build_stage, pipeline_layers
from distbelief.pipeline.links import LinkCounters, StageLinks
from distbelief.pipeline.split import StageSplit, split_model
from distbelief.pipeline.wire_links import WireLinks

__all__ = [
    "LinkCounters",
    "PipelineStage",
    "StageLinks",
    "StageModule",
    "StageSplit",
    "StageStepFigures",
    "WireLinks",
    "build_stage",
    "pipeline_layers",
    "split_model",
]
