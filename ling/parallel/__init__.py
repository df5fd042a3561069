"""Everything distributed, applied to the plain model from outside: meshes, expert parallelism,
FSDP2, activation checkpointing, compilation, and the Lightning strategy that drives them."""

from ling.parallel.mesh import ParallelDims, build_mesh
from ling.parallel.parallelize import ParallelPlan, parallelize

__all__ = ["ParallelDims", "ParallelPlan", "build_mesh", "parallelize"]
