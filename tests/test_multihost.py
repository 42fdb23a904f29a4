"""Multi-host for real: 2 JAX processes x 4 CPU devices against 1 process x 8 devices.

One 2-host job and one 1-host job run the same program (`PROGRAM`): global arrays from each
host's rows, fetches, the checkpoint of a sharded state (saved by 2 processes, restored by 2 and
by 1), atomic output from process 0, and - on 2 hosts - a training-like loop in which only host
1 gets SIGTERM. The checks compare the hosts with each other, with the 1-host run and with numpy.
"""

import signal

import numpy as np
import pytest

from tests.multihost import run_job, start_job

ROWS = 16

PROGRAM = """
import os, time
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from cpe_jax.checkpoints import PreemptionGuard, TrainCheckpointer
from cpe_jax.sharding import (fetch_global, host_batch_to_global, host_rows, is_primary, local_rows, make_mesh,
                              process_row_range, shard_batch, write_atomically)

ROWS = %(rows)d
work = os.environ["MH_WORKDIR"]
batch = {"tokens": np.arange(ROWS * 5, dtype=np.int32).reshape(ROWS, 5),
         "weight": np.linspace(0, 1, ROWS, dtype=np.float32), "scale": np.float32(3)}

@jax.jit
def score(b):
    per_row = (b["tokens"].astype(jnp.float32) * b["weight"][:, None]).sum(1) * b["scale"]
    return per_row, per_row.mean()

for name, axes in [("data2_fsdp4", {"data": 2, "fsdp": 4}), ("data2_fsdp2_tensor2", {"data": 2, "fsdp": 2, "tensor": 2}),
                   ("tensor8", {"tensor": 8})]:
    mesh = make_mesh(axes)
    rows = process_row_range(mesh, ROWS)
    placed = host_batch_to_global(mesh, host_rows(mesh, batch), ROWS)
    per_row, mean = score(placed)
    emit({"mesh": name, "rows": [rows.start, rows.stop], "global": fetch_global(per_row).tolist(),
          "mean": float(fetch_global(mean)), "local": local_rows(per_row).tolist(),
          "tokens": fetch_global(shard_batch(mesh, batch)["tokens"]).tolist()})

# A sharded state: saved by every process (each its own shards) only in the 2-host run.
mesh = make_mesh({"data": 2, "fsdp": 4})
w = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
state = {"w": jax.device_put(w, NamedSharding(mesh, P(("data", "fsdp"), None))),
         "b": jax.device_put(jnp.arange(6.0), NamedSharding(mesh, P())), "step": jnp.int32(7)}
saved = os.path.join(work, "saved_by_two_hosts")
if jax.process_count() == 2:
    ckpt = TrainCheckpointer(saved, keep=2)
    ckpt.save(7, state, extra={"position": 42}, force=True)
    ckpt.close()
# Restore straight into another sharding (columns over tensor, rows over fsdp).
other = make_mesh({"fsdp": 4, "tensor": 2})
target = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(other, P("fsdp", "tensor"))),
          "b": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(other, P("tensor"))),
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))}
restored, extra = TrainCheckpointer(saved).restore(target)
emit({"restored": {k: np.asarray(fetch_global(v)).tolist() for k, v in restored.items()}, "extra": extra,
      "in_target_sharding": all(restored[k].sharding == target[k].sharding for k in target),
      "wrote": write_atomically(os.path.join(work, "report-%%d.txt" %% jax.process_count()),
                                "written by process %%d of %%d" %% (jax.process_index(), jax.process_count()))})

if jax.process_count() == 2:  # SIGTERM to one host: all hosts agree on the step to save
    preempt = TrainCheckpointer(os.path.join(work, "preempted"), keep=2)
    x = jax.device_put(jnp.zeros((8,)), NamedSharding(mesh, P(("data", "fsdp"))))
    add = jax.jit(lambda a: a + jnp.mean(a) + 1)  # a cross-host reduction every step
    step = 0
    with PreemptionGuard() as guard:
        while step < 300:
            x = add(x)
            step += 1
            emit({"step": step})
            time.sleep(0.05)
            if guard.should_stop(step):
                preempt.save(step, {"x": x}, extra={"step": step}, force=True)
                preempt.close()
                emit({"stopped_at": step, "signalled": guard.requested, "latest": preempt.latest_step()})
                break
"""


def _reference():
    tokens = np.arange(ROWS * 5, dtype=np.int32).reshape(ROWS, 5)
    weight = np.linspace(0, 1, ROWS, dtype=np.float32)
    per_row = (tokens.astype(np.float32) * weight[:, None]).sum(1) * np.float32(3)
    return tokens, per_row


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def two_hosts(workdir):
    """The program as 2 processes x 4 devices; host 1 (only) gets SIGTERM once both reached step 3."""
    job = start_job(PROGRAM % {"rows": ROWS}, env={"MH_WORKDIR": str(workdir)})
    both_running = job.wait_for(
        lambda r: all(any(o.get("step", 0) >= 3 for o in r.get(h, [])) for h in (0, 1)), timeout=240)
    if both_running:
        job.local.processes[1].send_signal(signal.SIGTERM)
    job.wait(timeout=120)
    assert both_running, job.out.text()
    return job.check()


@pytest.fixture(scope="module")
def one_host(workdir, two_hosts):
    """The same program as 1 process x 8 devices (restoring the 2-host checkpoint)."""
    return run_job(PROGRAM % {"rows": ROWS}, hosts=1, devices_per_host=8, env={"MH_WORKDIR": str(workdir)}).check()


def _by_mesh(results):
    return {o["mesh"]: o for o in results if "mesh" in o}


def test_global_arrays_from_host_rows_match_one_host(two_hosts, one_host):
    tokens, per_row = _reference()
    one = _by_mesh(one_host.results[0])
    for host in (0, 1):
        got = _by_mesh(two_hosts.results[host])
        for mesh in ("data2_fsdp4", "data2_fsdp2_tensor2", "tensor8"):
            np.testing.assert_allclose(got[mesh]["global"], per_row, rtol=1e-6)
            np.testing.assert_allclose(got[mesh]["global"], one[mesh]["global"], rtol=1e-6)
            assert got[mesh]["mean"] == pytest.approx(float(per_row.mean()), rel=1e-6)
            np.testing.assert_array_equal(got[mesh]["tokens"], tokens)  # shard_batch of the global batch
    # Batch rows follow the mesh: split by data x fsdp over hosts, all rows when the batch is replicated.
    for mesh, ranges in {"data2_fsdp4": [[0, 8], [8, 16]], "data2_fsdp2_tensor2": [[0, 8], [8, 16]],
                         "tensor8": [[0, 16], [0, 16]]}.items():
        for host in (0, 1):
            got = _by_mesh(two_hosts.results[host])[mesh]
            assert got["rows"] == ranges[host]
            start, stop = ranges[host]
            np.testing.assert_allclose(got["local"], per_row[start:stop], rtol=1e-6)
        assert one[mesh]["rows"] == [0, ROWS]
        np.testing.assert_allclose(one[mesh]["local"], per_row, rtol=1e-6)


def _restore_result(job, host):
    return next(o for o in job.results[host] if "restored" in o)


def test_checkpoint_saved_by_two_hosts_restores_on_two_and_on_one(two_hosts, one_host):
    expected = {"w": np.arange(48, dtype=np.float32).reshape(8, 6).tolist(), "b": list(np.arange(6.0)), "step": 7}
    for result in (_restore_result(two_hosts, 0), _restore_result(two_hosts, 1), _restore_result(one_host, 0)):
        assert result["restored"] == expected
        assert result["extra"] == {"position": 42}
        assert result["in_target_sharding"]


def test_only_process_zero_writes_output(two_hosts, one_host, workdir):
    assert [_restore_result(two_hosts, h)["wrote"] for h in (0, 1)] == [True, False]
    assert (workdir / "report-2.txt").read_text() == "written by process 0 of 2"
    assert (workdir / "report-1.txt").read_text() == "written by process 0 of 1"
    assert not list(workdir.glob("*.tmp"))


def test_sigterm_to_one_host_stops_every_host_at_the_same_step(two_hosts):
    ends = [next(o for o in two_hosts.results[h] if "stopped_at" in o) for h in (0, 1)]
    assert ends[0]["stopped_at"] == ends[1]["stopped_at"] < 300
    assert [e["signalled"] for e in ends] == [False, True]  # host 0 stopped because host 1 was told to
    assert ends[0]["latest"] == ends[1]["latest"] == ends[0]["stopped_at"]
    last_steps = [max(o["step"] for o in two_hosts.results[h] if "step" in o) for h in (0, 1)]
    assert last_steps == [ends[0]["stopped_at"]] * 2
