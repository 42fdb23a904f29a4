"""Commands other than the supervised trainers as a real 2-host job (2 processes x 4 CPU devices,
`cpe_jax.launch`) equal the same command as one process with 8 devices: `train` with the fused
in-framework GRM (per-step metrics to 1e-4 relative), `generate` (identical rows, one output
file written by process 0 only, no temp file left), and `eval --policy`, `label` and `rm-eval` with
a Flax GRM or a BT RM (identical output files, every appended row once). In those commands every
host reads every row, and each host samples, judges or scores only its share: both hosts work,
and their work adds up to the one host's."""

import json
import os
import shutil

import pytest

import cpe_jax
from cpe_jax.cli import main as cli_main
from cpe_jax.metrics import read_metrics
from tests.helpers import make_hf_qwen2, make_persona_world_policy
from tests.multihost import run_command, run_job
from tests.test_multihost_trainers import _one_host, _same_metrics, _train


# Counts the rows each host works on (exec'd in the 2-host job and, undone after, in this process).
COUNT_WORK = """
from cpe_jax.engine import Engine
from cpe_jax.reward.bt import BTScorer
from cpe_jax.reward.flax_grm import FlaxGRMJudge, FlaxGRMScorer

work, patched = {}, []

def count(cls, name, key):
    original = getattr(cls, name)

    def counted(self, items, *args, **kwargs):
        work[key] = work.get(key, 0) + len(items)
        return original(self, items, *args, **kwargs)

    patched.append((cls, name, original))
    setattr(cls, name, counted)

for cls, name, key in [(Engine, "generate", "prompts"), (FlaxGRMJudge, "__call__", "conversations"),
                       (FlaxGRMScorer, "score", "expected"), (BTScorer, "score_array", "bt")]:
    count(cls, name, key)
"""


def _work_of_one_host(run):
    """{kind: rows} that `run()` (commands in this process, 8 devices) sampled, judged or scored."""
    counting = {}
    exec(COUNT_WORK, counting)
    try:
        run()
    finally:
        for cls, name, original in counting["patched"]:
            setattr(cls, name, original)
    return counting["work"]


def _work_is_split(one, per_host):
    """Both hosts worked on every kind of row, and their shares add up to the one host's rows."""
    assert set(one) == set(per_host[0]) == set(per_host[1]), (one, per_host)
    for kind, rows in one.items():
        assert per_host[0][kind] > 0 and per_host[1][kind] > 0, (kind, per_host)
        assert per_host[0][kind] + per_host[1][kind] == rows, (kind, one, per_host)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import jax.numpy as jnp
    import numpy as np

    from cpe_jax.models.heads import ValueModel, save_value_model

    root = tmp_path_factory.mktemp("multihost_commands")
    tokenizer = make_persona_world_policy(root / "policy", seed=0)
    shutil.copytree(root / "policy", root / "grm")  # same tokenizer, other (peakier) weights
    make_hf_qwen2(root / "grm", seed=1, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                  layers=2, heads=4, kv_heads=2, init_scale=0.2)
    bt = ValueModel.from_policy(cpe_jax.load_model(str(root / "grm")))
    bt.head.kernel.set_value(jnp.asarray(np.random.default_rng(0).normal(size=(32, 1)), jnp.float32))
    save_value_model(bt, root / "bt", tokenizer_dir=root / "grm", kind="reward")
    return root


def test_fused_grm_train_on_two_hosts_equals_one_host(models, tmp_path):
    fused = ["--config.grm.type=flax", "--config.grm.fused=True", f"--config.grm.path={models / 'grm'}",
             "--config.grm.max_tokens=6", "--config.grm.max_prompt_length=640",
             "--config.rollout.max_response_length=6", "--config.edit.max_prompt_length=256"]
    one = _train(models, tmp_path / "one", 2, *fused)
    _one_host(one)
    run_command(_train(models, tmp_path / "two", 2, *fused)).check()
    metrics_one, metrics_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in metrics_two] == [1, 2]
    _same_metrics(metrics_one, metrics_two)


def test_generate_on_two_hosts_equals_one_host_and_host_0_writes_once(models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"how should I plan week {i}?"}) + "\n" for i in range(6)))

    def generate(out):
        return ["generate", "--model", str(models / "policy"), "--prompts", str(prompts), "--out", str(out),
                "--max-tokens", "6", "--seed", "3", "--n", "2", "--batch-size", "8"]

    os.makedirs(tmp_path / "one")
    os.makedirs(tmp_path / "two")
    one_work = _work_of_one_host(lambda: cli_main(generate(tmp_path / "one" / "out.jsonl")))  # 8 devices
    job = run_job(COUNT_WORK + f"""
from cpe_jax.cli import main
assert main({generate(tmp_path / "two" / "out.jsonl")!r}) in (0, None)
emit(work)
""").check()
    _work_is_split(one_work, {host: results[0] for host, results in job.results.items()})
    assert os.listdir(tmp_path / "two") == ["out.jsonl"]  # no OUT.tmp left behind
    one = [json.loads(line) for line in (tmp_path / "one" / "out.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "out.jsonl").read_text().splitlines()]
    assert len(one) == 12
    assert [(r["prompt"], r.get("index"), r["token_ids"], r["text"]) for r in two] == \
        [(r["prompt"], r.get("index"), r["token_ids"], r["text"]) for r in one]
    for a, b in zip(one, two):
        assert b["logprobs"] == pytest.approx(a["logprobs"], rel=1e-4, abs=1e-5)
    assert job.returncode == 0


def _outputs(directory):
    """{file name: content} of a command's output directory (PNG plots: bytes, others: text)."""
    return {name: (directory / name).read_bytes() if name.endswith(".png") else (directory / name).read_text()
            for name in sorted(os.listdir(directory))}


def _same_rows(two, one):
    """Two JSONL texts hold the same rows: every field equal, floats to 1e-6 relative or 2e-6
    absolute (the expected GRM scores sum probabilities through collectives whose order differs
    between 2 processes x 4 devices and 1 x 8, a last-bit difference on some CPUs; scores lie in
    [-5, 5], where a float32 last bit is ~5e-7, and the reward's weighted sum can cancel down to
    a small value: -0.1322146 against -0.1322142 on a 2-core AMD EPYC with AVX2)."""
    def same(a, b):
        if isinstance(a, float) and isinstance(b, float):
            return a == pytest.approx(b, rel=1e-6, abs=2e-6)
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(map(same, a, b))
        return a == b
    two_rows, one_rows = two.splitlines(), one.splitlines()
    return len(two_rows) == len(one_rows) and all(same(json.loads(a), json.loads(b)) for a, b in zip(two_rows, one_rows))


def test_eval_label_and_rm_eval_with_a_flax_grm_on_two_hosts_equal_one_host(models, tmp_path):
    rows = [{"question": f"which {topic} suits me?", "persona": {"Name": name}, "response": f"the {topic} near you"}
            for name, topic in [("Ann", "hotel"), ("Bo", "dish"), ("Cy", "phone")]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    feedback = tmp_path / "feedback"
    os.makedirs(feedback / "persona_all")
    os.makedirs(feedback / "rm_benchmark_all")
    (feedback / "persona_all" / "ann.json").write_text(json.dumps({"Name": "Ann", "Likes": "quiet places"}))
    (feedback / "rm_benchmark_all" / "general_easy.jsonl").write_text("".join(
        json.dumps({"user_id": "ann", "question": f"where should I stay {i}?", "chosen": "a quiet inn",
                    "reject": "a loud hostel"}) + "\n" for i in range(2)))
    grm = ["--judge-path", str(models / "grm")]

    def commands(out):
        return [
            ["eval", "--policy", str(models / "policy"), "--eval-set", str(tmp_path / "rows.jsonl"), "--judge",
             "flax", *grm, "--judge-max-tokens", "2", "--max-tokens", "4", "--batch-size", "4",
             "--fresh", "--out", str(out / "eval")],  # --fresh: hosts meet once process 0 emptied OUT
            ["label", "--judge", "flax", *grm, "--input", str(tmp_path / "rows.jsonl"), "--max-tokens", "4",
             "--prompt-style", "compact", "--out", str(out / "label" / "labels.jsonl")],
            ["rm-eval", "--data", str(feedback), "--rm-type", "grm", "--rm", str(models / "grm"), "--max-tokens", "4",
             "--prompt-style", "compact", "--categories", "general", "--tiers", "easy", "--out", str(out / "rm")],
            ["rm-eval", "--data", str(feedback), "--rm-type", "grm", "--grm-mode", "expected", "--rm",
             str(models / "grm"), "--max-tokens", "4", "--prompt-style", "compact", "--categories", "general", "--tiers", "easy",
             "--out", str(out / "rm_expected")],
            ["rm-eval", "--data", str(feedback), "--rm-type", "bt", "--rm", str(models / "bt"), "--categories",
             "general", "--tiers", "easy", "--out", str(out / "rm_bt")],
        ]

    def one_host():  # the 8-device references
        for args in commands(tmp_path / "one"):
            assert cli_main(args) in (0, None)

    one_work = _work_of_one_host(one_host)
    # The commands one after another in one 2-host job (JAX starts once: a launch costs seconds).
    job = run_job(COUNT_WORK + f"""
from cpe_jax.cli import main
for args in {commands(tmp_path / "two")!r}:
    assert main(args) in (0, None), args
emit(work)
""")
    job.check()
    _work_is_split(one_work, {host: results[0] for host, results in job.results.items()})
    for part in ("eval", "label", "rm", "rm_expected", "rm_bt"):
        one, two = _outputs(tmp_path / "one" / part), _outputs(tmp_path / "two" / part)
        assert list(two) == list(one)  # one file each, no PATH.tmp left behind
        for name in one:  # appended logs hold each row once: host 1 wrote nothing
            if part == "rm_expected" and name.endswith(".jsonl"):
                assert _same_rows(two[name], one[name]), (part, name)
            else:
                assert two[name] == one[name], (part, name)
    labels = (tmp_path / "two" / "label" / "labels.jsonl").read_text().splitlines()
    assert len(labels) == 3
    assert json.loads((tmp_path / "two" / "eval" / "metrics.json").read_text())["n"] == 3
    assert json.loads((tmp_path / "two" / "rm" / "rm_eval.json").read_text())["accuracy"]["overall"]["n"] == 2
