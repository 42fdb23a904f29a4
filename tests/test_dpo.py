import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpe_jax import dpo
from cpe_jax.cli import main as cli_main
from cpe_jax.config import parse_config_flags
from cpe_jax.metrics import read_metrics
from helpers import make_persona_world_policy

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "dpo.py")
COLOURS = ["blue", "green", "red", "yellow"]


def _np_log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def test_dpo_loss_matches_numpy():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, size=16) for _ in range(4))
    h = (pc - rc) - (pr - rr)
    for beta, eps in [(0.1, 0.0), (0.5, 0.2)]:
        losses, m = dpo.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, label_smoothing=eps)
        expected = -(1 - eps) * _np_log_sigmoid(beta * h) - eps * _np_log_sigmoid(-beta * h)
        np.testing.assert_allclose(losses, expected, rtol=1e-5)
        np.testing.assert_allclose(m["chosen_reward"], beta * (pc - rc), rtol=1e-5)
        np.testing.assert_allclose(m["margin"], beta * h, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(m["reward_accuracy"], (h > 0).astype(np.float32))
    losses, _ = dpo.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=0.25, loss_type="ipo")
    np.testing.assert_allclose(losses, (h - 1 / (2 * 0.25)) ** 2, rtol=1e-5)


def _rows():
    """A toy preference: a calm answer over a shouted one, whatever the item."""
    return [{"prompt": f"what colour is item {i}?", "chosen": f"item {i} is {COLOURS[i % 4]}, I think.",
             "rejected": f"ITEM {i} IS {COLOURS[i % 4].upper()}!!"} for i in range(8)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    model_dir = str(root / "model")
    make_persona_world_policy(model_dir)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return model_dir, str(data)


def _argv(model_dir, data, workdir, *overrides):
    return [f"--config={CONFIG}", f"--workdir={workdir}", f"--config.model={model_dir}",
            f"--config.data.path={data}", "--config.batch_size=4", "--config.max_length=64",
            "--config.bucket_size=32", "--config.mesh.data=2", "--config.progress=False", *overrides]


def run_cli(argv, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _policy_logps(model_dir, data):
    """Sequence log-probs of every pair under the model in `model_dir`, computed outside the trainer."""
    import cpe_jax
    from cpe_jax.tokenizer import load_tokenizer

    config = parse_config_flags(_argv(model_dir, data, "unused"), "test")[0]
    tokenizer = load_tokenizer(model_dir)
    examples = dpo.load_pairs(config, tokenizer)
    batch = dpo.collate_pairs(examples, 32, 64, tokenizer.pad_token_id)
    chosen, rejected = dpo.pair_logps(cpe_jax.load_model(model_dir), {k: jnp.asarray(v) for k, v in batch.items()})
    return np.asarray(chosen), np.asarray(rejected)


def test_dpo_raises_the_chosen_minus_rejected_margin(setup, tmp_path, capsys):
    model_dir, data = setup
    workdir = tmp_path / "run"
    code, _ = run_cli(["dpo", *_argv(model_dir, data, workdir, "--config.total_steps=6", "--config.lr=3e-3",
                                     "--config.beta=0.5")], capsys)
    assert code == 0
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    # Step 1 is measured before any update: the policy equals the reference, so every log-ratio is 0.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert np.mean([r["margin"] for r in rows[-3:]]) > 0.5
    assert np.mean([r["reward_accuracy"] for r in rows[-3:]]) > 0.9
    assert os.path.exists(workdir / "reference_logps.npz")

    # The margin measured from scratch on the final model, against the starting one.
    ref_c, ref_r = _policy_logps(model_dir, data)
    new_c, new_r = _policy_logps(str(workdir / "final"), data)
    cached = np.load(workdir / "reference_logps.npz")  # in data order, computed once before step 1
    np.testing.assert_allclose(cached["chosen"], ref_c, rtol=1e-4)
    np.testing.assert_allclose(cached["rejected"], ref_r, rtol=1e-4)
    margins = (new_c - ref_c) - (new_r - ref_r)
    assert (margins > 0).mean() >= 0.75 and margins.mean() > 1.0


def test_ipo_starts_at_its_target_gap_and_raises_the_margin(setup, tmp_path):
    model_dir, data = setup
    config = parse_config_flags(_argv(model_dir, data, tmp_path, "--config.total_steps=3", "--config.lr=1e-3",
                                      "--config.loss_type=ipo", "--config.beta=0.5"), "test")[0]
    trainer = dpo.DPOTrainer(config, str(tmp_path))
    trainer.run(progress=False)
    trainer.close()
    rows = read_metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx((0 - 1 / (2 * 0.5)) ** 2, abs=1e-4)  # h = 0 before any update
    assert rows[-1]["margin"] > 0.1 and rows[-1]["loss"] < rows[0]["loss"]


def test_resume_is_exact_and_reuses_cached_reference(setup, tmp_path, monkeypatch):
    model_dir, data = setup
    argv = ["--config.total_steps=4", "--config.save_every=3", "--config.lr=3e-3"]

    def config(workdir):
        return parse_config_flags(_argv(model_dir, data, workdir, *argv), "test")[0]

    straight = dpo.DPOTrainer(config(tmp_path / "straight"), str(tmp_path / "straight"))
    assert straight.run(progress=False) == 4
    straight.close()

    def terminate_after_two(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = dpo.DPOTrainer(config(tmp_path / "resumed"), str(tmp_path / "resumed"))
    assert first.run(progress=False, on_step=terminate_after_two) == 2
    first.close()

    def no_recompute(self):
        raise AssertionError("reference log-probs recomputed on resume")

    monkeypatch.setattr(dpo.DPOTrainer, "_compute_reference_logps", no_recompute)
    second = dpo.DPOTrainer(config(tmp_path / "resumed"), str(tmp_path / "resumed"))
    assert second.step == 2
    assert second.run(progress=False) == 4
    second.close()

    def without_timing(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert without_timing(read_metrics(tmp_path / "straight")) == without_timing(read_metrics(tmp_path / "resumed"))
    for x, y in zip(jax.tree.leaves(jax.device_get(straight.state.params)),
                    jax.tree.leaves(jax.device_get(second.state.params))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("override, message", [
    ("--config.beta=0", "config field beta: must be a number in (0, inf]"),
    ("--config.loss_type=hinge", "config field loss_type: must be one of 'sigmoid', 'ipo'"),
    ("--config.label_smoothing=0.5", "config field label_smoothing: must be a number in [0, 0.5)"),
    ("--config.mode=lm", "config field mode: must be one of 'dpo'"),
    ("--config.batch_size=3", "config field batch_size: 3 is not divisible by the data-parallel size 2"),
])
def test_bad_config_exits_2_naming_the_field(setup, tmp_path, capsys, override, message):
    model_dir, data = setup
    code, err = run_cli(["dpo", *_argv(model_dir, data, tmp_path / "w", override)], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_ipo_with_label_smoothing_and_a_bad_row_exit_2(setup, tmp_path, capsys):
    model_dir, data = setup
    code, err = run_cli(["dpo", *_argv(model_dir, data, tmp_path / "w", "--config.loss_type=ipo",
                                       "--config.label_smoothing=0.1")], capsys)
    assert code == 2 and "config field label_smoothing: applies to loss_type 'sigmoid' only" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_rows()[0]) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    code, err = run_cli(["dpo", *_argv(model_dir, str(bad), tmp_path / "w2")], capsys)
    assert code == 2 and f"{bad}:2: field 'rejected' must be a string, got missing" in err
