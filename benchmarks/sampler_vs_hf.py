"""Throughput of `cpe_jax.sampling.Sampler` against transformers' `generate` on one CPU.

A random 26M-parameter Qwen2 (vocab 4096, hidden 512, 8 layers, 8 heads, 2 kv heads,
intermediate 1376), float32, greedy, 64-token prompts, 128 new tokens, EOS ignored, batch 8 and 64.
Both run on the same weights in the same process, alternating (`machine.alternate`: each timed
run follows an untimed one of the same framework), median of 3 timed runs after a warm-up. Prints one JSON object per line: tokens/s of each, their ratio, and the fraction of this
machine's roofline reached (bytes of weights + KV cache read per decode step over the measured
memory bandwidth; FLOPs per step over the measured matmul peak).

For float32 it also times the run's matmuls alone (`matmul_floor`) in XLA and in PyTorch: hf
seconds over the XLA floor bounds the speedup a float32 sampler on XLA:CPU can reach here.

    python benchmarks/sampler_vs_hf.py [--batch-sizes 8 64] [--repeats 3] [--dtypes float32 bfloat16]

`bfloat16` samples with bfloat16 compute and KV cache over the same float32 weights
(transformers stays float32); its greedy tokens are compared with transformers' float32 ones.
"""

import argparse
import json
import os
import statistics
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from machine import MODEL, alternate, matmul_peak, memory_bandwidth  # noqa: E402  (benchmarks/machine.py)

PROMPT_LEN, NEW_TOKENS = 64, 128


def kv_width(cfg):
    """Width of one layer's key (or value) projection: kv heads x head dim."""
    return cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]


def step_cost(cfg, batch, num_params, itemsize):
    """Bytes read and FLOPs of one average decode step (cache half full of generated tokens), with
    weights and cache in the compute dtype."""
    context = PROMPT_LEN + NEW_TOKENS / 2
    kv = kv_width(cfg)
    cache_bytes = 2 * cfg["num_hidden_layers"] * batch * context * kv * itemsize
    weight_bytes = num_params * itemsize
    # Matmuls touch every weight except the embedding lookup; attention reads q.k and p.v.
    matmul_params = num_params - cfg["vocab_size"] * cfg["hidden_size"]
    attn_flops = 4 * cfg["num_hidden_layers"] * batch * context * cfg["hidden_size"]
    return weight_bytes + cache_bytes, 2 * batch * matmul_params + attn_flops


def matmul_floor(cfg, batch, repeats):
    """Seconds of the run's float32 matmuls alone (prefill of batch x PROMPT_LEN rows, then
    NEW_TOKENS - 1 decode steps of `batch` rows, each with the vocabulary head), for XLA and for
    PyTorch on this CPU, with the data flow of the model's dense layers but no attention, norms or
    sampling. Neither sampler can beat its floor, so hf seconds over the XLA floor bounds the
    speedup any float32 sampler on XLA:CPU can reach here."""
    import jax
    import jax.numpy as jnp
    import torch

    e, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = kv_width(cfg)
    rng = np.random.default_rng(0)
    layer_shapes = [(e, e), (e, kv), (e, kv), (e, e), (e, m), (e, m), (m, e)]
    weights = [[rng.standard_normal(shape, np.float32) * 0.02 for shape in layer_shapes]
               for _ in range(cfg["num_hidden_layers"])]
    head = rng.standard_normal((e, v), np.float32) * 0.02

    def forward(x, layers, lm_head, mean):
        for wq, wk, wv, wo, wg, wu, wd in layers:
            q, k, val = x @ wq, x @ wk, x @ wv
            x = x + (q + mean(k) + mean(val)) @ wo
            x = x + ((x @ wg) * (x @ wu)) @ wd
        return x if lm_head is None else x + mean(x @ lm_head)

    def jax_mean(y):
        return jnp.mean(y, axis=1, keepdims=True)

    @jax.jit
    def xla_run(prompt_rows, rows, layers, lm_head):
        rows = rows + 1e-9 * jnp.mean(forward(prompt_rows, layers, None, jax_mean))
        step = lambda i, r: jnp.tanh(forward(r, layers, lm_head, jax_mean))  # noqa: E731  (stays O(1))
        return jax.lax.fori_loop(0, NEW_TOKENS - 1, step, rows)

    def torch_mean(y):
        return y.mean(dim=1, keepdim=True)

    torch_layers = [[torch.from_numpy(w) for w in layer] for layer in weights]
    torch_head = torch.from_numpy(head)

    def torch_run(prompt_rows, rows):
        with torch.inference_mode():
            rows = rows + 1e-9 * forward(prompt_rows, torch_layers, None, torch_mean).mean()
            for _ in range(NEW_TOKENS - 1):
                rows = torch.tanh(forward(rows, torch_layers, torch_head, torch_mean))
        return rows

    prompt_rows, rows = np.ones((batch * PROMPT_LEN, e), np.float32), np.ones((batch, e), np.float32)
    xla_args = (jnp.asarray(prompt_rows), jnp.asarray(rows), jax.tree.map(jnp.asarray, weights),
                jnp.asarray(head))
    torch_args = (torch.from_numpy(prompt_rows), torch.from_numpy(rows))
    xla_times, torch_times = alternate(lambda: xla_run(*xla_args).block_until_ready(),
                                       lambda: torch_run(*torch_args), repeats)
    return min(xla_times), min(torch_times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()

    import torch
    import transformers

    import cpe_jax
    from cpe_jax.sampling import Sampler, SamplingParams

    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MODEL)).eval()
    num_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        samplers = {dtype: Sampler(cpe_jax.load_model(d, dtype=dtype, param_dtype="float32"),
                                   eos_token_ids=(), max_batch_size=max(args.batch_sizes),
                                   min_prompt_bucket=PROMPT_LEN)
                    for dtype in args.dtypes}
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    bandwidth = memory_bandwidth()
    peaks = {dtype: matmul_peak(dtype=dtype) for dtype in args.dtypes}
    print(json.dumps({"machine": {"memory_bandwidth_GBps": round(bandwidth / 1e9, 2),
                                  "matmul_peak_GFLOPs": {k: round(v / 1e9, 2) for k, v in peaks.items()},
                                  "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
                      "model_params": num_params}), flush=True)

    for dtype, batch in [(dtype, batch) for dtype in args.dtypes for batch in args.batch_sizes]:
        sampler = samplers[dtype]
        prompts = np.random.default_rng(batch).integers(0, MODEL["vocab_size"], (batch, PROMPT_LEN))
        ids = torch.tensor(prompts)
        attention = torch.ones_like(ids)

        def ours():
            outs = sampler.generate(prompts.tolist(), params)
            assert all(len(o.token_ids) == NEW_TOKENS for o in outs)
            return outs

        def theirs():
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=attention, do_sample=False,
                                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  pad_token_id=0)
            assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
            return out

        def remeasure():
            # The machine is shared: keep the best roofline figures seen between runs.
            nonlocal bandwidth
            bandwidth = max(bandwidth, memory_bandwidth(repeats=2))
            peaks[dtype] = max(peaks[dtype], matmul_peak(repeats=2, dtype=dtype))

        ours_out, hf_out = ours(), theirs()  # warm-up (compiles)
        ours_times, hf_times = alternate(ours, theirs, args.repeats, remeasure)
        peak = peaks[dtype]
        same = float(np.mean([o.token_ids == hf_out[i, PROMPT_LEN:].tolist()
                              for i, o in enumerate(ours_out)]))
        ours_t, hf_t = statistics.median(ours_times), statistics.median(hf_times)
        floor = matmul_floor(MODEL, batch, args.repeats) if dtype == "float32" else None
        step_bytes, step_flops = step_cost(MODEL, batch, num_params, np.dtype(dtype).itemsize)
        step_time = ours_t / NEW_TOKENS
        print(json.dumps({
            "dtype": dtype,
            "batch": batch,
            "ours_tokens_per_s": round(batch * NEW_TOKENS / ours_t, 1),
            "hf_tokens_per_s": round(batch * NEW_TOKENS / hf_t, 1),
            "speedup_vs_hf": round(hf_t / ours_t, 2),
            "ours_seconds": [round(t, 3) for t in ours_times],
            "hf_seconds": [round(t, 3) for t in hf_times],
            "ours_bandwidth_roofline_fraction": round(step_bytes / step_time / bandwidth, 3),
            "ours_flops_roofline_fraction": round(step_flops / step_time / peak, 3),
            "memory_bandwidth_GBps": round(bandwidth / 1e9, 2),
            "matmul_peak_GFLOPs": round(peak / 1e9, 2),
            "greedy_rows_identical_to_hf": same,
            **({} if floor is None else {
                "matmul_floor_seconds": {"xla": round(floor[0], 3), "torch": round(floor[1], 3)},
                "speedup_bound_at_xla_matmul_floor": round(hf_t / floor[0], 2),
            }),
        }), flush=True)


if __name__ == "__main__":
    main()
