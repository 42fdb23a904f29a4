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


# ---- multi-slice meshes and multi-host start-up ------------------------------------------------


def make_hybrid_mesh(ici: dict, dcn: dict, devices: Optional[Sequence] = None) -> Mesh:
    """Mesh over several TPU slices: `ici` sizes within a slice, `dcn` sizes across slices.

    Each mesh axis has size ici[axis] * dcn[axis]; only the dcn part crosses the slow data-center
    network, so put `data` (one gradient all-reduce per step) on it and keep `fsdp`/`tensor` inside
    a slice. `ici` may use -1 for "the rest of a slice". Devices without `slice_index` (CPU, one
    slice) count as one slice, so the dcn sizes must then all be 1.
    """
    return Mesh(hybrid_device_grid(ici, dcn, devices), MESH_AXES)


def hybrid_device_grid(ici: dict, dcn: dict, devices: Optional[Sequence] = None) -> np.ndarray:
    """The [data, fsdp, tensor] device array of `make_hybrid_mesh` (devices grouped by slice)."""
    devices = list(jax.devices() if devices is None else devices)
    for name in set(ici) | set(dcn):
        if name not in MESH_AXES:
            raise UserError(f"mesh axis {name!r} is not one of {MESH_AXES}")
    dcn_shape = [int(dcn.get(name, 1)) for name in MESH_AXES]
    if any(size < 1 for size in dcn_shape):
        raise UserError(f"dcn mesh sizes must be positive, got {dict(dcn)}")
    slices = {getattr(d, "slice_index", 0) for d in devices}
    num_slices = math.prod(dcn_shape)
    if num_slices != len(slices):
        raise UserError(f"dcn mesh {dict(dcn)} spans {num_slices} slices but the devices are on {len(slices)}")
    per_slice = len(devices) // num_slices
    ici_sizes = _resolve_sizes(ici, per_slice)
    if math.prod(ici_sizes.values()) != per_slice:
        raise UserError(f"ici mesh {ici_sizes} does not use all {per_slice} devices of a slice")
    ici_shape = [ici_sizes[name] for name in MESH_AXES]
    if num_slices == 1:
        return np.asarray(devices, dtype=object).reshape(ici_shape)
    from jax.experimental import mesh_utils

    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)


def _resolve_sizes(axes: dict, num_devices: int) -> dict:
    """Mesh axis sizes with a -1 replaced by the rest of `num_devices` (as in make_mesh)."""
    sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise UserError(f"mesh sizes must be positive with at most one -1, got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise UserError(f"mesh {sizes}: {num_devices} devices are not divisible by {fixed}")
        sizes[free[0]] = num_devices // fixed
    return sizes


_DISTRIBUTED_ENV = ("MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID")


def _on_multi_host_tpu(environ) -> bool:
    """True on a TPU VM or a multi-host TPU job, judged from the environment only (no backend start)."""
    import glob

    if any(environ.get(name) for name in _DISTRIBUTED_ENV):
        return True
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):  # GKE: one entry per host
        if "," in environ.get(name, ""):
            return True
    # A Cloud TPU VM: JAX's own cluster detection finds the workers in the VM metadata.
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) and not environ.get("TPU_SKIP_MDS_QUERY")


def initialize_distributed(enabled: Optional[bool] = None, environ=None) -> bool:
    """Start JAX's multi-host runtime (`jax.distributed.initialize()`) when running on a TPU pod.

    Must run before anything touches the devices. `enabled=None` reads `CPE_JAX_DISTRIBUTED`
    (`0` off, `1` always) and otherwise detects a TPU VM or a multi-host TPU job from the
    environment; JAX then finds the coordinator and the process ids itself. Returns whether it
    initialized (False when off or already initialized).
    """
    import os

    environ = os.environ if environ is None else environ
    if enabled is None:
        flag = environ.get("CPE_JAX_DISTRIBUTED", "").strip().lower()
        if flag in ("0", "false", "no", "off"):
            return False
        if flag and flag not in ("1", "true", "yes", "on"):
            raise UserError(f"CPE_JAX_DISTRIBUTED={flag!r} must be 0 or 1")
        enabled = bool(flag) or _on_multi_host_tpu(environ)
    if not enabled or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize()
    return True
