"""MiCoTA teacher-assistant CoT distillation on the synthetic arithmetic task; tiny CPU defaults.

    cpe-jax micota --config=configs/micota_cpu.py --workdir=/tmp/micota \
        --config.teacher_assistant=TA_DIR --config.student=STUDENT_DIR

Writes DIR/generations.jsonl, DIR/sft.jsonl, DIR/filter_stats.json and the student in DIR/student/final.
"""

import ml_collections

from cpe_jax.configs import sft


def get_config():
    c = ml_collections.ConfigDict()
    c.teacher_assistant = ""  # model directory (with tokenizer) that writes the chains of thought
    c.student = ""  # model directory the student starts from
    c.dtype = ""  # compute dtype of the teacher assistant; "" = bfloat16 on TPU/GPU and AMX CPUs, else float32
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # for generation
    c.progress = True

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # JSONL {"question": str, "answer": int}; "" = the synthetic arithmetic task below
    c.data.num_problems = 64  # synthetic problems
    c.data.seed = 0
    c.data.min_steps = 2  # operations per expression
    c.data.max_steps = 3
    c.data.max_operand = 9  # operands are integers in [1, max_operand]

    c.generate = ml_collections.ConfigDict()
    c.generate.n = 4  # answers per problem
    c.generate.temperature = 0.7
    c.generate.top_p = 1.0
    c.generate.max_tokens = 96
    c.generate.seed = 0  # per-row keys are fold_in(seed, row), so results do not depend on batching
    c.generate.batch_size = 64  # rows per compiled sampler call

    c.filter = ml_collections.ConfigDict()
    c.filter.low_percentile = 25.0  # the length band, as percentiles of the correct answers' token lengths
    c.filter.high_percentile = 75.0
    c.filter.min_tokens = 0  # absolute bounds on top of the percentiles; 0 = none
    c.filter.max_tokens = 0
    c.filter.max_per_problem = 0  # keep at most this many answers per problem; 0 = all

    c.sft = sft.get_config()  # the student's `cpe-jax sft` config (model and data.path are filled in)
    c.sft.batch_size = 8
    c.sft.max_length = 256
    c.sft.epochs = 2
    c.sft.lr = 1e-4
    return c
