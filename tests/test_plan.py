"""The memory planner: TPU names, sharded sizes, the residuals JAX really saves under each remat
policy, XLA's own memory analysis of the compiled SFT step, the mesh proposal, and the CLI."""

import contextlib
import io
import json
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from cpe_jax import plan
from cpe_jax.errors import UserError
from cpe_jax.train.state import TrainState
from cpe_jax.models.qwen2.model import Qwen2Config, Qwen2ForCausalLM

ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def tiny(**kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4)
    base.update(kw)
    return Qwen2Config(**base)


def test_parse_tpu_counts_chips_not_cores():
    assert plan.parse_tpu("v5p-64") == ("v5p", 32)
    assert plan.parse_tpu("v4-32") == ("v4", 16)
    assert plan.parse_tpu("v5litepod-16") == ("v5e", 16)
    assert plan.parse_tpu("v6e-8") == ("v6e", 8)
    with pytest.raises(UserError, match="v5p-64"):
        plan.parse_tpu("v9-8")


def test_param_bytes_match_parameter_count_and_shard():
    cfg = Qwen2Config.qwen2_5_7b()
    assert plan.param_bytes(cfg, ONE) == 4 * cfg.num_parameters
    # embed over fsdp=8 and heads/mlp/vocab over tensor=4 divide every large tensor of the 7B model
    sharded = plan.param_bytes(cfg, {"data": 1, "fsdp": 8, "tensor": 4}, "bfloat16")
    assert sharded == pytest.approx(2 * cfg.num_parameters / 32, rel=0.01)


def test_rows_per_chip_follows_the_batch_rule():
    assert plan.rows_per_chip(64, 10, {"data": 4, "fsdp": 8, "tensor": 1}) == 2
    assert plan.rows_per_chip(16, 10, {"data": 4, "fsdp": 8, "tensor": 1}) == 4  # fsdp does not divide 16/4


def _saved_residual_bytes(loss, *args):
    """Bytes of the residuals JAX keeps for the backward pass (parameters excluded)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, *args)
    total = 0
    for line in out.getvalue().splitlines():
        m = re.match(r"(\w+)\[([\d,]*)\]\s+(.*)", line)
        if m and "from the argument" not in m.group(3):
            itemsize = {"f32": 4, "bf16": 2, "i32": 4, "bool": 1}[m.group(1)]
            total += itemsize * int(np.prod([int(x) for x in m.group(2).split(",") if x]))
    return total


@pytest.mark.parametrize("remat", ["none", "dots", "dots_no_batch", "full"])
def test_saved_activations_match_jax_residuals(remat):
    cfg = tiny(remat=remat)
    graphdef, state = nnx.split(Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((4, 128), jnp.int32)
    actual = _saved_residual_bytes(lambda s, t: nnx.merge(graphdef, s)(t)[0].sum(), state, tokens)
    assert plan.saved_activation_bytes(cfg, 4, 128, ONE) == pytest.approx(actual, rel=0.2)


def test_saved_activations_shrink_with_stronger_remat():
    sizes = [plan.saved_activation_bytes(tiny(remat=r), 4, 128, ONE) for r in plan.REMAT_ORDER]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 10 * sizes[-1]


@pytest.mark.parametrize("rows,length,vocab", [(16, 128, 256), (4, 128, 2048)])
def test_sft_plan_matches_compiled_memory_analysis(rows, length, vocab):
    """XLA on CPU does not honour remat in its buffer assignment, so the whole-step check uses
    remat=none; the remat terms are checked against JAX's saved residuals above."""
    from cpe_jax import sft

    cfg = tiny(vocab_size=vocab)
    graphdef, params = nnx.split(Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    tx = optax.adamw(1e-3)
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
    batch = {"tokens": jnp.zeros((rows, length), jnp.int32), "mask": jnp.ones((rows, length), bool),
             "targets": jnp.ones((rows, length), bool)}
    step = jax.jit(partial(sft.train_step, graphdef, tx, optax.constant_schedule(1e-3), "lm", 1), donate_argnums=(0,))
    m = step.lower(state, batch).compile().memory_analysis()
    xla = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    planned = plan.sft_plan(cfg, rows, 0, length, ONE)
    assert planned.peak == pytest.approx(xla, rel=0.2)
    assert planned.components["params"] == 4 * cfg.num_parameters


def _ppo_config(**mesh):
    from cpe_jax.rl.trainer import default_config

    c = default_config()
    c.mesh = mesh or {"data": -1, "fsdp": 1, "tensor": 1}
    return c


def test_ppo_plan_counts_critic_kv_cache_and_reference():
    cfg = Qwen2Config.qwen2_5_7b(dtype="bfloat16")
    c = _ppo_config()
    mesh = {"data": 1, "fsdp": 32, "tensor": 1}
    p = plan.ppo_plan(cfg, c, mesh)
    params = plan.param_bytes(cfg, mesh)
    assert p.components["critic params"] == params and p.components["reference params"] == 0
    assert p.resident == pytest.approx(6 * params)
    # 512 rollouts x (4096 edit prompt + 2048) x 28 layers x 4 kv heads x 128 x (k, v) x bf16, over 32 chips
    expected_kv = 512 * 6144 * 28 * 4 * 128 * 2 * 2 / 32
    assert p.components["edit rollout: KV cache + decode state"] == pytest.approx(expected_kv, rel=1e-3)
    # the edit prompts' prefill: 16 rows x 28 heads x 4096 queries x 6144 slots, two float32 copies
    assert p.components["edit rollout: prefill attention scores (f32)"] == 16 * 28 * 4096 * 6144 * 4 * 2
    assert "reference pass: logits (f32)" not in p.components
    c.ppo.kl_coef, c.ppo.kl_loss, c.ppo.micro_batch_size = 0.01, True, 16
    with_kl = plan.ppo_plan(cfg, c, mesh)
    assert with_kl.components["reference params"] == params
    # in micro-batches the reference pass is a phase of its own, as large as the old pass
    assert with_kl.phase_bytes("reference pass: head") == with_kl.phase_bytes("old log-probs + values pass: head")
    c.ppo.micro_batch_size = 0  # in one piece XLA interleaves the two passes: one phase
    one_piece = plan.ppo_plan(cfg, c, mesh)
    assert "reference pass: head" not in one_piece.phases
    assert one_piece.phase_bytes("old log-probs + values pass: head") == 2 * one_piece.components[
        "reference pass: logits (f32)"]


def test_no_grad_passes_follow_the_micro_batch_size():
    """micro_batch_size 0 runs the old-log-prob pass over all 2B rows in one piece; a micro size
    splits it (and the pi_e pass over the B edit rows) into pieces of that many rows."""
    cfg = tiny(vocab_size=16384)
    c = _ppo_config()
    c.rollout.max_prompt_length, c.rollout.max_response_length, c.edit.max_prompt_length = 64, 64, 256
    c.ppo.prompts_per_step, c.ppo.rollouts_per_prompt, c.ppo.mini_batch_size = 4, 2, 1
    whole = plan.ppo_plan(cfg, c, ONE)
    head = lambda p, name: p.components[f"{name}: logits (f32)"]  # noqa: E731
    assert head(whole, "old log-probs + values pass") == 16 * (128 + 64) * 16384 * 4
    assert head(whole, "pi_e recompute") == 8 * (320 + 64) * 16384 * 4
    c.ppo.micro_batch_size = 4
    split = plan.ppo_plan(cfg, c, ONE)
    assert head(split, "old log-probs + values pass") == head(whole, "old log-probs + values pass") / 4
    assert head(split, "pi_e recompute") == head(whole, "pi_e recompute") / 2
    assert split.components["update: logits (f32)"] == whole.components["update: logits (f32)"]


def test_propose_picks_smallest_fsdp_that_fits():
    c = _ppo_config()
    c.remat = "full"
    c.ppo.micro_batch_size = 32
    c.ppo.prompts_per_step, c.ppo.mini_batch_size = 32, 16  # the rollout prefill of 512 rows does not fit
    result = plan.propose(c, "v5p-64", model="qwen2.5-7b")
    chosen = result["proposed"]
    assert result["fits"] and chosen.fits
    smaller = dict(chosen.mesh, fsdp=chosen.mesh["fsdp"] // 2, data=chosen.mesh["data"] * 2)
    if chosen.mesh["fsdp"] > 1 and chosen.mesh["tensor"] == 1:
        assert not plan.plan_config(c, smaller, "qwen2.5-7b", 95, remat=chosen.remat).fits
    # a 7B CPE run cannot fit on one v5e chip
    assert not plan.propose(c, "v5e-1", model="qwen2.5-7b")["fits"]


def test_warns_when_whole_batch_no_grad_passes_set_the_peak(capsys):
    """Short sequences and a 152k vocabulary: with micro_batch_size 0 the old-log-prob pass's
    logits over all 2B rows dominate; the warning names a micro size that fits, and that size
    plans without the warning."""
    from cpe_jax.cli import main

    c = _ppo_config(data=1, fsdp=32, tensor=1)
    c.model_preset, c.remat = "qwen2.5-0.5b", "full"
    c.rollout.max_prompt_length, c.rollout.max_response_length, c.edit.max_prompt_length = 256, 256, 256
    configured = plan.plan_config(c, dict(c.mesh), None, 16)
    assert configured.peak_phase == "old log-probs + values pass: head" and not configured.fits
    warning = plan.micro_batch_warning(c, configured)
    size = int(re.search(r"--config.ppo.micro_batch_size=(\d+) fits", warning).group(1))
    c.ppo.micro_batch_size = size
    assert plan.plan_config(c, dict(c.mesh), None, 16).fits
    assert plan.micro_batch_warning(c, plan.plan_config(c, dict(c.mesh), None, 16)) is None
    args = ["plan", "--config=configs/ppo_qwen2_5_7b.py", "--model=qwen2.5-0.5b", "--config.ppo.micro_batch_size=0",
            "--config.remat=full", "--config.rollout.max_prompt_length=256", "--config.rollout.max_response_length=256",
            "--config.edit.max_prompt_length=256"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "warning: ppo.micro_batch_size=0" in out and "<- peak" in out


# ---- the plan against XLA's memory analysis of the compiled PPO/CPE steps ---------------------------
# One CPU device, float32, remat none (XLA:CPU does not honour remat in its buffer assignment); the
# states and batches are abstract, so nothing is allocated. XLA's figure is argument + output -
# alias + temp, as for the SFT step.


def _xla_bytes(compiled):
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def _ppo_case(vocab, hidden, layers, prompt, response, edit_prompt, prompts, rollouts, mini, micro, kl):
    model = tiny(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers)
    c = _ppo_config()
    c.rollout.max_prompt_length, c.rollout.max_response_length = prompt, response
    c.edit.max_prompt_length = edit_prompt
    c.ppo.prompts_per_step, c.ppo.rollouts_per_prompt = prompts, rollouts
    c.ppo.mini_batch_size, c.ppo.micro_batch_size = mini, micro
    if kl:
        c.ppo.kl_coef, c.ppo.kl_loss = 0.05, True
    return model, c


def _optimizer(lr):
    import ml_collections

    from cpe_jax.train.optim import make_optimizer

    fields = dict(lr=lr, warmup_steps=0, total_steps=10, grad_clip=1.0, weight_decay=0.01)
    return make_optimizer(ml_collections.ConfigDict(fields), "constant")[0]


def _abstract_train_state(model, config):
    """(graphdefs and optimizers, abstract TrainState) as `rl.trainer.Trainer` builds them."""
    from cpe_jax.models.heads import ValueModel
    from cpe_jax.train.state import ActorCriticState

    p = config.ppo
    policy_graphdef, policy = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(model, rngs=nnx.Rngs(0))))
    critic_graphdef, critic = nnx.split(nnx.eval_shape(lambda: ValueModel(model, rngs=nnx.Rngs(0))))
    kl_on = bool(p.kl_coef) and (p.kl_in_reward or p.kl_loss)
    policy_tx, critic_tx = _optimizer(1e-6), _optimizer(1e-5)
    state = ActorCriticState(policy=policy, critic=critic, ref=policy if kl_on else {},
                       policy_opt=jax.eval_shape(policy_tx.init, policy),
                       critic_opt=jax.eval_shape(critic_tx.init, critic),
                       kl_coef=jax.ShapeDtypeStruct((), jnp.float32), step=jax.ShapeDtypeStruct((), jnp.int32))
    return (policy_graphdef, critic_graphdef, policy_tx, critic_tx), state


def _step_settings(config):
    from cpe_jax.rl.update import StepSettings

    p, r, e = config.ppo, config.rollout, config.edit
    kl_on = bool(p.kl_coef) and (p.kl_in_reward or p.kl_loss)
    return StepSettings(
        prompt_length=r.max_prompt_length, response_length=r.max_response_length,
        edit_prompt_length=e.max_prompt_length, num_mini_batches=p.prompts_per_step // p.mini_batch_size,
        micro_batch_size=p.micro_batch_size, epochs=p.epochs, clip_eps_low=p.clip_eps_low,
        clip_eps_high=p.clip_eps_high, dual_clip_c=None, edit_clip_eps_low=None, edit_clip_eps_high=None,
        value_clip=p.value_clip, gamma=p.gamma, lam=p.lam, whiten_advantages=p.whiten_advantages,
        loss_agg=p.loss_agg, entropy_coef=p.entropy_coef, kl_in_reward=kl_on and p.kl_in_reward,
        kl_loss=kl_on and p.kl_loss, kl_kind=p.kl_kind, pi_e_source=e.pi_e)


def _abstract_rollout_batch(config):
    p, r, e = config.ppo, config.rollout, config.edit
    b, n, length, edit_length = (p.prompts_per_step * p.rollouts_per_prompt, r.max_response_length,
                                 r.max_prompt_length, e.max_prompt_length)
    S = jax.ShapeDtypeStruct
    return dict(prompt_tokens=S((b, length), jnp.int32), prompt_mask=S((b, length), bool),
                orig_tokens=S((b, n), jnp.int32), orig_mask=S((b, n), bool), orig_valid=S((b,), bool),
                orig_rewards=S((b,), jnp.float32), edit_prompt_tokens=S((b, edit_length), jnp.int32),
                edit_prompt_mask=S((b, edit_length), bool), edit_tokens=S((b, n), jnp.int32),
                edit_mask=S((b, n), bool), edit_sampler_logprobs=S((b, n), jnp.float32),
                edit_rewards=S((b,), jnp.float32), keep_edit=S((b,), bool))


def compiled_train_step_bytes(model, config):
    """XLA's memory figure of `rl.update.train_step`, jitted with the state donated as the trainer does."""
    from cpe_jax.rl.update import train_step

    fixed, state = _abstract_train_state(model, config)
    step = jax.jit(partial(train_step, *fixed, _step_settings(config)), donate_argnums=(0,))
    return _xla_bytes(step.lower(state, _abstract_rollout_batch(config), jax.random.key(0)).compile())


# (vocab, hidden, layers, prompt, response, edit prompt, prompts/step, rollouts, mini-batch prompts, micro, KL):
# each case has another phase at the peak, named in the comment.
PPO_GRID = {
    "v256-mb2-micro0-edit192": (256, 64, 2, 32, 64, 192, 2, 2, 1, 0, False),  # update (attention)
    "v16384-mb4-micro0-kl": (16384, 32, 1, 64, 64, 64, 4, 2, 1, 0, True),  # old + reference pass logits
    "v4096-mb4-micro0-edit512": (4096, 32, 1, 32, 32, 512, 4, 2, 1, 0, False),  # pi_e pass logits
    "v2048-mb1-micro4-kl-t256": (2048, 64, 2, 128, 128, 256, 2, 2, 2, 4, True),  # update, 2 micro-batches
}


def ppo_grid_ratios():
    """{case: (planned train-step peak / XLA's figure, the phase at the peak)} over PPO_GRID."""
    out = {}
    for name, case in PPO_GRID.items():
        model, c = _ppo_case(*case)
        planned = plan.ppo_plan(model, c, ONE)
        train = planned.groups["train step"]
        top = max(train, key=planned.phase_bytes)
        out[name] = (planned.group_peak("train step") / compiled_train_step_bytes(model, c), top)
    return out


@pytest.mark.parametrize("name", list(PPO_GRID))
def test_ppo_plan_matches_compiled_train_step(name):
    model, c = _ppo_case(*PPO_GRID[name])
    planned = plan.ppo_plan(model, c, ONE)
    assert planned.group_peak("train step") == pytest.approx(compiled_train_step_bytes(model, c), rel=0.2)


def test_rollout_plan_matches_compiled_sampler():
    """The host rollout: `sampling.sample` over all B rows, its prefill's scores spanning the cache."""
    from cpe_jax.sampling import SampleConfig, sample

    model, c = _ppo_case(2048, 64, 2, 256, 32, 256, 4, 4, 2, 0, False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(model, rngs=nnx.Rngs(0))))
    rows, prompt = 16, 256
    S = jax.ShapeDtypeStruct
    config = SampleConfig(max_new_tokens=32, temperature=0.9, top_p=0.9, eos_token_ids=(2,))
    compiled = jax.jit(sample, static_argnums=(0, 5)).lower(
        graphdef, state, S((rows, prompt), jnp.int32), S((rows, prompt), bool), jax.random.key(0), config).compile()
    planned = plan.ppo_plan(model, c, ONE)
    expected = planned.components["policy params"] + planned.phase_bytes("rollout")
    assert expected == pytest.approx(_xla_bytes(compiled), rel=0.2)


def _fused_case(vocab=2048, micro=0, grm_prefix=256, critique=48):
    model, c = _ppo_case(vocab, 64, 2, 32, 32, 128, 2, 2, 1, micro, False)
    c.grm.type, c.grm.fused, c.grm.mode = "flax", True, "expected"
    c.grm.max_prompt_length, c.grm.max_tokens = grm_prefix, critique
    return model, tiny(vocab_size=vocab, intermediate_size=128, num_hidden_layers=2), c


FUSED_PIECE = 8  # tokens of each fixed text piece around the generated parts (GRM suffix, edit middle, ...)


def compiled_fused_step_bytes(model, grm_model, config):
    """XLA's memory figure of `rl.fused.fused_step` (rollout, GRM critique and expected scores, edits,
    PPO update in one jit), with synthetic score-token tables of two-token candidate values."""
    from cpe_jax.reward.flax_grm import ScoreTokenTables
    from cpe_jax.rl.fused import FusedSettings, GRMTables, fused_step
    from cpe_jax.sampling import SampleConfig

    (policy_graphdef, critic_graphdef, policy_tx, critic_tx), state = _abstract_train_state(model, config)
    grm_graphdef, grm_state = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(grm_model, rngs=nnx.Rngs(1))))
    p, r, e, g = config.ppo, config.rollout, config.edit, config.grm
    b = p.prompts_per_step * p.rollouts_per_prompt
    policy_sample = SampleConfig(max_new_tokens=r.max_response_length, temperature=0.9, top_p=0.9, eos_token_ids=(2,))
    critique = SampleConfig(max_new_tokens=g.max_tokens, temperature=0.9, eos_token_ids=(2,))
    settings = FusedSettings(
        policy_sample=policy_sample, edit_sample=policy_sample, critique_sample=critique,
        edit_critique_sample=critique, critique_close=(5, 6), edit_prompt_length=e.max_prompt_length,
        strategy="random", ratio=0.5, weights=tuple(dict(g.weights).items()))
    values = np.arange(-5, 6)
    tables = GRMTables(ScoreTokenTables(
        values=jnp.asarray(values, jnp.float32),
        candidate_tokens=jnp.asarray(np.stack([np.full(11, 7), values + 15], axis=1), jnp.int32),
        candidate_mask=jnp.ones((11, 2), bool), label_tokens=jnp.asarray([[0, 20], [21, 22], [23, 24]], jnp.int32),
        label_mask=jnp.asarray([[False, True], [True, True], [True, True]])), jnp.asarray([30, 31, 32], jnp.int32))
    S = jax.ShapeDtypeStruct
    widths = dict(prompt=r.max_prompt_length, grm_prefix=g.max_prompt_length, grm_suffix=FUSED_PIECE,
                  edit_prefix=e.max_prompt_length // 2, edit_middle=FUSED_PIECE, edit_suffix=FUSED_PIECE)
    pieces = {"question_ids": S((b,), jnp.int32), "row_ids": S((b,), jnp.uint32)}
    for name, width in widths.items():
        pieces[f"{name}_tokens"], pieces[f"{name}_mask"] = S((b, width), jnp.int32), S((b, width), bool)
    step = jax.jit(partial(fused_step, policy_graphdef, critic_graphdef, grm_graphdef, policy_tx, critic_tx,
                           _step_settings(config), settings), donate_argnums=(1,))
    return _xla_bytes(step.lower(tables, state, grm_state, pieces, jax.random.key(0)).compile())


def test_fused_plan_matches_compiled_fused_step():
    """A GRM prompt longer than the policy's: the GRM's expected-score prefill sets the peak."""
    model, grm_model, c = _fused_case()
    planned = plan.ppo_plan(model, c, ONE, grm_model)
    assert planned.peak_phase.startswith("GRM")
    assert planned.peak == pytest.approx(compiled_fused_step_bytes(model, grm_model, c), rel=0.2)


def test_plan_cli_json(capsys):
    from cpe_jax.cli import main

    assert main(["plan", "--config=configs/cpe_qwen2_5_7b.py", "--tpu=v5p-64", "--model=qwen2.5-7b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chips"] == 32 and out["configured"]["mesh"] == {"data": 4, "fsdp": 8, "tensor": 1}
    assert set(out["proposed"]) >= {"mesh", "remat", "per_chip_gib", "peak_gib", "fits"}
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config=configs/cpe_qwen2_5_7b.py", "--tpu=v9-8", "--model=qwen2.5-7b"])
    assert exit_info.value.code == 2


if __name__ == "__main__":
    # The plan / XLA table of the PPO grid and the fused step: python tests/test_plan.py
    print(f"{'case':32s} {'plan / XLA':>10s}  phase at the peak")
    for case, (ratio, phase) in ppo_grid_ratios().items():
        print(f"{case:32s} {ratio:10.2f}  {phase}")
    model, grm_model, c = _fused_case()
    planned = plan.ppo_plan(model, c, ONE, grm_model)
    ratio = planned.peak / compiled_fused_step_bytes(model, grm_model, c)
    print(f"{'fused step, GRM prefix 256':32s} {ratio:10.2f}  {planned.peak_phase}")
