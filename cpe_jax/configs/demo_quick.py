"""`cpe-jax demo --quick`: the same pipeline as configs/demo_cpu.py, shrunk to a few minutes on a CPU.

Numbers from a quick run show that everything runs end to end; the comparison needs the full demo.
"""

from cpe_jax.configs import demo_cpu


def get_config():
    c = demo_cpu.get_config()  # every field is documented in configs/demo_cpu.py
    c.world.vocab_size = 1024
    c.world.tokenizer_responses = 200
    c.world.sft_rows = 192
    c.world.edit_rows = 64
    c.world.label_rows = 256
    c.world.grm_eval_pairs = 16
    c.world.grm_aspect_pairs = 2  # per aspect: best response vs the same with one flaw
    c.world.eval_examples = 16
    c.sft.epochs = 1
    c.sft.total_steps = 8
    c.grm.sft.total_steps = 8
    c.bt.pairs = 64
    c.bt.sft.total_steps = 4
    c.grm.max_tokens = 16
    c.rl.total_steps = 2
    c.rl.save_every = 2
    c.rl.ppo.prompts_per_step = 4
    c.rl.ppo.rollouts_per_prompt = 2
    c.rl.ppo.mini_batch_size = 4
    c.rl.rollout.max_response_length = 32
    c.eval.max_tokens = 32
    return c
