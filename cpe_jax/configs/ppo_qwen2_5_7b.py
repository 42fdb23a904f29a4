"""Plain PPO (no edits) on Qwen2.5-7B-Instruct, the baseline of the ablation table.

    cpe-jax train --config=configs/ppo_qwen2_5_7b.py --workdir=gs://BUCKET/ppo7b \
        --config.policy=gs://BUCKET/qwen2.5-7b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.rl.trainer import default_config


def get_config():
    c = default_config()  # 128 prompts x 4 rollouts, mini-batch 64, lr 1e-6 / 1e-5, GAE 1/1, no KL
    c.total_steps = 200
    c.save_every = 10
    c.edit.strategy = "none"
    c.edit.ratio = 0.5
    c.rollout.max_prompt_length = 2048
    c.rollout.max_response_length = 2048
    c.ppo.micro_batch_size = 16
    c.mesh = {"data": -1, "fsdp": 8, "tensor": 1}
    return c
