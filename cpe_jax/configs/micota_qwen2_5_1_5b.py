"""MiCoTA recipe at paper scale: a Qwen2.5-7B-size teacher assistant distills chain of thought into
Qwen2.5-1.5B-Instruct.

    cpe-jax micota --config=configs/micota_qwen2_5_1_5b.py --workdir=gs://BUCKET/micota \
        --config.teacher_assistant=/path/to/TA --config.student=/path/to/Qwen2.5-1.5B-Instruct \
        --config.data.path=/path/to/problems.jsonl

The teacher assistant is an intermediate model (in the MiCoTA paper, a mid-size model merged from a
long-CoT reasoner and its base) whose chains are long enough to teach reasoning but short enough
for a small student to learn; the length band keeps the middle half of its correct answers.
`data.path` holds {"question": str, "answer": int} rows (e.g. GSM8K-style word problems).
"""

from cpe_jax.configs import micota_cpu


def get_config():
    c = micota_cpu.get_config()  # every field is documented in configs/micota_cpu.py
    c.dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 4  # a 7B teacher assistant: heads split 4 ways
    c.generate.n = 8
    c.generate.temperature = 0.7
    c.generate.top_p = 0.95
    c.generate.max_tokens = 4096
    c.generate.batch_size = 256
    c.filter.low_percentile = 25.0
    c.filter.high_percentile = 75.0
    c.filter.max_tokens = 4096
    c.filter.max_per_problem = 2

    c.sft.dtype = "bfloat16"
    c.sft.mesh.data, c.sft.mesh.fsdp, c.sft.mesh.tensor = 1, -1, 1
    c.sft.batch_size = 128
    c.sft.micro_batch_size = 16
    c.sft.max_length = 4608  # prompt + 4096-token chain of thought
    c.sft.bucket_size = 512
    c.sft.epochs = 3
    c.sft.lr = 1e-5
    c.sft.warmup_steps = 20
    c.sft.save_every = 200
    return c
