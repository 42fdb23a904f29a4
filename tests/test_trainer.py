"""The CPE/PPO trainer: weights move, reward rises, the update is invariant to how the batch is
split, and a SIGTERM'd run resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from tests.helpers import make_persona_world_policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pw_policy")
    make_persona_world_policy(path)
    return str(path)


def smoke_config(policy_dir, **overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", os.path.join(REPO, "configs", "smoke.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.policy = policy_dir
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def short_answer_judge(conversation):
    """A trivially learnable reward: every dimension is higher for shorter responses."""
    from cpe_jax.data.persona_world import prompt_field as _prompt_field

    words = len(_prompt_field(conversation, "RESPONSE").split())
    score = int(max(-5, min(5, 5 - words // 2)))
    return (f"<critique>Use at most {max(words // 2, 1)} words.</critique>\n<scores>\n"
            f"Helpfulness: {score}\nPersonalization: {score}\nNatural: {score}\n</scores>")


def test_one_step_changes_policy_and_critic(policy_dir, tmp_path):
    from cpe_jax.rl.trainer import Trainer

    trainer = Trainer(smoke_config(policy_dir, total_steps=1), str(tmp_path))
    before = jax.tree.map(np.asarray, (trainer.state.policy, trainer.state.critic))
    step, metrics = trainer.train_one_step()
    after = jax.tree.map(np.asarray, (trainer.state.policy, trainer.state.critic))
    assert step == 1
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        if b.ndim >= 2:
            assert not np.array_equal(a, b)
    for key in ("orig/reward", "orig/helpfulness", "edit/reward", "orig/length", "edit/length",
                "grm/failure_rate", "actor/entropy", "actor/clip_frac", "critic/value_loss",
                "critic/explained_variance", "actor/grad_norm", "critic/grad_norm", "actor/lr",
                "time/generate", "time/judge", "time/train", "perf/tokens_per_s"):
        assert key in metrics, key
    assert metrics["edit/selected"] == 4  # random edits, r = 0.5 of 8 rollouts
    trainer.metrics.close()
    trainer.checkpointer.close()


def test_reward_rises_on_a_learnable_reward(policy_dir, tmp_path):
    from cpe_jax.rl.trainer import Trainer

    config = smoke_config(policy_dir, total_steps=16, save_every=100)
    config.grm.judge_fn = "tests.test_trainer:short_answer_judge"
    config.edit.strategy = "none"
    config.ppo.actor_lr = 2e-2
    trainer = Trainer(config, str(tmp_path))
    trainer.run(progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rewards = [r["orig/reward"] for r in rows]
    assert len(rewards) == 16
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 1.5


def _train_cli(policy_dir, workdir, *extra):
    cmd = [sys.executable, "-m", "cpe_jax.cli", "train", f"--config={REPO}/configs/smoke.py",
           f"--workdir={workdir}", f"--config.policy={policy_dir}", *extra]
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


DETERMINISTIC = ("orig/reward", "edit/reward", "orig/length", "actor/pg_loss", "critic/value_loss",
                 "actor/grad_norm", "edit/selected", "data/position")


def test_sigterm_then_resume_is_exact(policy_dir, tmp_path):
    straight = tmp_path / "straight"
    proc = _train_cli(policy_dir, straight)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    reference = {row["step"]: row for row in _metrics(straight)}
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    interrupted = tmp_path / "interrupted"
    proc = _train_cli(policy_dir, interrupted)
    deadline = time.time() + 600
    while time.time() < deadline and not any(r["step"] >= 3 for r in _metrics(interrupted)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    saved = max(r["step"] for r in _metrics(interrupted))
    assert 3 <= saved < 6
    proc = _train_cli(policy_dir, interrupted)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    resumed = {row["step"]: row for row in _metrics(interrupted)}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in DETERMINISTIC:
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert os.path.exists(interrupted / "final" / "cpe_jax_model.json")


def test_bad_config_field_exits_2(policy_dir, tmp_path):
    for flag, field in (("--config.edit.ratio=1.5", "edit_ratio"), ("--config.edit.strategy=best", "edit_strategy"),
                        ("--config.ppo.prompts_per_step=3", "ppo."), ("--config.grm.type=bt", "edit.strategy")):
        proc = _train_cli(policy_dir, tmp_path / "bad", flag)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2, out
        assert field in out and "Traceback" not in out


def _pad_batch(batch, prompt_extra, response_extra):
    """The same rollout with extra left padding on prompts and right padding on responses."""
    out = dict(batch)
    for name in ("prompt_tokens", "prompt_mask"):
        out[name] = np.pad(batch[name], ((0, 0), (prompt_extra, 0)))
    for name in ("orig_tokens", "orig_mask", "orig_sampler_logprobs", "edit_tokens", "edit_mask",
                 "edit_sampler_logprobs"):
        out[name] = np.pad(batch[name], ((0, 0), (0, response_extra)))
    return out


def test_update_invariant_to_micro_batches_padding_and_devices(policy_dir, tmp_path):
    """Same new weights whatever the micro-batch split, the padding, or the data-parallel split."""
    import dataclasses
    from functools import partial

    from cpe_jax.rl.trainer import Trainer
    from cpe_jax.rl.update import train_step
    from cpe_jax.sharding import make_mesh, shard_batch

    config = smoke_config(policy_dir, total_steps=1)
    config.grm.judge_fn = "tests.test_trainer:short_answer_judge"  # rewards that vary across rows
    trainer = Trainer(config, str(tmp_path))
    prompts = trainer.data.take(0, 4)
    examples = [p for p in prompts for _ in range(2)]
    key = jax.random.key(7)
    batch = trainer.rollout.run(trainer.state.policy, examples, list(range(8)), key, trainer.mesh).arrays
    assert batch["keep_edit"].sum() == 4
    state = jax.device_get(trainer.state)

    # Plain SGD: Adam's first step is lr * sign(g), which turns float noise in near-zero gradients
    # into lr-sized differences; with SGD the weights compare the gradients themselves.
    sgd = optax.sgd(1.0)
    state = state.replace(policy_opt=sgd.init(state.policy), critic_opt=sgd.init(state.critic))

    def update(settings, batch, mesh):
        fn = jax.jit(partial(train_step, trainer.policy_graphdef, trainer.critic_graphdef, sgd, sgd, settings))
        with jax.set_mesh(mesh):
            new_state, metrics = fn(jax.device_put(state), shard_batch(mesh, batch), jax.random.key(3))
        return jax.device_get(new_state), jax.device_get(metrics)

    base = trainer.settings
    reference, ref_metrics = update(base, batch, trainer.mesh)
    variants = {
        "micro-batches": update(dataclasses.replace(base, micro_batch_size=2), batch, trainer.mesh),
        "padding": update(dataclasses.replace(base, prompt_length=base.prompt_length + 5,
                                              edit_prompt_length=base.edit_prompt_length + 3,
                                              response_length=base.response_length + 7),
                          _pad_batch(batch, 5, 7) | {"edit_prompt_tokens": np.pad(batch["edit_prompt_tokens"], ((0, 0), (3, 0))),
                                                     "edit_prompt_mask": np.pad(batch["edit_prompt_mask"], ((0, 0), (3, 0)))},
                          trainer.mesh),
        "8 devices": update(base, batch, make_mesh({"data": 8})),
    }
    for name, (new_state, metrics) in variants.items():
        for a, b in zip(jax.tree.leaves(reference.policy), jax.tree.leaves(new_state.policy)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(reference.critic), jax.tree.leaves(new_state.critic)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
        assert metrics["actor/pg_loss"] == pytest.approx(ref_metrics["actor/pg_loss"], abs=1e-5), name
    trainer.metrics.close()
    trainer.checkpointer.close()
