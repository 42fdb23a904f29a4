"""DPO baseline for Qwen2.5-7B-Instruct on PersonaFeedback-style pairs (the paper's DPO row).

    cpe-jax dpo --config=configs/dpo_qwen2_5_7b.py --workdir=gs://BUCKET/dpo7b \
        --config.model=/path/to/Qwen2.5-7B-Instruct --config.data.path=/path/to/PersonaFeedback

Settings follow the common DPO recipe (beta 0.1, lr 5e-7, cosine with 10% warmup, one epoch, global
batch 64) with the paper's 2048-token prompt and response budget. Weights are sharded over
`fsdp`; micro-batches of 8 pairs (16 sequences of 4096 tokens) bound activation memory.
"""

from cpe_jax.configs import dpo


def dpo_config():
    return dpo.get_config()


def get_config():
    c = dpo_config()  # every field is documented in configs/dpo.py and configs/sft.py
    c.dtype = "bfloat16"
    c.mesh.data = 1
    c.mesh.fsdp = -1  # shard parameters and optimizer state over all devices
    c.mesh.tensor = 1
    c.beta = 0.1
    c.loss_type = "sigmoid"
    c.label_smoothing = 0.0
    c.batch_size = 64
    c.micro_batch_size = 8
    c.max_length = 4096  # 2048 prompt + 2048 response
    c.bucket_size = 512
    c.epochs = 1
    c.lr = 5e-7
    c.warmup_steps = 12  # ~10% of one epoch of 8298 pairs at batch 64
    c.min_lr_ratio = 0.0
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.save_every = 50
    return c
