"""Run code as a real multi-host JAX job on this machine and collect what each host reports.

`run_job(code)` runs a Python snippet as 2 processes x 4 CPU devices through `cpe_jax.launch`
(JAX's multi-controller runtime over gloo, coordinator on 127.0.0.1); `run_job(code, hosts=1,
devices_per_host=8)` runs the same snippet as one process with 8 devices, for comparison.
`run_job(["cpe_jax.cli", "sft", ...])`-style commands are run with `run_command`. The snippet
starts after `initialize_distributed()` and reports with `emit(obj)` (one JSON line per call);
`Job.results[host]` holds the objects of each host in order.

JAX start-up costs several seconds per process on a loaded machine, so tests batch their checks
into few launches.
"""

import json
import os
import sys
import textwrap
import threading
import time

from cpe_jax.launch import LocalJob

RESULT_PREFIX = "MULTIHOST-RESULT "
_PREAMBLE = f"""\
import json, sys
from cpe_jax.sharding import initialize_distributed
initialize_distributed()

def emit(obj):
    print({RESULT_PREFIX!r} + json.dumps(obj), flush=True)

"""


class Output:
    """A launcher output sink: keeps every line, parses `emit` results per host, wakes waiters."""

    def __init__(self):
        self.lines, self.results = [], {}
        self._changed = threading.Condition()

    def write(self, text):
        with self._changed:
            for line in text.splitlines():
                self.lines.append(line)
                if line.startswith("[host ") and RESULT_PREFIX in line:
                    host = int(line[len("[host "):line.index("]")])
                    payload = line.split(RESULT_PREFIX, 1)[1]
                    self.results.setdefault(host, []).append(json.loads(payload))
            self._changed.notify_all()

    def flush(self):
        pass

    def wait_for(self, predicate, timeout):
        """Block until `predicate(results)` holds (True) or `timeout` seconds pass (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.results), timeout)

    def text(self):
        return "\n".join(self.lines)


class Job:
    """A started job: `job.local` is the LocalJob (its `processes`), `wait()` gives the exit code."""

    def __init__(self, command, *, hosts, devices_per_host, env=None, grace=5.0):
        self.out = Output()
        base = dict(os.environ)
        base.pop("CPE_JAX_DISTRIBUTED", None)
        base.update(env or {})
        self.started = time.monotonic()
        self.local = LocalJob(command, hosts=hosts, devices_per_host=devices_per_host, env=base, grace=grace,
                              stdout=self.out, stderr=self.out)
        self.returncode = None
        self.seconds = None

    @property
    def results(self):
        return self.out.results

    def wait_for(self, predicate, timeout):
        """Block until `predicate(results)` holds (True), or every host has exited or `timeout`
        seconds have passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.out.wait_for(predicate, 0.5):
                return True
            if all(p.poll() is not None for p in self.local.processes):
                return predicate(self.results)
        return False

    def wait(self, timeout=240):
        self.returncode = self.local.run(timeout=timeout)
        self.seconds = time.monotonic() - self.started
        return self.returncode

    def check(self):
        """Exit code 0, or an AssertionError carrying every host's output."""
        assert self.returncode == 0, f"job exited with {self.returncode}:\n{self.out.text()}"
        return self


def start_job(code, *, hosts=2, devices_per_host=4, env=None, grace=5.0):
    """Start `code` (a snippet that may call `emit`) as `hosts` processes; returns the running Job."""
    program = _PREAMBLE + textwrap.dedent(code)
    return Job([sys.executable, "-c", program], hosts=hosts, devices_per_host=devices_per_host, env=env,
               grace=grace)


def run_job(code, *, hosts=2, devices_per_host=4, env=None, timeout=240):
    """Run `code` to the end as `hosts` processes x `devices_per_host` devices; returns the Job."""
    job = start_job(code, hosts=hosts, devices_per_host=devices_per_host, env=env)
    job.wait(timeout)
    return job


def run_command(args, *, hosts=2, devices_per_host=4, env=None, timeout=240):
    """Run `cpe-jax ARGS` as a `hosts`-process job (as `cpe-jax launch` does); returns the Job."""
    job = Job([sys.executable, "-m", "cpe_jax.cli", *args], hosts=hosts, devices_per_host=devices_per_host,
              env=env)
    job.wait(timeout)
    return job
