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


def _cmd_generate(argv):
    p = argparse.ArgumentParser(
        prog="cpe-jax generate",
        description="Sample completions for every row of a JSONL file of prompts. Input rows hold "
        'one of {"prompt": str}, {"prompt_token_ids": [...]} or {"messages": [...]}; output rows '
        "repeat the input row and add token_ids, text, logprobs, finish_reason (and index when "
        "n > 1). The output appears only when complete (written to OUT.tmp, then renamed).",
    )
    p.add_argument("--model", required=True, help="Hugging Face or cpe_jax Orbax model directory")
    p.add_argument("--prompts", required=True, metavar="IN.jsonl")
    p.add_argument("--out", required=True, metavar="OUT.jsonl")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--chat", action="store_true", help='wrap "prompt" strings as a user turn')
    p.add_argument("--batch-size", type=int, default=64, help="rows per compiled batch")
    p.add_argument("--dtype", default=None, help="compute dtype (default: as loaded)")
    args = p.parse_args(argv)

    from cpe_jax import sampling
    from cpe_jax.errors import require_path

    require_path(args.prompts, "prompts file")
    params = sampling.SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, n=args.n, ignore_eos=args.ignore_eos,
    )
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be >= 1")
    sampler = sampling.Sampler.from_pretrained(
        require_path(args.model, "model directory"), dtype=args.dtype, max_batch_size=args.batch_size
    )
    count = sampling.generate_jsonl(sampler, args.prompts, args.out, params, chat=args.chat)
    print(f"wrote {count} samples to {args.out}")


COMMANDS = {
    "convert": (_cmd_convert, "convert checkpoints between Hugging Face and Orbax"),
    "generate": (_cmd_generate, "sample completions for a JSONL file of prompts"),
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
