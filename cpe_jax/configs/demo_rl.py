"""RL stage of `cpe-jax demo`: PPO / CPE on PersonaWorld prompts with a distilled flax GRM.

    cpe-jax train --config=configs/demo_rl.py --workdir=DIR --config.policy=SFT --config.grm.path=GRM
"""

from cpe_jax.rl.trainer import default_config


def get_config():
    c = default_config()
    c.total_steps = 30
    c.save_every = 10
    c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    c.data.source = "persona_world"
    c.grm.type = "flax"
    c.grm.mode = "expected"  # a tiny GRM's scores never fail to parse this way
    c.grm.max_tokens = 96
    c.rollout.max_prompt_length = 96
    c.rollout.max_response_length = 64
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.edit.strategy = "random"
    c.edit.ratio = 0.5
    c.edit.max_prompt_length = 448
    c.ppo.prompts_per_step = 16
    c.ppo.rollouts_per_prompt = 4
    c.ppo.mini_batch_size = 8
    c.ppo.actor_lr = 1e-3
    c.ppo.critic_lr = 1e-3
    return c
