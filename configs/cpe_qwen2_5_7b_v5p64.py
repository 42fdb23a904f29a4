"""Critique-Post-Edit on Qwen2.5-7B-Instruct on a v5p-64 slice (32 chips), paper defaults.

    tpu_scripts/launch.sh --config=configs/cpe_qwen2_5_7b_v5p64.py --workdir=gs://BUCKET/cpe7b -- \
        --config.policy=gs://BUCKET/qwen2.5-7b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.config import sibling_config

# Mesh and remat from the planner (`cpe-jax plan`: the smallest fsdp that fits, tensor parallelism
# only when needed, the least recomputation that fits; bf16 compute, f32 params and AdamW moments):
#   cpe-jax plan --config=configs/cpe_qwen2_5_7b_v5p64.py --tpu=v5p-64
#   mesh {'data': 4, 'fsdp': 4, 'tensor': 2}  remat=dots_no_batch
#     policy params                                     3.55 GiB
#     policy optimizer (AdamW mu+nu, param dtype)       7.09 GiB
#     critic params                                     3.55 GiB
#     critic optimizer (AdamW mu+nu, param dtype)       7.09 GiB
#     reference params                                  0.00 GiB
#     gradients (policy + critic)                      14.19 GiB
#     activations (policy + critic)                    19.50 GiB
#     logits (f32)                                      3.48 GiB
#     rollout KV cache                                  5.25 GiB
#     resident                                         21.28 GiB
#     peak                                             58.45 GiB
#     fits in 80.8 GiB usable of 95 GiB HBM per chip


def get_config():
    c = sibling_config(__file__, "cpe_qwen2_5_7b.py")
    c.model_preset = "qwen2.5-7b"  # the architecture `cpe-jax plan` assumes before the checkpoint exists
    c.remat = "dots_no_batch"  # Qwen2Config.remat of the policy and critic
    c.ppo.micro_batch_size = 16
    c.mesh = {"data": 4, "fsdp": 4, "tensor": 2}
    return c
