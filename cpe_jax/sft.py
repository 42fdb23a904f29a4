"""Supervised training: SFT of the policy, GRM distillation (both mode `lm`) and the Bradley-Terry RM (mode `bt`).

    cpe-jax sft --config=configs/sft.py --workdir=DIR [--config.model=PATH --config.data.path=F.jsonl]

`lm` rows: {"messages": [...]} (loss on every assistant turn) or {"prompt": str | messages,
"response": str}. `bt` rows: {"messages" | "prompt", "chosen", "rejected"}, or a PersonaFeedback
directory. The train step is ONE jit (donated state, explicit shardings, gradient accumulation by
`lax.scan`); batches are padded to a few bucket widths so steady-state steps never recompile.
Data order is a seeded permutation per epoch and the position is saved with every checkpoint, so a
resumed run repeats an uninterrupted one exactly.
"""

import dataclasses
import json
import logging
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpe_jax.data.jsonl import read_jsonl
from cpe_jax.errors import UserError
from cpe_jax.models.logprobs import token_logprobs
from cpe_jax.train.batching import split_micro
from cpe_jax.train.loop import NONFINITE_METRIC, TrainLoop, configure_logging
from cpe_jax.train.numerics import count_nonfinite
from cpe_jax.train.optim import init_opt_state, make_optimizer, with_total_steps
from cpe_jax.train.state import TrainState, shardings_of

log = logging.getLogger(__name__)

MODES = ("lm", "bt")
ROLES = ("system", "user", "assistant")


# ---- data ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Example:
    """One tokenized row: `tokens` with `targets` (lm: which tokens carry loss) or a chosen/rejected pair."""

    tokens: np.ndarray
    targets: np.ndarray = None
    rejected: np.ndarray = None
    truncated: bool = False
    where: str = ""  # FILE:LINE (or pair) for error messages


def read_rows(path):
    """(where, row) for every non-blank line of a JSONL file; bad JSON is a UserError naming FILE:LINE.

    Every host reads every row: the rows of a global batch are then the same on any number of hosts.
    """
    return [(f"{path}:{line_no}", row) for line_no, row in read_jsonl(path, "data file")]


def _check_messages(messages, where, field):
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: {field}[{i}] must be {{\"role\": one of {ROLES}, \"content\": str}}")
    return messages


def string_field(row, name, where):
    if not isinstance(row.get(name), str):
        got = "missing" if name not in row else f"a {type(row[name]).__name__}"
        raise UserError(f"{where}: field {name!r} must be a string, got {got}")
    return row[name]


def prompt_messages(row, where):
    if "messages" in row:
        return _check_messages(row["messages"], where, "messages")
    if "prompt" not in row:
        raise UserError(f"{where}: missing field 'messages' or 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return _check_messages(prompt, where, "prompt")


def lm_conversation(row, where):
    """The messages of an `lm` row; loss goes on every assistant message."""
    if "response" in row or "prompt" in row:
        return prompt_messages(row, where) + [{"role": "assistant", "content": string_field(row, "response", where)}]
    if "messages" not in row:
        raise UserError(f"{where}: an lm row needs 'messages' or 'prompt' + 'response'")
    messages = _check_messages(row["messages"], where, "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: 'messages' has no assistant turn to train on")
    return messages


def _render(tokenizer, messages, add_generation_prompt, where):
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors from the user's template
        raise UserError(f"{where}: the chat template cannot render this conversation ({e})") from None


def tokenize_conversation(tokenizer, messages, where):
    """(ids, targets): targets mark the tokens of each assistant turn after its header.

    The conversation is rendered as text prefixes (before each assistant turn with the generation
    header, after it without) and each piece is encoded separately, so the loss mask follows the
    template's own boundaries.
    """
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where) if i else ""
        after = _render(tokenizer, messages[: i + 1], False, where)
        if not before.startswith(done) or not after.startswith(before):
            raise UserError(f"{where}: the chat template does not render this conversation incrementally")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    ids, targets = [], []
    for text, is_target in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece
        targets += [is_target] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(targets, bool)


def _encode_chat(tokenizer, messages):
    from cpe_jax.tokenizer import apply_chat_template

    return np.asarray(apply_chat_template(tokenizer, messages, add_generation_prompt=False), np.int32)


def load_examples(config, tokenizer):
    """The training rows, validated and tokenized (too-long rows truncated and flagged)."""
    path, mode, max_length = config.data.path, config.mode, config.max_length
    if not path or not os.path.exists(path):
        raise UserError(f"config field data.path: data file does not exist: {path!r}")
    examples = []
    if os.path.isdir(path):
        if mode != "bt":
            raise UserError(f"config field data.path: {path} is a directory; mode 'lm' reads a JSONL file")
        from cpe_jax.data.personafeedback import load_pairs
        from cpe_jax.reward.bt import example_messages

        language = config.data.get("language", "en")
        for i, p in enumerate(load_pairs(path)):
            chosen = _encode_chat(tokenizer, example_messages(p.persona, p.question, p.chosen, language))
            rejected = _encode_chat(tokenizer, example_messages(p.persona, p.question, p.rejected, language))
            where = f"{p.source} pair {i}"
            examples.append(_pair_example(chosen, rejected, max_length, where))
        return examples
    skipped = 0
    for where, row in read_rows(path):
        if row.get("valid") is False:  # `cpe-jax label` keeps unreadable teacher outputs, marked
            skipped += 1
            continue
        if mode == "lm":
            ids, targets = tokenize_conversation(tokenizer, lm_conversation(row, where), where)
            truncated = len(ids) > max_length
            examples.append(Example(ids[:max_length], targets[:max_length], truncated=truncated, where=where))
        else:
            prompt = prompt_messages(row, where)
            chosen = _encode_chat(tokenizer, prompt + [{"role": "assistant", "content": string_field(row, "chosen", where)}])
            rejected = _encode_chat(tokenizer, prompt + [{"role": "assistant", "content": string_field(row, "rejected", where)}])
            examples.append(_pair_example(chosen, rejected, max_length, where))
    if skipped:
        log.warning("%s: skipped %d rows marked \"valid\": false", path, skipped)
    return examples


def _pair_example(chosen, rejected, max_length, where):
    # The score is read at the last token, so a too-long sequence loses its beginning.
    truncated = len(chosen) > max_length or len(rejected) > max_length
    return Example(chosen[-max_length:], rejected=rejected[-max_length:], truncated=truncated, where=where)


TOKEN_FIELDS = ("tokens", "rejected", "chosen")  # the token arrays of Example and dpo.PairExample


def check_example_ids(examples, vocab_size):
    """Every token id of every example inside the model's vocabulary, else a UserError naming the
    example's row and the id (a tokenizer larger than the model would read past the embedding)."""
    from cpe_jax.tokenizer import check_token_ids

    for example in examples:
        for field in TOKEN_FIELDS:
            ids = getattr(example, field, None)
            if ids is not None:
                check_token_ids(ids, vocab_size, example.where)


def bucket_width(length, bucket_size, max_length):
    """The padded width for a batch whose longest row has `length` tokens."""
    return min(max_length, -(-max(length, 1) // bucket_size) * bucket_size)


def pad_rows(rows, width, pad_id):
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
    return tokens, mask


def collate(examples, mode, bucket_size, max_length, pad_id):
    """Host arrays of one batch, right-padded to a bucket width."""
    if mode == "lm":
        width = bucket_width(max(len(e.tokens) for e in examples), bucket_size, max_length)
        tokens, mask = pad_rows([e.tokens for e in examples], width, pad_id)
        targets, _ = pad_rows([e.targets for e in examples], width, 0)
        return {"tokens": tokens, "mask": mask, "targets": targets.astype(bool)}
    longest = max(max(len(e.tokens), len(e.rejected)) for e in examples)
    width = bucket_width(longest, bucket_size, max_length)
    chosen, chosen_mask = pad_rows([e.tokens for e in examples], width, pad_id)
    rejected, rejected_mask = pad_rows([e.rejected for e in examples], width, pad_id)
    return {"chosen": chosen, "chosen_mask": chosen_mask, "rejected": rejected, "rejected_mask": rejected_mask}


def epoch_order(seed, epoch, n):
    """The data order of one epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


# ---- losses ------------------------------------------------------------------------------------


def lm_loss_sum(model, batch):
    """(sum of next-token NLL over target tokens, number of target tokens); targets[t] means token t
    is predicted from tokens < t."""
    from cpe_jax.models.qwen2.model import positions_from_mask

    tokens, mask = batch["tokens"], batch["mask"]
    logits, _ = model(tokens, positions_from_mask(mask), None, mask)
    weights = (batch["targets"][:, 1:] & mask[:, 1:]).astype(jnp.float32)
    nll = -token_logprobs(logits[:, :-1], tokens[:, 1:])
    return (nll * weights).sum(), {"tokens": weights.sum()}


def bt_loss_sum(model, batch):
    """(sum over pairs of -log sigmoid(chosen - rejected), metrics summed over pairs)."""
    from cpe_jax.reward.bt import bt_loss

    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    scores = model.score(tokens, mask)
    n = batch["chosen"].shape[0]
    loss, metrics = bt_loss(scores[:n], scores[n:])
    return loss * n, {"pairs": jnp.asarray(n, jnp.float32), "accuracy": metrics["accuracy"] * n,
                      "margin": metrics["margin"] * n}


LOSSES = {"lm": (lm_loss_sum, "tokens"), "bt": (bt_loss_sum, "pairs")}


# ---- the train step ----------------------------------------------------------------------------


def train_step(graphdef, tx, schedule, mode, num_micro, state, batch):
    """One optimizer update on one global batch: the loss is the mean over target tokens (lm) or
    pairs (bt) of the whole batch, however it is split into micro-batches.

    `mode` is a key of LOSSES or a `(loss_sum_fn(model, batch) -> (sum, aux sums), count_key)` pair,
    so other objectives (DPO) reuse this step.
    """
    loss_sum_fn, count_key = LOSSES[mode] if isinstance(mode, str) else mode

    def loss_fn(params, micro):
        return loss_sum_fn(nnx.merge(graphdef, params), micro)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss_sum, aux), grads = grad_fn(state.params, batch)
    else:
        def body(carry, micro):
            (l, a), g = grad_fn(state.params, micro)
            acc_g, acc_l, acc_a = carry
            return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, jax.tree.map(jnp.add, acc_a, a)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first = jax.tree.map(lambda x: x[0], split_micro(batch, num_micro))
        aux0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda p, m: loss_fn(p, m)[1], state.params, first))
        (grads, loss_sum, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), aux0),
                                                 split_micro(batch, num_micro))
    count = jnp.maximum(aux[count_key], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss_sum / count, "grad_norm": grad_norm, "lr": schedule(state.step)}
    for key, value in aux.items():
        metrics[key] = value if key == count_key else value / count
    metrics[NONFINITE_METRIC] = count_nonfinite((loss_sum, True), (grad_norm, True))
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics


# ---- the loop ----------------------------------------------------------------------------------


def validate_config(config, modes=MODES):
    """Check every field before any work; returns the mesh."""
    from cpe_jax import config as cfg

    cfg.check_choice(config, "mode", modes)
    cfg.check(bool(config.model), "model", "set it to a Hugging Face directory or cpe_jax checkpoint")
    cfg.check(bool(config.data.path), "data.path", "set it to a JSONL file (or a PersonaFeedback directory for bt)")
    for field in ("batch_size", "max_length", "bucket_size", "epochs", "save_every", "keep_checkpoints"):
        cfg.check_positive_int(config, field)
    for field in ("micro_batch_size", "total_steps", "warmup_steps", "seed"):
        cfg.check_positive_int(config, field, allow_zero=True)
    cfg.check_range(config, "lr", 0, None, low_open=True)
    cfg.check_range(config, "weight_decay", 0)
    cfg.check_range(config, "grad_clip", 0)
    cfg.check_range(config, "min_lr_ratio", 0, 1)
    micro = config.micro_batch_size or config.batch_size
    cfg.check(config.batch_size % micro == 0, "micro_batch_size",
              f"{micro} does not divide batch_size {config.batch_size}")
    mesh = cfg.make_mesh_from_config(config)
    cfg.check_divisible_by_mesh(config, "batch_size", mesh)
    return mesh


class SFTTrainer(TrainLoop):
    """Builds the model, optimizer, data and jitted step from a config; `run()` trains with resume.

    Other objectives on the same loop (DPO) subclass it and override the hooks `validate`,
    `load_examples`, `loss` and `collate`; batches may hold arrays of any rank with a leading batch axis.

    Every host holds every row and collates the whole global batch of a step (token ids are
    small); each device then takes its rows of it. So global batch s is the same rows in the same
    order on 1, 2 or 64 hosts, and a run resumed on a slice of another shape continues the same stream.
    """

    def __init__(self, config, workdir):
        import cpe_jax
        from cpe_jax.models.qwen2.params import load_options
        from cpe_jax.sharding import logical_sharding, replicated
        from cpe_jax.tokenizer import load_tokenizer, pad_token_id

        self.config, self.workdir = config, os.path.abspath(workdir)
        self.progress_desc = f"sft {config.mode}"
        self.mesh = self.validate()
        os.makedirs(self.workdir, exist_ok=True)
        self.tokenizer_dir = config.tokenizer or config.model
        self.tokenizer = load_tokenizer(self.tokenizer_dir)

        self.examples = self.load_examples()
        self.steps_per_epoch = len(self.examples) // config.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"config field batch_size: {config.batch_size} is larger than the "
                            f"{len(self.examples)} rows of {config.data.path}")
        truncated = sum(e.truncated for e in self.examples)
        if truncated:
            log.warning("%d of %d rows are longer than max_length=%d and were truncated",
                        truncated, len(self.examples), config.max_length)
        self.total_steps = config.total_steps or config.epochs * self.steps_per_epoch

        model = cpe_jax.load_model(config.model, mesh=self.mesh, dtype=config.dtype, **load_options(config))
        check_example_ids(self.examples, model.config.vocab_size)
        self.pad_id = pad_token_id(self.tokenizer, model.config.vocab_size)
        if config.get("remat"):
            model.config = model.config.replace(remat=config.remat)
        self.generation_config = getattr(model, "generation_config", None)
        if config.mode == "bt":
            from cpe_jax.reward.bt import BTRewardModel

            model = BTRewardModel.from_policy(model)
        self.graphdef, params = nnx.split(model)
        self.tx, self.schedule = make_optimizer(with_total_steps(config, self.total_steps))
        opt_state = init_opt_state(self.tx, params, self.mesh)
        state = TrainState(params=params, opt_state=opt_state,
                           step=jax.device_put(jnp.zeros((), jnp.int32), replicated(self.mesh)))
        self.state_sharding = shardings_of(state)
        extra = self.start_checkpoints(self.workdir, state, keep=config.keep_checkpoints)
        if extra is not None:
            self._check_resumable(extra)

        num_micro = config.batch_size // (config.micro_batch_size or config.batch_size)
        step_fn = partial(train_step, self.graphdef, self.tx, self.schedule, self.loss(), num_micro)
        self.batch_sharding = logical_sharding(self.mesh, ("batch",))  # any rank: later axes replicated
        self._step = jax.jit(step_fn, donate_argnums=(0,), in_shardings=(self.state_sharding, self.batch_sharding),
                             out_shardings=(self.state_sharding, replicated(self.mesh)))
        self._compiled_widths = set()

    # -- hooks for other objectives --
    def validate(self):
        """Check the config before any work; returns the mesh."""
        return validate_config(self.config)

    def load_examples(self):
        return load_examples(self.config, self.tokenizer)

    def loss(self):
        """The step's objective: a LOSSES key or a (loss_sum_fn, count_key) pair (see `train_step`)."""
        return self.config.mode

    def collate(self, rows):
        return collate(rows, self.config.mode, self.config.bucket_size, self.config.max_length, self.pad_id)

    def _data_signature(self):
        c = self.config
        return {"mode": c.mode, "data_path": os.path.abspath(c.data.path), "seed": int(c.seed),
                "batch_size": int(c.batch_size), "max_length": int(c.max_length)}

    def _check_resumable(self, extra):
        """Resuming with another data order would silently differ from an uninterrupted run."""
        saved = extra.get("data", {})
        for key, value in self._data_signature().items():
            if key in saved and saved[key] != value:
                field = {"data_path": "data.path"}.get(key, key)
                raise UserError(f"config field {field}: {value!r} differs from {saved[key]!r} of the checkpoint "
                                f"in {self.checkpointer.directory} (use a new --workdir)")

    def batch_for_step(self, step):
        """The rows of global batch `step` (epoch step // steps_per_epoch, in that epoch's order)
        and their host arrays, the same on every host."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.config.seed, epoch, len(self.examples))
        size = self.config.batch_size
        rows = [self.examples[i] for i in order[index * size:(index + 1) * size]]
        return rows, self.collate(rows)

    def place(self, batch):
        """A global batch (the same host arrays on every host) as arrays split over the batch axes:
        each host copies only the rows of its own devices."""
        return jax.tree.map(lambda x: jax.device_put(x, self.batch_sharding), batch)

    def train_one_step(self):
        step = self.step
        rows, batch = self.batch_for_step(step)
        width = next(iter(batch.values())).shape[1]
        if width not in self._compiled_widths:
            self._compiled_widths.add(width)
            log.info("compiling the train step for width %d", width)
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            self.state, metrics = self._step(self.state, self.place(batch))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - start
        masks = [v for k, v in batch.items() if k.endswith("mask")]
        metrics["tokens_per_s"] = sum(float(m.sum()) for m in masks) / elapsed
        metrics["truncated_rows"] = sum(e.truncated for e in rows)
        metrics["epoch"] = step // self.steps_per_epoch
        return step + 1, metrics

    def checkpoint_extra(self):
        return {"data": self._data_signature(), "step": self.step,
                "data_position": {"epoch": self.step // self.steps_per_epoch,
                                  "batch": self.step % self.steps_per_epoch},
                "config": json.loads(self.config.to_json_best_effort())}

    def save_final(self, out_dir=None):
        """The trained model as a standalone checkpoint with the tokenizer files (bt: a reward
        model), in `workdir/final` unless `out_dir` says otherwise."""
        from cpe_jax.checkpoints import save_model
        from cpe_jax.models.heads import save_value_model

        out_dir = out_dir or os.path.join(self.workdir, "final")
        model = nnx.merge(self.graphdef, self.state.params)
        if self.config.mode == "bt":
            save_value_model(model, out_dir, tokenizer_dir=self.tokenizer_dir, kind="reward")
        else:
            model.generation_config = self.generation_config
            save_model(model, out_dir, tokenizer_dir=self.tokenizer_dir)
        log.info("wrote %s", out_dir)


def main(argv):
    """`cpe-jax sft --config=configs/sft.py --workdir=DIR [--config.a.b=v ...]`."""
    from cpe_jax.config import parse_config_flags

    config, workdir = parse_config_flags(argv, prog="cpe-jax sft")
    configure_logging()
    trainer = SFTTrainer(config, workdir)
    step = trainer.run(progress=config.get("progress", True))
    print(f"stopped at step {step} of {trainer.total_steps}; workdir {workdir}")
    return 0
