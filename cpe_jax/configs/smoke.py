"""Seconds-per-step CPU config for tests: a tiny policy, PersonaWorld prompts, the Python teacher as GRM.

    cpe-jax train --config=configs/smoke.py --workdir=/tmp/smoke --config.policy=PATH
"""

from cpe_jax.rl.trainer import default_config


def get_config():
    c = default_config()
    c.total_steps = 6
    c.save_every = 2
    c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    c.data.source = "persona_world"
    c.grm.type = "python"
    c.grm.judge_fn = "cpe_jax.data.persona_world:grm_teacher"
    c.rollout.max_prompt_length = 96
    c.rollout.max_response_length = 24
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.edit.max_prompt_length = 320
    c.ppo.prompts_per_step = 4
    c.ppo.rollouts_per_prompt = 2
    c.ppo.mini_batch_size = 2
    c.ppo.actor_lr = 1e-3
    c.ppo.critic_lr = 1e-3
    return c
