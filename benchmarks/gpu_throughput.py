"""The accelerator path on one GPU: cuDNN attention parity, the training step and the sampler of a
Qwen2.5-0.5B-shaped random model in bfloat16, next to transformers/PyTorch on the same GPU.

- parity: logits of `attention="auto"` (cuDNN) against `attention="xla"`, the same model and batch
  (ragged, both padding sides), bfloat16 compute; and against transformers' float32 logits.
- train: `cpe_jax.sft.train_step` (forward + backward + AdamW, bfloat16 compute, float32 params),
  batch x length tokens, against transformers + torch.optim.AdamW under bfloat16 autocast.
- sampler: `cpe_jax.sampling.Sampler`, greedy, `ignore_eos`, against transformers' `generate`
  in bfloat16.

    python benchmarks/gpu_throughput.py [--batch 8] [--length 1024] [--repeats 3]

Prints one JSON object per line. MFU = model FLOPs per step over the GPU's measured bfloat16
matmul peak.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from machine import matmul_peak  # noqa: E402  (benchmarks/machine.py)

LR, WEIGHT_DECAY = 1e-5, 0.01


def _hf_model(path):
    """A random transformers Qwen2.5-0.5B-shaped model (float32) saved to `path`."""
    import torch
    import transformers

    from cpe_jax.models.qwen2.model import Qwen2Config

    cfg = Qwen2Config.qwen2_5_0_5b(max_position_embeddings=4096).to_hf_dict()
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg, attn_implementation="sdpa"))
    hf.save_pretrained(path)
    return hf


def _seconds(fn, repeats):
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parity(path, hf):
    import torch

    import cpe_jax
    from cpe_jax.models.qwen2.model import positions_from_mask

    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 1000, (3, 256)).astype(np.int32)
    mask = np.zeros_like(tokens, bool)
    mask[0, 40:], mask[1, :200], mask[2, :] = True, True, True
    logits = {}
    for attention in ("auto", "xla"):
        model = cpe_jax.load_model(path, dtype="bfloat16", param_dtype="float32", attention=attention)
        fn = jax.jit(lambda t, m: model(t, positions_from_mask(m), None, m)[0])
        logits[attention] = np.asarray(fn(jnp.asarray(tokens), jnp.asarray(mask)))
    with torch.no_grad():
        ref = hf.cuda()(torch.tensor(tokens, dtype=torch.long).cuda(),
                        attention_mask=torch.tensor(mask.astype(np.int64)).cuda()).logits.float().cpu().numpy()
    hf.cpu()
    scale = float(np.abs(ref[mask]).max())
    fused_vs_xla = float(np.abs(logits["auto"] - logits["xla"])[mask].max())
    vs_torch = float(np.abs(logits["auto"] - ref)[mask].max())
    from cpe_jax.models.qwen2.attention import resolve_attention

    return {"check": "parity", "attention": resolve_attention("auto"), "logit_scale": round(scale, 3),
            "max_diff_fused_vs_xla_bf16": round(fused_vs_xla, 4), "max_diff_vs_torch_fp32": round(vs_torch, 4),
            "passed": fused_vs_xla <= 0.05 * scale and vs_torch <= 0.1 * scale}


def train(path, hf, batch, length, repeats, peak):
    import optax
    import torch
    from flax import nnx

    import cpe_jax
    from cpe_jax.sft import train_step
    from cpe_jax.train.state import TrainState

    model = cpe_jax.load_model(path, dtype="bfloat16", param_dtype="float32")
    graphdef, params = nnx.split(model)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
    step = jax.jit(lambda s, b: train_step(graphdef, tx, optax.constant_schedule(LR), "lm", 1, s, b),
                   donate_argnums=(0,))
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (batch, length)).astype(np.int32)
    data = {"tokens": jnp.asarray(tokens), "mask": jnp.ones((batch, length), bool),
            "targets": jnp.ones((batch, length), bool)}
    holder = [state]

    def ours():
        holder[0], metrics = step(holder[0], data)
        float(metrics["loss"])

    hf = hf.cuda().train()
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    ids = torch.tensor(tokens, dtype=torch.long).cuda()

    def theirs():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        loss.item()

    ours_s, theirs_s = _seconds(ours, repeats), _seconds(theirs, repeats)
    hf.cpu()
    torch.cuda.empty_cache()
    c = model.config
    matmul_params = c.num_parameters - c.vocab_size * c.hidden_size * (0 if c.tie_word_embeddings else 1)
    flops = 6 * matmul_params * batch * length + 6 * c.num_hidden_layers * batch * length**2 * c.num_attention_heads * c.head_dim
    return {"check": "train_step", "batch": batch, "length": length, "dtype": "bfloat16",
            "ours_tokens_per_s": round(batch * length / ours_s, 1),
            "torch_tokens_per_s": round(batch * length / theirs_s, 1),
            "speedup_vs_torch": round(theirs_s / ours_s, 2),
            "ours_mfu": round(flops / ours_s / peak, 3), "torch_mfu": round(flops / theirs_s / peak, 3)}


def sampler(path, hf, rows, prompt, new, repeats):
    import torch

    import cpe_jax
    from cpe_jax.sampling import Sampler, SamplingParams

    prompts = [list(map(int, r)) for r in np.random.default_rng(2).integers(3, 1000, (rows, prompt))]
    ours_sampler = Sampler(cpe_jax.load_model(path, dtype="bfloat16", param_dtype="float32"))
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    hf = hf.to(torch.bfloat16).cuda().eval()
    ids = torch.tensor(prompts, dtype=torch.long).cuda()

    def theirs():
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()

    ours_s = _seconds(lambda: ours_sampler.generate(prompts, params), repeats)
    theirs_s = _seconds(theirs, repeats)
    return {"check": "sampler", "batch": rows, "prompt": prompt, "new_tokens": new, "dtype": "bfloat16",
            "ours_tokens_per_s": round(rows * new / ours_s, 1), "torch_tokens_per_s": round(rows * new / theirs_s, 1),
            "speedup_vs_torch": round(theirs_s / ours_s, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--sampler-batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    peak = matmul_peak(n=8192, dtype="bfloat16")
    print(json.dumps({"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
                      "bf16_matmul_peak_TFLOPs": round(peak / 1e12, 1)}), flush=True)
    with tempfile.TemporaryDirectory() as path:
        hf = _hf_model(path)
        print(json.dumps(parity(path, hf)), flush=True)
        print(json.dumps(train(path, hf, args.batch, args.length, args.repeats, peak)), flush=True)
        print(json.dumps(sampler(path, hf, args.sampler_batch, args.prompt, args.new_tokens, args.repeats)),
              flush=True)


if __name__ == "__main__":
    main()
