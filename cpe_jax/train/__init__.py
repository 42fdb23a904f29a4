"""The training core every trainer runs on (SFT, BT, DPO, MiCoTA's student, PPO/CPE).

- `optim`: the optimizer and its learning-rate schedule, with the state sharded like the params.
- `state`: the train-state pytrees, their shardings and abstract (restore) shapes.
- `batching`: the one micro-batch splitter of gradient accumulation.
- `loop`: steps, checkpoints and resume, SIGTERM, non-finite stops, metrics and progress.

A trainer supplies its data and its jitted step function; everything else lives here.
"""
