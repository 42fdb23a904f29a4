"""Lower + compile seconds of the PPO update and of the sampler, by depth, length and layer stack.

The programs are the product's: `cpe_jax.rl.update.train_step` (policy and critic forward and
backward, old log-probs and values, AdamW; one prompt, one rollout and its edit, pi_e from the
sampler) jitted with the state donated as the trainer does, and `cpe_jax.sampling.sample`
(prefill + decode loop) on one row. The model is Qwen2.5-7B's depth (28 layers) against 4 layers
at a tiny width (vocab 1024, hidden 64, 4 heads, 2 kv heads), so the figures are compile time, not
weights. `tokens` is prompt + response: 512 = 256 + 256, 2048 = 1024 + 1024, 6144 = 4096 + 2048 (the
paper's edit prompt + response). Each compile runs in a fresh process (XLA's caches would
otherwise serve the second of two equal programs). Attention is the backend's default (`auto`).

    python benchmarks/compile_time.py [--layers 4 28] [--tokens 512 2048 6144] \
        [--stacks scanned unrolled] [--programs update sampler]

Runs the shallow depth at the shortest length and the deep depth at every length (what the two
targets compare). Prints one JSON object per line: program, layers, tokens, stack, attention,
lower_s, compile_s, total_s (CPU seconds of this process: XLA compiles on one thread, and CPU time
does not count other jobs sharing the cores) and wall_s, then one summary line per program and
stack with the two target ratios (deep over shallow at the shortest length; the longest over the
shortest length at the deep depth).
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

WIDTH = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False)
SPLITS = {512: (256, 256), 2048: (1024, 1024), 6144: (4096, 2048)}


def _split(tokens):
    return SPLITS.get(tokens, (tokens // 2, tokens - tokens // 2))


def _config(layers, scanned):
    from cpe_jax.models.qwen2.model import Qwen2Config

    return Qwen2Config(num_hidden_layers=layers, scan_layers=scanned, **WIDTH)


def _update_program(layers, tokens, scanned):
    """(jitted rl.update.train_step, abstract arguments)."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from cpe_jax.models.heads import ValueModel
    from cpe_jax.models.qwen2.model import Qwen2ForCausalLM
    from cpe_jax.rl.update import StepSettings, train_step
    from cpe_jax.train.optim import make_optimizer
    from cpe_jax.train.state import ActorCriticState

    cfg = _config(layers, scanned)
    prompt, response = _split(tokens)
    policy_graphdef, policy = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))))
    critic_graphdef, critic = nnx.split(nnx.eval_shape(lambda: ValueModel(cfg, rngs=nnx.Rngs(0))))

    def optimizer(lr):
        fields = dict(lr=lr, warmup_steps=0, total_steps=10, grad_clip=1.0, weight_decay=0.01)
        return make_optimizer(ml_collections.ConfigDict(fields), "constant")[0]

    policy_tx, critic_tx = optimizer(1e-6), optimizer(1e-5)
    S = jax.ShapeDtypeStruct
    state = ActorCriticState(policy=policy, critic=critic, ref={},
                             policy_opt=jax.eval_shape(policy_tx.init, policy),
                             critic_opt=jax.eval_shape(critic_tx.init, critic),
                             kl_coef=S((), jnp.float32), step=S((), jnp.int32))
    settings = StepSettings(
        prompt_length=prompt, response_length=response, edit_prompt_length=prompt, num_mini_batches=1,
        micro_batch_size=0, epochs=1, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=None,
        edit_clip_eps_low=None, edit_clip_eps_high=None, value_clip=0.5, gamma=1.0, lam=1.0,
        whiten_advantages=False, loss_agg="token-mean", entropy_coef=0.0, kl_in_reward=False,
        kl_loss=False, kl_kind="k1", pi_e_source="sampler")
    b = 1
    batch = dict(prompt_tokens=S((b, prompt), jnp.int32), prompt_mask=S((b, prompt), bool),
                 orig_tokens=S((b, response), jnp.int32), orig_mask=S((b, response), bool),
                 orig_valid=S((b,), bool), orig_rewards=S((b,), jnp.float32),
                 edit_prompt_tokens=S((b, prompt), jnp.int32), edit_prompt_mask=S((b, prompt), bool),
                 edit_tokens=S((b, response), jnp.int32), edit_mask=S((b, response), bool),
                 edit_sampler_logprobs=S((b, response), jnp.float32), edit_rewards=S((b,), jnp.float32),
                 keep_edit=S((b,), bool))
    step = jax.jit(partial(train_step, policy_graphdef, critic_graphdef, policy_tx, critic_tx, settings),
                   donate_argnums=(0,))
    return step, (state, batch, jax.random.key(0))


def _sampler_program(layers, tokens, scanned):
    """(jitted sampling.sample, abstract arguments)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cpe_jax.models.qwen2.model import Qwen2ForCausalLM
    from cpe_jax.sampling import SampleConfig, sample

    cfg = _config(layers, scanned)
    prompt, response = _split(tokens)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))))
    config = SampleConfig(max_new_tokens=response, temperature=1.0, ignore_eos=True)
    S = jax.ShapeDtypeStruct
    fn = jax.jit(lambda s, t, m, k: sample(graphdef, s, t, m, k, config))
    return fn, (state, S((1, prompt), jnp.int32), S((1, prompt), bool), jax.random.key(0))


def measure(program, layers, tokens, stack):
    """One JSON record: lower and compile seconds of `program` (in this process)."""
    import jax

    from cpe_jax.models.qwen2.attention import resolve_attention

    build = {"update": _update_program, "sampler": _sampler_program}[program]
    fn, args = build(layers, tokens, stack == "scanned")
    wall, cpu = time.perf_counter(), time.process_time()
    lowered = fn.lower(*args)
    lower_s = time.process_time() - cpu
    lowered.compile()
    return dict(program=program, layers=layers, tokens=tokens, stack=stack, backend=jax.default_backend(),
                attention=resolve_attention("auto"), lower_s=round(lower_s, 2),
                compile_s=round(time.process_time() - cpu - lower_s, 2),
                total_s=round(time.process_time() - cpu, 2), wall_s=round(time.perf_counter() - wall, 2))


def _fresh_process(program, layers, tokens, stack):
    out = subprocess.run([sys.executable, __file__, "--one", program, str(layers), str(tokens), stack],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 28])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 6144])
    parser.add_argument("--stacks", nargs="+", default=["scanned", "unrolled"], choices=["scanned", "unrolled"])
    parser.add_argument("--programs", nargs="+", default=["update", "sampler"], choices=["update", "sampler"])
    parser.add_argument("--one", nargs=4, metavar=("PROGRAM", "LAYERS", "TOKENS", "STACK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        program, layers, tokens, stack = args.one
        print(json.dumps(measure(program, int(layers), int(tokens), stack)))
        return
    from cpe_jax.hardware import cpu_features

    print(json.dumps({"cpu_features": cpu_features()}), flush=True)
    for program in args.programs:
        for stack in args.stacks:
            seconds = {}
            shallow, deep = min(args.layers), max(args.layers)
            short, long = min(args.tokens), max(args.tokens)
            grid = [(shallow, short)] + [(deep, tokens) for tokens in sorted(args.tokens)]
            for layers, tokens in dict.fromkeys(grid):
                record = _fresh_process(program, layers, tokens, stack)
                seconds[layers, tokens] = record["total_s"]
                print(json.dumps(record), flush=True)
            summary = dict(program=program, stack=stack)
            if deep != shallow:
                summary[f"layers_{deep}_over_{shallow}"] = round(seconds[deep, short] / seconds[shallow, short], 2)
                summary["layers_target"] = 1.3
            if long != short:
                summary[f"tokens_{long}_over_{short}"] = round(seconds[deep, long] / seconds[deep, short], 2)
                summary["tokens_target"] = 2.0
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
