"""Device meshes and the ONE table that maps logical axis names to mesh axes.

Every parameter, activation and cache carries logical axis names (`embed`, `heads`, ...). This
module is the only place that decides how those names map onto the physical mesh axes
`data`, `fsdp` and `tensor`, so changing a parallelism strategy is a one-line edit here.
"""

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpe_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (None: replicated).
LOGICAL_AXIS_RULES = {
    "batch": ("data", "fsdp"),
    "length": None,
    "cache_length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    "layers": None,
}


def make_mesh(axes: dict, devices: Optional[Sequence] = None) -> Mesh:
    """Build a mesh with axes `data`, `fsdp`, `tensor` from sizes like {"data": 2, "fsdp": -1}.

    Missing axes get size 1; one axis may be -1, meaning "all remaining devices".
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise UserError(f"mesh axis {sorted(unknown)[0]!r} is not one of {MESH_AXES}")
    sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise UserError(f"only one mesh axis may be -1, got {free}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise UserError(f"mesh axis sizes must be positive or -1, got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise UserError(f"mesh {sizes}: {len(devices)} devices are not divisible by {fixed}")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total > len(devices):
        raise UserError(f"mesh {sizes} needs {total} devices but {len(devices)} are available")
    devices = devices[:total]  # a fixed-size mesh may use a subset of the devices
    grid = np.asarray(devices, dtype=object).reshape([sizes[name] for name in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape=None, mesh: Optional[Mesh] = None):
    """PartitionSpec for logical axis names; with `shape` and `mesh`, dims that don't divide stay replicated."""
    spec = []
    used = set()
    for i, name in enumerate(logical_axes):
        mesh_axes = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise ValueError(f"logical axis {name!r} has no sharding rule")
        if isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        if mesh_axes and mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
            if shape is not None:
                # Keep the longest prefix of mesh axes whose product divides the dimension.
                kept = []
                for a in mesh_axes:
                    if shape[i] % (math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]) == 0:
                        kept.append(a)
                    else:
                        break
                mesh_axes = tuple(kept)
        if mesh_axes:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical_axes, shape=None) -> NamedSharding:
    """NamedSharding on `mesh` for an array with these logical axes (and this shape, if known)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(mesh: Mesh, batch):
    """Place every array of a host batch with its leading dimension split over the batch axes."""

    def put(x):
        x = np.asarray(x)
        axes = ("batch",) + (None,) * (x.ndim - 1)
        return jax.device_put(x, logical_sharding(mesh, axes, x.shape))

    return jax.tree.map(put, batch)
