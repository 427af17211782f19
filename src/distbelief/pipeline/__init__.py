"""Model parallelism: one replica split into contiguous partitions, each run by its own stage,
which exchange each micro-batch's activations forward and their gradients backward on a
pipeline schedule.
"""

from distbelief.pipeline.engine import PipelineStage, StageStepFigures
from distbelief.pipeline.layers import StageModule, build_stage, pipeline_layers
from distbelief.pipeline.links import LinkCounters, StageLinks
from distbelief.pipeline.local_links import local_links
from distbelief.pipeline.split import StageSplit, split_model
from distbelief.pipeline.wire_links import WireLinks, wire_links

__all__ = [
    "LinkCounters",
    "PipelineStage",
    "StageLinks",
    "StageModule",
    "StageSplit",
    "StageStepFigures",
    "WireLinks",
    "build_stage",
    "local_links",
    "pipeline_layers",
    "split_model",
    "wire_links",
]
