"""Critique-Post-Edit on Qwen2.5-14B-Instruct on a v5p-64 slice (32 chips), paper defaults.

    tpu_scripts/launch.sh --config=configs/cpe_qwen2_5_14b_v5p64.py --workdir=gs://BUCKET/cpe14b -- \
        --config.policy=gs://BUCKET/qwen2.5-14b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.configs import cpe_qwen2_5_14b

# Mesh and remat sized by the planner for the train step (`cpe-jax plan`: the smallest fsdp, tensor
# parallelism only when needed, the least recomputation; bf16 compute, f32 params and AdamW moments).
# The train step fits; the edit rollout's prefill does not: the sampler prefills all rollout rows at
# once, with float32 attention scores over the whole cache. The plan's phases:
#   cpe-jax plan --config=configs/cpe_qwen2_5_14b_v5p64.py --tpu=v5p-64
#   mesh {'data': 2, 'fsdp': 4, 'tensor': 4}  remat=dots_no_batch
#     old log-probs + values pass: layers     1.72 GiB
#     old log-probs + values pass: head       0.87 GiB
#     pi_e recompute: layers                  1.52 GiB
#     pi_e recompute: head                    1.16 GiB
#     PPO update                             31.80 GiB
#     rollout                                68.56 GiB
#     edit rollout                          171.13 GiB  <- peak
#     resident                               20.65 GiB
#     train step peak                        52.44 GiB
#     peak                                  191.77 GiB
#     does NOT fit in 80.8 GiB usable of 95 GiB HBM per chip


def get_config():
    c = cpe_qwen2_5_14b.get_config()
    c.model_preset = "qwen2.5-14b"  # the architecture `cpe-jax plan` assumes before the checkpoint exists
    c.remat = "dots_no_batch"  # Qwen2Config.remat of the policy and critic
    c.ppo.micro_batch_size = 8
    c.mesh = {"data": 2, "fsdp": 4, "tensor": 4}
    return c
