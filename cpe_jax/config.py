"""Config files (`--config=configs/X.py --config.a.b=v --workdir=DIR`) and the checks every entry point shares.

Flags are parsed into a private `absl.flags.FlagValues`, never the global one, so several commands
can run in one process (the tests call the CLI in-process). Every mistake is a UserError naming the
flag or config field, which the CLI turns into exit code 2.
"""

import os

from cpe_jax.errors import UserError


def parse_config_flags(argv, prog):
    """Parse `--config=FILE [--config.a.b=v ...] --workdir=DIR` into (ConfigDict, workdir)."""
    import ml_collections
    from absl import flags
    from ml_collections import config_flags

    argv = [prog] + list(argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(f"usage: {prog} --config=configs/X.py --workdir=DIR [--config.a.b=VALUE ...]\n\n"
              "The config file defines get_config(); every field can be overridden with --config.FIELD=VALUE.")
        raise SystemExit(0)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file with get_config()", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the final model",
                        flag_values=values)
    try:
        rest = values(argv)
    except flags.Error as e:
        raise UserError(_one_line(prog, e)) from None
    except (AttributeError, KeyError) as e:
        raise UserError(f"config field {_unknown_field(argv, str(e).strip(chr(39) + chr(34)))}: "
                        "no such field in the config file") from None
    if len(rest) > 1:
        raise UserError(f"{prog}: unexpected argument {rest[1]!r}")
    config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_path is None:
        raise UserError(f"{prog}: --config=FILE is required")
    config = values.config
    if not isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        if not os.path.isfile(config_path.split(":", 1)[0]):
            raise UserError(f"--config: config file does not exist: {config_path}")
        try:
            config.keys()  # an error placeholder re-raises what went wrong loading the file
        except Exception as e:  # the user's file may raise anything
            raise UserError(f"--config={config_path}: cannot load ({type(e).__name__}: {e})") from None
        raise UserError(f"--config={config_path}: get_config() must return a ConfigDict")
    workdir = values.workdir
    if not workdir:
        raise UserError(f"{prog}: --workdir=DIR is required")
    return config, workdir


def _one_line(prog, error):
    """A flag error in one line: for a config file that raised, the exception's last line."""
    text = str(error)
    if "Error whilst parsing config file" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        flag = text.split(":", 1)[0].replace("flag ", "")
        return f"{flag}: cannot load ({lines[-1].strip()})"
    return f"{prog}: {' '.join(text.split())}"


def _unknown_field(argv, key):
    """The `--config.a.b` override that names a field the config lacks (`key` is its missing part)."""
    for arg in argv:
        if arg.startswith("--config."):
            path = arg[len("--config."):].split("=", 1)[0]
            if key in path.split("."):
                return path
    return key


def check(condition, field, message):
    """Raise `UserError("config field FIELD: MESSAGE")` unless `condition` holds."""
    if not condition:
        raise UserError(f"config field {field}: {message}")


def _get(config, field):
    node = config
    for key in field.split("."):
        try:
            node = node[key]
        except (KeyError, AttributeError, TypeError):
            raise UserError(f"config field {field}: missing") from None
    return node


def check_positive_int(config, field, allow_zero=False):
    value = _get(config, field)
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    check(ok, field, f"must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return value


def check_range(config, field, low=None, high=None, *, low_open=False, high_open=False):
    """`low <= value <= high` (or strict with *_open); either bound may be None."""
    value = _get(config, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    check(ok, field, f"must be a number in {interval}, got {value!r}")
    return value


def check_choice(config, field, choices):
    value = _get(config, field)
    check(value in choices, field, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def data_parallel_size(mesh):
    """How many ways a batch is split: the product of the mesh axes the `batch` logical axis uses."""
    from cpe_jax.sharding import LOGICAL_AXIS_RULES

    axes = LOGICAL_AXIS_RULES["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def check_divisible_by_mesh(config, field, mesh):
    """A batch dimension must split evenly over the mesh's data-parallel devices."""
    value = _get(config, field)
    dp = data_parallel_size(mesh)
    check(value % dp == 0, field, f"{value} is not divisible by the data-parallel size {dp} of mesh "
          f"{dict(mesh.shape)}")
    return value


def make_mesh_from_config(config, field="mesh"):
    """The device mesh of `config.mesh`, with a mistake reported against the config field."""
    from cpe_jax.sharding import make_mesh

    axes = _get(config, field)
    try:
        return make_mesh(dict(axes))
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"config field {field}: {e}") from None
