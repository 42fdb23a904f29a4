from setuptools import find_packages, setup

# Bounds: the lower one is the version tested here (CI runs tests/test_install.py, which checks the
# installed versions against these bounds); the upper one is the next major release, or the next
# minor for 0.x packages (jax, flax, optax, orbax, tokenizers, safetensors, sentencepiece), whose
# minor releases change APIs.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml_collections>=1.1,<2",
    "absl-py>=2.5,<3",
    "transformers>=5.24,<6",
    "datasets>=5.2,<6",
    "tokenizers>=0.23.3,<0.24",
    "sentencepiece>=0.2.3,<0.3",
    "safetensors>=0.8,<0.9",
    "numpy>=2.4,<3",
    "tqdm>=4.70,<5",
    "scikit-learn>=1.9,<2",
    "openai>=3.57,<4",
    "tensorboardX>=2.6.5,<3",
    "matplotlib>=3.11,<4",
    "pyarrow>=26,<27",
]
EXTRAS_REQUIRE = {
    # torch is pinned to the CPU build; it is only needed for the parity tests.
    "test": ["pytest>=9.0,<10", "torch==2.13.0"],
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
}

setup(
    name="cpe_jax",
    version="0.1.0",
    description="Critique-Post-Edit reinforcement learning for Qwen2.5 in JAX/Flax, TPU-native.",
    packages=find_packages(include=["cpe_jax", "cpe_jax.*"]),
    package_data={"cpe_jax.models.qwen2": ["decode_attention.cc"]},  # compiled on first use (cpu_decode.py)
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["cpe-jax=cpe_jax.cli:main"]},
)
