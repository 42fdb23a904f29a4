"""tpu_scripts/*.sh: dry-run prints exactly the gcloud commands and runs nothing; the remote
commands really start, report and stop a detached run (executed here on a fake worker home)."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "tpu_scripts"
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "status.sh", "stop.sh", "delete.sh"]
SCOPE = ["--name", "my-tpu", "--zone", "us-east5-a"]

# Any of these being run during a dry run is a failure the test can see (marker file + exit 97).
FAILING_TOOL = """#!/usr/bin/env bash
echo "$0 $*" >> "$(dirname "$0")/CALLED"
echo "FAKE $(basename "$0") WAS CALLED" >&2
exit 97
"""
RECORDING_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.path.join(os.path.dirname(sys.argv[0]), "RECORD"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""
# Stands in for the trainer: prints its argv, and on SIGTERM says it saved a checkpoint.
FAKE_CPE_JAX = """#!/usr/bin/env bash
trap 'echo "fake trainer: SIGTERM, checkpoint saved"; exit 0' TERM
printf 'arg: %s\\n' "$@"
echo ready
while true; do sleep 0.1; done
"""


def _write_tool(path, text):
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ["gcloud", "tar", "rm", "ssh", "scp", "git"]:
        _write_tool(bin_dir / tool, FAILING_TOOL)
    return bin_dir


def _env(bin_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPE_TPU_")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env.update(extra)
    return env


def run_script(bin_dir, script, *args, stdin="", **env):
    return subprocess.run(
        ["bash", str(SCRIPTS_DIR / script), *args],
        capture_output=True,
        text=True,
        env=_env(bin_dir, **env),
        input=stdin,
        timeout=30,
    )


def dry_run(bin_dir, script, *args, **env):
    """Run with --dry-run; return the printed commands as argv lists."""
    result = run_script(bin_dir, script, "--dry-run", *args, **env)
    assert result.returncode == 0, result.stderr
    assert not (bin_dir / "CALLED").exists(), (bin_dir / "CALLED").read_text()
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), result.stdout
    return [shlex.split(line[2:]) for line in lines]


def remote_command(argv):
    """The --command of a `gcloud compute tpus tpu-vm ssh` argv."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    (command,) = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
    return command


def test_create_queued_spot_prints_queued_resources_create(fake_bin):
    commands = dry_run(
        fake_bin, "create.sh", *SCOPE, "--accelerator-type", "v5p-64", "--queued", "--spot",
        "--project=my-proj", "--", "--network=my-net",
    )
    assert commands == [[
        "gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", "--node-id=my-tpu",
        "--zone=us-east5-a", "--project=my-proj", "--accelerator-type=v5p-64",
        "--runtime-version=v2-alpha-tpuv5", "--spot", "--network=my-net",
    ]]


@pytest.mark.parametrize(
    "accelerator, runtime",
    [("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
     ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")],
)
def test_create_direct_picks_runtime_per_generation(fake_bin, accelerator, runtime):
    commands = dry_run(fake_bin, "create.sh", *SCOPE, f"--accelerator-type={accelerator}",
                       "--preemptible")
    assert commands == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-east5-a",
        f"--accelerator-type={accelerator}", f"--version={runtime}", "--preemptible",
    ]]


def test_create_explicit_runtime_version_wins(fake_bin):
    (command,) = dry_run(fake_bin, "create.sh", *SCOPE, "--accelerator-type=v4-8",
                         "--runtime-version=tpu-vm-v4-base")
    assert "--version=tpu-vm-v4-base" in command


@pytest.mark.parametrize(
    "args, culprit",
    [(["--accelerator-type=v5p-64", "--spot", "--preemptible"], "--spot"),
     (["--accelerator-type=v5p-64", "--queued", "--preemptible"], "--preemptible"),
     (["--accelerator-type=tpu64"], "tpu64"),
     (["--accelerator-type=v9x-8"], "--runtime-version")],
)
def test_create_rejects_bad_combinations(fake_bin, args, culprit):
    result = run_script(fake_bin, "create.sh", *SCOPE, *args, "--dry-run")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and culprit in result.stderr
    assert result.stdout == ""


def test_setup_copies_checkout_to_every_worker_and_installs(fake_bin):
    tar, scp, rm, ssh = dry_run(fake_bin, "setup.sh", *SCOPE)
    archive = tar[2]
    assert tar[:2] == ["tar", "-czf"] and tar[3:5] == ["-C", str(SCRIPTS_DIR.parent)]
    assert "--exclude=.git" in tar
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                   f"my-tpu:{Path(archive).name}", "--zone=us-east5-a", "--worker=all"]
    assert rm == ["rm", "-f", archive]
    assert "--worker=all" in ssh
    remote = remote_command(ssh)
    assert f"tar -xzf {Path(archive).name} -C cpe_jax" in remote
    assert 'pip install --upgrade "jax[tpu]"' in remote
    assert 'pip install "$HOME"/cpe_jax' in remote


def test_setup_from_repo_url_clones_on_every_worker(fake_bin):
    (ssh,) = dry_run(fake_bin, "setup.sh", *SCOPE, "--repo-url=https://github.com/o/r.git",
                     "--repo-ref=v1", "--jax-spec=jax[tpu]==0.6.2")
    assert "--worker=all" in ssh
    remote = remote_command(ssh)
    assert "git clone --depth=1 --branch=v1 https://github.com/o/r.git cpe_jax" in remote
    assert 'pip install --upgrade "jax[tpu]==0.6.2"' in remote


def test_launch_runs_train_with_nohup_on_every_worker(fake_bin):
    (ssh,) = dry_run(fake_bin, "launch.sh", *SCOPE, "--config=configs/cpe_qwen7b.py",
                     "--workdir", "gs://bucket/run1", "--", "--config.seed=3", "--config.note=a b")
    assert ssh[5] == "my-tpu" and "--worker=all" in ssh and "--zone=us-east5-a" in ssh
    remote = remote_command(ssh)
    assert ("nohup cpe-jax train --config=configs/cpe_qwen7b.py --workdir=gs://bucket/run1"
            ' --config.seed=3 "--config.note=a b" >> "$HOME"/cpe_jax_logs/train.log') in remote


@pytest.mark.parametrize("workdir", ["/tmp/run", "run1", "gs://"])
def test_launch_requires_a_gcs_workdir(fake_bin, workdir):
    result = run_script(fake_bin, "launch.sh", *SCOPE, "--config=c.py", f"--workdir={workdir}")
    assert result.returncode == 2 and "gs://" in result.stderr
    assert not (fake_bin / "CALLED").exists()


def test_status_describes_queued_resource_and_tails_logs(fake_bin):
    qr, vm, ssh = dry_run(fake_bin, "status.sh", *SCOPE, "--queued", "--logs", "--lines=7")
    assert qr == ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu",
                  "--zone=us-east5-a"]
    assert vm == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu", "--zone=us-east5-a"]
    assert "--worker=all" in ssh
    assert 'tail -n 7 "$HOME"/cpe_jax_logs/train.log' in remote_command(ssh)


def test_status_without_logs_only_describes(fake_bin):
    commands = dry_run(fake_bin, "status.sh", *SCOPE, "--worker=0")
    assert commands == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu",
                         "--zone=us-east5-a"]]


def test_stop_signals_every_worker_then_stops_vm(fake_bin):
    ssh, stop = dry_run(fake_bin, "stop.sh", *SCOPE, "--stop-vm", "--timeout=30")
    assert "--worker=all" in ssh
    remote = remote_command(ssh)
    assert remote.index("kill -TERM") < remote.index("kill -KILL")
    assert stop == ["gcloud", "compute", "tpus", "tpu-vm", "stop", "my-tpu", "--zone=us-east5-a"]


@pytest.mark.parametrize(
    "flags, expected",
    [([], ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-east5-a",
           "--quiet"]),
     (["--queued"], ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu",
                     "--zone=us-east5-a", "--force", "--quiet"])],
)
def test_delete_dry_run_prints_without_asking(fake_bin, flags, expected):
    assert dry_run(fake_bin, "delete.sh", *SCOPE, *flags) == [expected]


def test_delete_asks_and_keeps_the_tpu_on_no(fake_bin):
    result = run_script(fake_bin, "delete.sh", *SCOPE, stdin="n\n")
    assert result.returncode == 1 and "not deleted" in result.stderr
    assert not (fake_bin / "CALLED").exists()


def test_delete_runs_gcloud_after_yes(fake_bin):
    _write_tool(fake_bin / "gcloud", RECORDING_GCLOUD)
    result = run_script(fake_bin, "delete.sh", *SCOPE, stdin="y\n")
    assert result.returncode == 0, result.stderr
    recorded = [json.loads(line) for line in (fake_bin / "RECORD").read_text().splitlines()]
    assert recorded == [["compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-east5-a",
                         "--quiet"]]


def test_env_vars_supply_defaults(fake_bin):
    (command,) = dry_run(fake_bin, "create.sh", CPE_TPU_NAME="env-tpu", CPE_TPU_ZONE="eu-z",
                         CPE_TPU_ACCELERATOR_TYPE="v4-8", CPE_TPU_SPOT="1")
    assert command[5:] == ["env-tpu", "--zone=eu-z", "--accelerator-type=v4-8",
                           "--version=tpu-ubuntu2204-base", "--spot"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_required_flag_and_unknown_flag_exit_2(fake_bin, script):
    missing = run_script(fake_bin, script, "--zone=z", "--dry-run")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [f"{script}: missing required flag --name "
                                           "(or set CPE_TPU_NAME)"]
    unknown = run_script(fake_bin, script, *SCOPE, "--bogus", "--dry-run")
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1
    assert "--bogus" in unknown.stderr
    no_value = run_script(fake_bin, script, "--zone=z", "--name")
    assert no_value.returncode == 2 and "--name needs a value" in no_value.stderr
    assert not (fake_bin / "CALLED").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_flags(fake_bin, script):
    result = run_script(fake_bin, script, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {script}")
    assert "--name" in result.stdout and "--dry-run" in result.stdout


def test_remote_commands_start_report_and_stop_a_detached_run(fake_bin, tmp_path):
    """Real mode runs what dry-run prints; the remote commands, executed on a fake worker home,
    start the trainer detached with the exact args, refuse a second launch, show the log, and
    stop it with SIGTERM (the trainer's checkpoint signal) before removing the pid file."""
    _write_tool(fake_bin / "gcloud", RECORDING_GCLOUD)
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    _write_tool(home / ".local" / "bin" / "cpe-jax", FAKE_CPE_JAX)
    launch_args = [*SCOPE, "--config=c.py", "--workdir=gs://b/r", "--", "--config.note=it's $x"]

    printed = dry_run(fake_bin, "launch.sh", *launch_args)
    result = run_script(fake_bin, "launch.sh", *launch_args)
    assert result.returncode == 0, result.stderr
    recorded = [json.loads(line) for line in (fake_bin / "RECORD").read_text().splitlines()]
    assert [["gcloud", *argv] for argv in recorded] == printed

    def on_worker(argv):
        env = {"HOME": str(home), "PATH": os.environ["PATH"]}
        return subprocess.run(["bash", "-c", remote_command(argv)], capture_output=True,
                              text=True, env=env, timeout=30)

    log = home / "cpe_jax_logs" / "train.log"
    pid_file = home / "cpe_jax_logs" / "train.pid"
    started = on_worker(printed[0])
    assert started.returncode == 0 and "started pid" in started.stdout, started.stderr
    pid = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 20
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        expected_args = ["train", "--config=c.py", "--workdir=gs://b/r", "--config.note=it's $x"]
        assert "".join(f"arg: {a}\n" for a in expected_args) in log.read_text()

        again = on_worker(printed[0])
        assert again.returncode == 1 and "still going" in again.stderr

        (status,) = dry_run(fake_bin, "status.sh", *SCOPE, "--logs", "--lines=3")[1:]
        shown = on_worker(status).stdout
        assert f"running, pid {pid}" in shown and "] ready" in shown

        (stop,) = dry_run(fake_bin, "stop.sh", *SCOPE, "--timeout=20")
        stopped = on_worker(stop)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout
        assert "fake trainer: SIGTERM, checkpoint saved" in log.read_text()
        assert not pid_file.exists()
        assert "not running" in on_worker(status).stdout
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    paths = [str(SCRIPTS_DIR / name) for name in [*SCRIPTS, "common.sh"]]
    # Plain `shellcheck` from the repository root, as a user would run it; tpu_scripts/.shellcheckrc
    # makes it follow `source common.sh`.
    result = subprocess.run(["shellcheck", *paths], capture_output=True, text=True,
                            cwd=SCRIPTS_DIR.parent, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_setup_packs_the_checkout_without_git(fake_bin, tmp_path):
    """Real mode: the archive copied to the workers holds the package, not .git; it is removed."""
    repo = tmp_path / "repo"
    (repo / "cpe_jax").mkdir(parents=True)
    (repo / "setup.py").write_text("")
    (repo / "cpe_jax" / "__init__.py").write_text("")
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("")
    _write_tool(fake_bin / "gcloud", """#!/usr/bin/env bash
if [ "$4" = scp ]; then /usr/bin/env tar -tzf "$5" > "$(dirname "$0")/LISTING"; fi
""")
    for tool in ["tar", "rm"]:
        (fake_bin / tool).unlink()
    result = run_script(fake_bin, "setup.sh", *SCOPE, f"--repo-dir={repo}", TMPDIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    listing = set((fake_bin / "LISTING").read_text().split())
    assert {"./setup.py", "./cpe_jax/__init__.py"} <= listing
    assert not any(".git" in name for name in listing)
    assert not list(tmp_path.glob("cpe_jax-src-*"))
