import os

# 8 fake CPU devices for mesh tests; must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# dtype "" picks bfloat16 on CPUs with AMX: pin float32 so the suite computes the same on every machine.
os.environ.setdefault("CPE_JAX_CPU_DTYPE", "float32")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
