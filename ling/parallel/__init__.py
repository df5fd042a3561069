"""Everything applied to the plain model from outside: float8, meshes, expert parallelism, FSDP2,
activation checkpointing, compilation, and the Lightning strategy that drives them."""

from ling.parallel.float8 import Float8Plan, apply_float8
from ling.parallel.mesh import ParallelDims, build_mesh
from ling.parallel.parallelize import ParallelPlan, parallelize

__all__ = ["Float8Plan", "ParallelDims", "apply_float8", "ParallelPlan", "build_mesh", "parallelize"]
