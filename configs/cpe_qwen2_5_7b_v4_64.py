"""Critique-Post-Edit on Qwen2.5-7B-Instruct on a v4-64 slice (32 chips), paper defaults.

    tpu_scripts/launch.sh --config=configs/cpe_qwen2_5_7b_v4_64.py --workdir=gs://BUCKET/cpe7b -- \
        --config.policy=gs://BUCKET/qwen2.5-7b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.config import sibling_config

# Mesh and remat from the planner (`cpe-jax plan`: the smallest fsdp that fits, tensor parallelism
# only when needed, the least recomputation that fits; bf16 compute, f32 params and AdamW moments):
#   cpe-jax plan --config=configs/cpe_qwen2_5_7b_v4_64.py --tpu=v4-64
#   mesh {'data': 1, 'fsdp': 16, 'tensor': 2}  remat=full
#     policy params                                     0.89 GiB
#     policy optimizer (AdamW mu+nu, param dtype)       1.78 GiB
#     critic params                                     0.89 GiB
#     critic optimizer (AdamW mu+nu, param dtype)       1.78 GiB
#     reference params                                  0.00 GiB
#     gradients (policy + critic)                       3.55 GiB
#     activations (policy + critic)                     8.89 GiB
#     logits (f32)                                      3.48 GiB
#     rollout KV cache                                  5.25 GiB
#     resident                                          5.33 GiB
#     peak                                             21.25 GiB
#     fits in 27.2 GiB usable of 32 GiB HBM per chip


def get_config():
    c = sibling_config(__file__, "cpe_qwen2_5_7b.py")
    c.model_preset = "qwen2.5-7b"  # the architecture `cpe-jax plan` assumes before the checkpoint exists
    c.remat = "full"  # Qwen2Config.remat of the policy and critic
    c.ppo.micro_batch_size = 16
    c.mesh = {"data": 1, "fsdp": 16, "tensor": 2}
    return c
