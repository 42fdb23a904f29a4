"""Bradley-Terry reward model on preference pairs; defaults for a small CPU run.

    cpe-jax sft --config=configs/bt.py --workdir=/tmp/bt --config.model=DIR --config.data.path=PAIRS

`data.path` is a JSONL file of {"messages" | "prompt", "chosen", "rejected"} rows or a
PersonaFeedback directory (either layout). The result in DIR/final loads with
`cpe_jax.reward.bt.BTRewardModel.load`.
"""

from cpe_jax.configs import sft



def get_config():
    c = sft.get_config()  # every field is documented in configs/sft.py
    c.mode = "bt"  # Bradley-Terry loss: -log sigmoid(score(chosen) - score(rejected))
    c.max_length = 1024  # chosen/rejected longer than this lose their beginning (the score is read at the end)
    c.lr = 5e-6  # peak learning rate (the head starts at zero, the backbone from the policy)
    return c
