"""Critique-Post-Edit on Qwen2.5-14B-Instruct on a v5litepod-256 slice (256 chips), paper defaults.

    tpu_scripts/launch.sh --config=configs/cpe_qwen2_5_14b_v5e256.py --workdir=gs://BUCKET/cpe14b -- \
        --config.policy=gs://BUCKET/qwen2.5-14b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.config import sibling_config

# Mesh and remat from the planner (`cpe-jax plan`: the smallest fsdp that fits, tensor parallelism
# only when needed, the least recomputation that fits; bf16 compute, f32 params and AdamW moments):
#   cpe-jax plan --config=configs/cpe_qwen2_5_14b_v5e256.py --tpu=v5litepod-256
#   mesh {'data': 2, 'fsdp': 16, 'tensor': 8}  remat=full
#     policy params                                     0.43 GiB
#     policy optimizer (AdamW mu+nu, param dtype)       0.86 GiB
#     critic params                                     0.43 GiB
#     critic optimizer (AdamW mu+nu, param dtype)       0.86 GiB
#     reference params                                  0.00 GiB
#     gradients (policy + critic)                       1.73 GiB
#     activations (policy + critic)                     6.99 GiB
#     logits (f32)                                      0.87 GiB
#     rollout KV cache                                  2.25 GiB
#     resident                                          2.59 GiB
#     peak                                             12.18 GiB
#     fits in 13.6 GiB usable of 16 GiB HBM per chip


def get_config():
    c = sibling_config(__file__, "cpe_qwen2_5_14b.py")
    c.model_preset = "qwen2.5-14b"  # the architecture `cpe-jax plan` assumes before the checkpoint exists
    c.remat = "full"  # Qwen2Config.remat of the policy and critic
    c.ppo.micro_batch_size = 32
    c.mesh = {"data": 2, "fsdp": 16, "tensor": 8}
    return c
