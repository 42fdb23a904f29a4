"""Critique-Post-Edit on Qwen2.5-7B-Instruct on a v5litepod-64 slice (64 chips), paper defaults.

    tpu_scripts/launch.sh --config=configs/cpe_qwen2_5_7b_v5e64.py --workdir=gs://BUCKET/cpe7b -- \
        --config.policy=gs://BUCKET/qwen2.5-7b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.configs import cpe_qwen2_5_7b

# Mesh and remat sized by the planner for the train step (`cpe-jax plan`: the smallest fsdp, tensor
# parallelism only when needed, the least recomputation; bf16 compute, f32 params and AdamW moments).
# The train step fits; the edit rollout's prefill does not: the sampler prefills all rollout rows at
# once, with float32 attention scores over the whole cache. The plan's phases:
#   cpe-jax plan --config=configs/cpe_qwen2_5_7b_v5e64.py --tpu=v5litepod-64
#   mesh {'data': 1, 'fsdp': 16, 'tensor': 4}  remat=full
#     old log-probs + values pass: layers     1.41 GiB
#     old log-probs + values pass: head       0.87 GiB
#     pi_e recompute: layers                  1.22 GiB
#     pi_e recompute: head                    1.16 GiB
#     PPO update                              6.78 GiB
#     rollout                                23.22 GiB
#     edit rollout                           59.56 GiB  <- peak
#     resident                                2.66 GiB
#     train step peak                         9.44 GiB
#     peak                                   62.23 GiB
#     does NOT fit in 13.6 GiB usable of 16 GiB HBM per chip


def get_config():
    c = cpe_qwen2_5_7b.get_config()
    c.model_preset = "qwen2.5-7b"  # the architecture `cpe-jax plan` assumes before the checkpoint exists
    c.remat = "full"  # Qwen2Config.remat of the policy and critic
    c.ppo.micro_batch_size = 16
    c.mesh = {"data": 1, "fsdp": 16, "tensor": 4}
    return c
