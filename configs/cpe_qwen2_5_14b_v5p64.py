"""Critique-Post-Edit on Qwen2.5-14B-Instruct on a v5p-64 slice (32 chips), paper defaults.

    tpu_scripts/launch.sh --config=configs/cpe_qwen2_5_14b_v5p64.py --workdir=gs://BUCKET/cpe14b -- \
        --config.policy=gs://BUCKET/qwen2.5-14b-sft --config.data.path=prompts.jsonl \
        --config.grm.base_url=http://GRM_HOST:8000/v1 --config.grm.model_name=grm-14b
"""

from cpe_jax.config import sibling_config

# Mesh and remat from the planner (`cpe-jax plan`: the smallest fsdp that fits, tensor parallelism
# only when needed, the least recomputation that fits; bf16 compute, f32 params and AdamW moments):
#   cpe-jax plan --config=configs/cpe_qwen2_5_14b_v5p64.py --tpu=v5p-64
#   mesh {'data': 2, 'fsdp': 4, 'tensor': 4}  remat=dots_no_batch
#     policy params                                     3.44 GiB
#     policy optimizer (AdamW mu+nu, param dtype)       6.88 GiB
#     critic params                                     3.44 GiB
#     critic optimizer (AdamW mu+nu, param dtype)       6.88 GiB
#     reference params                                  0.00 GiB
#     gradients (policy + critic)                      13.76 GiB
#     activations (policy + critic)                    19.34 GiB
#     logits (f32)                                      1.74 GiB
#     rollout KV cache                                 18.00 GiB
#     resident                                         20.65 GiB
#     peak                                             55.49 GiB
#     fits in 80.8 GiB usable of 95 GiB HBM per chip


def get_config():
    c = sibling_config(__file__, "cpe_qwen2_5_14b.py")
    c.model_preset = "qwen2.5-14b"  # the architecture `cpe-jax plan` assumes before the checkpoint exists
    c.remat = "dots_no_batch"  # Qwen2Config.remat of the policy and critic
    c.ppo.micro_batch_size = 8
    c.mesh = {"data": 2, "fsdp": 4, "tensor": 4}
    return c
