"""Model parallelism: one replica split into contiguous partitions, each run by its own stage,
which exchange each micro-batch's activations forward and their gradients backward on a
pipeline schedule.
"""
