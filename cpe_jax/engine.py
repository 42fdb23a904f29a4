"""The slot engine: continuous batching over a fixed number of decode slots.

Requests wait in a queue. A prompt and its n samples are admitted when n slots are free: the
prompt is prefilled ONCE and its keys and values are copied into the n slots, whose first tokens
are sampled from the same logits with their own keys. All slots then decode together in one
compiled loop of at most `sync_every` steps; between loops the host collects finished rows and
refills their slots. Shapes are static (slots, cache length, prompt buckets), so steady state
never compiles again.

The KV cache is a ring: every decode step writes slot `end % S` of every row, and each row's mask
says which of its slots are live. A request occupies at most `prompt bucket + max_tokens` slots,
so it never overwrites its own prompt; what a slot's previous request left there is overwritten
with zeros on admission and masked, so a refilled slot sees no trace of it.

Sampling settings are per request (vLLM's `SamplingParams` list): temperature, top_k, top_p,
seed, stop tokens, max_tokens, ignore_eos, n. Row r of prompt i is keyed `fold_in(key(seed),
i * n + r)` and its step t `fold_in(row key, t)`, as in the static sampler, so a row's tokens do not
depend on its slot, its start time or its neighbours.
"""

import dataclasses
import logging
import math
from collections import deque
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpe_jax.errors import UserError
from cpe_jax.models.qwen2.model import (as_raw_bits, compute_dtype_params, init_cache, map_layers, positions_from_mask,
                                        weights_hold_compute_values)
from cpe_jax.sharding import fetch_global

logger = logging.getLogger(__name__)

DEFAULT_SYNC_EVERY = 8  # decode steps between host visits: timed best of 8, 16, 32 (benchmarks/rollout_engine.py)
MAX_STOP_TOKENS = 8  # stop_token_ids per request (padded with -1)


class SlotSettings(NamedTuple):
    """Per-slot sampling settings, as arrays [B] (stop_ids [B, MAX_STOP_TOKENS], -1 padded)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    max_tokens: jax.Array
    ignore_eos: jax.Array
    stop_ids: jax.Array


class EngineState(NamedTuple):
    """Everything the decode loop carries, one row per slot; donated between calls."""

    cache: dict  # {"k", "v": per-layer [B, KVH, S, D], "end": ring write index}
    mask: jax.Array  # [B, S] live slots of each row's request
    row_keys: jax.Array  # [B] keys
    last_token: jax.Array  # [B]
    next_position: jax.Array  # [B] position of the token fed next
    row_step: jax.Array  # [B] index of the row's next token
    tokens: jax.Array  # [B, N]
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    done: jax.Array  # [B] finished (or never used): the slot is free
    stopped: jax.Array  # [B] ended on an EOS / stop token
    settings: SlotSettings


@dataclasses.dataclass(frozen=True)
class EngineShape:
    """Static shape of one engine program: slots, ring length, output width and sampling features."""

    slots: int
    cache_length: int
    max_tokens: int
    sampling: bool  # some request has temperature > 0
    top_k: bool  # some request truncates by top_k
    top_p: bool  # some request truncates by top_p
    eos_token_ids: tuple
    pad_token_id: int
    cache_dtype: str = None


def bucket_size(n: int, minimum: int = 1, multiple: int = 1) -> int:
    """Smallest power of two >= max(n, minimum), rounded up to a multiple of `multiple`
    (the batch-sharding degree), so ragged requests hit a few compiled shapes."""
    size = 1 << max(0, math.ceil(math.log2(max(n, minimum, 1))))
    return -(-size // multiple) * multiple


# ---- per-row sampling (pure) -----------------------------------------------------------------


def first_argmax(x):
    """`jnp.argmax(x, axis=-1)` (the first index of the largest value, or of the first NaN) as
    plain reductions: XLA:CPU runs argmax's (value, index) reduction one element at a time, ~2.5x
    slower over a vocabulary, and on every decode step."""
    nan = jnp.isnan(x)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, x == jnp.max(x, axis=-1, keepdims=True))
    return jnp.min(jnp.where(hit, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


def categorical(keys, logits):
    """`jax.vmap(jax.random.categorical)(keys, logits)`, the same Gumbel noise and draws, with
    `first_argmax` (the Gumbel noise is not fused into the slow argmax reduction)."""
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], logits.dtype))(keys)
    return first_argmax(noise + logits)


def sample_rows(keys, logits, settings: SlotSettings, shape: EngineShape):
    """One token per row under that row's own settings; the same numbers as `sampling.sample_tokens`
    with the row's settings as constants. Returns (tokens, raw logprobs, sampling logprobs)."""
    logits = logits.astype(jnp.float32)
    greedy = first_argmax(logits)
    tokens, sampling_logprobs = greedy, jnp.zeros(greedy.shape, jnp.float32)
    if shape.sampling:
        temperature = jnp.where(settings.temperature > 0, settings.temperature, 1.0)
        processed = logits / temperature[:, None]
        if shape.top_k or shape.top_p:
            processed = _truncate(processed, settings, shape)
        sampled = categorical(keys, processed)
        chosen = jnp.take_along_axis(processed, sampled[:, None], axis=-1)[:, 0]
        is_sampled = settings.temperature > 0
        tokens = jnp.where(is_sampled, sampled, greedy)
        sampling_logprobs = jnp.where(is_sampled, chosen - jax.nn.logsumexp(processed, axis=-1), 0.0)
    chosen_logit = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen_logit - jax.nn.logsumexp(logits, axis=-1), sampling_logprobs


def _truncate(logits, settings, shape):
    """`sampling.process_logits`'s top_k / top_p cut with per-row k (0 = off) and p (1 = off)."""
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where((settings.top_k > 0) & (settings.top_k < vocab), settings.top_k, vocab)
    ranks = jnp.arange(vocab)[None, :]
    kept_by_k = ranks < k[:, None]
    threshold = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    if shape.top_p:
        top = jnp.where(kept_by_k, sorted_desc, -jnp.inf)
        probs = jax.nn.softmax(top, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = kept_by_k & (mass_before < settings.top_p[:, None])
        p_threshold = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        threshold = jnp.where(settings.top_p[:, None] < 1.0, p_threshold, threshold)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _record(state: EngineState, shape: EngineShape, tokens, logprobs, sampling_logprobs):
    """Write each running row's sample at its own step; mark rows that end (stop token or length)."""
    running = ~state.done
    rows = jnp.arange(tokens.shape[0])
    step = jnp.minimum(state.row_step, shape.max_tokens - 1)
    tokens = jnp.where(running, tokens, shape.pad_token_id)
    s = state.settings
    hit = jnp.any(tokens[:, None] == s.stop_ids, axis=1)
    if shape.eos_token_ids:
        hit = hit | (jnp.isin(tokens, jnp.asarray(shape.eos_token_ids, jnp.int32)) & ~s.ignore_eos)
    hit = hit & running
    row_step = state.row_step + running.astype(jnp.int32)
    keep = lambda buf, new: buf.at[rows, step].set(jnp.where(running, new, buf[rows, step]))
    return state._replace(
        tokens=keep(state.tokens, tokens),
        logprobs=keep(state.logprobs, logprobs),
        sampling_logprobs=keep(state.sampling_logprobs, sampling_logprobs),
        row_step=row_step,
        done=state.done | hit | (running & (row_step >= s.max_tokens)),
        stopped=state.stopped | hit,
        last_token=tokens,
    )


def _step_keys(row_keys, row_step):
    return jax.vmap(jax.random.fold_in)(row_keys, row_step)


def _is_typed_key(x):
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def default_row_keys(params_list):
    """The keys of every output row of a request list (prompt-major): row j of prompt i is keyed
    fold_in(key(seed), i * n + j), so a row's randomness depends only on its request."""
    seeds = [p.seed for p in params_list for _ in range(p.n)]
    ids = [i * p.n + j for i, p in enumerate(params_list) for j in range(p.n)]
    return request_keys(np.asarray(seeds, np.uint32), np.asarray(ids, np.uint32))


@jax.jit
def request_keys(seeds, row_ids):
    """Row keys fold_in(key(seed), row id) for many rows at once (as `sampling.row_keys`)."""
    return jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.key(seed), i))(seeds, row_ids)


# ---- the compiled pieces (pure) --------------------------------------------------------------


def empty_state(config, shape: EngineShape) -> EngineState:
    b, s, n = shape.slots, shape.cache_length, shape.max_tokens
    return EngineState(
        cache=init_cache(config, b, s, dtype=shape.cache_dtype),
        mask=jnp.zeros((b, s), bool),
        row_keys=jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(b, dtype=jnp.uint32)),
        last_token=jnp.zeros((b,), jnp.int32),
        next_position=jnp.zeros((b,), jnp.int32),
        row_step=jnp.zeros((b,), jnp.int32),
        tokens=jnp.full((b, n), shape.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((b, n), jnp.float32),
        sampling_logprobs=jnp.zeros((b, n), jnp.float32),
        done=jnp.ones((b,), bool),
        stopped=jnp.zeros((b,), bool),
        settings=SlotSettings(
            temperature=jnp.zeros((b,), jnp.float32), top_k=jnp.zeros((b,), jnp.int32),
            top_p=jnp.ones((b,), jnp.float32), max_tokens=jnp.ones((b,), jnp.int32),
            ignore_eos=jnp.zeros((b,), bool), stop_ids=jnp.full((b, MAX_STOP_TOKENS), -1, jnp.int32),
        ),
    )


def admit(graphdef, params, state: EngineState, prompt_tokens, prompt_mask, source, slots, row_keys,
          settings: SlotSettings, shape: EngineShape) -> EngineState:
    """Prefill the left-padded prompts [K, P] once, copy each one's keys and values into the slots
    that sample it (`source[m]` is the prompt of admitted row m, `slots[m]` its slot; rows that pad
    the admission bucket come last, with slot index B, and are dropped), and sample every admitted
    row's first token."""
    model = nnx.merge(graphdef, params)
    row_keys = jax.random.wrap_key_data(row_keys)  # raw uint32 key data [M, 2] from the host
    k, p = prompt_tokens.shape
    s = shape.cache_length
    prompt_mask = prompt_mask.astype(bool)
    prompt_cache = init_cache(model.config, k, p, dtype=shape.cache_dtype)
    _, prompt_cache, hidden = model(prompt_tokens.astype(jnp.int32), positions_from_mask(prompt_mask),
                                    prompt_cache, prompt_mask, return_hidden=True, skip_logits=True)
    logits = model.vocabulary_logits(hidden[:, -1])[source]

    # The prompt takes the P ring slots before the next write, so its first fed token lands at `end`.
    end = state.cache["end"]
    ring = (end - p + jnp.arange(p)) % s

    # Each admitted row's slot gets a whole new ring row: its prompt's keys and values at the P
    # ring slots before `end`, zeros elsewhere. Row by row, in place: a scatter into a 16-bit
    # cache runs through float32 (or raw-bit) copies of the whole cache.
    offset = (jnp.arange(s) - (end - p)) % s  # the prompt position each ring slot holds, if < p
    admitted_rows = jnp.sum(slots < shape.slots)  # admitted rows come first; the rest pad the bucket

    def place(cache_layer, prompt_layer):  # [B, KVH, S, D] <- [K, KVH, P, D]
        def write(m, cache):
            prompt = jax.lax.dynamic_index_in_dim(prompt_layer, source[m], keepdims=True).astype(cache.dtype)
            row = jnp.take(prompt, jnp.minimum(offset, p - 1), axis=2)  # [1, KVH, S, D]
            row = jnp.where((offset < p)[None, None, :, None], row, jnp.zeros((), row.dtype))
            update = partial(jax.lax.dynamic_update_slice_in_dim, start_index=slots[m], axis=0)
            return as_raw_bits(update, cache, row)

        return jax.lax.fori_loop(0, admitted_rows, write, cache_layer)

    cache = dict(state.cache, k=map_layers(place, state.cache["k"], prompt_cache["k"]),
                 v=map_layers(place, state.cache["v"], prompt_cache["v"]))
    row_mask = jnp.zeros((slots.shape[0], s), bool).at[:, ring].set(prompt_mask[source])
    n = shape.max_tokens

    def put(buf, rows_value):
        return buf.at[slots].set(rows_value, mode="drop")

    fresh = EngineState(
        cache=cache,
        mask=put(state.mask, row_mask),
        row_keys=put(state.row_keys, row_keys),
        last_token=put(state.last_token, jnp.zeros_like(slots)),
        next_position=put(state.next_position, jnp.sum(prompt_mask, axis=1).astype(jnp.int32)[source]),
        row_step=put(state.row_step, jnp.zeros_like(slots)),
        tokens=put(state.tokens, jnp.full((slots.shape[0], n), shape.pad_token_id, jnp.int32)),
        logprobs=put(state.logprobs, jnp.zeros((slots.shape[0], n), jnp.float32)),
        sampling_logprobs=put(state.sampling_logprobs, jnp.zeros((slots.shape[0], n), jnp.float32)),
        done=put(state.done, jnp.zeros(slots.shape, bool)),
        stopped=put(state.stopped, jnp.zeros(slots.shape, bool)),
        settings=jax.tree.map(put, state.settings, settings),
    )
    # First tokens: only the admitted rows sample now; every other row keeps its state.
    admitted = jnp.zeros((shape.slots,), bool).at[slots].set(True, mode="drop")
    full_logits = jnp.zeros((shape.slots, logits.shape[-1]), jnp.float32).at[slots].set(logits, mode="drop")
    sampled = sample_rows(_step_keys(fresh.row_keys, fresh.row_step), full_logits, fresh.settings, shape)
    recorded = _record(fresh._replace(done=fresh.done | ~admitted), shape, *sampled)
    return _merge_admitted(recorded, fresh, state, admitted)


def _merge_admitted(recorded, fresh, before, admitted):
    """Rows just admitted take their recorded first step; every other row is as it was."""
    def pick(new, old):
        return jnp.where(admitted.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    rows = ("mask", "row_keys", "last_token", "next_position", "row_step", "tokens", "logprobs",
            "sampling_logprobs", "done", "stopped")
    merged = {name: pick(getattr(recorded, name), getattr(before, name)) for name in rows}
    merged["settings"] = jax.tree.map(pick, fresh.settings, before.settings)
    return before._replace(cache=fresh.cache, **merged)


def decode(graphdef, params, state: EngineState, shape: EngineShape, steps: int) -> EngineState:
    """Up to `steps` decode steps of every running slot, in one while_loop; stops early when no
    slot is running."""
    model = nnx.merge(graphdef, params)
    s = shape.cache_length

    def running(carry):
        i, st = carry
        return (i < steps) & ~jnp.all(st.done)

    def step(carry):
        i, st = carry
        end = st.cache["end"]
        live = ~st.done
        mask = st.mask.at[:, end].set(live)  # the slot written now; a finished row sees nothing new
        _, cache, hidden = model(st.last_token[:, None], st.next_position[:, None], st.cache, mask,
                                 return_hidden=True, skip_logits=True)
        cache = dict(cache, end=(end + 1) % s)
        logits = model.vocabulary_logits(hidden[:, -1])
        st = st._replace(cache=cache, mask=mask, next_position=st.next_position + live.astype(jnp.int32))
        st = _record(st, shape, *sample_rows(_step_keys(st.row_keys, st.row_step), logits, st.settings, shape))
        return i + 1, st

    return jax.lax.while_loop(running, step, (jnp.zeros((), jnp.int32), state))[1]


# ---- the host loop ---------------------------------------------------------------------------


@dataclasses.dataclass
class EngineRow:
    """One finished sample: tokens (with the EOS/stop token that ended it), log-probs, end."""

    prompt_index: int
    index: int
    token_ids: list
    logprobs: list
    sampling_logprobs: list
    stopped: bool


class Engine:
    """Continuous batching over `num_slots` decode slots for a `Qwen2ForCausalLM`.

    Args:
      model: the NNX model (parameters placed on `mesh` when one is given).
      num_slots: decode slots (rounded up to the batch-sharding degree of `mesh`).
      sync_every: decode steps per compiled loop before the host refills finished slots.
      min_prompt_bucket: smallest prompt-length bucket (lengths are bucketed to powers of two).
      eos_token_ids / pad_token_id: as the `Sampler` resolves them.
    """

    def __init__(self, model, *, num_slots=64, mesh=None, sync_every=DEFAULT_SYNC_EVERY, eos_token_ids=(),
                 pad_token_id=0, cache_dtype=None, min_prompt_bucket=16):
        self.config = model.config
        self._cast = jax.jit(compute_dtype_params, static_argnums=(1,))
        self.graphdef, params = nnx.split(model)
        self.set_params(params)
        self.mesh = mesh
        multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.num_slots = -(-int(num_slots) // multiple) * multiple
        if int(sync_every) < 1:
            raise UserError(f"sync_every={sync_every!r} must be an integer >= 1")
        self.sync_every = int(sync_every)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.cache_dtype = cache_dtype
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.compile_count = 0  # traces of an admit or decode program
        self._admit = jax.jit(self._traced_admit, static_argnums=(8,), donate_argnums=(1,))
        self._decode = jax.jit(self._traced_decode, static_argnums=(2,), donate_argnums=(1,))
        self._empty = jax.jit(partial(empty_state, self.config), static_argnums=(0,))

    def set_params(self, params):
        """Generate from new weights of the same structure: no recompile. The engine keeps them in
        the compute dtype (`compute_dtype_params`), one copy per call, not one cast per step."""
        self.params = self._cast(params, self.config.dtype)

    def _traced_admit(self, params, state, tokens, mask, source, slots, keys, settings, shape):
        self.compile_count += 1
        logger.info("compiling engine admission: %d prompts x %d tokens into %d rows",
                    tokens.shape[0], tokens.shape[1], slots.shape[0])
        with weights_hold_compute_values():  # self.params went through compute_dtype_params
            return admit(self.graphdef, params, state, tokens, mask, source, slots, keys, settings, shape)

    def _traced_decode(self, params, state, shape):
        self.compile_count += 1
        logger.info("compiling engine decode: %d slots, ring of %d", shape.slots, shape.cache_length)
        with weights_hold_compute_values():
            return decode(self.graphdef, params, state, shape, self.sync_every)

    def shape_for(self, prompt_lengths, params_list) -> EngineShape:
        """The static shape serving these requests: ring = longest prompt bucket + longest max_tokens."""
        max_tokens = bucket_size(max(p.max_tokens for p in params_list), 16)
        prompt = bucket_size(max(prompt_lengths), self.min_prompt_bucket)
        return EngineShape(
            slots=self.num_slots, cache_length=prompt + max_tokens, max_tokens=max_tokens,
            sampling=any(p.temperature > 0 for p in params_list),
            top_k=any(p.temperature > 0 and p.top_k > 0 for p in params_list),
            top_p=any(p.temperature > 0 and p.top_p < 1 for p in params_list),
            eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id, cache_dtype=self.cache_dtype,
        )

    def generate(self, prompts: Sequence[list], params_list: Sequence, *, progress=False, row_keys=None) -> list:
        """Sample `params.n` rows for every prompt (token-id lists, one SamplingParams each).

        `row_keys`: one key per output row (prompt-major) instead of fold_in(key(seed), i * n + j).
        Returns EngineRows prompt-major: prompt i's samples are consecutive, in sample order."""
        if len(prompts) != len(params_list):
            raise UserError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        for i, p in enumerate(params_list):
            if p.n > self.num_slots:
                raise UserError(f"prompt {i}: n={p.n} is more than the engine's {self.num_slots} slots")
            if len(p.stop_token_ids) > MAX_STOP_TOKENS:
                raise UserError(f"prompt {i}: at most {MAX_STOP_TOKENS} stop_token_ids, got {len(p.stop_token_ids)}")
        if not prompts:
            return []
        first_row = np.cumsum([0] + [p.n for p in params_list])
        if row_keys is None:
            row_keys = default_row_keys(params_list)
        elif len(row_keys) != first_row[-1]:
            raise UserError(f"{len(row_keys)} row keys for {first_row[-1]} rows")
        # Raw key data on the host (the same on every host): admissions slice it without a device
        # round trip and pass it in as plain data, whatever device the keys were made on.
        row_keys = np.asarray(fetch_global(jax.random.key_data(row_keys) if _is_typed_key(row_keys) else row_keys),
                              np.uint32)
        results = {}
        for i, prompt in enumerate(prompts):  # an empty prompt ends before its first token
            if not len(prompt):
                for j in range(params_list[i].n):
                    results[(i, j)] = EngineRow(i, j, [], [], [], False)
        waiting = [i for i, prompt in enumerate(prompts) if len(prompt)]
        if not waiting:
            return [results[(i, j)] for i in range(len(prompts)) for j in range(params_list[i].n)]
        shape = self.shape_for([len(prompts[i]) for i in waiting], [params_list[i] for i in waiting])
        state = self._run(self._empty, shape)
        # Longest max_tokens first (stable): a long request admitted last would decode alone at the
        # end. A row's result does not depend on when it runs, so the order changes only the time.
        queue = deque(sorted(waiting, key=lambda i: -params_list[i].max_tokens))
        free = list(range(self.num_slots))
        owner = {}  # slot -> (prompt index, sample index)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(p.n for p in params_list), desc="generate", unit="sample")
        while queue or owner:
            group = []
            while queue and params_list[queue[0]].n <= len(free) - sum(params_list[g].n for g in group):
                group.append(queue.popleft())
            if group:
                state = self._admit_group(state, shape, group, prompts, params_list, free, owner,
                                          row_keys, first_row)
            state = self._run(self._decode, self.params, state, shape)
            # fetch_global: every host reads all slots (an all-gather when slots span processes)
            # and so takes the same refill decisions.
            done = fetch_global(state.done)
            finished = [slot for slot in owner if done[slot]]
            if finished:
                host = fetch_global((state.tokens, state.logprobs, state.sampling_logprobs, state.row_step,
                                     state.stopped))
                for slot in finished:
                    i, j = owner.pop(slot)
                    results[(i, j)] = _row(host, slot, i, j)
                    free.append(slot)
                if bar is not None:
                    bar.update(len(finished))
        if bar is not None:
            bar.close()
        return [results[(i, j)] for i in range(len(prompts)) for j in range(params_list[i].n)]

    def _admit_group(self, state, shape, group, prompts, params_list, free, owner, row_keys, first_row):
        """Prefill the prompts of `group` in one bucketed call and give each sample a free slot."""
        b = self.num_slots
        k = bucket_size(len(group), 1)
        width = bucket_size(max(len(prompts[i]) for i in group), self.min_prompt_bucket)
        tokens = np.full((k, width), self.pad_token_id, np.int32)
        mask = np.zeros((k, width), bool)
        for r, i in enumerate(group):
            ids = prompts[i]
            tokens[r, width - len(ids):], mask[r, width - len(ids):] = ids, True
        rows = [(r, i, j) for r, i in enumerate(group) for j in range(params_list[i].n)]
        m = bucket_size(len(rows), 1)
        source = np.zeros((m,), np.int32)
        slots = np.full((m,), b, np.int32)  # index b: padding, dropped
        settings = {name: [] for name in SlotSettings._fields}
        key_index = []
        for a, (r, i, j) in enumerate(rows):
            slot = free.pop(0)
            owner[slot] = (i, j)
            source[a], slots[a] = r, slot
        for a in range(m):
            r, i, j = rows[min(a, len(rows) - 1)]
            p = params_list[i]
            settings["temperature"].append(float(p.temperature))
            settings["top_k"].append(int(p.top_k))
            settings["top_p"].append(float(p.top_p))
            settings["max_tokens"].append(int(p.max_tokens))
            settings["ignore_eos"].append(bool(p.ignore_eos))
            stops = list(p.stop_token_ids) + [-1] * (MAX_STOP_TOKENS - len(p.stop_token_ids))
            settings["stop_ids"].append(stops)
            key_index.append(first_row[i] + j)
        keys = row_keys[np.asarray(key_index)]  # host key data [M, 2]
        dtypes = dict(temperature=np.float32, top_k=np.int32, top_p=np.float32, max_tokens=np.int32,
                      ignore_eos=bool, stop_ids=np.int32)
        settings = SlotSettings(**{name: np.asarray(v, dtypes[name]) for name, v in settings.items()})
        return self._run(self._admit, self.params, state, tokens, mask, source, slots, keys, settings, shape)

    def _run(self, fn, *args):
        """Call a compiled piece, under the mesh when there is one (the cache shards by its logical axes)."""
        if self.mesh is None:
            return fn(*args)
        with jax.set_mesh(self.mesh):
            return fn(*args)


def _row(host, slot, prompt_index, index):
    tokens, logprobs, sampling_logprobs, lengths, stopped = host
    n = int(lengths[slot])
    return EngineRow(prompt_index=prompt_index, index=index, token_ids=[int(t) for t in tokens[slot, :n]],
                     logprobs=[float(x) for x in logprobs[slot, :n]],
                     sampling_logprobs=[float(x) for x in sampling_logprobs[slot, :n]],
                     stopped=bool(stopped[slot]))
