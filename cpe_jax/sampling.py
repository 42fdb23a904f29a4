"""Autoregressive sampling with a preallocated KV cache: the pure jittable core and a vLLM-like shell.

Core (for use inside a jitted train step):

    result = sample(graphdef, state, prompt_tokens, prompt_mask, rng, SampleConfig(...))

prefills left-padded prompts [B, P] in one forward pass, then decodes in ONE `lax.while_loop` that
stops as soon as every row has produced an EOS / stop token (or `max_new_tokens`). Row b samples
step t with `fold_in(row_key[b], t)`, so a row's tokens do not depend on what else is in the batch.

Shell: `Sampler(model, tokenizer).generate(prompts, SamplingParams(...))` tokenizes, buckets batch
size and prompt length (so repeated calls reuse compiled code), shards over a mesh and returns one
`SampleOutput` per (prompt, sample), prompt-major: prompt i's n samples are outputs[i*n:(i+1)*n].
"""

import dataclasses
import logging
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpe_jax import sharding
from cpe_jax.engine import DEFAULT_SYNC_EVERY, Engine, EngineRow, categorical, default_row_keys, first_argmax
from cpe_jax.errors import UserError
from cpe_jax.models.qwen2.model import compute_dtype_params
from cpe_jax.tokenizer import check_token_ids

logger = logging.getLogger(__name__)

# ---- parameters ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What to sample, named like vLLM's. temperature 0 = greedy; top_k 0 and top_p 1 = off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    n: int = 1

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = {
            "max_tokens": _is_int(self.max_tokens) and self.max_tokens >= 1,
            "temperature": _is_number(self.temperature) and self.temperature >= 0,
            "top_p": _is_number(self.top_p) and 0 < self.top_p <= 1,
            "top_k": _is_int(self.top_k) and self.top_k >= 0,
            "seed": _is_int(self.seed),
            "n": _is_int(self.n) and self.n >= 1,
            "stop_token_ids": all(t >= 0 for t in self.stop_token_ids),
        }
        rules = {
            "max_tokens": "an integer >= 1",
            "temperature": "a number >= 0",
            "top_p": "a number in (0, 1]",
            "top_k": "an integer >= 0 (0 = off)",
            "seed": "an integer",
            "n": "an integer >= 1",
            "stop_token_ids": "non-negative token ids",
        }
        for field, ok in checks.items():
            if not ok:
                raise UserError(
                    f"SamplingParams.{field}={getattr(self, field)!r} must be {rules[field]}"
                )


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Static (compile-time) settings of the jittable core; hashable so it can be a static arg."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple = ()
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    pad_token_id: int = 0
    cache_dtype: Optional[str] = None  # compute dtype of the model when None

    @property
    def end_token_ids(self):
        """Tokens that finish a row: stop tokens always, EOS unless ignore_eos."""
        ids = self.stop_token_ids + (() if self.ignore_eos else self.eos_token_ids)
        return tuple(dict.fromkeys(int(t) for t in ids))


# ---- logits processing (pure) ----------------------------------------------------------------


def process_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Logits of the distribution actually sampled from: scaled by 1/temperature, then all but the
    top_k tokens and all tokens outside the top_p nucleus set to -inf (ties at a cut-off are kept).

    temperature must be > 0 here (0 means greedy and is handled by the caller). The nucleus is
    the smallest set of most likely tokens whose mass reaches top_p, measured on the
    top_k-renormalized distribution when both are on (as in vLLM).
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k <= 0 and top_p >= 1.0:
        return logits  # no full-vocabulary sort when nothing is truncated
    if top_k > 0 and top_k < logits.shape[-1]:
        sorted_desc = jax.lax.top_k(logits, top_k)[0]  # only the k largest, not a full sort
    else:
        sorted_desc = -jnp.sort(-logits, axis=-1)
    threshold = sorted_desc[..., -1:]  # smallest kept logit after top_k
    if top_p < 1.0:
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = mass_before < top_p  # always keeps the most likely token
        threshold = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_tokens(keys, logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One token per row from logits [B, V] with per-row keys [B].

    Returns (tokens [B] int32, logprobs [B] under the raw distribution, sampling_logprobs [B]
    under the processed distribution; 0 for greedy since the argmax has probability 1).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = first_argmax(logits)
        sampling_logprobs = jnp.zeros(tokens.shape, jnp.float32)
    else:
        processed = process_logits(logits, temperature, top_k, top_p)
        tokens = categorical(keys, processed)
        chosen = jnp.take_along_axis(processed, tokens[:, None], axis=-1)[:, 0]
        sampling_logprobs = chosen - jax.nn.logsumexp(processed, axis=-1)
    # Gather-then-normalise: two reductions over the vocabulary, no [B, V] log-softmax.
    chosen_logit = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    logprobs = chosen_logit - jax.nn.logsumexp(logits, axis=-1)
    return tokens, logprobs, sampling_logprobs


# ---- the jittable core -----------------------------------------------------------------------


class SampleResult(NamedTuple):
    """Generated tokens [B, N] (pad after a row ends), their validity mask, raw and sampling
    log-probs (0 where masked), lengths [B] and whether each row ended on an EOS/stop token."""

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    lengths: jax.Array
    stopped: jax.Array


class DecodeState(NamedTuple):
    """Everything the decode loop carries; donated between the prefill and decode jits."""

    cache: dict
    cache_mask: jax.Array  # [B, S] validity of every cache slot (prompt padding 0)
    row_keys: jax.Array  # [B] keys
    next_position: jax.Array  # [B] position of the token fed next
    step: jax.Array  # index of the next token to sample
    last_token: jax.Array  # [B]
    tokens: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    lengths: jax.Array
    done: jax.Array
    stopped: jax.Array


def row_keys(seed, row_ids):
    """Per-row keys fold_in(key(seed), row_id): a row's sample depends only on its id."""
    base = jax.random.key(seed) if np.ndim(seed) == 0 and not _is_key(seed) else seed
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(row_ids, jnp.uint32))


def _is_key(x):
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_for_rows(rng, batch_size):
    """Accept one key (split by row index), or per-row keys (typed [B] or raw uint32 [B, 2])."""
    if not _is_key(rng):
        rng = jnp.asarray(rng)
        if rng.ndim == 0:
            return row_keys(rng, jnp.arange(batch_size))
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        return row_keys(rng, jnp.arange(batch_size))
    return rng


def _record(ds: DecodeState, config: SampleConfig, tokens, logprobs, sampling_logprobs):
    """Write step `ds.step`'s samples for rows still running, and mark rows that just ended."""
    active = ~ds.done
    step = ds.step
    tokens = jnp.where(active, tokens, config.pad_token_id)
    zero = jnp.zeros_like(logprobs)
    end_ids = config.end_token_ids
    hit = jnp.isin(tokens, jnp.asarray(end_ids, jnp.int32)) if end_ids else jnp.zeros_like(active)
    hit = hit & active
    return ds._replace(
        tokens=ds.tokens.at[:, step].set(tokens),
        logprobs=ds.logprobs.at[:, step].set(jnp.where(active, logprobs, zero)),
        sampling_logprobs=ds.sampling_logprobs.at[:, step].set(
            jnp.where(active, sampling_logprobs, zero)
        ),
        lengths=ds.lengths + active.astype(jnp.int32),
        done=ds.done | hit,
        stopped=ds.stopped | hit,
        last_token=tokens,
        step=step + 1,
    )


def _sample_step(ds: DecodeState, logits, config: SampleConfig):
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(ds.row_keys, ds.step)
    tokens, logprobs, sampling_logprobs = sample_tokens(
        keys, logits, config.temperature, config.top_k, config.top_p
    )
    return _record(ds, config, tokens, logprobs, sampling_logprobs)


def prefill(graphdef, state, prompt_tokens, prompt_mask, rng, config: SampleConfig) -> DecodeState:
    """Run the left-padded prompts [B, P] through the model, filling the cache, and sample the
    first token. Rows whose mask is all zero are empty: they are done from the start."""
    from cpe_jax.models.qwen2.model import init_cache, positions_from_mask

    model = nnx.merge(graphdef, state)
    b, p = prompt_tokens.shape
    n = config.max_new_tokens
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(bool)
    # Slots [P, P + N) hold generated tokens; N - 1 of them are ever fed back. A slot becomes valid
    # when its token is fed (decoding attends by the mask alone).
    cache = init_cache(model.config, b, p + n, dtype=config.cache_dtype)
    cache_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n), bool)], axis=1)
    positions = positions_from_mask(prompt_mask)
    _, cache, hidden = model(
        prompt_tokens, positions, cache, cache_mask, return_hidden=True, skip_logits=True
    )
    logits = model.vocabulary_logits(hidden[:, -1])
    empty = ~jnp.any(prompt_mask, axis=1)
    ds = DecodeState(
        cache=cache,
        cache_mask=cache_mask,
        row_keys=_keys_for_rows(rng, b),
        next_position=jnp.sum(prompt_mask, axis=1).astype(jnp.int32),
        step=jnp.zeros((), jnp.int32),
        last_token=jnp.zeros((b,), jnp.int32),
        tokens=jnp.full((b, n), config.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((b, n), jnp.float32),
        sampling_logprobs=jnp.zeros((b, n), jnp.float32),
        lengths=jnp.zeros((b,), jnp.int32),
        done=empty,
        stopped=jnp.zeros((b,), bool),
    )
    return _sample_step(ds, logits, config)


def decode(graphdef, state, ds: DecodeState, config: SampleConfig) -> DecodeState:
    """Feed back the last token and sample the next, in one while_loop, until every row is done
    or max_new_tokens tokens exist."""
    model = nnx.merge(graphdef, state)

    def running(ds):
        return (ds.step < config.max_new_tokens) & ~jnp.all(ds.done)

    def step(ds):
        cache_mask = jax.lax.dynamic_update_slice(
            ds.cache_mask, jnp.ones((ds.cache_mask.shape[0], 1), bool), (0, ds.cache["end"]))
        _, cache, hidden = model(
            ds.last_token[:, None],
            ds.next_position[:, None],
            ds.cache,
            cache_mask,
            return_hidden=True,
            skip_logits=True,
        )
        logits = model.vocabulary_logits(hidden[:, -1])
        ds = ds._replace(cache=cache, cache_mask=cache_mask, next_position=ds.next_position + 1)
        return _sample_step(ds, logits, config)

    return jax.lax.while_loop(running, step, ds)


def result_of(ds: DecodeState) -> SampleResult:
    n = ds.tokens.shape[1]
    mask = jnp.arange(n)[None, :] < ds.lengths[:, None]
    return SampleResult(
        ds.tokens, mask, ds.logprobs, ds.sampling_logprobs, ds.lengths, ds.stopped
    )


def sample(graphdef, state, prompt_tokens, prompt_mask, rng, config: SampleConfig) -> SampleResult:
    """Sample up to `config.max_new_tokens` tokens after left-padded prompts; pure and jittable.

    rng: one key (row b uses fold_in(rng, b)) or per-row keys [B] (see `row_keys`).
    """
    state = compute_dtype_params(state, nnx.merge(graphdef, state).config.dtype)  # once, not per step
    ds = prefill(graphdef, state, prompt_tokens, prompt_mask, rng, config)
    return result_of(decode(graphdef, state, ds, config))


# ---- the shell -------------------------------------------------------------------------------


@dataclasses.dataclass
class SampleOutput:
    """One sample. token_ids include the EOS/stop token that ended it (text does not)."""

    token_ids: list
    text: Optional[str]
    logprobs: list
    sampling_logprobs: list
    finish_reason: str  # "stop" (EOS or stop token) or "length"
    prompt_token_ids: list
    prompt_index: int = 0  # index of the prompt in the request
    index: int = 0  # sample index among the n samples of that prompt


class Sampler:
    """Generate from a `Qwen2ForCausalLM` on the slot engine (`cpe_jax.engine.Engine`): continuous
    batching, one prefill per prompt for its n samples, per-request settings, compiled code reused
    across calls.

    Args:
      model: the NNX model (parameters already placed on `mesh` when one is given).
      tokenizer: optional transformers tokenizer; needed for string prompts and `text`.
      mesh: shard the slots over data/fsdp and the cache's kv heads over tensor.
      max_prompt_length: longer prompts raise a UserError (default: the model's max positions
        minus max_tokens).
      max_batch_size: decode slots of the engine.
      eos_token_ids: default: the tokenizer's EOS/turn-end tokens and the model config's.
      min_prompt_bucket: smallest prompt-length bucket.
      sync_every: decode steps between refills of finished slots.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        mesh=None,
        max_prompt_length=None,
        max_batch_size=64,
        eos_token_ids=None,
        cache_dtype=None,
        min_prompt_bucket=16,
        sync_every=None,
    ):
        from cpe_jax.tokenizer import eos_token_ids as tokenizer_eos_ids
        from cpe_jax.tokenizer import pad_token_id, sampleable_ids

        self.config = model.config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.max_prompt_length = max_prompt_length
        if eos_token_ids is None:
            model_eos = self.config.eos_token_id
            model_eos = () if model_eos is None else model_eos
            model_eos = model_eos if isinstance(model_eos, (tuple, list)) else (model_eos,)
            eos_token_ids = tuple(tokenizer_eos_ids(tokenizer)) if tokenizer is not None else ()
            eos_token_ids = tuple(dict.fromkeys(eos_token_ids + tuple(model_eos)))
        self.eos_token_ids = sampleable_ids(eos_token_ids, self.config.vocab_size, "EOS")
        self.pad_token_id = pad_token_id(tokenizer, self.config.vocab_size, self.eos_token_ids)
        self.engine = Engine(model, num_slots=int(max_batch_size), mesh=mesh, eos_token_ids=self.eos_token_ids,
                             pad_token_id=self.pad_token_id, cache_dtype=cache_dtype,
                             min_prompt_bucket=min_prompt_bucket, sync_every=sync_every or DEFAULT_SYNC_EVERY)
        self.graphdef = self.engine.graphdef

    @property
    def state(self):
        return self.engine.params

    @property
    def compile_count(self):
        """Programs compiled so far (engine admissions and decode loops); steady state adds none."""
        return self.engine.compile_count

    @classmethod
    def from_pretrained(cls, path, *, mesh=None, dtype=None, **kwargs):
        """Model, tokenizer (if the directory has one) and EOS ids from one model directory."""
        import os

        from cpe_jax import load_model
        from cpe_jax.tokenizer import _has_tokenizer_files, eos_token_ids, load_tokenizer

        model = load_model(path, dtype=dtype, mesh=mesh)
        tokenizer = load_tokenizer(path) if _has_tokenizer_files(os.fspath(path)) else None
        if "eos_token_ids" not in kwargs:
            eos = eos_token_ids(tokenizer, path)
            cfg_eos = model.config.eos_token_id
            cfg_eos = () if cfg_eos is None else cfg_eos
            cfg_eos = cfg_eos if isinstance(cfg_eos, (tuple, list)) else (cfg_eos,)
            kwargs["eos_token_ids"] = tuple(dict.fromkeys(eos + tuple(cfg_eos)))
        return cls(model, tokenizer, mesh=mesh, **kwargs)

    def set_state(self, state):
        """Sample from new weights of the same structure (e.g. after a train step): no recompile."""
        self.engine.set_params(state)

    # -- public API --
    def encode(self, prompt, index=0):
        """Token ids of one prompt (a string needs the tokenizer)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError(f"prompt {index} is a string but the sampler has no tokenizer")
            return list(self.tokenizer.encode(prompt))
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise UserError(f"prompt {index} is neither a string nor a list of token ids") from None
        check_token_ids(ids, self.config.vocab_size, f"prompt {index}")
        return ids

    def prompt_limit(self, params: SamplingParams) -> int:
        """Longest prompt accepted: max_prompt_length, else what fits in the model's positions."""
        if self.max_prompt_length is not None:
            return int(self.max_prompt_length)
        return self.config.max_position_embeddings - params.max_tokens

    def generate(self, prompts, params=None, *, progress=False, row_keys=None, spread_over_hosts=False):
        """Sample params.n completions of each prompt (strings or lists of token ids).

        `params`: one SamplingParams for every prompt, or a list with one per prompt (as vLLM
        takes them). `row_keys`: optional keys, one per output row, instead of the seed's.
        `spread_over_hosts`: in a multi-host job where every host runs its own copy of this
        sampler (a mesh of the host's own devices) and passes the same prompts, each host samples
        its share of the prompts and every host gets every output; the outputs are those of one
        host sampling them all (each row keeps its own key). Ignored on one host or a mesh that
        spans hosts (the engine is then one job over all of them).
        Returns a flat list of SampleOutputs, prompt-major: prompt i's n samples are consecutive
        (each carries prompt_index and index).
        """
        params = params or SamplingParams()
        if isinstance(prompts, (str, bytes)) or (
            len(prompts) and isinstance(prompts[0], (int, np.integer))
        ):
            raise UserError("prompts must be a list of prompts (strings or lists of token ids)")
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        encoded = [self.encode(p, i) for i, p in enumerate(prompts)]
        for i, (ids, p) in enumerate(zip(encoded, params_list)):
            if not isinstance(p, SamplingParams):
                raise UserError(f"params[{i}] is a {type(p).__name__}, not a SamplingParams")
            if not ids:
                raise UserError(f"prompt {i} is empty")
            limit = self.prompt_limit(p)
            if len(ids) > limit:
                raise UserError(
                    f"prompt {i} has {len(ids)} tokens, more than the limit of {limit}"
                    " (max_prompt_length, or max positions minus max_tokens)"
                )
        if spread_over_hosts and jax.process_count() > 1 and sharding.is_host_local(self.mesh):
            rows = self._generate_across_hosts(encoded, params_list, progress, row_keys)
        else:
            rows = self.engine.generate(encoded, params_list, progress=progress, row_keys=row_keys)
        return [
            SampleOutput(
                token_ids=row.token_ids,
                text=(self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
                      if self.tokenizer is not None else None),
                logprobs=row.logprobs,
                sampling_logprobs=row.sampling_logprobs,
                finish_reason="stop" if row.stopped else "length",
                prompt_token_ids=list(encoded[row.prompt_index]),
                prompt_index=row.prompt_index,
                index=row.index,
            )
            for row in rows
        ]

    def _generate_across_hosts(self, encoded, params_list, progress, row_keys):
        """EngineRows of all prompts, each host sampling its `host_share` of them with the keys
        the rows have in the whole request list."""

        keys = default_row_keys(params_list) if row_keys is None else row_keys
        first_row = np.cumsum([0] + [p.n for p in params_list])

        def work(indices):
            a, b = indices[0], indices[-1] + 1
            rows = self.engine.generate(encoded[a:b], params_list[a:b], progress=progress,
                                        row_keys=keys[first_row[a]:first_row[b]])
            return [dataclasses.asdict(dataclasses.replace(row, prompt_index=row.prompt_index + a)) for row in rows]

        return [EngineRow(**row) for row in sharding.spread_over_hosts(work, range(len(encoded)))]


# ---- JSONL in, JSONL out (the `cpe-jax generate` command) ------------------------------------


def read_prompt_rows(path, tokenizer=None, *, chat=False, vocab_size=None):
    """Parse and validate EVERY row of a prompts JSONL file before any work is done.

    Each row is an object with exactly one of "prompt" (a string; with chat=True wrapped as one
    user message), "prompt_token_ids" (a list of ids) or "messages" (a chat). Returns
    (rows, token ids per row, line number per row); a bad row raises "PATH:LINE: ...".
    """
    from cpe_jax.data.jsonl import read_jsonl
    from cpe_jax.errors import require_path
    from cpe_jax.tokenizer import apply_chat_template

    require_path(path, "prompts file")
    rows, encoded, lines = [], [], []
    for line_no, row in read_jsonl(path, "prompts file"):
        where = f"{path}:{line_no}"
        keys = [k for k in ("prompt", "prompt_token_ids", "messages") if k in row]
        if len(keys) != 1:
            raise UserError(
                f'{where}: needs exactly one of "prompt", "prompt_token_ids", "messages"'
            )
        value = row[keys[0]]
        if keys[0] == "prompt_token_ids":
            if not (isinstance(value, list) and value and all(_is_int(t) for t in value)):
                raise UserError(f'{where}: "prompt_token_ids" must be a non-empty list of ints')
            ids = list(value)
        else:
            if tokenizer is None:
                raise UserError(f'{where}: "{keys[0]}" needs a tokenizer in the model directory')
            if keys[0] == "prompt":
                if not isinstance(value, str) or not value:
                    raise UserError(f'{where}: "prompt" must be a non-empty string')
                messages = [{"role": "user", "content": value}] if chat else None
            else:
                messages = value
                ok = isinstance(value, list) and value and all(
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                    for m in value
                )
                if not ok:
                    raise UserError(
                        f'{where}: "messages" must be a non-empty list of '
                        '{"role": str, "content": str}'
                    )
            if messages is None:
                ids = list(tokenizer.encode(value))
            else:
                ids = apply_chat_template(tokenizer, messages, add_generation_prompt=True)
            if not ids:
                raise UserError(f"{where}: the prompt encodes to no tokens")
        if vocab_size is not None:
            check_token_ids(ids, vocab_size, where)
        rows.append(row)
        encoded.append(ids)
        lines.append(line_no)
    if not rows:
        raise UserError(f"{path}: no prompt rows")
    return rows, encoded, lines


def generate_jsonl(sampler: "Sampler", prompts_path, out_path, params: SamplingParams, *, chat=False,
                   progress=True):
    """Sample for every row of `prompts_path` and write `out_path` (input row + token_ids, text,
    logprobs, finish_reason, and `index` when n > 1). Rows are written to OUT.tmp, renamed to
    OUT only when all are done, so a file at OUT is always complete; in a multi-host job only
    process 0 writes it."""
    import json

    rows, encoded, lines = read_prompt_rows(
        prompts_path, sampler.tokenizer, chat=chat, vocab_size=sampler.config.vocab_size
    )
    limit = sampler.prompt_limit(params)
    for ids, line_no in zip(encoded, lines):
        if len(ids) > limit:
            raise UserError(
                f"{prompts_path}:{line_no}: prompt has {len(ids)} tokens, more than {limit}"
            )
    outputs = sampler.generate(encoded, params, progress=progress, spread_over_hosts=True)
    records = []
    for out in outputs:
        record = dict(rows[out.prompt_index])
        if params.n > 1:
            record["index"] = out.index
        record.update(
            token_ids=out.token_ids,
            text=out.text,
            logprobs=out.logprobs,
            finish_reason=out.finish_reason,
        )
        records.append(json.dumps(record, ensure_ascii=False) + "\n")
    sharding.write_atomically(out_path, "".join(records))  # process 0 only: every host holds every row
    return len(outputs)
