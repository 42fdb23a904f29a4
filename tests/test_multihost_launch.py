"""The local multi-host launcher and the multi-host start-up: exit codes, output, dead hosts, and
the environment variables `initialize_distributed` reads (bad values exit 2 naming them; a
coordinator that never answers fails in one line within the timeout)."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from cpe_jax.errors import UserError
from cpe_jax.launch import LocalJob, free_port
from cpe_jax.sharding import distributed_settings
from tests.multihost import Output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_each_host_gets_its_jax_variables_and_prefixed_output_and_the_first_failure_is_returned():
    out, err = Output(), Output()
    job = LocalJob(_python("""
        import os, signal, sys, time
        host = int(os.environ["JAX_PROCESS_ID"])
        print(os.environ["JAX_NUM_PROCESSES"], os.environ["JAX_COORDINATOR_ADDRESS"], os.environ["JAX_PLATFORMS"],
              os.environ["XLA_FLAGS"], flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        if host == 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep({0: 60, 1: 3, 2: 2}[host])  # every host has printed before the first one fails
        sys.exit({0: 0, 1: 5, 2: 3}[host])     # host 2 fails first, host 1 later (within the grace); host 0 would run on
    """), hosts=3, devices_per_host=2, stdout=out, stderr=err, grace=5)
    start = time.monotonic()
    assert job.run(timeout=60) == 3
    assert time.monotonic() - start < 30  # host 0 was ended, not waited for
    for host in range(3):
        line = next(line for line in out.lines if line.startswith(f"[host {host}] 3 "))
        assert line.startswith(f"[host {host}] 3 127.0.0.1:{job.port} cpu ")
        assert line.endswith(" --xla_force_host_platform_device_count=2")  # replaces the 8 of conftest
        assert f"[host {host}] to stderr" in err.lines
    assert all(line.startswith("[host ") for line in out.lines)
    assert job.processes[0].returncode != 0


def test_a_killed_host_ends_the_others_within_the_grace_period():
    """Host 1 dies by SIGKILL; host 0 ignores SIGTERM (as a host stuck in a collective does): the
    launcher kills it after the grace period and exits with 137 (128 + SIGKILL)."""
    out = Output()
    job = LocalJob(_python("""
        import os, signal, time
        if os.environ["JAX_PROCESS_ID"] == "1":
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        time.sleep(120)
    """), hosts=2, stdout=out, stderr=out, grace=2)
    start = time.monotonic()
    assert job.run(timeout=100) == 137
    assert time.monotonic() - start < 60
    assert job.processes[0].returncode == -9
    assert any("host 1 exited with code 137; ending the other hosts" in line for line in out.lines)


def test_launch_command_runs_a_cpe_jax_command_on_every_host():
    result = subprocess.run([sys.executable, "-m", "cpe_jax.cli", "launch", "--hosts", "2", "--", "plan", "--help"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    for host in (0, 1):
        assert f"[host {host}] usage: cpe-jax plan" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "cpe_jax.cli", "launch", "--hosts", "0", "--", "plan"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "cpe-jax: error: --hosts=0 and --devices-per-host=1 must be >= 1"]


@pytest.mark.parametrize("environ, culprit", [
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
    ({"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES='0' must be >= 1"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS='10.0.0.2' must be HOST:PORT"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID='-1'"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES is not set"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
      "JAX_LOCAL_DEVICE_IDS": "0;1"}, "JAX_LOCAL_DEVICE_IDS='0;1'"),
    ({"CPE_JAX_DISTRIBUTED": "maybe"}, "CPE_JAX_DISTRIBUTED='maybe' must be 0 or 1"),
    ({"CPE_JAX_DISTRIBUTED_TIMEOUT": "soon", "JAX_NUM_PROCESSES": "2"}, "CPE_JAX_DISTRIBUTED_TIMEOUT='soon'"),
])
def test_a_bad_variable_is_named(environ, culprit):
    with pytest.raises(UserError, match="^" + culprit.replace("(", r"\(").replace(")", r"\)")):
        distributed_settings(environ)


def test_settings_from_the_variables_or_from_the_cluster():
    full = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
            "JAX_LOCAL_DEVICE_IDS": "0,1", "CPE_JAX_DISTRIBUTED_TIMEOUT": "20"}
    assert distributed_settings(full) == {
        "coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3, "local_device_ids": [0, 1],
        "timeout": 20, "cluster": None}
    assert distributed_settings({**full, "CPE_JAX_DISTRIBUTED": "0"}) is None
    assert distributed_settings({}) is None
    assert distributed_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    slurm = distributed_settings({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"})
    assert slurm["cluster"] == "SLURM" and slurm["num_processes"] is None and slurm["timeout"] == 300
    assert distributed_settings({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task: stay single
    assert distributed_settings({"OMPI_COMM_WORLD_SIZE": "2"})["cluster"] == "Open MPI"
    # The JAX_* variables may complete a detected cluster (JAX fills in the rest).
    assert distributed_settings({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "JAX_COORDINATOR_ADDRESS": "n1:9"})[
        "coordinator_address"] == "n1:9"


def test_a_command_started_with_a_bad_variable_exits_2_naming_it():
    env = {**os.environ, "JAX_NUM_PROCESSES": "two"}
    result = subprocess.run([sys.executable, "-m", "cpe_jax.cli", "generate", "--help"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["cpe-jax: error: JAX_NUM_PROCESSES='two' must be an integer"]


def test_a_coordinator_that_never_answers_fails_in_one_line_within_the_timeout():
    """Process 1 finds nobody at the address; process 0 waits in vain for process 1 (run apart)."""
    ports = {"1": free_port(), "0": free_port()}
    procs = []
    start = time.monotonic()
    for process_id in ("1", "0"):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{ports[process_id]}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": process_id, "CPE_JAX_DISTRIBUTED_TIMEOUT": "3"}
        procs.append(subprocess.Popen([sys.executable, "-m", "cpe_jax.cli", "generate", "--help"], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (_, err1), (_, err0) = (p.communicate(timeout=120) for p in procs)
    assert time.monotonic() - start < 60  # 3 s of waiting plus start-up on a loaded machine, not 300 s
    assert [p.returncode for p in procs] == [2, 2]
    assert err1.strip().splitlines() == [
        f"cpe-jax: error: the JAX coordinator at 127.0.0.1:{ports['1']} (JAX_COORDINATOR_ADDRESS) did not answer within "
        "3 s (this is process 1 of 2); check that process 0 runs and the address is right, or set "
        "CPE_JAX_DISTRIBUTED_TIMEOUT to wait longer"]
    assert err0.strip().splitlines() == [
        f"cpe-jax: error: not all 2 processes joined the JAX coordinator at 127.0.0.1:{ports['0']} within 3 s; start "
        "every process with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES, or set "
        "CPE_JAX_DISTRIBUTED_TIMEOUT to wait longer"]
