"""Bradley-Terry reward model on preference pairs; defaults for a small CPU run.

    cpe-jax sft --config=configs/bt.py --workdir=/tmp/bt --config.model=DIR --config.data.path=PAIRS

`data.path` is a JSONL file of {"messages" | "prompt", "chosen", "rejected"} rows or a
PersonaFeedback directory (either layout). The result in DIR/final loads with
`cpe_jax.reward.bt.BTRewardModel.load`.
"""

import importlib.util
import os


def sft_config():
    """configs/sft.py's get_config(), read from beside this file (config files are loaded by path)."""
    spec = importlib.util.spec_from_file_location("_sft_config", os.path.join(os.path.dirname(__file__), "sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = sft_config()  # every field is documented in configs/sft.py
    c.mode = "bt"  # Bradley-Terry loss: -log sigmoid(score(chosen) - score(rejected))
    c.max_length = 1024  # chosen/rejected longer than this lose their beginning (the score is read at the end)
    c.lr = 5e-6  # peak learning rate (the head starts at zero, the backbone from the policy)
    return c
