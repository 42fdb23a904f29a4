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
    state = sft.TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
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
    assert p.components["rollout KV cache"] == pytest.approx(expected_kv)
    c.ppo.kl_coef, c.ppo.kl_loss = 0.01, True
    assert plan.ppo_plan(cfg, c, mesh).components["reference params"] == params


def test_propose_picks_smallest_fsdp_that_fits():
    c = _ppo_config()
    c.remat = "full"
    c.ppo.micro_batch_size = 32
    result = plan.propose(c, "v5p-64", model="qwen2.5-7b")
    chosen = result["proposed"]
    assert result["fits"] and chosen.fits
    smaller = dict(chosen.mesh, fsdp=chosen.mesh["fsdp"] // 2, data=chosen.mesh["data"] * 2)
    if chosen.mesh["fsdp"] > 1 and chosen.mesh["tensor"] == 1:
        assert not plan.plan_config(c, smaller, "qwen2.5-7b", 95, remat=chosen.remat).fits
    # a 7B CPE run cannot fit on one v5e chip
    assert not plan.propose(c, "v5e-1", model="qwen2.5-7b")["fits"]


def test_plan_cli_json(capsys):
    from cpe_jax.cli import main

    assert main(["plan", "--config=configs/cpe_qwen2_5_7b.py", "--tpu=v5p-64", "--model=qwen2.5-7b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chips"] == 32 and out["configured"]["mesh"] == {"data": 4, "fsdp": 8, "tensor": 1}
    assert set(out["proposed"]) >= {"mesh", "remat", "per_chip_gib", "peak_gib", "fits"}
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config=configs/cpe_qwen2_5_7b.py", "--tpu=v9-8", "--model=qwen2.5-7b"])
    assert exit_info.value.code == 2
