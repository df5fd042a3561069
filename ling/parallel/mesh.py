"""The device mesh of a `ParallelDims` layout: ("dp_replicate", "efsdp", "ep"), with "dp_shard" = efsdp x ep.

Dense weights are sharded over dp_shard (and replicated over dp_replicate, HSDP); routed experts are
split over ep and their slices sharded over efsdp (see `ling.parallel.layout`).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ling.parallel.layout import ParallelDims


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """One mesh ("dp_replicate", "efsdp", "ep") with the flattened "dp_shard" (= efsdp x ep) view."""
    mesh = init_device_mesh(device_type, (dims.dp_replicate, dims.efsdp, dims.ep),
                            mesh_dim_names=("dp_replicate", "efsdp", "ep"))  # fmt: skip
    # torch 2.13 has no public DeviceMesh flatten (dir(DeviceMesh) lists only `_flatten`); torchtitan
    # names its dp_shard view with the same call.
    mesh["efsdp", "ep"]._flatten("dp_shard")
    return mesh


def mesh_dims(mesh: DeviceMesh) -> ParallelDims:
    """The layout a mesh of `build_mesh` was built for."""
    return ParallelDims(mesh["dp_replicate"].size(), mesh["dp_shard"].size(), mesh["ep"].size())
