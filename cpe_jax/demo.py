"""`cpe-jax demo`: the paper's pipeline in miniature on PersonaWorld, on a CPU, in minutes.

Stages (each one what a `cpe-jax` command runs, called here as library functions with the shipped
presets of `cpe_jax/configs/`; each skipped when its output exists, so an interrupted demo resumes,
and the trainers resume from their own checkpoints):

1. a BPE tokenizer trained on the world's text; a tiny random Qwen2 SFT'd on noisy demonstrations
   (and on revisions of replies from critiques, the instruct ability that post-editing relies on);
2. a tiny GRM distilled from the programmatic teacher (`label`, then `sft` on the valid rows), with
   its pairwise agreement with the teacher on held-out pairs;
3. from the SFT policy, with equal rollout budgets: PPO (no edits) and CPE (random edits, r = 0.5),
   both rewarded by the distilled GRM in expected-score mode;
4. every policy against the SFT policy's responses on held-out personas and questions, judged by
   the teacher's pairwise judge: raw and length-controlled win rates and mean lengths.

Writes OUT/results.json, OUT/report.md and OUT/reward.png, OUT/length.png.
"""

import argparse
import importlib
import json
import logging
import os
import random
import sys
import time

from cpe_jax.configs import CONFIG_DIR
from cpe_jax.data.jsonl import read_jsonl, write_jsonl_atomic
from cpe_jax.errors import UserError

log = logging.getLogger(__name__)

GRM_TEACHERS = {"full": "cpe_jax.data.persona_world:grm_teacher",
                "short": "cpe_jax.data.persona_world:grm_teacher_short"}
PAIRWISE_TEACHER = "cpe_jax.data.persona_world:pairwise_teacher"
MIN_SERVED_HEAD_DIM = 32  # vLLM's CPU attention backend serves head sizes 32 and up
RUN_LABELS = {"sft": "SFT (start)", "ppo": "PPO (GRM)", "cpe": "CPE (GRM + edit)", "ppo_bt": "PPO (BT RM)"}


# ---- small helpers --------------------------------------------------------------------------------


class StoppedEarly(Exception):
    """Raised by `Progress.run` once the stage named by `stop_after` is done."""


class Progress:
    """One line per stage ("[demo 3/11] grm: ..."); the commands show their own step bars."""

    def __init__(self, stages, stop_after=None):
        if stop_after is not None and stop_after not in stages:
            raise UserError(f"--stop-after={stop_after!r}: not a stage of this run; choose one of {', '.join(stages)}")
        self.stages, self.stop_after = stages, stop_after
        self.start = time.perf_counter()
        self.timings = {}

    def run(self, name, done, fn, what=""):
        k = self.stages.index(name) + 1
        prefix = f"[demo {k}/{len(self.stages)}] {name}"
        if done():
            print(f"{prefix}: done earlier, skipped", flush=True)
        else:
            print(f"{prefix}: {what}", flush=True)
            t0 = time.perf_counter()
            fn()
            self.timings[name] = round(time.perf_counter() - t0, 1)
            print(f"{prefix}: finished in {self.timings[name]:.0f} s "
                  f"(total {time.perf_counter() - self.start:.0f} s)", flush=True)
        if name == self.stop_after:
            raise StoppedEarly(name)


def write_rows(path, rows):
    """Write rows atomically (tmp + rename), so a file that exists is complete."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_jsonl_atomic(path, rows)


def read_rows(path):
    return [row for _, row in read_jsonl(path)]


def preset(name, *overrides):
    """The shipped preset `cpe_jax/configs/<name>.py` with the demo's override blocks applied (nested
    blocks field by field), locked as `--config=` leaves it, so a misspelt field is an error."""
    config = importlib.import_module(f"cpe_jax.configs.{name}").get_config()
    config.lock()
    for block in overrides:
        _override(config, block)
    return config


def _override(config, block):
    for key, value in block.items():
        if hasattr(value, "items"):
            _override(config[key], value)
        else:
            config[key] = value


# The stages' commands, as `cpe-jax sft`, `train`, `label`, `generate` and `eval` run them.


def run_sft(config, workdir):
    """`cpe-jax sft`: SFT, GRM distillation or a Bradley-Terry RM (config.mode), resuming in workdir."""
    from cpe_jax.sft import SFTTrainer

    SFTTrainer(config, workdir).run(progress=config.get("progress", True))


def run_rl(config, workdir):
    """`cpe-jax train`: PPO / CPE, resuming in workdir."""
    from cpe_jax.rl.trainer import Trainer

    if Trainer(config, workdir).run() < 0:
        raise RuntimeError(f"training in {workdir} did not finish")


def run_label(judge_fn, in_path, out_path, *, batch_size, prompt_style):
    """`cpe-jax label --judge python --judge-fn FN`: the teacher's GRM judgements of every row."""
    from cpe_jax.reward.judge_factory import build_judge
    from cpe_jax.reward.label import label

    judge, _ = build_judge("python", judge_fn=judge_fn)
    label(judge, in_path, out_path, batch_size=batch_size, progress=sys.stderr.isatty(), prompt_style=prompt_style)


def run_generate(model_dir, prompts_path, out_path, *, max_tokens, temperature, batch_size, seed):
    """`cpe-jax generate`: one sample per prompt row."""
    from cpe_jax import sampling

    params = sampling.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    sampler = sampling.Sampler.from_pretrained(model_dir, max_batch_size=batch_size)
    sampling.generate_jsonl(sampler, prompts_path, out_path, params)


def run_eval(policy_dir, eval_set, out_dir, *, judge_fn, policy_prompt, max_tokens, temperature, batch_size, seed):
    """`cpe-jax eval --policy DIR --judge python --judge-fn FN`: win rates against the eval set's responses."""
    from cpe_jax.data.personafeedback import load_eval_set
    from cpe_jax.eval import run
    from cpe_jax.reward.judge_factory import build_judge
    from cpe_jax.sampling import Sampler, SamplingParams

    judge, judge_label = build_judge("python", judge_fn=judge_fn)
    run.evaluate(
        load_eval_set(eval_set), out_dir, judge=judge,
        policy=Sampler.from_pretrained(policy_dir, max_batch_size=batch_size),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=1.0, seed=seed),
        policy_prompt=policy_prompt, batch_size=batch_size, judge_max_tokens=32, judge_label=judge_label,
        policy_label=os.path.abspath(policy_dir), baseline_label=os.path.abspath(eval_set))


def load_config(path):
    import importlib.util

    if not os.path.isfile(path):
        raise UserError(f"--config: config file does not exist: {path}")
    spec = importlib.util.spec_from_file_location("_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ---- stage 1: tokenizer, policy, SFT data --------------------------------------------------------


def init_model(out_dir, tokenizer_dir, shapes, seed):
    """A random tiny Qwen2 with the world's tokenizer, saved as a cpe_jax checkpoint."""
    from flax import nnx

    from cpe_jax.checkpoints import save_model
    from cpe_jax.models.qwen2.model import Qwen2Config, Qwen2ForCausalLM
    from cpe_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=1024, eos_token_id=eos,
                         bos_token_id=None, rope_theta=10000.0, **dict(shapes))
    if config.head_dim < MIN_SERVED_HEAD_DIM:  # every model the demo writes can be exported and served by vLLM
        raise UserError(f"demo model shapes: head_dim {config.head_dim} (hidden_size {config.hidden_size} / "
                        f"num_attention_heads {config.num_attention_heads}) must be >= {MIN_SERVED_HEAD_DIM}, "
                        "the smallest vLLM's CPU backend serves")
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))
    save_model(model, out_dir, tokenizer_dir=tokenizer_dir)


def sft_rows(world, n_answers, n_edits, p_good, p_fix, seed, critique_style="full", damaged_fraction=0.0):
    """Policy SFT rows: noisy answers to the policy prompt, and minimal revisions of noisy (a
    `damaged_fraction` of them broken) answers after the teacher's critique of them (each
    criticised flaw fixed with probability p_fix)."""
    from cpe_jax.data import persona_world as pw
    from cpe_jax.data.prompts import post_edit_messages
    from cpe_jax.reward.grm import parse_grm_output

    rng = random.Random(seed)
    rows = []
    for persona, question in pw.sample_prompts(world, "train", n_answers, rng):
        rows.append({"prompt": pw.policy_messages(persona, question),
                     "response": pw.noisy_demonstration(world, persona, question, rng, p_good)})
    for persona, question in pw.sample_prompts(world, "train", n_edits, rng):
        if rng.random() < damaged_fraction:
            original = pw.damaged_response(world, persona, question, rng)
        else:
            original = pw.generate_response(world, persona, question, rng, pw.random_quality(rng, p_good))
        critique = parse_grm_output(pw.teacher_judgement(persona, question, original, critique_style)).critique
        revised = pw.revise_response(world, persona, question, original, rng, p_fix)
        user_prompt = pw.policy_messages(persona, question)[0]["content"]
        rows.append({"prompt": post_edit_messages(user_prompt, original, critique), "response": revised})
    rng.shuffle(rows)
    return rows


def label_inputs(world, n, seed, damaged_fraction=0.0):
    """Responses of every quality for the teacher to judge: the GRM's distillation inputs, a
    `damaged_fraction` of them broken the ways RL policies break (`persona_world.damaged_response`)."""
    from cpe_jax.data import persona_world as pw

    rng = random.Random(seed)
    rows = []
    for k, (persona, question) in enumerate(pw.sample_prompts(world, "train", n, rng)):
        if rng.random() < damaged_fraction:
            response = pw.damaged_response(world, persona, question, rng)
        else:
            quality = pw.random_quality(rng, rng.uniform(0.2, 0.9))
            response = pw.generate_response(world, persona, question, rng, quality)
        rows.append({"id": k, "persona": pw.persona_text(persona), "question": question["text"],
                     "response": response})
    return rows


def grm_pairs(world, n, seed):
    """Held-out preference pairs (eval personas and questions), chosen by the teacher's reward;
    the tier is the reward gap (easy > 2, medium > 1, hard otherwise)."""
    from cpe_jax.data import persona_world as pw
    from cpe_jax.data.personafeedback import PreferencePair

    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        persona, question = pw.sample_prompts(world, "eval", 1, rng)[0]
        a, b = (pw.generate_response(world, persona, question, rng, pw.random_quality(rng, rng.uniform(0.2, 0.9)))
                for _ in range(2))
        ra, rb = (pw.teacher_reward(persona, question, r) for r in (a, b))
        if abs(ra - rb) < 0.25:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        gap = abs(ra - rb)
        pairs.append(PreferencePair(
            user_id=persona["id"], persona=pw.persona_text(persona), question=question["text"], chosen=chosen,
            rejected=rejected, tier="easy" if gap > 2 else "medium" if gap > 1 else "hard", category="general",
            source=f"pair {len(pairs)}"))
    return pairs


ASPECT_FLAWS = {  # one flaw each, as `generate_response` quality overrides of the best response
    "diet": {"diet": False}, "budget": {"budget": False}, "expertise": {"expertise": False},
    "tone": {"tone": False}, "length": {"length": False}, "interest": {"interest": False},
    "on_topic": {"on_topic": False}, "padding": {"padding": 2},
}


def grm_aspect_pairs(world, n_per_aspect, seed):
    """Held-out pairs that differ in one aspect: a best response against the same draw with that
    aspect flawed (tier = the aspect). What a reward model cannot see here, RL cannot improve."""
    from cpe_jax.data import persona_world as pw
    from cpe_jax.data.personafeedback import PreferencePair

    rng = random.Random(seed)
    pairs, counts = [], dict.fromkeys(ASPECT_FLAWS, 0)
    for _ in range(50 * n_per_aspect):  # every aspect applies to some eval questions
        if min(counts.values()) >= n_per_aspect:
            break
        persona, question = pw.sample_prompts(world, "eval", 1, rng)[0]
        draw = rng.randrange(2**32)
        for aspect, flaw in ASPECT_FLAWS.items():
            if counts[aspect] >= n_per_aspect:
                continue
            good, bad = (pw.generate_response(world, persona, question, random.Random(draw), q)
                         for q in (pw.BEST_QUALITY, flaw))
            if pw.teacher_reward(persona, question, good) <= pw.teacher_reward(persona, question, bad):
                continue  # the flaw does not apply to this question (e.g. diet outside food)
            counts[aspect] += 1
            pairs.append(PreferencePair(
                user_id=persona["id"], persona=pw.persona_text(persona), question=question["text"], chosen=good,
                rejected=bad, tier=aspect, category="general", source=f"aspect {aspect} {counts[aspect]}"))
    return pairs


def bt_pairs(world, n, seed, longer_chosen):
    """Teacher preference pairs for a Bradley-Terry RM, confounded with length: in a `longer_chosen`
    share of them the preferred response is also the longer one, so length is the easy feature
    to learn (the length hacking the paper reports for a BT RM). Each row carries the policy's
    prompt, which `reward.bt.BTScorer` scores rollouts after."""
    from cpe_jax.data import persona_world as pw

    rng = random.Random(seed)
    wanted = {True: round(n * longer_chosen), False: n - round(n * longer_chosen)}
    rows = []
    while any(wanted.values()):
        persona, question = pw.sample_prompts(world, "train", 1, rng)[0]
        a, b = (pw.generate_response(world, persona, question, rng, pw.random_quality(rng, rng.uniform(0.2, 0.9)))
                for _ in range(2))
        preference = pw.teacher_preference(persona, question, a, b)
        if preference == 0.5:
            continue
        chosen, rejected = (a, b) if preference > 0.5 else (b, a)
        longer = len(chosen) > len(rejected)
        if wanted[longer]:
            wanted[longer] -= 1
            rows.append({"messages": pw.policy_messages(persona, question), "chosen": chosen, "rejected": rejected})
    return rows


def eval_examples(world, n, seed):
    """Held-out (persona, question) pairs: every eval persona x eval question, a seeded subset."""
    pairs = [(p, q) for p in world.personas("eval") for q in world.questions("eval")]
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


# ---- the pipeline --------------------------------------------------------------------------------


STAGES = ["tokenizer", "policy-init", "sft-data", "sft", "label", "grm-init", "grm", "grm-eval",
          "rl-ppo", "rl-cpe", "sft-responses", "eval-ppo", "eval-cpe", "report"]


def run(out, config, seed=0, config_path="", stop_after=None):
    """Run (or resume) the whole demo into `out`; returns the results dict (None when stopped after
    the stage `stop_after`: a rerun without it goes on from there)."""
    from cpe_jax.data import persona_world as pw

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    c = config
    world = pw.make_world(seed)
    stages = list(STAGES)
    if c.run_bt:
        stages.insert(stages.index("grm-eval") + 1, "bt-rm")
        stages.insert(stages.index("rl-cpe") + 1, "rl-ppo_bt")
        stages.insert(stages.index("eval-cpe") + 1, "eval-ppo_bt")
    progress = Progress(stages, stop_after)
    try:
        return run_stages(progress, out, c, seed, config_path, world)
    except StoppedEarly:
        return None


def run_stages(progress, out, c, seed, config_path, world):
    """The stages of `run`, in order, each skipped when its output exists."""
    import cpe_jax
    from cpe_jax.data import persona_world as pw

    config = c
    critique_style = c.grm.get("critique_style", "full")  # what the GRM learns to write, and the policy to read
    prompt_style = c.grm.get("prompt_style", "full")  # every stage renders the same GRM prompt
    path = lambda *parts: os.path.join(out, *parts)  # noqa: E731
    exists = lambda *parts: (lambda: os.path.exists(path(*parts)))  # noqa: E731
    one_device = {"mesh": {"data": 1, "fsdp": 1, "tensor": 1}}

    def trainer_config(name, block, **fields):  # a stage's `--config.*` overrides of a shipped preset
        return preset(name, {k: v for k, v in block.items() if k != "mesh"}, fields, one_device)

    progress.run("tokenizer", exists("tokenizer", "tokenizer.json"), lambda: pw.train_tokenizer(
        world, path("tokenizer"), vocab_size=c.world.vocab_size, n_responses=c.world.tokenizer_responses,
        seed=seed, grm_prompt_style=prompt_style), "BPE on the world's text")
    progress.run("policy-init", exists("policy_init", "cpe_jax_model.json"),
                 lambda: init_model(path("policy_init"), path("tokenizer"), c.policy_model, seed),
                 "random tiny Qwen2 policy")
    progress.run("sft-data", exists("data", "sft.jsonl"), lambda: write_rows(path("data", "sft.jsonl"), sft_rows(
        world, c.world.sft_rows, c.world.edit_rows, c.world.sft_p_good, c.world.edit_p_fix, seed, critique_style,
        c.world.get("damaged_fraction", 0.0))),
        "noisy demonstrations and post-edit demonstrations")
    progress.run("sft", exists("policy_sft", "final"), lambda: run_sft(trainer_config(
        "sft", c.sft, model=path("policy_init"), data={"path": path("data", "sft.jsonl")}, seed=seed),
        path("policy_sft")), "cpe-jax sft (policy)")

    def label():
        write_rows(path("data", "label_input.jsonl"), label_inputs(world, c.world.label_rows, seed + 1,
                                                               c.world.get("damaged_fraction", 0.0)))
        run_label(GRM_TEACHERS[critique_style], path("data", "label_input.jsonl"), path("data", "labels.jsonl.partial"),
                  batch_size=256, prompt_style=prompt_style)
        rows = [{"messages": r["messages"]} for r in read_rows(path("data", "labels.jsonl.partial")) if r["valid"]]
        write_rows(path("data", "grm_train.jsonl"), rows)

    progress.run("label", exists("data", "grm_train.jsonl"), label, "cpe-jax label (teacher judgements)")
    progress.run("grm-init", exists("grm_init", "cpe_jax_model.json"),
                 lambda: init_model(path("grm_init"), path("tokenizer"), c.grm_model, seed + 1), "random tiny GRM")
    progress.run("grm", exists("grm", "final"), lambda: run_sft(trainer_config(
        "sft", c.grm.sft, model=path("grm_init"), data={"path": path("data", "grm_train.jsonl")}, seed=seed),
        path("grm")), "cpe-jax sft (GRM distillation)")

    def grm_eval():
        from cpe_jax.reward import rm_eval
        from cpe_jax.reward.flax_grm import FlaxGRMScorer
        from cpe_jax.tokenizer import load_tokenizer

        pairs = grm_pairs(world, c.world.grm_eval_pairs, seed + 2)
        grm_dir = path("grm", "final")
        scorer = FlaxGRMScorer(cpe_jax.load_model(grm_dir), load_tokenizer(grm_dir), max_tokens=c.grm.max_tokens,
                               max_batch_size=64, prompt_style=prompt_style)
        scores = rm_eval.grm_pair_scores(scorer, pairs, batch_size=64)
        info = {"rm": f"flax-expected:{grm_dir}", "rm_type": "grm"}
        aspect_pairs = grm_aspect_pairs(world, c.world.get("grm_aspect_pairs", 0), seed + 4)
        if aspect_pairs:
            rm_eval.evaluate(aspect_pairs, rm_eval.grm_pair_scores(scorer, aspect_pairs, batch_size=64),
                             path("grm_eval", "aspects"), info=info)
        rm_eval.evaluate(pairs, scores, path("grm_eval"), info=info)  # written last: the stage's done mark

    progress.run("grm-eval", exists("grm_eval", "rm_eval.json"), grm_eval,
                 "GRM agreement with the teacher on held-out pairs")

    if c.run_bt:
        def bt_rm():
            write_rows(path("data", "bt_pairs.jsonl"), bt_pairs(world, c.bt.pairs, seed + 5, c.bt.longer_chosen))
            run_sft(trainer_config("bt", c.bt.sft, model=path("grm_init"), data={"path": path("data", "bt_pairs.jsonl")},
                                   seed=seed), path("bt"))

        progress.run("bt-rm", exists("bt", "final"), bt_rm,
                     "cpe-jax sft (Bradley-Terry RM on length-confounded teacher pairs)")

    rl_fields = {"policy": path("policy_sft", "final"), "seed": seed, "data": {"seed": seed, "world_seed": seed},
                 "grm": {"max_tokens": c.grm.max_tokens, "prompt_style": prompt_style}}
    grm = {"grm": {"path": path("grm", "final")}}
    runs = {"ppo": [grm, {"edit": {"strategy": "none"}}], "cpe": [grm, {"edit": {"strategy": "random"}}]}
    if c.run_bt:
        runs["ppo_bt"] = [{"grm": {"path": path("bt", "final"), "type": "bt", "mode": "text"}},
                          {"edit": {"strategy": "none"}}]
    for name, extra in runs.items():
        progress.run(f"rl-{name}", exists("rl", name, "final", "cpe_jax_model.json"),
                     lambda extra=extra, name=name: run_rl(preset("demo_rl", rl_fields, c.rl, *extra), path("rl", name)),
                     f"cpe-jax train ({RUN_LABELS[name]}, {c.rl.total_steps} steps)")

    examples = eval_examples(world, c.world.eval_examples, seed + 3)

    def sft_responses():
        write_rows(path("eval", "prompts.jsonl"),
                   [{"row": i, "messages": pw.policy_messages(p, q)} for i, (p, q) in enumerate(examples)])
        run_generate(path("policy_sft", "final"), path("eval", "prompts.jsonl"), path("eval", "sft_generated.jsonl"),
                     max_tokens=c.eval.max_tokens, temperature=c.eval.temperature, batch_size=c.eval.batch_size,
                     seed=seed)
        generated = sorted(read_rows(path("eval", "sft_generated.jsonl")), key=lambda r: r["row"])
        write_rows(path("eval", "eval_set.jsonl"), [
            {"persona": p, "question": q["text"], "category": "specific", "response": g["text"]}
            for (p, q), g in zip(examples, generated)])

    progress.run("sft-responses", exists("eval", "eval_set.jsonl"), sft_responses,
                 "cpe-jax generate (the SFT baseline's responses)")
    for name in runs:
        progress.run(f"eval-{name}", exists("eval", name, "metrics.json"), lambda name=name: run_eval(
            path("rl", name, "final"), path("eval", "eval_set.jsonl"), path("eval", name), judge_fn=PAIRWISE_TEACHER,
            policy_prompt="persona_world", max_tokens=c.eval.max_tokens, temperature=c.eval.temperature,
            batch_size=c.eval.batch_size, seed=seed), f"cpe-jax eval ({RUN_LABELS[name]} vs SFT)")
    progress.run("report", lambda: False, lambda: None, "results.json, report.md, plots")
    results = collect_results(out, seed, config, config_path, progress.timings)
    write_report(out, results)
    return results


# ---- results ---------------------------------------------------------------------------------------


def _eval_summary(metrics):
    o = metrics["overall"]
    return {"lc_win_rate": o.get("lc_win_rate"), "lc_standard_error": o.get("lc_standard_error"),
            "win_rate": o["win_rate"], "standard_error": o.get("standard_error"),
            "mean_length": o.get("mean_model_length"), "baseline_mean_length": o.get("mean_baseline_length"),
            "n": o["n"]}


def _earlier_timings(out):
    """Stage timings of the runs this one resumes (a resumed demo skips those stages)."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f).get("timings_s", {})
    except (OSError, ValueError):
        return {}


def collect_results(out, seed, config, config_path, timings):
    from cpe_jax.data.personafeedback import TIERS
    from cpe_jax.metrics import read_metrics

    runs = {}
    sft_set = read_rows(os.path.join(out, "eval", "eval_set.jsonl"))
    sft_length = sum(len(r["response"]) for r in sft_set) / len(sft_set)
    runs["sft"] = {"lc_win_rate": 50.0, "win_rate": 50.0, "mean_length": sft_length, "n": len(sft_set)}
    for name in ("ppo", "cpe", "ppo_bt"):
        metrics_path = os.path.join(out, "eval", name, "metrics.json")
        if not os.path.exists(metrics_path):
            continue
        with open(metrics_path) as f:
            runs[name] = _eval_summary(json.load(f))
        rows = read_metrics(os.path.join(out, "rl", name))
        runs[name]["training"] = {key: [r.get(key) for r in rows] for key in ("step", "orig/reward", "orig/length",
                                                                               "edit/reward", "edit/length")}
    with open(os.path.join(out, "grm_eval", "rm_eval.json")) as f:
        grm = json.load(f)["accuracy"]
    aspects_path = os.path.join(out, "grm_eval", "aspects", "rm_eval.json")
    aspects = {}
    if os.path.exists(aspects_path):
        with open(aspects_path) as f:
            aspects = json.load(f)["accuracy"]
    by_aspect = {k: aspects[k]["accuracy"] for k in ASPECT_FLAWS if k in aspects}
    return {
        "seed": seed,
        "config": config_path,
        "length_unit": "characters",
        "grm": {"agreement": grm["overall"]["accuracy"], "n": grm["overall"]["n"],
                "by_tier": {k: v["accuracy"] for k, v in grm.items() if k in TIERS},
                "by_aspect": by_aspect},
        "runs": runs,
        "timings_s": {**_earlier_timings(out), **timings},
    }


def write_report(out, results):
    runs = results["runs"]
    lines = ["# cpe-jax demo: Critique-Post-Edit on PersonaWorld", "",
             f"Seed {results['seed']}. Held-out personas and questions; every policy is compared with the SFT "
             "policy's responses by the teacher's pairwise judge (both orders). Length in characters.", "",
             "| Method | LC win rate | Win rate | Length |", "|---|---:|---:|---:|"]
    for name, r in runs.items():
        lc = "-" if r.get("lc_win_rate") is None else f"{r['lc_win_rate']:.1f}"
        lines.append(f"| {RUN_LABELS.get(name, name)} | {lc} | {r['win_rate']:.1f} | {r['mean_length']:.0f} |")
    g = results["grm"]
    lines += ["", f"Distilled GRM: {100 * g['agreement']:.1f}% pairwise agreement with the teacher on {g['n']} "
              "held-out pairs (ties count half).", ""]
    if g.get("by_aspect"):
        lines += ["Its accuracy on pairs that differ in one flaw (a best response against the same response "
                  "with that flaw): " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in g["by_aspect"].items()) + ".", ""]
    lines += ["![reward over training](reward.png)", "", "![length over training](length.png)", ""]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    _plot(out, runs, "orig/reward", "GRM reward of the rollouts", "reward.png")
    _plot(out, runs, "orig/length", "rollout length (tokens)", "length.png")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


def _plot(out, runs, key, ylabel, filename):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, r in runs.items():
        if "training" in r:
            ax.plot(r["training"]["step"], r["training"][key], label=RUN_LABELS.get(name, name))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, filename), dpi=100)


def main(argv):
    p = argparse.ArgumentParser(
        prog="cpe-jax demo",
        description="The paper's pipeline in miniature on PersonaWorld: SFT policy, distilled GRM, PPO vs CPE, "
        "win rates on held-out personas. Resumable: rerun the same command to continue.")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--quick", action="store_true", help="a smaller run of a few minutes (configs/demo_quick.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", metavar="FILE", help="demo config (default configs/demo_cpu.py or demo_quick.py)")
    p.add_argument("--stop-after", metavar="STAGE",
                   help="stop once this stage is done (e.g. sft); rerun without it to go on")
    p.add_argument("--bt", action="store_true",
                   help="also PPO rewarded by a Bradley-Terry RM trained on length-confounded pairs (config run_bt)")
    args = p.parse_args(argv)
    config_path = args.config or os.path.join(CONFIG_DIR, "demo_quick.py" if args.quick else "demo_cpu.py")
    config = load_config(config_path)
    if args.bt:
        config.run_bt = True
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = run(args.out, config, seed=args.seed, config_path=os.path.abspath(config_path),
                  stop_after=args.stop_after)
    if results is None:
        print(f"stopped after stage {args.stop_after}; rerun without --stop-after to go on")
        return 0
    print(open(os.path.join(os.path.abspath(args.out), "report.md")).read().split("![")[0].strip())
    return 0
