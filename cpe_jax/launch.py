"""`cpe-jax launch`: run a command as an N-host JAX job on this machine, to check a config as a
multi-host job on a laptop before renting a pod.

Each host is one process with K fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=K`,
`JAX_PLATFORMS=cpu`) and the `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`
variables that `cpe_jax.sharding.initialize_distributed` reads, with process 0 serving as the
coordinator on a free port of 127.0.0.1. Output lines carry their host's index ("[host 1] ").
When a host fails, the others are ended (SIGTERM, then SIGKILL after a grace period) and the
launcher returns the first non-zero exit code; SIGTERM and SIGINT are passed on to every host,
so a preempted job saves the step all hosts agree on and exits 0.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from cpe_jax.errors import UserError

GRACE_SECONDS = 10.0  # a host asked to stop (SIGTERM) gets this long before SIGKILL
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port(host="127.0.0.1") -> int:
    """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def host_environment(index, hosts, devices_per_host, port, base=None) -> dict:
    """The environment of host `index` of a local `hosts`-process job on 127.0.0.1:`port`."""
    env = dict(os.environ if base is None else base)
    xla_flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(xla_flags + [f"--xla_force_host_platform_device_count={devices_per_host}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    env["JAX_NUM_PROCESSES"] = str(hosts)
    env["JAX_PROCESS_ID"] = str(index)
    env.pop("JAX_LOCAL_DEVICE_IDS", None)
    # The hosts import the cpe_jax this launcher runs from, installed or not.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"  # lines appear as they are written, in order across hosts
    return env


def exit_code(returncode) -> int:
    """A process's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class LocalJob:
    """`hosts` processes of `command` (an argv list), started at once; see the module docstring.

    `run()` waits for all of them and returns the job's exit code. `processes` are the host
    processes (index = JAX process id), e.g. to send one of them a signal in a test.
    """

    def __init__(self, command, *, hosts, devices_per_host=1, port=None, env=None, grace=GRACE_SECONDS,
                 stdout=None, stderr=None):
        if hosts < 1 or devices_per_host < 1:
            raise UserError(f"--hosts={hosts} and --devices-per-host={devices_per_host} must be >= 1")
        if not command:
            raise UserError("no command to launch: put it after `--`, e.g. cpe-jax launch --hosts 2 -- train ...")
        self.command, self.hosts, self.grace = list(command), int(hosts), float(grace)
        self.port = int(port) if port else free_port()
        self._out, self._err = stdout or sys.stdout, stderr or sys.stderr
        self._lock = threading.Lock()
        self.processes, self._readers = [], []
        self.first_failure = None  # (host index, exit code) of the first host that failed
        for index in range(self.hosts):
            self.processes.append(subprocess.Popen(
                self.command, env=host_environment(index, self.hosts, devices_per_host, self.port, env),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,  # a terminal's Ctrl-C reaches the hosts once, through us
            ))
        for index, proc in enumerate(self.processes):
            for pipe, sink in ((proc.stdout, self._out), (proc.stderr, self._err)):
                reader = threading.Thread(target=self._relay, args=(index, pipe, sink), daemon=True)
                reader.start()
                self._readers.append(reader)

    def _relay(self, index, pipe, sink):
        prefix = f"[host {index}] "
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            with self._lock:
                sink.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
                sink.flush()
        pipe.close()

    def send(self, signum):
        """Send `signum` to every host that still runs."""
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def stop(self):
        """End every host: SIGTERM, then SIGKILL for those still running after the grace period."""
        self.send(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(0.05)
        self.send(signal.SIGKILL)
        for proc in self.processes:
            proc.wait()

    def run(self, timeout=None) -> int:
        """Wait for every host; on the first failure end the others. Returns the first non-zero
        exit code (in the order the hosts failed), else 0; after `timeout` seconds the hosts are
        ended and the code is 124 (as `timeout(1)`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if deadline is not None and time.monotonic() > deadline and self.first_failure is None:
                    with self._lock:
                        self._err.write(f"cpe-jax launch: timed out after {timeout:g} s; ending the hosts\n")
                        self._err.flush()
                    self.first_failure = (None, 124)
                    self.stop()
                    break
                running = False
                for index, proc in enumerate(self.processes):
                    code = proc.poll()
                    if code is None:
                        running = True
                    elif code != 0 and self.first_failure is None:
                        self.first_failure = (index, exit_code(code))
                if self.first_failure is not None or not running:
                    break
                time.sleep(0.05)
            if self.first_failure is not None:
                index, code = self.first_failure
                if any(p.poll() is None for p in self.processes):
                    with self._lock:
                        self._err.write(f"cpe-jax launch: host {index} exited with code {code}; "
                                        "ending the other hosts\n")
                        self._err.flush()
                self.stop()
        finally:
            if any(p.poll() is None for p in self.processes):  # interrupted ourselves
                self.stop()
            for reader in self._readers:
                reader.join(timeout=5)
        return self.first_failure[1] if self.first_failure else 0


def main(argv):
    """`cpe-jax launch --hosts N [--devices-per-host K] [--port P] -- <command> [flags]`."""
    p = argparse.ArgumentParser(
        prog="cpe-jax launch",
        description="Run `cpe-jax <command>` as an N-host JAX job on this machine: N processes with K "
        "fake CPU devices each, joined through a coordinator on 127.0.0.1. Output lines are prefixed "
        "with their host's index; when one host fails the others are ended, and the exit code is the "
        "first non-zero one. SIGTERM/SIGINT are passed on to every host.",
        usage="cpe-jax launch --hosts N [--devices-per-host K] [--port P] -- <command> [flags]",
    )
    p.add_argument("--hosts", type=int, required=True, help="number of processes (JAX hosts)")
    p.add_argument("--devices-per-host", type=int, default=1, help="fake CPU devices per process")
    p.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--grace", type=float, default=GRACE_SECONDS,
                   help="seconds a host gets to exit after SIGTERM before it is killed")
    p.add_argument("--timeout", type=float, default=None,
                   help="end the job after this many seconds (exit code 124); default: no limit")
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    command = argv[split + 1:]
    if command and command[0] == "cpe-jax":  # `-- cpe-jax train ...` means `-- train ...`
        command = command[1:]
    if command and command[0] == "launch":
        raise UserError("the command to launch cannot be `launch` itself")
    job = LocalJob([sys.executable, "-m", "cpe_jax.cli", *command], hosts=args.hosts,
                   devices_per_host=args.devices_per_host, port=args.port, grace=args.grace)
    forward = lambda signum, frame: job.send(signum)  # noqa: E731 - the hosts decide what a signal means
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return job.run(timeout=args.timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
