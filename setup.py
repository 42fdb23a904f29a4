from setuptools import find_packages, setup

setup(
    name="cpe_jax",
    version="0.1.0",
    description="Critique-Post-Edit reinforcement learning for Qwen2.5 in JAX/Flax, TPU-native.",
    packages=find_packages(include=["cpe_jax", "cpe_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "absl-py",
        "transformers",
        "datasets",
        "tokenizers",
        "sentencepiece",
        "safetensors",
        "numpy",
        "tqdm",
        "scikit-learn",
        "openai",
        "tensorboardX",
        "matplotlib",
        "pyarrow",
    ],
    extras_require={
        # torch is pinned to the CPU build; it is only needed for the parity tests.
        "test": ["pytest", "torch==2.13.0"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["cpe-jax=cpe_jax.cli:main"]},
)
