"""Throughput of `cpe_jax.sampling.Sampler` against transformers' `generate` on one CPU.

A random 26M-parameter Qwen2 (vocab 4096, hidden 512, 8 layers, 8 heads, 2 kv heads,
intermediate 1376), float32, greedy, 64-token prompts, 128 new tokens, EOS ignored, batch 8 and 64.
Both run on the same weights in the same process, alternating, median of 3 timed runs after a
warm-up. Prints one JSON object per line: tokens/s of each, their ratio, and the fraction of this
machine's roofline reached (bytes of weights + KV cache read per decode step over the measured
memory bandwidth; FLOPs per step over the measured matmul peak).

    python benchmarks/sampler_vs_hf.py [--batch-sizes 8 64] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from machine import MODEL, matmul_peak, memory_bandwidth  # noqa: E402  (benchmarks/machine.py)

PROMPT_LEN, NEW_TOKENS = 64, 128


def step_cost(cfg, batch, num_params):
    """Bytes read and FLOPs of one average decode step (cache half full of generated tokens)."""
    context = PROMPT_LEN + NEW_TOKENS / 2
    kv = cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    cache_bytes = 2 * cfg["num_hidden_layers"] * batch * context * kv * 4
    weight_bytes = num_params * 4
    # Matmuls touch every weight except the embedding lookup; attention reads q.k and p.v.
    matmul_params = num_params - cfg["vocab_size"] * cfg["hidden_size"]
    attn_flops = 4 * cfg["num_hidden_layers"] * batch * context * cfg["hidden_size"]
    return weight_bytes + cache_bytes, 2 * batch * matmul_params + attn_flops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--repeats", type=int, default=3)
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
        model = cpe_jax.load_model(d, dtype="float32")
    sampler = Sampler(model, eos_token_ids=(), max_batch_size=max(args.batch_sizes),
                      min_prompt_bucket=PROMPT_LEN)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    bandwidth, peak = memory_bandwidth(), matmul_peak()
    print(json.dumps({"machine": {"memory_bandwidth_GBps": round(bandwidth / 1e9, 2),
                                  "matmul_peak_GFLOPs": round(peak / 1e9, 2),
                                  "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
                      "model_params": num_params}), flush=True)

    for batch in args.batch_sizes:
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

        def timed(fn):
            start = time.perf_counter()
            result = fn()
            return time.perf_counter() - start, result

        _, ours_out = timed(ours)  # warm-up (compiles)
        _, hf_out = timed(theirs)
        ours_times, hf_times = [], []
        for _ in range(args.repeats):
            ours_times.append(timed(ours)[0])
            hf_times.append(timed(theirs)[0])
            # The machine is shared: keep the best roofline figures seen between runs.
            bandwidth, peak = max(bandwidth, memory_bandwidth(repeats=2)), max(peak, matmul_peak(repeats=2))
        same = float(np.mean([o.token_ids == hf_out[i, PROMPT_LEN:].tolist()
                              for i, o in enumerate(ours_out)]))
        ours_t, hf_t = statistics.median(ours_times), statistics.median(hf_times)
        step_bytes, step_flops = step_cost(MODEL, batch, num_params)
        step_time = ours_t / NEW_TOKENS
        print(json.dumps({
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
        }), flush=True)


if __name__ == "__main__":
    main()
