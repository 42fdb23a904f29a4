"""`cpe-jax` command line: one subcommand per stage of the pipeline.

Each subcommand is a small function `_cmd_<name>(argv)` that parses its own flags and calls the
library. Heavy imports happen inside the functions so `cpe-jax --help` is instant.
"""

import argparse
import shlex
import sys

from cpe_jax.errors import JudgeUnavailable, UserError, exit_on_user_error


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

    import cpe_jax
    from cpe_jax import checkpoints
    from cpe_jax.models.qwen2 import params as qparams

    model = cpe_jax.load_model(args.from_hf or args.from_orbax, dtype=args.dtype, progress=True)
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


def _host_device_mesh():
    """The mesh of a model a command runs on one device: None (jax.devices()[0]) in a one-host job;
    in a multi-host job this host's first device, since jax.devices()[0] belongs to host 0 only.
    Every host then reads every row, works on its share (`sharding.spread_over_hosts`) and gets
    every result back; process 0 writes the outputs."""
    import jax

    from cpe_jax.sharding import make_mesh

    return make_mesh({"data": 1}, devices=jax.local_devices()[:1]) if jax.process_count() > 1 else None


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
        require_path(args.model, "model directory"), dtype=args.dtype, max_batch_size=args.batch_size,
        mesh=_host_device_mesh(),
    )
    count = sampling.generate_jsonl(sampler, args.prompts, args.out, params, chat=args.chat)
    print(f"wrote {count} samples to {args.out}")


def _cmd_eval(argv):
    p = argparse.ArgumentParser(
        prog="cpe-jax eval",
        description="Win rate of a policy (or of a file of responses) against a baseline, judged "
        "pairwise in both orders. Writes OUT/annotations.jsonl (resumable: a rerun only does the "
        "missing examples), metrics.json (raw and length-controlled win rates overall, per tier and "
        "specific/general), report.md and PNG plots.",
    )
    system = p.add_mutually_exclusive_group(required=True)
    system.add_argument("--policy", metavar="PATH", help="model directory (Hugging Face or Orbax) to generate with")
    system.add_argument("--responses", metavar="FILE", help="JSONL of responses to score instead "
                        "(a `response` per row, aligned by `id` when both files have one, else by "
                        "(persona, question), else by line when the files have the same length)")
    p.add_argument("--eval-set", required=True, metavar="FILE",
                   help="JSONL rows {question, persona, response}; `response` is the baseline's")
    p.add_argument("--baseline-responses", metavar="FILE", help="baseline responses from another JSONL file "
                   "(aligned like --responses)")
    p.add_argument("--labels", metavar="FILE", help="JSONL rows {persona, question, tier, category} giving the "
                   "eval set's PersonaFeedback tier (easy, medium, hard) and category (specific, general), "
                   "for the per-tier and per-category rows (aligned like --responses)")
    p.add_argument("--out", required=True, metavar="DIR")
    from cpe_jax.reward.judge_factory import add_judge_arguments, add_row_error_argument

    add_judge_arguments(p)
    add_row_error_argument(p)
    p.add_argument("--allow-partial", action="store_true", help="while examples are unjudged (the judge gave "
                   "no answer), still report the win rate of the judged ones, marked partial")
    p.add_argument("--judge-max-tokens", type=int, default=32, help="judge reply length (the verdict comes first)")
    p.add_argument("--policy-prompt", choices=["paper", "persona_world"], default="paper")
    p.add_argument("--language", choices=["en", "zh"], default="en", help="language of the prompt templates")
    p.add_argument("--max-tokens", type=int, default=1024, help="new tokens per policy response")
    p.add_argument("--temperature", type=float, default=0.0, help="policy sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="examples generated and judged per chunk")
    p.add_argument("--dtype", default=None, help="policy compute dtype (default: as loaded)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    args = p.parse_args(argv)

    import logging
    import os

    from cpe_jax.data.personafeedback import load_eval_set
    from cpe_jax.errors import require_path
    from cpe_jax.eval import run
    from cpe_jax.eval.report import grouping_notes
    from cpe_jax.sampling import Sampler, SamplingParams

    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be >= 1")
    if args.policy is None and (args.temperature != 0.0 or args.dtype is not None):
        raise UserError("--temperature and --dtype apply to --policy only, not to --responses")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    examples = load_eval_set(args.eval_set)
    if args.labels:
        examples = run.apply_labels(examples, args.labels)
    from cpe_jax.reward.judge_factory import judge_from_arguments

    judge, judge_label = judge_from_arguments(args, mesh=_host_device_mesh())
    responses = run.read_responses(args.responses, examples) if args.responses else None
    baseline = (
        run.read_responses(args.baseline_responses, examples, "baseline responses file")
        if args.baseline_responses else None
    )
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    policy = None
    if args.policy:
        policy = Sampler.from_pretrained(require_path(args.policy, "policy directory"), dtype=args.dtype,
                                         max_batch_size=args.batch_size, mesh=_host_device_mesh())
    metrics = run.evaluate(
        examples, args.out, judge=judge, policy=policy, responses=responses, baseline=baseline,
        sampling=sampling, policy_prompt=args.policy_prompt, language=args.language,
        batch_size=args.batch_size, judge_max_tokens=args.judge_max_tokens, judge_label=judge_label,
        policy_label=os.path.abspath(args.policy) if args.policy else os.path.abspath(args.responses),
        baseline_label=os.path.abspath(args.baseline_responses or args.eval_set), fresh=args.fresh,
        skip_row_errors=args.skip_row_errors, max_consecutive_failures=args.max_consecutive_failures,
        allow_partial=args.allow_partial,
    )
    if metrics["row_errors"]:
        from cpe_jax.reward.judges import RowErrorLog

        errors = RowErrorLog(os.path.join(args.out, run.ERRORS_FILE))
        print(f"{metrics['row_errors']} examples refused by the judge, skipped and listed in {errors.path}: "
              f"{errors.listing()}")
    if "overall" not in metrics:
        raise UserError(f"no example could be judged: all {metrics['row_errors']} were refused by the judge "
                        f"(see {os.path.join(args.out, run.ERRORS_FILE)})")
    overall = metrics["overall"]
    lc = overall.get("lc_win_rate")
    for note in grouping_notes(metrics):
        print(note)
    print(
        f"n={overall['n']} win rate {overall['win_rate']:.1f}%"
        + (f", LC win rate {lc:.1f}%" if lc is not None else "")
        + f"; report in {os.path.join(args.out, 'report.md')}"
    )


def _cmd_sft(argv):
    """`cpe-jax sft --config=configs/sft.py --workdir=DIR [--config.a.b=v ...]` (SFT, GRM distillation, BT RM)."""
    from cpe_jax import sft

    return sft.main(argv)


def _cmd_train(argv):
    """`cpe-jax train --config=configs/X.py --workdir=DIR [--config.a.b=v ...]` (PPO / CPE)."""
    from cpe_jax.rl.trainer import main

    return main(argv)


def _cmd_label(argv):
    p = argparse.ArgumentParser(
        prog="cpe-jax label",
        description="Judge every row {persona, question, response} of IN with a teacher judge and "
        "append GRM distillation rows {messages: GRM prompt + teacher output, valid, problem, input "
        "fields} to OUT. Resumable: rows already in OUT (matched by `id`, else line number) are "
        "skipped. Rows whose teacher output cannot be parsed are kept with valid=false; train on "
        "valid rows only. Rows the judge refuses (HTTP 400/413/422) go to OUT.errors.jsonl; rows that "
        "got no answer are stored nowhere, and after --max-consecutive-failures of them in a row the "
        "command stops with exit code 3 (rerun it to judge the missing rows).",
    )
    from cpe_jax.reward.judge_factory import add_judge_arguments, add_row_error_argument

    add_judge_arguments(p)
    add_row_error_argument(p)
    p.add_argument("--input", required=True, metavar="IN.jsonl")
    p.add_argument("--out", required=True, metavar="OUT.jsonl")
    p.add_argument("--language", choices=["en", "zh"], default="en", help="language of the GRM prompt")
    p.add_argument("--prompt-style", choices=["full", "compact"], default="full",
                   help="GRM prompt: the paper's rubric (full) or a one-paragraph one for a small GRM (compact)")
    p.add_argument("--temperature", type=float, default=0.0, help="teacher sampling temperature")
    p.add_argument("--max-tokens", type=int, default=1024, help="teacher reply length")
    p.add_argument("--batch-size", type=int, default=16, help="rows judged (and flushed to OUT) together")
    args = p.parse_args(argv)

    import logging
    import sys as _sys

    from cpe_jax.errors import require_path
    from cpe_jax.reward.judge_factory import judge_from_arguments
    from cpe_jax.reward.label import label, read_label_rows

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    read_label_rows(require_path(args.input, "input file"))  # every row checked before the judge starts
    judge, judge_label = judge_from_arguments(args, mesh=_host_device_mesh())
    counts = label(judge, args.input, args.out, language=args.language, temperature=args.temperature,
                   max_tokens=args.max_tokens, batch_size=args.batch_size, progress=_sys.stderr.isatty(),
                   skip_row_errors=args.skip_row_errors, max_consecutive_failures=args.max_consecutive_failures,
                   prompt_style=args.prompt_style)
    if counts["row_errors"]:
        print(f"{counts['row_errors']} rows refused by the judge, skipped and listed in {counts['errors'].path}: "
              f"{counts['errors'].listing()}")
    print(f"{judge_label}: {counts['labelled']} rows labelled, {counts['already_done']} already done, "
          f"{counts['invalid']} of {counts['rows']} invalid, {counts['row_errors']} refused; wrote {args.out}")


def _cmd_rm_eval(argv):
    """`cpe-jax rm-eval --data ROOT --rm-type {grm,bt} --out DIR [...]`: reward-model pairwise accuracy."""
    from cpe_jax.reward import rm_eval

    return rm_eval.main(argv, mesh=_host_device_mesh())


def _cmd_demo(argv):
    """`cpe-jax demo --out DIR [--quick] [--seed N]`: the whole pipeline in miniature on PersonaWorld."""
    from cpe_jax import demo

    return demo.main(argv)


def _cmd_dpo(argv):
    """`cpe-jax dpo --config=configs/dpo.py --workdir=DIR [--config.a.b=v ...]` (DPO / IPO on preference pairs)."""
    from cpe_jax import dpo

    return dpo.main(argv)


def _cmd_micota(argv):
    """`cpe-jax micota --config=configs/micota_cpu.py --workdir=DIR`: teacher-assistant CoT distillation."""
    from cpe_jax import micota

    return micota.main(argv)


def _cmd_launch(argv):
    """`cpe-jax launch --hosts N [--devices-per-host K] -- <command> [flags]`: a local N-host JAX job."""
    from cpe_jax.launch import main

    return main(argv)


def _cmd_plan(argv):
    """`cpe-jax plan --config=configs/X.py [--tpu=v5p-64] [--model=qwen2.5-7b] [--json]` (memory per chip)."""
    from cpe_jax.plan import main

    return main(argv)


COMMANDS = {
    "convert": (_cmd_convert, "convert checkpoints between Hugging Face and Orbax"),
    "generate": (_cmd_generate, "sample completions for a JSONL file of prompts"),
    "sft": (_cmd_sft, "supervised training: SFT policy, GRM distillation, Bradley-Terry RM"),
    "train": (_cmd_train, "PPO with Critique-Post-Edit (resumes from the latest checkpoint)"),
    "eval": (_cmd_eval, "win rate of a policy or of responses against a baseline"),
    "label": (_cmd_label, "teacher GRM judgements of responses: GRM distillation data"),
    "plan": (_cmd_plan, "per-chip memory of a config on a TPU slice, and a mesh that fits"),
    "rm-eval": (_cmd_rm_eval, "pairwise accuracy of a GRM or BT reward model on PersonaFeedback"),
    "dpo": (_cmd_dpo, "DPO / IPO baseline on chosen/rejected pairs (resumes from the latest checkpoint)"),
    "micota": (_cmd_micota, "teacher-assistant CoT distillation: generate, filter by answer and length, SFT"),
    "demo": (_cmd_demo, "the whole pipeline in miniature on PersonaWorld (SFT, GRM, PPO vs CPE, win rates)"),
    "launch": (_cmd_launch, "run a command as an N-host JAX job on this machine (N processes, fake CPU devices)"),
}


# Commands that never touch the devices, so they do not join a multi-host job.
HOST_ONLY_COMMANDS = ("launch", "plan")


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
    if name not in HOST_ONLY_COMMANDS:
        from cpe_jax.sharding import initialize_distributed

        initialize_distributed()  # a multi-host job (JAX_* variables, TPU pod, SLURM, ...); else nothing
    try:
        return COMMANDS[name][0](rest)
    except JudgeUnavailable as e:  # exit code 3; the same command line resumes
        e.resume = shlex.join(["cpe-jax", *argv])
        raise


if __name__ == "__main__":
    sys.exit(main())
