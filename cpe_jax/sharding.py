"""Device meshes, the ONE table that maps logical axis names to mesh axes, and multi-host.

Every parameter, activation and cache carries logical axis names (`embed`, `heads`, ...). This
module is the only place that decides how those names map onto the physical mesh axes
`data`, `fsdp` and `tensor`, so changing a parallelism strategy is a one-line edit here.

Multi-host (one JAX process per host): `initialize_distributed` starts the runtime; a batch
becomes a global array from each host's rows (`process_row_range`, `shard_batch`,
`host_batch_to_global`); results come back through `local_rows` or `fetch_global`; only
process 0 writes files (`is_primary`, `write_atomically`).
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


# ---- multi-host start-up -----------------------------------------------------------------------
#
# One JAX process per host. Every command that touches devices calls `initialize_distributed()`
# first (the CLI does it in one place), so a command runs unchanged on one machine, under
# `cpe-jax launch`, `srun`, `mpirun`, a Kubernetes indexed job or a TPU pod.

DISTRIBUTED_TIMEOUT_SECONDS = 300  # how long the processes wait for each other at start-up (as JAX)
_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


def _env_int(environ, name, minimum):
    """The integer value of environment variable `name` (None when unset); a UserError naming it otherwise."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} must be an integer") from None
    if value < minimum:
        raise UserError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _world_size(environ, name):
    """An integer set by a cluster manager (SLURM_NTASKS, ...), 0 when unset or not a number."""
    raw = environ.get(name, "").strip()
    return int(raw) if raw.isdigit() else 0


def _on_multi_host_tpu(environ) -> bool:
    """True on a TPU VM or a multi-host TPU job, judged from the environment only (no backend start)."""
    import glob

    if environ.get("MEGASCALE_COORDINATOR_ADDRESS") or environ.get("CLOUD_TPU_TASK_ID"):
        return True
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):  # GKE: one entry per host
        if "," in environ.get(name, ""):
            return True
    # A Cloud TPU VM: JAX's own cluster detection finds the workers in the VM metadata.
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) and not environ.get("TPU_SKIP_MDS_QUERY")


def detected_cluster(environ=None) -> Optional[str]:
    """The multi-process job JAX's own detection will find ("Cloud TPU", "SLURM", "Open MPI",
    "Kubernetes"), judged from the environment only; None on a plain machine or a 1-task job."""
    import os

    environ = os.environ if environ is None else environ
    if _on_multi_host_tpu(environ):
        return "Cloud TPU"
    if environ.get("SLURM_JOB_ID") and max(_world_size(environ, "SLURM_STEP_NUM_TASKS"),
                                           _world_size(environ, "SLURM_NTASKS")) > 1:
        return "SLURM"
    if _world_size(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    if environ.get("KUBERNETES_SERVICE_HOST") and environ.get("JOB_COMPLETION_INDEX"):
        return "Kubernetes"
    return None


def distributed_settings(environ=None) -> Optional[dict]:
    """What `initialize_distributed` would pass to `jax.distributed.initialize`, from the environment.

    None: stay a single process. Otherwise a dict with `coordinator_address`, `num_processes`,
    `process_id`, `local_device_ids` (each None where JAX's cluster detection supplies it),
    `timeout` (seconds) and `cluster` (what JAX detects, or None when the JAX_* variables say it
    all). Every bad value is a UserError naming its variable.
    """
    import os

    environ = os.environ if environ is None else environ
    flag = environ.get("CPE_JAX_DISTRIBUTED", "").strip().lower()
    if flag and flag not in _OFF + _ON:
        raise UserError(f"CPE_JAX_DISTRIBUTED={flag!r} must be 0 or 1")
    address = environ.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
    if address is not None:
        host, sep, port = address.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise UserError(f"JAX_COORDINATOR_ADDRESS={address!r} must be HOST:PORT, e.g. 10.0.0.2:8476")
    num_processes = _env_int(environ, "JAX_NUM_PROCESSES", 1)
    process_id = _env_int(environ, "JAX_PROCESS_ID", 0)
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise UserError(f"JAX_PROCESS_ID={process_id} must be below JAX_NUM_PROCESSES={num_processes}")
    local_ids = environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    if local_ids:
        try:
            local_ids = [int(i) for i in local_ids.split(",")]
        except ValueError:
            raise UserError(f"JAX_LOCAL_DEVICE_IDS={local_ids!r} must be comma-separated integers, e.g. 0,1,2,3") from None
    timeout = _env_int(environ, "CPE_JAX_DISTRIBUTED_TIMEOUT", 1) or DISTRIBUTED_TIMEOUT_SECONDS
    if flag in _OFF:
        return None
    explicit = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": num_processes,
                "JAX_PROCESS_ID": process_id}
    cluster = detected_cluster(environ)
    if all(v is None for v in explicit.values()):
        if cluster is None and flag not in _ON:
            return None
    elif cluster is None:
        missing = [name for name, value in explicit.items() if value is None]
        if missing:
            set_ = next(name for name, value in explicit.items() if value is not None)
            raise UserError(f"{missing[0]} is not set: with {set_} set outside a SLURM, Open MPI, Kubernetes "
                            f"or Cloud TPU job, all of {', '.join(explicit)} are needed")
        if num_processes == 1 and flag not in _ON:
            return None
    return {"coordinator_address": address, "num_processes": num_processes, "process_id": process_id,
            "local_device_ids": local_ids or None, "timeout": timeout, "cluster": cluster}


def _port_free(port) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _answers(address, seconds=1.0) -> bool:
    """Whether something accepts TCP connections at HOST:PORT."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds):
            return True
    except OSError:
        return False


def _start_failure(settings) -> str:
    """One line saying why the processes did not all meet within the timeout."""
    address, n, pid, timeout = (settings["coordinator_address"], settings["num_processes"],
                                settings["process_id"], settings["timeout"])
    wait = "or set CPE_JAX_DISTRIBUTED_TIMEOUT to wait longer"
    if address is None:
        return (f"the multi-host runtime ({settings['cluster']}) did not start within {timeout} s; "
                f"check that every process of the job runs, {wait}")
    if pid not in (None, 0) and not _answers(address):
        return (f"the JAX coordinator at {address} (JAX_COORDINATOR_ADDRESS) did not answer within {timeout} s "
                f"(this is process {pid} of {n}); check that process 0 runs and the address is right, {wait}")
    return (f"not all {n or 'of the'} processes joined the JAX coordinator at {address} within {timeout} s; "
            f"start every process with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES, {wait}")


def initialize_distributed(enabled: Optional[bool] = None, environ=None) -> bool:
    """Start JAX's multi-host runtime (`jax.distributed.initialize`) when this is a multi-process job.

    Must run before anything touches the devices; `cpe_jax.cli` calls it for every command.
    `JAX_COORDINATOR_ADDRESS` (HOST:PORT of process 0), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` and
    `JAX_LOCAL_DEVICE_IDS` (comma-separated) are used when set (`cpe-jax launch` sets them);
    otherwise JAX's own detection finds a Cloud TPU, SLURM, Open MPI or Kubernetes job.
    `CPE_JAX_DISTRIBUTED=0` keeps a single process, `=1` initializes even when nothing is
    detected; `enabled` overrides both. A bad value is a UserError naming the variable. When
    the processes have not all met after `CPE_JAX_DISTRIBUTED_TIMEOUT` seconds (default 300),
    this prints one line naming the coordinator and ends the process with exit code 2 (JAX itself
    would abort with a stack trace). Returns whether it initialized (False when off or done already).
    """
    import os
    import sys
    import threading

    environ = os.environ if environ is None else environ
    settings = distributed_settings(environ)
    if enabled is False or jax.distributed.is_initialized():
        return False
    if settings is None:
        if not enabled:
            return False
        settings = {"coordinator_address": None, "num_processes": None, "process_id": None,
                    "local_device_ids": None, "timeout": DISTRIBUTED_TIMEOUT_SECONDS,
                    "cluster": detected_cluster(environ) or "JAX cluster detection"}
    address = settings["coordinator_address"]
    if address is not None and settings["process_id"] == 0 and not _port_free(int(address.rpartition(":")[2])):
        raise UserError(f"JAX_COORDINATOR_ADDRESS={address!r}: port {address.rpartition(':')[2]} is in use on "
                        "process 0's host; choose a free port")
    met = threading.Event()

    def give_up():
        if not met.wait(settings["timeout"]):
            print(f"cpe-jax: error: {_start_failure(settings)}", file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=give_up, name="distributed-start-deadline", daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=address, num_processes=settings["num_processes"],
            process_id=settings["process_id"], local_device_ids=settings["local_device_ids"],
            initialization_timeout=settings["timeout"] + 30,  # our deadline above ends it first, in one line
        )
    except ValueError as e:  # JAX could not work out the job (no coordinator, bad ids)
        raise UserError(f"cannot start the multi-host runtime: {e}") from None
    finally:
        met.set()
    return True


# ---- host-local rows <-> global arrays ---------------------------------------------------------
#
# Multi-controller JAX: every process runs the same program, but a process can only read and
# write the shards on its own devices. Inputs are therefore built from each host's rows, and
# results are read either from the host's own shards or through an explicit all-gather. Batches
# are split over the `batch` logical axis (mesh axes data x fsdp); the rows of a global batch a
# process holds depend only on the mesh, so the global batch s (which every host computes the
# same way) is the same rows in the same order on 1, 2, 4 or 8 hosts.


def all_hosts(flag: bool) -> bool:
    """True when `flag` is True on every process (a tiny all-gather on several): hosts that must
    take the same branch into collective work (compute or read a cache) decide with it."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def hosts_meet(name: str) -> None:
    """Every host waits here until all have arrived (a barrier named `name`), e.g. until process 0
    has written or removed a shared file that the others read next; nothing on one host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_host_local(mesh: Optional[Mesh]) -> bool:
    """True when `mesh` (None: one default device) holds only this process's devices: code on it
    runs on this host alone, so hosts of a multi-host job can each run their own copy of it."""
    devices = jax.local_devices()[:1] if mesh is None else list(mesh.devices.flat)
    return all(d.process_index == jax.process_index() for d in devices)


def host_share(count: int) -> range:
    """This process's contiguous share of `count` host-side work items that every host holds
    (the prompts of `cpe-jax generate`, the judge calls of eval): host h of N takes items
    count*h//N to count*(h+1)//N, so shares differ by at most one item and, concatenated in
    process order, are the items in order."""
    count, hosts, index = int(count), jax.process_count(), jax.process_index()
    return range(count * index // hosts, count * (index + 1) // hosts)


def gather_json(obj) -> list:
    """Every host's `obj` (JSON-serialisable; NaN and inf allowed), in process order, on every
    host (two all-gathers: sizes, then the padded bytes). Floats come back bit-exact."""
    import json

    if jax.process_count() == 1:
        return [json.loads(json.dumps(obj))]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:size]).decode("utf-8")) for row, size in zip(gathered, sizes)]


def spread_over_hosts(work, items) -> list:
    """`work(share)` on this host's share (`host_share`) of `items`, which every host holds the
    same; returns every host's results concatenated in process order, on every host. `work`
    returns a list of JSON-serialisable values and must not run collectives (each host works
    alone, e.g. on a host-local mesh or an HTTP judge). One process: `work(items)`."""
    items = list(items)
    if jax.process_count() == 1:
        return list(work(items))
    share = host_share(len(items))
    own = list(work(items[share.start:share.stop])) if len(share) else []
    return [value for part in gather_json(own) for value in part]


def is_primary() -> bool:
    """True on process 0, the one host that writes metrics, reports and output files."""
    return jax.process_index() == 0


def process_row_range(mesh: Mesh, global_rows: int) -> range:
    """The rows `start:stop` of a global batch of `global_rows` rows that this process holds when
    the batch is split over the `batch` logical axis of `mesh` (as `shard_batch` places it).

    All rows when the batch dimension is replicated (a mesh without data/fsdp parallelism, or a
    row count the batch axes do not divide). With `make_mesh` meshes the range is contiguous.
    """
    global_rows = int(global_rows)
    sharding = logical_sharding(mesh, ("batch",), (global_rows,))
    blocks = sorted({(index[0].start or 0, global_rows if index[0].stop is None else index[0].stop)
                     for index in sharding.addressable_devices_indices_map((global_rows,)).values()})
    start, stop = blocks[0][0], blocks[-1][1]
    covered = sum(b - a for a, b in blocks)
    if covered != stop - start:
        raise ValueError(f"the mesh gives process {jax.process_index()} non-contiguous batch rows {blocks}; "
                         "order the mesh devices by process (make_mesh does)")
    return range(start, stop)


def host_rows(mesh: Mesh, global_batch):
    """This process's rows (`process_row_range`) of every array of a host-side global batch."""

    def take(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return x
        rows = process_row_range(mesh, x.shape[0])
        return x[rows.start:rows.stop]

    return jax.tree.map(take, global_batch)


def host_batch_to_global(mesh: Mesh, host_batch, global_rows: int):
    """A global jax.Array per array of `host_batch`, from this process's rows only.

    `host_batch` holds rows `process_row_range(mesh, global_rows)` of a batch of `global_rows`
    rows (e.g. read by this host from its part of the data); every process calls this with its
    own rows and gets the same global array, leading dimension split over the batch axes.
    0-d values are taken as equal on every host and replicated. Uses
    `jax.make_array_from_process_local_data`, so nothing is sent between hosts.
    """
    rows = process_row_range(mesh, global_rows)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(replicated(mesh), x, ())
        if x.shape[0] != len(rows):
            raise ValueError(f"process {jax.process_index()} holds rows {rows.start}:{rows.stop} of {global_rows} "
                             f"but its host batch has {x.shape[0]} rows (shape {x.shape})")
        global_shape = (global_rows,) + x.shape[1:]
        sharding = logical_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), global_shape)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, host_batch)


def shard_batch(mesh: Mesh, batch):
    """Place a host-side global batch (the same on every host) with its leading dimension split
    over the batch axes; each process transfers only its own rows (`host_rows`)."""
    batch = jax.tree.map(np.asarray, batch)
    leaves = [x for x in jax.tree.leaves(batch) if x.ndim]
    if not leaves:
        return host_batch_to_global(mesh, batch, 1)
    sizes = {x.shape[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays differ in their number of rows: {sorted(sizes)}")
    return host_batch_to_global(mesh, host_rows(mesh, batch), sizes.pop())


def fetch_global(tree):
    """Every jax.Array of `tree` as a numpy array of its global value, on every host.

    A collective when an array is split over processes (`process_allgather`), so every process
    must call it with arrays of the same shardings; use it where each host needs every row (e.g. a
    batch-level decision all hosts must take identically). Non-jax values pass through.
    """
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def local_rows(tree):
    """This host's rows of every jax.Array of `tree` (no communication), as numpy arrays.

    For a batch-sharded array these are rows `process_row_range(mesh, x.shape[0])`, in order,
    replicas (e.g. over `tensor`) counted once. An array this host does not hold whole rows of
    (another dimension split across processes) is a ValueError: use `fetch_global`.
    """

    def rows(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.ndim == 0:
            return np.asarray(jax.device_get(x)) if x.is_fully_addressable else np.asarray(x.addressable_data(0))
        shards = x.addressable_shards
        starts = [s.index[0].indices(x.shape[0])[:2] for s in shards]
        start, stop = min(a for a, _ in starts), max(b for _, b in starts)
        out = np.empty((stop - start,) + x.shape[1:], x.dtype)
        filled = np.zeros(out.shape, bool)
        for shard, (a, b) in zip(shards, starts):
            index = (slice(a - start, b - start),) + tuple(shard.index[1:])
            out[index] = np.asarray(shard.data)
            filled[index] = True
        if not filled.all():
            raise ValueError(f"process {jax.process_index()} does not hold whole rows {start}:{stop} of an array of "
                             f"shape {x.shape} ({x.sharding}); use fetch_global")
        return out

    return jax.tree.map(rows, tree)


def write_atomically(path, data) -> bool:
    """Write `data` (str or bytes) to `path` from process 0 only, all at once: a reader (or a
    crash) never sees half a file. Local paths go through PATH.tmp and a rename; cloud paths
    (gs://...) are written as one object. Returns whether this process wrote."""
    import os

    if not is_primary():
        return False
    path = os.fspath(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    if "://" in path:
        from etils import epath

        with epath.Path(path).open(mode) as f:
            f.write(data)
        return True
    tmp = f"{path}.tmp"
    with open(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True
