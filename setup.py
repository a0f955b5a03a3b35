"""rlhf_jax: the InstructGPT pipeline (pretrain -> SFT -> K-wise RM -> PPO-ptx) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="rlhf_jax",
    version="0.1.0",
    description="InstructGPT-style RLHF (SFT, K-wise reward model, PPO-ptx) in JAX/Flax on a device mesh",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "transformers>=4.50",
        "tensorflow-datasets>=4.9.9",
        "array_record",
        "ml_collections>=1.0",
        "grain>=0.2.10",
        "tokenizers>=0.21",
        "safetensors",
        "numpy",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "absl-py",
    ],
    extras_require={
        # torch 2.13.0 is the CPU wheel used only as the reference in HF parity tests.
        "test": ["pytest>=8", "pytest-xdist", "torch==2.13.0"],
        "bench": ["torch==2.13.0"],
    },
)
