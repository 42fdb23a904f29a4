"""`python -c "import cpe_jax.X"` works for every module on its own: no module relies on another
having been imported first (an import cycle or a missing import shows up here)."""

import os
import pkgutil
import subprocess
import sys

import cpe_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One interpreter for all modules: before each import every cpe_jax module is dropped from
# sys.modules, so each is imported as in a fresh `python -c` (third-party packages stay loaded,
# which keeps this cheap; they cannot hide an ordering problem between our modules).
SCRIPT = r"""
import importlib, json, sys, traceback
failures = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "cpe_jax" or m.startswith("cpe_jax.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps(failures))
"""


def all_modules():
    names = ["cpe_jax"]
    for info in pkgutil.walk_packages(cpe_jax.__path__, prefix="cpe_jax."):
        names.append(info.name)
    return sorted(names)


def test_every_module_imports_on_its_own():
    import json

    names = all_modules()
    assert {"cpe_jax.cli", "cpe_jax.demo", "cpe_jax.configs.demo_quick", "cpe_jax.data.persona_world.teacher",
            "cpe_jax.reward.judge_factory", "cpe_jax.data.padding"} <= set(names)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *names], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{tb}" for name, tb in failures.items())
