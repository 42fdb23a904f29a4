"""The one judge factory (`build_judge`: python, http or flax) and the one set of judge flags.

Commands reach it through `add_judge_arguments` + `judge_from_arguments` (`cpe-jax label`, `eval`,
`rm-eval`), the RL trainer through its `grm` config block (`judge_from_config`), the demo directly.
"""

import importlib
import os

import jax

from cpe_jax.errors import UserError
from cpe_jax.reward.judges import DEFAULT_MAX_CONSECUTIVE_FAILURES, AcrossHostsJudge, CallableJudge, HTTPJudge
from cpe_jax.sharding import is_host_local

JUDGE_KINDS = ("python", "http", "flax")


def load_callable(spec, what):
    """Import `module:attribute` (e.g. "cpe_jax.data.persona_world:grm_teacher"); `what` names the
    flag or config field in errors."""
    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise UserError(f"{what}={spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what}={spec!r}: cannot import {module_name} ({e})") from None
    if not hasattr(module, attr):
        raise UserError(f"{what}={spec!r}: {module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def build_judge(kind, *, judge_fn=None, base_url=None, judge_model=None, api_key_env=None, judge_path=None,
                max_tokens=None, max_concurrency=8, timeout=60.0, max_retries=5, backoff_base=0.5,
                max_consecutive_failures=DEFAULT_MAX_CONSECUTIVE_FAILURES, names=None, mesh=None):
    """(ChatJudge, label) of kind python (`judge_fn`, "module:function"), http (`judge_model` at
    `base_url`, the key in $`api_key_env`: None = OPENAI_API_KEY, "" = no key) or flax (the model
    at `judge_path` placed on `mesh`, replies of at most `max_tokens` when given). `names` maps
    these arguments to what the user wrote (flags or config fields), for the errors."""
    names = {"kind": "--judge", "judge_fn": "--judge-fn", "judge_path": "judge model directory", **(names or {})}
    if kind not in JUDGE_KINDS:
        raise UserError(f"{names['kind']} must be one of {', '.join(JUDGE_KINDS)}, got {kind!r}")
    if kind == "python":
        fn = load_callable(judge_fn, names["judge_fn"])
        if not callable(fn):
            raise UserError(f"{names['judge_fn']}={judge_fn!r} is not callable")
        return CallableJudge(fn), f"python:{judge_fn}"
    if kind == "http":
        env = "OPENAI_API_KEY" if api_key_env is None else (api_key_env or None)  # "" = no key
        judge = HTTPJudge(judge_model, base_url=base_url, api_key_env=env, max_concurrency=max_concurrency,
                          timeout=timeout, max_retries=max_retries, backoff_base=backoff_base,
                          max_consecutive_failures=max_consecutive_failures)
        return judge, f"http:{judge_model}@{base_url}"
    import cpe_jax
    from cpe_jax.errors import require_path
    from cpe_jax.reward.flax_grm import FlaxGRMJudge
    from cpe_jax.tokenizer import load_tokenizer

    require_path(judge_path, names["judge_path"])
    extra = {} if max_tokens is None else {"max_tokens": max_tokens}
    judge = FlaxGRMJudge(cpe_jax.load_model(judge_path, mesh=mesh), load_tokenizer(judge_path), mesh=mesh, **extra)
    return judge, f"flax:{os.path.abspath(judge_path)}"


def judge_from_config(grm_config):
    """The ChatJudge of a `grm` config block (`grm.type` python, http or flax)."""
    g = grm_config
    if g.type not in JUDGE_KINDS:
        raise UserError(f"config field grm.type: {g.type!r} is not one of {', '.join(JUDGE_KINDS)}")
    judge, _ = build_judge(
        g.type, judge_fn=g.get("judge_fn"), base_url=g.get("base_url"), judge_model=g.get("model_name"),
        api_key_env=g.get("api_key_env", "OPENAI_API_KEY"), judge_path=g.get("path"),
        max_tokens=g.get("max_tokens"), max_concurrency=g.get("max_concurrency", 8),
        timeout=g.get("timeout", 60.0), max_retries=g.get("max_retries", 5),
        backoff_base=g.get("backoff_base", 0.5),
        max_consecutive_failures=g.get("max_consecutive_failures", DEFAULT_MAX_CONSECUTIVE_FAILURES),
        names={"kind": "config field grm.type", "judge_fn": "grm.judge_fn", "judge_path": "grm.path"})
    return judge


# ---- the one set of judge flags (`cpe-jax label`, `eval`, `rm-eval`) ----------------------------

_KIND_FLAGS = {"python": ("--judge-fn",), "http": ("--base-url", "--judge-model", "--api-key-env"),
               "flax": ("--judge-path",)}
_NEEDED_FLAGS = {"python": ("--judge-fn",), "http": ("--base-url", "--judge-model"), "flax": ("--judge-path",)}


def add_judge_arguments(parser, *, required=True):
    """The `--judge {python,http,flax}` flags every judging command shares."""
    parser.add_argument("--judge", required=required, choices=list(JUDGE_KINDS))
    parser.add_argument("--judge-fn", metavar="MODULE:FUNCTION",
                        help="--judge python: fn(messages) -> str, importable from PYTHONPATH")
    parser.add_argument("--base-url", help="--judge http: OpenAI-compatible server, e.g. http://localhost:8000/v1")
    parser.add_argument("--judge-model", "--model", dest="judge_model", metavar="NAME",
                        help="--judge http: model name on the server")
    parser.add_argument("--api-key-env", metavar="VAR", help="--judge http: environment variable holding the "
                        "API key (default OPENAI_API_KEY; '' for a server without a key)")
    parser.add_argument("--judge-path", metavar="DIR", help="--judge flax: judge model directory")
    parser.add_argument("--max-concurrency", type=int, default=8,
                        help="--judge http: requests in flight (per host in a multi-host job)")
    parser.add_argument("--judge-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="--judge http: seconds one request may take")
    parser.add_argument("--judge-retries", type=int, default=5,
                        help="--judge http: retries of a timeout, connection error, 429 or 5xx")
    parser.add_argument("--judge-backoff", type=float, default=0.5, metavar="SECONDS",
                        help="--judge http: first retry delay (doubled each retry, at most 30 s)")
    parser.add_argument("--max-consecutive-failures", type=int, default=DEFAULT_MAX_CONSECUTIVE_FAILURES,
                        metavar="K", help="stop (exit code 3, finished rows kept) after K judge calls in a row "
                        "got no answer; a rerun judges the missing rows")


def add_row_error_argument(parser):
    """`--skip-row-errors` (default on): record rows the judge refuses (HTTP 400/413/422) and go on."""
    import argparse

    parser.add_argument("--skip-row-errors", action=argparse.BooleanOptionalAction, default=True,
                        help="record a row the judge refuses (HTTP 400/413/422, e.g. too long) in the errors "
                        "file and go on (default); --no-skip-row-errors stops at it (exit code 2)")


def judge_from_arguments(args, judge_path=None, mesh=None):
    """(ChatJudge, label) from the flags of `add_judge_arguments`; flags of another kind are refused.
    A flax judge's model is placed on `mesh` (None: one device). For the commands that give every
    host the same rows (eval, label, rm-eval): in a multi-host job with a host-local `mesh` the
    judge is an `AcrossHostsJudge`, so each host judges its share of every batch."""
    kind = args.judge
    judge_path = judge_path or args.judge_path
    flags = {"--judge-fn": args.judge_fn, "--base-url": args.base_url, "--judge-model": args.judge_model,
             "--api-key-env": args.api_key_env, "--judge-path": judge_path}
    if kind not in JUDGE_KINDS:
        raise UserError(f"--judge must be one of {', '.join(JUDGE_KINDS)}, got {kind!r}")
    for flag in _NEEDED_FLAGS[kind]:
        if not flags[flag]:
            raise UserError(f"--judge {kind} needs {flag}")
    extra = [flag for flag, value in flags.items() if value is not None and flag not in _KIND_FLAGS[kind]]
    if extra:
        raise UserError(f"{', '.join(extra)} cannot be used with --judge {kind}")
    judge, label = build_judge(
        kind, judge_fn=args.judge_fn, base_url=args.base_url, judge_model=args.judge_model,
        api_key_env=args.api_key_env, judge_path=judge_path, max_concurrency=args.max_concurrency,
        timeout=args.judge_timeout, max_retries=args.judge_retries, backoff_base=args.judge_backoff,
        max_consecutive_failures=args.max_consecutive_failures, mesh=mesh)
    if jax.process_count() > 1 and is_host_local(mesh):
        judge = AcrossHostsJudge(judge)
    return judge, label
