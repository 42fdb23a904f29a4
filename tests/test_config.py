import os
import textwrap

import pytest

from cpe_jax import config as cfg
from cpe_jax.errors import UserError
from cpe_jax.sharding import make_mesh

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text(textwrap.dedent("""
        import ml_collections

        def get_config():
            c = ml_collections.ConfigDict()
            c.lr = 1e-3
            c.name = "a"
            c.opt = ml_collections.ConfigDict({"steps": 2, "mode": "x"})
            return c
    """))
    return str(path)


def test_overrides_and_workdir(config_file):
    config, workdir = cfg.parse_config_flags(
        [f"--config={config_file}", "--config.opt.steps=5", "--config.lr=0.5", "--workdir=/tmp/w"], "p")
    assert (config.opt.steps, config.lr, config.name, workdir) == (5, 0.5, "a", "/tmp/w")
    # a second parse in the same process starts from the file again (private flag values)
    config, _ = cfg.parse_config_flags([f"--config={config_file}", "--workdir=/tmp/w"], "p")
    assert config.opt.steps == 2


@pytest.mark.parametrize("argv, message", [
    (["--config=/no/such.py", "--workdir=w"], "config file does not exist: /no/such.py"),
    (["--config={f}", "--config.opt.nope=1", "--workdir=w"], "config field opt.nope"),
    (["--config={f}", "--config.lr=fast", "--workdir=w"], "config.lr=fast"),
    (["--config={f}", "--bogus=1", "--workdir=w"], "bogus"),
    (["--config={f}"], "--workdir=DIR is required"),
    (["--workdir=w"], "--config=FILE is required"),
])
def test_bad_flags_are_user_errors(config_file, argv, message):
    with pytest.raises(UserError, match=None) as e:
        cfg.parse_config_flags([a.format(f=config_file) for a in argv], "p")
    assert message in str(e.value)


def test_broken_config_file_is_a_user_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config():\n    raise ValueError('oops')\n")
    with pytest.raises(UserError, match="cannot load.*oops"):
        cfg.parse_config_flags([f"--config={path}", "--workdir=w"], "p")


def test_validators_name_the_field(config_file):
    config, _ = cfg.parse_config_flags([f"--config={config_file}", "--workdir=w"], "p")
    assert cfg.check_positive_int(config, "opt.steps") == 2
    config.opt.steps = 0
    with pytest.raises(UserError, match=r"^config field opt.steps: must be a positive integer, got 0$"):
        cfg.check_positive_int(config, "opt.steps")
    assert cfg.check_positive_int(config, "opt.steps", allow_zero=True) == 0
    with pytest.raises(UserError, match=r"config field lr: must be a number in \[0.01, 1\]"):
        cfg.check_range(config, "lr", 0.01, 1)
    assert cfg.check_range(config, "lr", 0, 1, low_open=True) == 1e-3
    with pytest.raises(UserError, match="config field opt.mode: must be one of 'a', 'b', got 'x'"):
        cfg.check_choice(config, "opt.mode", ("a", "b"))
    with pytest.raises(UserError, match="config field opt.missing: missing"):
        cfg.check_positive_int(config, "opt.missing")


def test_batch_must_divide_over_data_parallel_devices():
    import ml_collections

    config = ml_collections.ConfigDict({"batch": 12, "mesh": {"data": 2, "fsdp": 4}})
    mesh = cfg.make_mesh_from_config(config)
    assert cfg.data_parallel_size(mesh) == 8  # batch is split over data and fsdp
    with pytest.raises(UserError, match="config field batch: 12 is not divisible by the data-parallel size 8"):
        cfg.check_divisible_by_mesh(config, "batch", mesh)
    config.batch = 16
    assert cfg.check_divisible_by_mesh(config, "batch", make_mesh({"data": 2, "fsdp": 4})) == 16
    with pytest.raises(UserError, match="config field mesh: "):
        cfg.make_mesh_from_config(ml_collections.ConfigDict({"mesh": {"data": 3, "fsdp": -1}}))


@pytest.mark.parametrize("name", ["sft.py", "bt.py"])
def test_shipped_configs_load(name):
    config, _ = cfg.parse_config_flags([f"--config={os.path.join(CONFIG_DIR, name)}", "--workdir=w"], "p")
    assert config.mode == ("bt" if name == "bt.py" else "lm")
    assert config.batch_size > 0 and config.max_length > 0
