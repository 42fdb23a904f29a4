"""DPO / IPO on preference pairs; defaults for a small CPU run.

    cpe-jax dpo --config=configs/dpo.py --workdir=/tmp/dpo --config.model=DIR --config.data.path=PAIRS

`data.path` is a JSONL file of {"messages" | "prompt", "chosen", "rejected"} rows or a
PersonaFeedback directory (either layout). The trained policy is written to DIR/final.
"""

from cpe_jax.configs import sft



def get_config():
    c = sft.get_config()  # every shared field is documented in configs/sft.py
    c.mode = "dpo"
    c.ref_model = ""  # frozen reference policy; "" = the starting model (config.model)
    c.loss_type = "sigmoid"  # "sigmoid": DPO; "ipo": (h - 1/(2 beta))^2 on the log-ratio difference h
    c.beta = 0.1  # strength of the implicit KL to the reference (rewards are beta * log pi/ref)
    c.label_smoothing = 0.0  # conservative DPO: the probability that a preference label is flipped
    c.max_length = 1024  # prompt + response; longer pairs lose the end of the response
    c.lr = 1e-6  # peak learning rate
    return c
