import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import cpe_jax
from cpe_jax import sft
from cpe_jax.cli import main as cli_main
from cpe_jax.data.prompts import policy_messages
from cpe_jax.metrics import read_metrics
from cpe_jax.models.heads import ValueModel, load_value_model, save_value_model
from cpe_jax.reward.bt import BTRewardModel, BTScorer, bt_loss, score_texts
from test_sft import write_model

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "bt.py")
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "personafeedback_sample")
PERSONAS = [{"Name": n, "Preference": p} for n, p in (("Ana", "tea"), ("Bo", "maps"), ("Cy", "jazz"), ("Di", "rain"))]
QUESTIONS = ["what should I do today?", "any advice for tomorrow?"]


def toy_pairs():
    """The chosen reply is polite, the rejected one rude: a preference the model can pick up."""
    return [{"persona": p, "question": q, "chosen": f"gladly, enjoy some {p['Preference']}.",
             "rejected": f"no. go away {p['Name']}."} for p in PERSONAS for q in QUESTIONS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bt")
    corpus = []
    for pair in toy_pairs():
        corpus += [json.dumps(pair), pair["chosen"], pair["rejected"]]
    return write_model(str(root / "model"), corpus * 3 + ["Persona Question Write one personalized answer"])


def test_bt_loss_matches_numpy():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    rejected[:3] = chosen[:3]  # ties count half
    loss, metrics = bt_loss(jnp.asarray(chosen), jnp.asarray(rejected))
    margin = chosen.astype(np.float64) - rejected
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-margin))), rtol=1e-6)
    expected_accuracy = (np.sum(margin > 0) + 0.5 * np.sum(margin == 0)) / 16
    np.testing.assert_allclose(float(metrics["accuracy"]), expected_accuracy, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), margin.mean(), rtol=1e-5)


def test_value_model_scores_the_last_real_token_and_round_trips(model_dir, tmp_path):
    model = ValueModel.from_policy(cpe_jax.load_model(model_dir))
    rng = np.random.default_rng(0)
    model.head.kernel.set_value(jnp.asarray(rng.normal(size=(32, 1)), jnp.float32))
    model.head.bias.set_value(jnp.asarray([0.3], jnp.float32))
    rows = [rng.integers(3, 300, size=n).astype(np.int32) for n in (5, 9, 12)]
    direct = [float(model(jnp.asarray(r[None]))[0, -1]) for r in rows]  # unpadded, one row at a time
    for left in (False, True):
        tokens, mask = np.zeros((3, 16), np.int32), np.zeros((3, 16), bool)
        for i, r in enumerate(rows):
            sl = slice(16 - len(r), 16) if left else slice(0, len(r))
            tokens[i, sl], mask[i, sl] = r, True
        np.testing.assert_allclose(np.asarray(model.score(jnp.asarray(tokens), jnp.asarray(mask))), direct, atol=1e-5)

    save_value_model(model, tmp_path / "rm", tokenizer_dir=model_dir)
    loaded = load_value_model(str(tmp_path / "rm"))
    np.testing.assert_array_equal(np.asarray(loaded.head.kernel.get_value()), np.asarray(model.head.kernel.get_value()))
    tokens = jnp.asarray(rows[2][None])
    np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(model(tokens)), atol=1e-6)
    assert cpe_jax.load_model(str(tmp_path / "rm")).config == model.config  # the backbone alone loads too


def test_bt_training_learns_the_preference(model_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"messages": policy_messages(p["persona"], p["question"]),
                                        "chosen": p["chosen"], "rejected": p["rejected"]}) + "\n"
                            for p in toy_pairs()))
    workdir = tmp_path / "run"
    try:
        code = cli_main(["sft", f"--config={CONFIG}", f"--workdir={workdir}", f"--config.model={model_dir}",
                         f"--config.data.path={data}", "--config.batch_size=8", "--config.total_steps=8",
                         "--config.lr=3e-3", "--config.max_length=256", "--config.mesh.data=2",
                         "--config.progress=False"])
    except SystemExit as e:
        code = e.code
    assert code == 0, capsys.readouterr().err
    rows = read_metrics(workdir)
    assert rows[0]["accuracy"] == 0.5  # a zero head starts indifferent: every pair is a tie
    assert rows[-1]["loss"] < rows[0]["loss"]

    from cpe_jax.tokenizer import load_tokenizer

    reward_model = BTRewardModel.load(str(workdir / "final"))
    tokenizer = load_tokenizer(str(workdir / "final"))
    pairs = toy_pairs()
    chosen = score_texts(reward_model, tokenizer, [dict(p, response=p["chosen"]) for p in pairs], batch_size=4)
    rejected = score_texts(reward_model, tokenizer, [dict(p, response=p["rejected"]) for p in pairs], batch_size=4)
    assert np.mean(chosen > rejected) == 1.0

    # Behind the GRM scorer's interface (what the RL trainer calls): one reward, valid, no critique.
    scorer = BTScorer(reward_model, tokenizer, batch_size=4)
    result = scorer.score([dict(p, response=p["chosen"]) for p in pairs])
    np.testing.assert_allclose(result.scores["reward"], chosen, rtol=1e-5, atol=1e-6)
    assert result.valid.all() and result.critiques == [""] * len(pairs)
    # A row's `messages` is the prompt the response answered, and the RM scores that chat.
    same = scorer.score([dict(p, response=p["chosen"], messages=policy_messages(p["persona"], p["question"]))
                         for p in pairs])
    np.testing.assert_allclose(same.scores["reward"], chosen, rtol=1e-5, atol=1e-6)
    other = scorer.score([dict(p, response=p["chosen"], messages=[{"role": "user", "content": "hi"}]) for p in pairs])
    assert not np.allclose(other.scores["reward"], chosen)


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="shared PersonaFeedback sample not present")
def test_personafeedback_directory_gives_one_example_per_pair(model_dir):
    from cpe_jax.config import parse_config_flags
    from cpe_jax.data.personafeedback import load_pairs
    from cpe_jax.tokenizer import load_tokenizer

    config, _ = parse_config_flags([f"--config={CONFIG}", "--workdir=x", f"--config.model={model_dir}",
                                    f"--config.data.path={SAMPLE}", "--config.max_length=64"], "test")
    examples = sft.load_examples(config, load_tokenizer(model_dir))
    assert len(examples) == len(load_pairs(SAMPLE))
    assert all(len(e.tokens) <= 64 and len(e.rejected) <= 64 for e in examples)
    assert any(e.truncated for e in examples)
