"""Direct Preference Optimization (DPO, and its IPO variant), the paper's offline preference baseline.

    cpe-jax dpo --config=configs/dpo.py --workdir=DIR [--config.model=PATH --config.data.path=PAIRS]

`data.path` is a JSONL file of {"messages" | "prompt", "chosen", "rejected"} rows or a
PersonaFeedback directory (either layout; the prompt is the policy prompt for persona + question).
A response's log-probability is the sum over its tokens. The frozen reference model's
log-probabilities are computed ONCE before the first step and cached in
DIR/reference_logps*.npz, so a resumed run neither recomputes them nor needs the reference weights.
Training is `cpe_jax.sft`'s loop (one jitted sharded step with donated state, gradient
accumulation, bucketed widths, Orbax checkpoints with exact resume, metrics.jsonl, progress);
the trained policy is written to DIR/final.

Loss on h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
  sigmoid (DPO):  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing,
                  "conservative DPO", for preference labels that are wrong with probability eps)
  ipo:            (h - 1 / (2 beta))^2
"""

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpe_jax import sft
from cpe_jax.errors import UserError
from cpe_jax.models.logprobs import token_logprobs

log = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo")


# ---- data ------------------------------------------------------------------------------------


@dataclasses.dataclass
class PairExample:
    """A tokenized preference pair; `*_targets` mark the response tokens whose log-probs are summed."""

    chosen: np.ndarray
    chosen_targets: np.ndarray
    rejected: np.ndarray
    rejected_targets: np.ndarray
    truncated: bool = False
    where: str = ""  # FILE:LINE (or pair) for error messages
    ref_chosen: float = float("nan")
    ref_rejected: float = float("nan")


def _tokenize_pair(tokenizer, prompt, chosen, rejected, max_length, where):
    """Prompt + each response; a too-long sequence keeps its beginning (the prompt) and loses the end."""
    arrays = []
    for response in (chosen, rejected):
        ids, targets = sft.tokenize_conversation(tokenizer, prompt + [{"role": "assistant", "content": response}], where)
        arrays.append((ids, targets))
    truncated = any(len(ids) > max_length for ids, _ in arrays)
    (c, ct), (r, rt) = [(ids[:max_length], targets[:max_length]) for ids, targets in arrays]
    return PairExample(c, ct, r, rt, truncated=truncated, where=where)


def load_pairs(config, tokenizer):
    """The preference pairs, validated and tokenized (every host holds all of them)."""
    path, max_length = config.data.path, config.max_length
    if not path or not os.path.exists(path):
        raise UserError(f"config field data.path: preference data does not exist: {path!r}")
    examples = []
    if os.path.isdir(path):
        from cpe_jax.data.personafeedback import load_pairs as load_personafeedback
        from cpe_jax.data.prompts import policy_messages

        language = config.data.get("language", "en")
        for i, p in enumerate(load_personafeedback(path)):
            prompt = policy_messages(p.persona, p.question, language)
            examples.append(_tokenize_pair(tokenizer, prompt, p.chosen, p.rejected, max_length,
                                           f"{p.source} pair {i}"))
        return examples
    for where, row in sft.read_rows(path):
        if row.get("valid") is False:
            continue
        prompt = sft.prompt_messages(row, where)
        examples.append(_tokenize_pair(tokenizer, prompt, sft.string_field(row, "chosen", where),
                                       sft.string_field(row, "rejected", where), max_length, where))
    return examples


def collate_pairs(examples, bucket_size, max_length, pad_id):
    """Host arrays of one batch of pairs, right-padded to one bucket width, with the cached reference log-probs."""
    longest = max(max(len(e.chosen), len(e.rejected)) for e in examples)
    width = sft.bucket_width(longest, bucket_size, max_length)
    batch = {}
    for side in ("chosen", "rejected"):
        batch[side], batch[f"{side}_mask"] = sft.pad_rows([getattr(e, side) for e in examples], width, pad_id)
        targets, _ = sft.pad_rows([getattr(e, f"{side}_targets") for e in examples], width, 0)
        batch[f"{side}_targets"] = targets.astype(bool)
        batch[f"ref_{side}"] = np.asarray([getattr(e, f"ref_{side}") for e in examples], np.float32)
    return batch


# ---- losses ------------------------------------------------------------------------------------


def sequence_logps(model, tokens, mask, targets):
    """Sum of log p(token t | tokens < t) over the target tokens of each row: float32 [B]."""
    from cpe_jax.models.qwen2.model import positions_from_mask

    logits, _ = model(tokens, positions_from_mask(mask), None, mask)
    token_logps = token_logprobs(logits[:, :-1], tokens[:, 1:])
    weights = (targets[:, 1:] & mask[:, 1:]).astype(jnp.float32)
    return (token_logps * weights).sum(-1)


def pair_logps(model, batch):
    """(chosen, rejected) sequence log-probs [B] each, from one forward pass over both."""
    n = batch["chosen"].shape[0]
    logps = sequence_logps(model, *(jnp.concatenate([batch[side + suffix] for side in ("chosen", "rejected")])
                                    for suffix in ("", "_mask", "_targets")))
    return logps[:n], logps[n:]


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0,
             loss_type="sigmoid"):
    """Per-pair losses [B] and implicit rewards (beta times the log-ratio to the reference)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    return losses, {"chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
                    "margin": chosen_reward - rejected_reward,
                    "reward_accuracy": (chosen_reward > rejected_reward).astype(jnp.float32)}


def dpo_loss_sum(beta, label_smoothing, loss_type, model, batch):
    """(sum of pair losses, metrics summed over pairs): the `sft.train_step` loss contract."""
    policy_chosen, policy_rejected = pair_logps(model, batch)
    losses, rewards = dpo_loss(policy_chosen, policy_rejected, batch["ref_chosen"], batch["ref_rejected"],
                               beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
    aux = {name: value.sum() for name, value in rewards.items()}
    aux["pairs"] = jnp.asarray(losses.shape[0], jnp.float32)
    return losses.sum(), aux


# ---- the trainer -------------------------------------------------------------------------------


class DPOTrainer(sft.SFTTrainer):
    """`sft.SFTTrainer` with preference pairs, cached reference log-probs and the DPO loss."""

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self._attach_reference_logps()

    def validate(self):
        from cpe_jax import config as cfg

        c = self.config
        cfg.check_choice(c, "loss_type", LOSS_TYPES)
        cfg.check_range(c, "beta", 0, None, low_open=True)
        cfg.check_range(c, "label_smoothing", 0, 0.5, high_open=True)
        cfg.check(c.loss_type == "sigmoid" or c.label_smoothing == 0, "label_smoothing",
                  "applies to loss_type 'sigmoid' only")
        cfg.check(isinstance(c.ref_model, str), "ref_model", "must be a path or '' (the starting model)")
        return sft.validate_config(c, modes=("dpo",))

    def load_examples(self):
        examples = load_pairs(self.config, self.tokenizer)
        empty = sum(not e.chosen_targets.any() or not e.rejected_targets.any() for e in examples)
        if empty:
            log.warning("%d pairs have no response tokens within max_length=%d; they carry no gradient",
                        empty, self.config.max_length)
        return examples

    def loss(self):
        from functools import partial

        c = self.config
        return partial(dpo_loss_sum, float(c.beta), float(c.label_smoothing), c.loss_type), "pairs"

    def collate(self, rows):
        return collate_pairs(rows, self.config.bucket_size, self.config.max_length, self.pad_id)

    # -- reference log-probs, computed once --
    def _reference_path(self):
        return os.path.join(self.workdir, "reference_logps.npz")

    def _reference_signature(self):
        c = self.config
        return json.dumps({"data_path": os.path.abspath(c.data.path), "ref_model": os.path.abspath(c.ref_model or c.model),
                           "max_length": int(c.max_length), "rows": len(self.examples)}, sort_keys=True)

    def _read_reference_cache(self, path):
        """(chosen, rejected) of the cache file, or None when there is none on this host."""
        if not os.path.exists(path):
            return None
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["signature"]) != self._reference_signature():
                raise UserError(f"{path}: cached reference log-probs are for other data or another reference "
                                "model (use a new --workdir)")
            return cached["chosen"], cached["rejected"]

    def _attach_reference_logps(self):
        from cpe_jax.sharding import all_hosts

        path = self._reference_path()
        cached = self._read_reference_cache(path)
        if all_hosts(cached is not None):  # computing is collective: every host takes the same branch
            chosen, rejected = cached
            log.info("read reference log-probs from %s", path)
        else:
            chosen, rejected = self._compute_reference_logps()
            if jax.process_index() == 0:
                tmp = path + ".tmp.npz"
                np.savez(tmp, chosen=chosen, rejected=rejected, signature=np.asarray(self._reference_signature()))
                os.replace(tmp, path)
                log.info("wrote reference log-probs to %s", path)
        for example, c, r in zip(self.examples, chosen, rejected):
            example.ref_chosen, example.ref_rejected = float(c), float(r)

    def _compute_reference_logps(self):
        """One forward pass over every pair with the reference weights (the starting params when
        `ref_model` is empty and training has not begun). Every host gets every row's values."""
        import cpe_jax
        from cpe_jax.config import data_parallel_size
        from cpe_jax.metrics import progress_bar
        from cpe_jax.models.qwen2.params import load_options
        from cpe_jax.sharding import replicated

        c = self.config
        if c.ref_model or self.step > 0:
            path = c.ref_model or c.model
            log.info("loading the reference model %s", path)
            graphdef, params = nnx.split(cpe_jax.load_model(path, mesh=self.mesh, dtype=c.dtype, **load_options(c)))
        else:
            graphdef, params = self.graphdef, self.state.params
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        forward = jax.jit(lambda p, batch: pair_logps(nnx.merge(graphdef, p), batch),
                          in_shardings=(param_shardings, self.batch_sharding), out_shardings=replicated(self.mesh))
        multiple = data_parallel_size(self.mesh)
        chunk_size = -(-(c.micro_batch_size or c.batch_size) // multiple) * multiple
        rows = len(self.examples)
        chosen, rejected = [], []
        bar = progress_bar(total=-(-rows // chunk_size), initial=0, desc="reference log-probs",
                           enabled=c.get("progress", True))
        for start in range(0, rows, chunk_size):
            chunk = self.examples[start:start + chunk_size]
            n = len(chunk)
            chunk = chunk + [self.examples[0]] * (chunk_size - n)
            tokens = {k: v for k, v in self.collate(chunk).items() if not k.startswith("ref_")}  # not cached yet
            with jax.set_mesh(self.mesh):
                out = forward(params, self.place(tokens))
            for values, sink in zip(jax.device_get(out), (chosen, rejected)):
                sink.append(np.asarray(values)[:n])
            bar.update(1)
        bar.close()
        return np.concatenate(chosen).astype(np.float32), np.concatenate(rejected).astype(np.float32)


def main(argv):
    """`cpe-jax dpo --config=configs/dpo.py --workdir=DIR [--config.a.b=v ...]`."""
    from cpe_jax.config import parse_config_flags
    from cpe_jax.train.loop import configure_logging

    config, workdir = parse_config_flags(argv, prog="cpe-jax dpo")
    configure_logging()
    trainer = DPOTrainer(config, workdir)
    step = trainer.run(progress=config.get("progress", True))
    print(f"stopped at step {step} of {trainer.total_steps}; workdir {workdir}")
    return 0
