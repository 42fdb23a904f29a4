#!/usr/bin/env bash
# The accelerator check on one GPU, under 8 minutes: the parity tests with attention=auto, then
# cuDNN attention parity, the training step and the sampler of a Qwen2.5-0.5B-shaped random model
# in bfloat16 next to transformers/PyTorch on the same GPU (benchmarks/gpu_throughput.py).
# Prints one JSON object per line; exits non-zero when a check fails.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; needs jax[cuda12], torch with CUDA
#
# Budget: parity tests <= 180 s, throughput <= 270 s (timeouts below), plus start-up.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export JAX_PLATFORMS=cuda
export JAX_DEFAULT_MATMUL_PRECISION=highest  # float32 parity at 1e-4 needs full-precision matmuls
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # PyTorch shares the GPU in the throughput check

started=$(date +%s)
python - <<'PY'
import json, jax
print(json.dumps({"check": "device", "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()]}))
PY

# The parity tests on the GPU: transformers logits and gradients (float32, so `auto` runs the
# XLA form there) for the unrolled and scanned stacks, and the sampler against the trainer. The
# Pallas TPU kernels are left out (they run in TPU interpret mode only).
status=0
timeout 180 python -m pytest -q -p no:cacheprovider tests/test_attention_backends.py tests/test_qwen2_model.py \
    -k "not splash and not flash" > /tmp/cpe_jax_gpu_parity.log 2>&1 || status=$?
summary=$(tail -n 1 /tmp/cpe_jax_gpu_parity.log)
python - "$status" "$summary" <<'PY'
import json, sys
print(json.dumps({"check": "parity_tests", "exit_code": int(sys.argv[1]), "summary": sys.argv[2],
                  "passed": sys.argv[1] == "0"}))
PY

timeout 270 python benchmarks/gpu_throughput.py --batch 8 --length 1024 --repeats 3 || status=$?

python - "$started" "$status" <<'PY'
import json, sys, time
print(json.dumps({"check": "done", "seconds": round(time.time() - int(sys.argv[1])), "exit_code": int(sys.argv[2])}))
PY
exit "$status"
