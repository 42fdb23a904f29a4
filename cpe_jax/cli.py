"""`cpe-jax` command line: one subcommand per stage of the pipeline.

Each subcommand is a small function `_cmd_<name>(argv)` that parses its own flags and calls the
library. Heavy imports happen inside the functions so `cpe-jax --help` is instant.
"""

import argparse
import sys

from cpe_jax.errors import UserError, exit_on_user_error


def _cmd_convert(argv):
    p = argparse.ArgumentParser(
        prog="cpe-jax convert",
        description="Convert a Qwen2 checkpoint between Hugging Face (safetensors) and Orbax.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face model directory")
    src.add_argument("--from-orbax", metavar="DIR", help="Orbax checkpoint written by cpe_jax")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--to-orbax", metavar="DIR", help="write an Orbax checkpoint here")
    dst.add_argument("--to-hf", metavar="DIR", help="write a Hugging Face directory here")
    p.add_argument("--dtype", default=None, help="parameter dtype to store (default: as loaded)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (--to-hf)")
    args = p.parse_args(argv)

    from cpe_jax import checkpoints
    from cpe_jax.models.qwen2 import params as qparams

    model = qparams.load_model(args.from_hf or args.from_orbax, dtype=args.dtype, progress=True)
    if args.to_orbax:
        checkpoints.save_model(model, args.to_orbax)
        print(f"wrote Orbax checkpoint {args.to_orbax}")
    else:
        qparams.save_hf(
            model,
            args.to_hf,
            tokenizer_dir=args.from_hf or args.from_orbax,
            max_shard_size=args.max_shard_size,
            progress=True,
        )
        print(f"wrote Hugging Face checkpoint {args.to_hf}")


COMMANDS = {
    "convert": (_cmd_convert, "convert checkpoints between Hugging Face and Orbax"),
}


def _usage():
    lines = ["usage: cpe-jax <command> [flags]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `cpe-jax <command> --help` for the flags of one command."]
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)}")
    return COMMANDS[name][0](rest)


if __name__ == "__main__":
    sys.exit(main())
