"""Critique-Post-Edit on Qwen2.5-14B-Instruct on a v4-128 slice (64 chips), paper defaults.

    tpu_scripts/launch.sh --config=configs/cpe_qwen2_5_14b_v4_128.py --workdir=gs://BUCKET/cpe14b -- \
        --config.policy=gs://BUCKET/qwen2.5-14b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.config import sibling_config

# Mesh and remat from the planner (`cpe-jax plan`: the smallest fsdp that fits, tensor parallelism
# only when needed, the least recomputation that fits; bf16 compute, f32 params and AdamW moments):
#   cpe-jax plan --config=configs/cpe_qwen2_5_14b_v4_128.py --tpu=v4-128
#   mesh {'data': 1, 'fsdp': 8, 'tensor': 8}  remat=dots_no_batch
#     policy params                                     0.86 GiB
#     policy optimizer (AdamW mu+nu, param dtype)       1.72 GiB
#     critic params                                     0.86 GiB
#     critic optimizer (AdamW mu+nu, param dtype)       1.72 GiB
#     reference params                                  0.00 GiB
#     gradients (policy + critic)                       3.45 GiB
#     activations (policy + critic)                    13.93 GiB
#     logits (f32)                                      0.87 GiB
#     rollout KV cache                                  9.00 GiB
#     resident                                          5.17 GiB
#     peak                                             23.41 GiB
#     fits in 27.2 GiB usable of 32 GiB HBM per chip


def get_config():
    c = sibling_config(__file__, "cpe_qwen2_5_14b.py")
    c.model_preset = "qwen2.5-14b"  # the architecture `cpe-jax plan` assumes before the checkpoint exists
    c.remat = "dots_no_batch"  # Qwen2Config.remat of the policy and critic
    c.ppo.micro_batch_size = 8
    c.mesh = {"data": 1, "fsdp": 8, "tensor": 8}
    return c
