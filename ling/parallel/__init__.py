"""Everything applied to the plain model from outside: float8, meshes, expert parallelism, FSDP2,
activation checkpointing, compilation, and the Lightning strategy that drives them."""

from ling.parallel.float8 import Float8Config, apply_float8
from ling.parallel.layout import AC_MODES, ParallelDims
from ling.parallel.mesh import build_mesh
from ling.parallel.parallelize import ParallelPlan, parallelize

__all__ = ["AC_MODES", "Float8Config", "ParallelDims", "ParallelPlan", "apply_float8", "build_mesh", "parallelize"]
