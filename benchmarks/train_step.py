"""Training-step throughput of `cpe_jax.sft.train_step` against PyTorch eager on one CPU.

Forward + backward + AdamW on a random 26M-parameter Qwen2 (vocab 4096, hidden 512, 8 layers,
8 heads, 2 kv heads, intermediate 1376), batch 8 x 512 tokens, next-token cross-entropy.
Ours: the product's SFT step (`cpe_jax.sft.train_step`, jitted with the state donated, optax
AdamW). Theirs: transformers' `Qwen2ForCausalLM` + `torch.optim.AdamW`, eager. Both start from the
same weights in the same process and run alternately (`machine.alternate`: each timed step
follows an untimed one of the same framework); median of N timed steps after warm-up.
Prints one JSON object per line: tokens/s of each, their ratio, and MFU (model FLOPs per step over
the measured matmul peak of the compute dtype; 6 * matmul params * tokens + attention).

    python benchmarks/train_step.py [--repeats 3] [--dtypes float32 bfloat16]

`bfloat16` runs our step with bfloat16 compute over float32 parameters; it is timed against
PyTorch in float32 (the ratio) and under `torch.autocast("cpu", torch.bfloat16)` (reported too).
"""

import argparse
import json
import os
import statistics
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from machine import MODEL, alternate, matmul_peak  # noqa: E402  (benchmarks/machine.py)

BATCH, LENGTH = 8, 512
LR, WEIGHT_DECAY = 1e-4, 0.01


def step_flops(cfg, num_params):
    """Model FLOPs of one training step: 6 per matmul weight per token plus causal attention."""
    tokens = BATCH * LENGTH
    matmul_params = num_params - cfg["vocab_size"] * cfg["hidden_size"]  # the embedding is a lookup
    attention = 6 * cfg["num_hidden_layers"] * BATCH * LENGTH * LENGTH * cfg["hidden_size"]  # causal half
    return 6 * matmul_params * tokens + attention


def make_ours(model_dir, dtype):
    """(step(), loss of the last step) running the product's jitted, donated SFT step."""
    import optax
    from flax import nnx

    import cpe_jax
    from cpe_jax.sft import train_step
    from cpe_jax.train.state import TrainState

    model = cpe_jax.load_model(model_dir, dtype=dtype, param_dtype="float32")
    graphdef, params = nnx.split(model)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    schedule = optax.constant_schedule(LR)
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
    fn = jax.jit(lambda s, b: train_step(graphdef, tx, schedule, "lm", 1, s, b), donate_argnums=(0,))
    return fn, state


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()

    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MODEL, attn_implementation="sdpa"))
    hf.train()
    num_params = sum(p.numel() for p in hf.parameters())
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, MODEL["vocab_size"], (BATCH, LENGTH)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "mask": jnp.ones((BATCH, LENGTH), bool),
             "targets": jnp.ones((BATCH, LENGTH), bool)}
    ids = torch.tensor(tokens, dtype=torch.long)

    def theirs(autocast=False):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.item()

    peaks = {"float32": [matmul_peak()]}
    flops = step_flops(MODEL, num_params)

    print(json.dumps({"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
                      "model_params": num_params}), flush=True)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        steps = {dtype: make_ours(d, dtype) for dtype in args.dtypes}

    for dtype, (fn, state) in steps.items():
        def ours():
            nonlocal state
            state, metrics = fn(state, batch)
            return float(metrics["loss"])  # blocks until the step is done

        low_precision = dtype != "float32"
        ours_first, hf_first = ours(), theirs()  # warm-up (compiles)
        peaks.setdefault(dtype, [matmul_peak(dtype=dtype)])

        def remeasure():
            for d in {"float32", dtype}:
                peaks[d].append(matmul_peak(dtype=d))

        ours_times, hf_times = alternate(ours, theirs, args.repeats, remeasure)
        if low_precision:
            _, hf_autocast_times = alternate(ours, lambda: theirs(True), args.repeats)
        peak, peak_f32 = max(peaks[dtype]), max(peaks["float32"])
        ours_t, hf_t = statistics.median(ours_times), statistics.median(hf_times)
        print(json.dumps({
            "dtype": dtype,
            "batch": BATCH, "length": LENGTH,
            "ours_tokens_per_s": round(BATCH * LENGTH / ours_t, 1),
            "torch_tokens_per_s": round(BATCH * LENGTH / hf_t, 1),
            "speedup_vs_torch": round(hf_t / ours_t, 2),
            "ours_seconds": [round(t, 3) for t in ours_times],
            "torch_seconds": [round(t, 3) for t in hf_times],
            "step_GFLOPs": round(flops / 1e9, 2),
            "ours_mfu": round(flops / ours_t / peak, 3),
            "torch_mfu": round(flops / hf_t / peak_f32, 3),
            "matmul_peak_GFLOPs": {d: round(max(p) / 1e9, 2) for d, p in peaks.items()},
            # Equal on the first dtype's first step (same weights); later ones follow their own runs.
            "warmup_loss": {"ours": round(ours_first, 4), "torch": round(hf_first, 4)},
            **({"torch_autocast_bf16_tokens_per_s": round(BATCH * LENGTH / statistics.median(hf_autocast_times), 1),
                "speedup_vs_torch_autocast_bf16": round(statistics.median(hf_autocast_times) / ours_t, 2)}
               if low_precision else {}),
        }), flush=True)


if __name__ == "__main__":
    main()
