"""Orbax checkpoints: standalone model checkpoints (weights + config) and training checkpoints.

A model checkpoint directory holds `cpe_jax_model.json` (the model config and generation config),
`params/` (Orbax, restored straight into the requested sharding) and the tokenizer files, so it
converts back to Hugging Face without the original directory.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cpe_jax.errors import UserError, require_path

MODEL_METADATA = "cpe_jax_model.json"


def _dir(path):
    """A local absolute path or a cloud path (gs://...), as an etils.epath.Path Orbax accepts."""
    from etils import epath

    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def is_model_checkpoint(path) -> bool:
    return (_dir(path) / MODEL_METADATA).exists()


def _nested(flat_state):
    """{"layers": {"0": {"attn": {...}}}} with string keys, as Orbax stores trees."""
    tree = {}
    for path, var in flat_state:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = var
    return tree


def save_model(model, out_dir, *, tokenizer_dir=None):
    """Write weights, config and tokenizer files of `model` to `out_dir` (overwrites `params/`)."""
    from cpe_jax.models.qwen2.params import copy_tokenizer_files

    out_dir = _dir(out_dir)
    _, state = nnx.split(model)
    arrays = _nested((p, v.get_value()) for p, v in nnx.to_flat_state(state))
    params_dir = out_dir / "params"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, arrays, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        metadata = {
            "format": "cpe_jax.qwen2",
            "config": model.config.to_hf_dict(),
            "param_dtype": model.config.param_dtype,
            "scan_layers": model.config.scanned,
            "generation_config": getattr(model, "generation_config", None),
        }
        (out_dir / MODEL_METADATA).write_text(json.dumps(metadata, indent=2))
        source = tokenizer_dir or getattr(model, "source_dir", None)
        if source:
            copy_tokenizer_files(source, out_dir)


def _relayout(restored, flat, num_layers, saved_scanned):
    """{target path: array} for the target layout from arrays restored in the saved layout:
    a stacked [L, ...] parameter ("layers.x") is split into, or joined from, "layers.{i}.x"."""
    out = {}
    for p, _ in flat:
        key = ".".join(str(k) for k in p)
        if key in restored:
            out[key] = restored[key]
        elif saved_scanned:  # target per layer, saved stacked
            layer, rest = int(p[1]), ".".join(str(k) for k in p[2:])
            out[key] = restored[f"{p[0]}.{rest}"][layer]
        else:  # target stacked, saved per layer
            rest = ".".join(str(k) for k in p[1:])
            out[key] = jnp.stack([restored[f"{p[0]}.{i}.{rest}"] for i in range(num_layers)])
    return out


def restore_model(path, *, dtype=None, param_dtype=None, mesh=None, scan_layers=None):
    """Restore a model checkpoint directly into the target sharding (no full host copy).
    `scan_layers` picks the layer layout (None: by backend); a checkpoint saved in the other
    layout has its stacked parameters split or joined, bit for bit."""
    from cpe_jax.models.qwen2.model import Qwen2Config, StaticDict
    from cpe_jax.models.qwen2.params import abstract_model, default_compute_dtype, param_sharding

    require_path(path, "checkpoint")
    meta_path = _dir(path) / MODEL_METADATA
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: invalid JSON ({e})") from None
    config = Qwen2Config.from_hf_dict(
        meta["config"],
        source=meta_path,
        dtype=dtype or default_compute_dtype(),
        param_dtype=param_dtype or meta.get("param_dtype", "float32"),
        scan_layers=scan_layers,
    )
    config = config.replace(scan_layers=config.scanned)
    saved_scanned = bool(meta.get("scan_layers", False))
    graphdef, state, _ = abstract_model(config)
    flat = list(nnx.to_flat_state(state))
    saved_flat = flat if saved_scanned == config.scan_layers else list(
        nnx.to_flat_state(abstract_model(config.replace(scan_layers=saved_scanned))[1]))
    stored_dtype = jnp.dtype(meta.get("param_dtype", config.param_dtype))
    target = _nested(
        (p, jax.ShapeDtypeStruct(v.get_value().shape, stored_dtype, sharding=param_sharding(v, mesh)))
        for p, v in saved_flat
    )
    params_dir = _dir(path) / "params"
    require_path(params_dir, "checkpoint parameters")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(f"{params_dir}: cannot restore parameters ({e})") from None
    by_path = {}
    for p, _ in saved_flat:
        node = restored
        for key in p:
            node = node[str(key)]
        by_path[".".join(str(k) for k in p)] = node
    by_path = _relayout(by_path, flat, config.num_hidden_layers, saved_scanned)
    for p, var in flat:
        node = by_path[".".join(str(k) for k in p)]
        if saved_scanned != config.scan_layers:
            node = jax.device_put(node, param_sharding(var, mesh))
        var.set_value(node if node.dtype == jnp.dtype(config.param_dtype) else node.astype(config.param_dtype))
    model = nnx.merge(graphdef, state)
    model.generation_config = StaticDict(meta["generation_config"]) if meta.get("generation_config") else None
    model.source_dir = str(_dir(path))
    return model


# ---- training checkpoints ----------------------------------------------------------------------


class TrainCheckpointer:
    """Resumable training checkpoints: the state pytree (Orbax, async, keep-N) plus a JSON `extra`.

    `extra` holds what resume needs beyond arrays: data position, RNG seed, the config. `restore`
    places every array straight into the sharding of the abstract state it is given, so a large
    model is never gathered on one host.

    Multi-host: every process creates the checkpointer on the same (shared) directory and calls
    `save`/`restore` at the same steps; each process writes and reads only its own shards, and
    process 0 writes the metadata and `extra`. A checkpoint written by N processes restores on
    any number of processes and any mesh (the abstract state's sharding decides).
    """

    def __init__(self, directory, *, keep=3, async_save=True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.directory = str(_dir(directory))
        self._manager = ocp.CheckpointManager(_dir(directory), options=options)

    def latest_step(self):
        """The newest finished checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, step, state, extra=None, *, force=False):
        """Start saving `state` at `step` (returns once the arrays are copied off the devices)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_global_arrays(state)), extra=ocp.args.JsonSave(dict(extra or {}))
        )
        return self._manager.save(int(step), args=args, force=force)

    def restore(self, abstract_state, step=None):
        """(state, extra) of `step` (default: latest), each array in `abstract_state`'s sharding."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no training checkpoint in {self.directory}")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_global_arrays(abstract_state)), extra=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(int(step), args=args)
        except (ValueError, KeyError) as e:
            raise UserError(
                f"{self.directory}: checkpoint of step {step} does not match this config ({e})"
            ) from None
        return _placed_like(restored.state, abstract_state), dict(restored.extra or {})

    def wait(self):
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def _everywhere():
    """A sharding that replicates over every device of every process."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def _global_arrays(tree):
    """Orbax saves and restores only global arrays in a multi-process job: a process-local array
    (e.g. a step counter made outside jit; the same on every host in SPMD code) or its abstract
    stand-in becomes one replicated over every device. Nothing changes on one process."""
    if jax.process_count() == 1:
        return tree

    def widen(x):
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            return jax.make_array_from_process_local_data(_everywhere(), np.asarray(x), x.shape)
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None and x.sharding.is_fully_addressable:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_everywhere())
        return x

    return jax.tree.map(widen, tree)


def _placed_like(restored, abstract_state):
    """Restored arrays that `_global_arrays` widened, put back on the process-local sharding asked for."""
    if jax.process_count() == 1:
        return restored

    def narrow(x, target):
        sharding = getattr(target, "sharding", None)
        if isinstance(x, jax.Array) and sharding is not None and sharding.is_fully_addressable:
            return jax.device_put(x.addressable_data(0), sharding)
        return x

    return jax.tree.map(narrow, restored, abstract_state)


class PreemptionGuard:
    """`with PreemptionGuard() as guard:` a SIGTERM sets `guard.requested` instead of killing us.

    After each step the loop asks `guard.should_stop(step)`, then saves and exits cleanly when it
    is True (a TPU preemption sends SIGTERM with a grace period). The answer is agreed by all
    processes, so when any one host is signalled every host saves the same step and stops; a loop
    that read `requested` directly could leave hosts taking different branches and hanging in the
    next collective. Outside the main thread no handler is installed.
    """

    def __init__(self, signals=None):
        import signal

        self.signals = tuple(signals or (signal.SIGTERM,))
        self.requested = False
        self._previous = {}

    def request(self, signum=None, frame=None):
        """The signal handler; also callable directly."""
        self.requested = True

    def should_stop(self, step) -> bool:
        """True when any process has been asked to stop: the same answer on every host.

        Every process must call this once after each step, with the same `step` (checked: hosts
        at different steps are a bug and raise RuntimeError). On one process it is `requested`;
        on several it all-gathers (step, flag), one tiny collective per step.
        """
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        votes = np.asarray(multihost_utils.process_allgather(np.asarray([int(step), int(self.requested)], np.int32)))
        steps = sorted({int(s) for s in votes[:, 0]})
        if len(steps) != 1:
            raise RuntimeError(f"hosts disagree on the step at the preemption check: {steps}")
        return bool(votes[:, 1].any())

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self.request)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
