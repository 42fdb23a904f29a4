"""Critique-Post-Edit on Qwen2.5-14B-Instruct on a v4-128 slice (64 chips), paper defaults.

    tpu_scripts/launch.sh --config=configs/cpe_qwen2_5_14b_v4_128.py --workdir=gs://BUCKET/cpe14b -- \
        --config.policy=gs://BUCKET/qwen2.5-14b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.configs import cpe_qwen2_5_14b

# Mesh and remat sized by the planner for the train step (`cpe-jax plan`: the smallest fsdp, tensor
# parallelism only when needed, the least recomputation; bf16 compute, f32 params and AdamW moments).
# The train step fits; the edit rollout's prefill does not: the sampler prefills all rollout rows at
# once, with float32 attention scores over the whole cache. The plan's phases:
#   cpe-jax plan --config=configs/cpe_qwen2_5_14b_v4_128.py --tpu=v4-128
#   mesh {'data': 1, 'fsdp': 8, 'tensor': 8}  remat=dots_no_batch
#     old log-probs + values pass: layers     1.17 GiB
#     old log-probs + values pass: head       0.44 GiB
#     pi_e recompute: layers                  1.00 GiB
#     pi_e recompute: head                    0.58 GiB
#     PPO update                             16.88 GiB
#     rollout                                39.28 GiB
#     edit rollout                           95.56 GiB  <- peak
#     resident                                5.17 GiB
#     train step peak                        22.05 GiB
#     peak                                  100.73 GiB
#     does NOT fit in 27.2 GiB usable of 32 GiB HBM per chip


def get_config():
    c = cpe_qwen2_5_14b.get_config()
    c.model_preset = "qwen2.5-14b"  # the architecture `cpe-jax plan` assumes before the checkpoint exists
    c.remat = "dots_no_batch"  # Qwen2Config.remat of the policy and critic
    c.ppo.micro_batch_size = 8
    c.mesh = {"data": 1, "fsdp": 8, "tensor": 8}
    return c
