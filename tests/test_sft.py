import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpe_jax import sft
from cpe_jax.train.optim import init_opt_state, make_optimizer, with_total_steps
from cpe_jax.train.state import TrainState
from cpe_jax.cli import main as cli_main
from cpe_jax.config import parse_config_flags
from cpe_jax.metrics import MetricsWriter, read_metrics
from helpers import make_hf_qwen2

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "sft.py")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
COLOURS = ["blue", "green", "red", "yellow"]


def write_model(model_dir, corpus, seed=0):
    """A tiny random Qwen2 with a byte-level BPE tokenizer trained on `corpus`, saved like a checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(model_dir, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>"}, f)
    make_hf_qwen2(model_dir, seed=seed, vocab_size=304, hidden_size=32, intermediate_size=64, layers=2,
                  heads=4, kv_heads=2, init_scale=0.02)
    return model_dir


def _rows():
    return [{"prompt": f"what colour is item {i}?", "response": f"item {i} is {COLOURS[i % 4]}."} for i in range(8)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    corpus = [f"what colour is item {i}? item {i} is {c}." for i in range(8) for c in COLOURS] * 4
    model_dir = write_model(str(root / "model"), corpus)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return model_dir, str(data)


def config_for(model_dir, data, *overrides):
    argv = [f"--config={CONFIG}", "--workdir=unused", f"--config.model={model_dir}", f"--config.data.path={data}",
            "--config.batch_size=4", "--config.max_length=64", "--config.bucket_size=32",
            "--config.mesh.data=2", "--config.progress=False", *overrides]
    return parse_config_flags(argv, "test")[0]


def run_cli(argv, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_sft_loss_falls_and_final_model_loads(setup, tmp_path, capsys):
    model_dir, data = setup
    workdir = tmp_path / "run"
    code, _ = run_cli(["sft", f"--config={CONFIG}", f"--workdir={workdir}", f"--config.model={model_dir}",
                       f"--config.data.path={data}", "--config.batch_size=8", "--config.total_steps=25",
                       "--config.lr=1e-2", "--config.max_length=64", "--config.bucket_size=32",
                       "--config.save_every=100", "--config.progress=False"], capsys)
    assert code == 0
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"]
    assert all(r["truncated_rows"] == 0 for r in rows)

    import cpe_jax
    from cpe_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(workdir / "final"))  # tokenizer files were copied through
    ids, targets = sft.tokenize_conversation(tokenizer, sft.lm_conversation(_rows()[0], "row"), "row")

    def response_nll(model):
        logits = np.asarray(model(jnp.asarray(ids[None]))[0][0, :-1], np.float64)
        logz = np.log(np.exp(logits).sum(-1))
        nll = logz - logits[np.arange(len(ids) - 1), ids[1:]]
        return nll[targets[1:]].mean()

    # the final checkpoint holds the trained weights: it has learned the memorised responses
    assert response_nll(cpe_jax.load_model(str(workdir / "final"))) < 0.5 * response_nll(cpe_jax.load_model(model_dir))


def test_loss_counts_only_assistant_tokens(setup):
    model_dir, _ = setup
    import cpe_jax
    from cpe_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what colour is item 1?"},
                {"role": "assistant", "content": "item 1 is blue."}, {"role": "user", "content": "and item 2?"},
                {"role": "assistant", "content": "item 2 is red."}]
    ids, targets = sft.tokenize_conversation(tokenizer, messages, "row")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == full
    assert tokenizer.decode(ids[targets]) == "item 1 is blue.<|im_end|>\nitem 2 is red.<|im_end|>\n"

    model = cpe_jax.load_model(model_dir)
    batch = sft.collate([sft.Example(ids, targets), sft.Example(ids[:20], targets[:20])], "lm", 32, 128, 0)
    loss_sum, aux = sft.lm_loss_sum(model, {k: jnp.asarray(v) for k, v in batch.items()})
    # direct computation: log-softmax of each row alone, summed over assistant tokens only
    expected, count = 0.0, 0
    for row_ids, row_targets in ((ids, targets), (ids[:20], targets[:20])):
        logits = np.asarray(model(jnp.asarray(row_ids[None]))[0][0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        for t in range(1, len(row_ids)):
            if row_targets[t]:
                expected -= logp[t - 1, row_ids[t]]
                count += 1
    assert int(aux["tokens"]) == count
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-4)


def test_micro_batches_give_the_same_update(setup):
    model_dir, data = setup
    import cpe_jax
    from cpe_jax.sharding import logical_sharding, make_mesh
    from cpe_jax.tokenizer import load_tokenizer

    config = config_for(model_dir, data, "--config.batch_size=8", "--config.lr=1e-2")
    examples = sft.load_examples(config, load_tokenizer(model_dir))
    batch = sft.collate(examples[:8], "lm", 32, 128, 0)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    results = []
    for num_micro in (1, 4):
        model = cpe_jax.load_model(model_dir, mesh=mesh)
        graphdef, params = nnx.split(model)
        tx, schedule = make_optimizer(with_total_steps(config, 10))
        opt_state = init_opt_state(tx, params, mesh)
        # Adam's moments are sharded like the parameters they follow (not replicated)
        moments = opt_state[1][0].mu
        assert moments["layers"][0]["mlp"]["gate_kernel"].get_value().sharding == \
            params["layers"][0]["mlp"]["gate_kernel"].get_value().sharding
        with jax.set_mesh(mesh):
            state = TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32))
            sharded = jax.device_put(batch, logical_sharding(mesh, ("batch", None)))
            step = jax.jit(lambda s, b: sft.train_step(graphdef, tx, schedule, "lm", num_micro, s, b))
            state, metrics = step(state, sharded)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p4, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    assert m1["tokens"] == m4["tokens"]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_resume_after_sigterm_is_exact(setup, tmp_path):
    model_dir, data = setup
    overrides = ["--config.total_steps=4", "--config.save_every=3", "--config.micro_batch_size=2",
                 "--config.lr=1e-2", "--config.warmup_steps=1"]
    config = config_for(model_dir, data, *overrides)

    straight = sft.SFTTrainer(config, str(tmp_path / "straight"))
    assert straight.run(progress=False) == 4
    straight.close()

    def terminate_after_two(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption: finish the step, save, exit

    first = sft.SFTTrainer(config, str(tmp_path / "resumed"))
    assert first.run(progress=False, on_step=terminate_after_two) == 2
    first.close()
    assert not os.path.exists(tmp_path / "resumed" / "final")
    second = sft.SFTTrainer(config, str(tmp_path / "resumed"))
    assert second.step == 2
    assert second.run(progress=False) == 4
    second.close()

    def without_timing(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert without_timing(a) == without_timing(b)
    for x, y in zip(jax.tree.leaves(jax.device_get(straight.state.params)),
                    jax.tree.leaves(jax.device_get(second.state.params))):
        np.testing.assert_array_equal(x, y)


def test_metrics_writer_drops_steps_after_the_resumed_one(tmp_path):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    for step in range(1, 6):
        writer.write(step, {"loss": 1.0 / step, "skipped": np.zeros(3)})
    writer.close()
    writer = MetricsWriter(str(tmp_path), resume_step=3, tensorboard=False)
    writer.write(4, {"loss": 0.0})
    writer.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["loss"] == 0.0 and "skipped" not in rows[0]


def test_length_buckets_and_truncation_is_counted(setup, tmp_path):
    model_dir, _ = setup
    from cpe_jax.tokenizer import load_tokenizer

    assert [sft.bucket_width(n, 64, 256) for n in (1, 64, 65, 200, 300)] == [64, 64, 128, 256, 256]
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "item 1", "response": "blue " * 100}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "red"}]}) + "\n")
    config = config_for(model_dir, str(data), "--config.max_length=32")
    examples = sft.load_examples(config, load_tokenizer(model_dir))
    assert [e.truncated for e in examples] == [True, False]
    assert len(examples[0].tokens) == 32


def test_data_order_is_a_seeded_permutation_per_epoch():
    a, b = sft.epoch_order(0, 0, 10), sft.epoch_order(0, 1, 10)
    assert sorted(a) == list(range(10)) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, sft.epoch_order(0, 0, 10))


def test_every_host_reads_every_row_with_its_line(tmp_path):
    """The global batch is cut from all rows on every host, so each host reads the whole file."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"i": i}) + "\n\n" for i in range(5)))
    rows = sft.read_rows(str(data))
    assert [row["i"] for _, row in rows] == [0, 1, 2, 3, 4]
    assert [where for where, _ in rows] == [f"{data}:{line}" for line in (1, 3, 5, 7, 9)]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q"}', "data.jsonl:3: field 'response' must be a string, got missing"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "data.jsonl:3: 'messages' has no assistant turn"),
    ('{"prompt": "q", "response": ', "data.jsonl:3: bad JSON"),
    ('{"messages": [{"role": "robot", "content": "q"}]}', "data.jsonl:3: messages[0] must be"),
])
def test_malformed_row_exits_2_naming_file_and_line(setup, tmp_path, capsys, line, message):
    model_dir, _ = setup
    data = tmp_path / "data.jsonl"
    good = json.dumps(_rows()[0])
    data.write_text(f"{good}\n{good}\n{line}\n")
    code, err = run_cli(["sft", f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}", f"--config.model={model_dir}",
                         f"--config.data.path={data}", "--config.mesh.data=1"], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("override, message", [
    ("--config.batch_size=0", "config field batch_size: must be a positive integer"),
    ("--config.micro_batch_size=3", "config field micro_batch_size: 3 does not divide batch_size 8"),
    ("--config.mode=dpo", "config field mode: must be one of 'lm', 'bt'"),
    ("--config.batch_size=6", "config field batch_size: 6 is not divisible by the data-parallel size 4"),
    ("--config.mesh.data=16", "config field mesh: mesh"),
    ("--config.no_such_field=1", "config field no_such_field"),
])
def test_bad_config_field_exits_2_naming_it(setup, tmp_path, capsys, override, message):
    model_dir, data = setup
    code, err = run_cli(["sft", f"--config={CONFIG}", f"--workdir={tmp_path}", f"--config.model={model_dir}",
                         f"--config.data.path={data}", "--config.mesh.data=4", "--config.batch_size=8",
                         override], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
