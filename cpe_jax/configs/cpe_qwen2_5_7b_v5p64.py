"""Critique-Post-Edit on Qwen2.5-7B-Instruct on a v5p-64 slice (32 chips), paper defaults.

    tpu_scripts/launch.sh --config=configs/cpe_qwen2_5_7b_v5p64.py --workdir=gs://BUCKET/cpe7b -- \
        --config.policy=gs://BUCKET/qwen2.5-7b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.configs import cpe_qwen2_5_7b

# Mesh and remat sized by the planner for the train step (`cpe-jax plan`: the smallest fsdp, tensor
# parallelism only when needed, the least recomputation; bf16 compute, f32 params and AdamW moments).
# The train step fits; the edit rollout's prefill does not: the sampler prefills all rollout rows at
# once, with float32 attention scores over the whole cache. The plan's phases:
#   cpe-jax plan --config=configs/cpe_qwen2_5_7b_v5p64.py --tpu=v5p-64
#   mesh {'data': 4, 'fsdp': 4, 'tensor': 2}  remat=dots_no_batch
#     old log-probs + values pass: layers     2.39 GiB
#     old log-probs + values pass: head       1.74 GiB
#     pi_e recompute: layers                  2.12 GiB
#     pi_e recompute: head                    2.32 GiB
#     PPO update                             32.34 GiB
#     rollout                                42.94 GiB
#     edit rollout                          112.13 GiB  <- peak
#     resident                               21.28 GiB
#     train step peak                        53.62 GiB
#     peak                                  133.41 GiB
#     does NOT fit in 80.8 GiB usable of 95 GiB HBM per chip


def get_config():
    c = cpe_qwen2_5_7b.get_config()
    c.model_preset = "qwen2.5-7b"  # the architecture `cpe-jax plan` assumes before the checkpoint exists
    c.remat = "dots_no_batch"  # Qwen2Config.remat of the policy and critic
    c.ppo.micro_batch_size = 16
    c.mesh = {"data": 4, "fsdp": 4, "tensor": 2}
    return c
