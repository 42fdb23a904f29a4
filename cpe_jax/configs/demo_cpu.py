"""`cpe-jax demo`: the paper's pipeline in miniature on PersonaWorld, sized for a 2-core CPU (~10 min).

    cpe-jax demo --out demo_out [--seed N] [--config configs/demo_cpu.py]

Every stage calls a real `cpe-jax` command; the blocks below are passed to it as `--config.*` flags
(`sft`, `grm.sft`, `rl`) or as its flags (`eval`).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()

    # PersonaWorld and its locally trained BPE tokenizer.
    c.world = ml_collections.ConfigDict()
    c.world.vocab_size = 2048
    c.world.tokenizer_responses = 1000
    c.world.sft_rows = 2400  # noisy demonstrations (the SFT policy starts mediocre)
    c.world.sft_p_good = 0.5  # chance each aspect of a demonstration is right
    c.world.edit_rows = 800  # post-edit demonstrations: revise a reply from a critique
    c.world.edit_p_fix = 0.8  # chance each criticised flaw is fixed in the (minimal) revision
    c.world.damaged_fraction = 0.3  # label inputs and edited originals broken the ways RL policies break
    c.world.label_rows = 16000  # responses the teacher judges for GRM distillation
    c.world.grm_eval_pairs = 200  # held-out pairs for the GRM's agreement with the teacher
    c.world.grm_aspect_pairs = 30  # per aspect: best response vs the same with one flaw
    c.world.eval_examples = 400  # held-out (persona, question) pairs for the win rates

    # Tiny Qwen2 shapes for the policy and the GRM; head_dim (hidden_size / num_attention_heads)
    # is at least 32 so that vLLM's CPU backend can serve every exported model.
    c.policy_model = ml_collections.ConfigDict(dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, initializer_range=0.02))
    c.grm_model = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.02))

    # `cpe-jax sft --config=configs/sft.py` overrides.
    c.sft = ml_collections.ConfigDict(dict(
        batch_size=32, epochs=4, lr=5e-3, warmup_steps=10, max_length=320, bucket_size=32,
        save_every=100, mesh=ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})))
    c.grm = ml_collections.ConfigDict()
    # 1200 steps: the persona-conditional judgements (tone, preferred length) are learnt only after
    # ~600 (per-aspect accuracy in results.json["grm"]["by_aspect"]). dtype "": bfloat16 where the CPU
    # has AMX (several times faster there), float32 elsewhere (bfloat16 is slower without AMX).
    c.grm.sft = ml_collections.ConfigDict(dict(
        batch_size=32, total_steps=1200, lr=6e-3, warmup_steps=10, max_length=256, bucket_size=32,
        save_every=100, dtype="", mesh=ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})))
    c.grm.max_tokens = 40  # the critique the GRM writes before its forced score lines
    c.grm.critique_style = "short"  # terse teacher critiques ("not vegan: grilled steak; too formal"): cheap to learn
    c.grm.prompt_style = "compact"  # $CPE_JAX_GRM_PROMPT for every stage: a short rubric for a tiny GRM

    # `cpe-jax train --config=configs/demo_rl.py` overrides; PPO and CPE differ only in edit.strategy.
    c.rl = ml_collections.ConfigDict()
    c.rl.total_steps = 20
    c.rl.save_every = 10
    c.rl.ppo = ml_collections.ConfigDict(dict(
        prompts_per_step=16, rollouts_per_prompt=4, mini_batch_size=8, actor_lr=2e-4, critic_lr=1e-3))
    # A k3 KL penalty in the loss holds the policy near SFT on what the tiny GRM cannot judge
    # (interests and expertise stay near chance in results.json["grm"]["by_aspect"]); without it
    # the policy drifts to one interest for every user.
    c.rl.ppo.kl_coef = 0.1
    c.rl.ppo.kl_loss = True
    c.rl.rollout = ml_collections.ConfigDict(dict(max_prompt_length=96, max_response_length=56))
    # Edits sampled at 0.5: the SFT policy's revisions then gain 1.2 teacher reward over its own
    # temperature-1 answers, against 0.3 when sampled at 1.0.
    c.rl.edit = ml_collections.ConfigDict(dict(ratio=0.5, max_prompt_length=256, temperature=0.5))

    # `cpe-jax eval`: responses on held-out personas, judged by the pairwise teacher. Seeded sampling
    # at 0.7 for the SFT baseline and every policy alike: greedy decoding of a 64-wide policy falls
    # into repetition loops that RL, which samples at 1.0, rarely sees, and the judge would score
    # mostly those loops.
    c.eval = ml_collections.ConfigDict(dict(max_tokens=56, batch_size=64, temperature=0.7))
    # `cpe-jax demo --bt` (or run_bt = True): also PPO rewarded by a Bradley-Terry RM trained on teacher
    # preference pairs in which the preferred response is mostly the longer one.
    c.run_bt = False
    c.bt = ml_collections.ConfigDict(dict(pairs=3000, longer_chosen=0.9))
    # float32: XLA:CPU has no kernel for one bfloat16 attention-gradient matmul of the BT loss
    # (read at the last token only), and a BT RM picks up length within 200 steps.
    c.bt.sft = ml_collections.ConfigDict(dict(
        batch_size=32, total_steps=200, lr=2e-3, warmup_steps=10, max_length=256, bucket_size=32,
        save_every=100, dtype="float32"))
    return c
