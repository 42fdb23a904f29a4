"""Critique-Post-Edit on Qwen2.5-14B-Instruct on a v5litepod-256 slice (256 chips), paper defaults.

    tpu_scripts/launch.sh --config=configs/cpe_qwen2_5_14b_v5e256.py --workdir=gs://BUCKET/cpe14b -- \
        --config.policy=gs://BUCKET/qwen2.5-14b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.configs import cpe_qwen2_5_14b

# Mesh and remat sized by the planner for the train step (`cpe-jax plan`: the smallest fsdp, tensor
# parallelism only when needed, the least recomputation; bf16 compute, f32 params and AdamW moments).
# The train step fits; the edit rollout's prefill does not: the sampler prefills all rollout rows at
# once, with float32 attention scores over the whole cache. The plan's phases:
#   cpe-jax plan --config=configs/cpe_qwen2_5_14b_v5e256.py --tpu=v5litepod-256
#   mesh {'data': 2, 'fsdp': 16, 'tensor': 8}  remat=full
#     old log-probs + values pass: layers     1.17 GiB
#     old log-probs + values pass: head       0.44 GiB
#     pi_e recompute: layers                  1.00 GiB
#     pi_e recompute: head                    0.58 GiB
#     PPO update                              8.22 GiB
#     rollout                                 9.82 GiB
#     edit rollout                           23.89 GiB  <- peak
#     resident                                2.59 GiB
#     train step peak                        10.81 GiB
#     peak                                   26.48 GiB
#     does NOT fit in 13.6 GiB usable of 16 GiB HBM per chip


def get_config():
    c = cpe_qwen2_5_14b.get_config()
    c.model_preset = "qwen2.5-14b"  # the architecture `cpe-jax plan` assumes before the checkpoint exists
    c.remat = "full"  # Qwen2Config.remat of the policy and critic
    c.ppo.micro_batch_size = 32
    c.mesh = {"data": 2, "fsdp": 16, "tensor": 8}
    return c
