"""SFT of the policy or GRM distillation (mode `lm`); defaults for a small CPU run.

    cpe-jax sft --config=configs/sft.py --workdir=/tmp/sft --config.model=DIR --config.data.path=train.jsonl
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = "lm"  # "lm": next-token loss on assistant tokens; "bt": Bradley-Terry reward model
    c.model = ""  # Hugging Face directory or cpe_jax checkpoint to start from
    c.tokenizer = ""  # directory with the tokenizer files; "" = the model directory
    c.remat = ""  # rematerialization: none | full | dots | dots_no_batch ("" = as loaded)
    c.dtype = ""  # compute dtype; "" = bfloat16 on TPU/GPU and on CPUs with AMX, float32 elsewhere
    c.attention = ""  # auto | xla | cpu_blocked | splash | flash | cudnn ("" = auto: by backend)
    c.scan_layers = None  # decoder layers as one scanned stack; None = on for TPU/GPU, off on CPU
    c.seed = 0  # data order: a permutation per epoch seeded by (seed, epoch)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # device mesh; -1 = the rest

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # JSONL: {"messages": [...]} or {"prompt": str | messages, "response": str}
    c.data.language = "en"  # prompt language for PersonaFeedback directories (bt mode)

    c.batch_size = 8  # rows per optimizer step (global, over all hosts and devices)
    c.micro_batch_size = 0  # rows per gradient-accumulation chunk; 0 = the whole batch at once
    c.max_length = 512  # longer rows are truncated (counted in the log and metrics)
    c.bucket_size = 64  # batches are padded to a multiple of this, so few shapes compile
    c.epochs = 1  # passes over the data when total_steps is 0
    c.total_steps = 0  # optimizer steps; 0 = epochs * (rows // batch_size)

    c.lr = 1e-5  # peak learning rate of AdamW
    c.warmup_steps = 0  # linear warmup from 0 to lr, then cosine decay
    c.min_lr_ratio = 0.0  # the cosine decays to lr * min_lr_ratio at total_steps
    c.weight_decay = 0.01  # AdamW decoupled weight decay
    c.grad_clip = 1.0  # global gradient-norm clip; 0 = off

    c.save_every = 100  # checkpoint every this many steps (and at the end, and on SIGTERM)
    c.keep_checkpoints = 3  # how many training checkpoints to keep
    c.progress = True  # progress bar on a terminal, log lines elsewhere
    return c
