from setuptools import find_packages, setup

setup(
    name="sparse_adamw",
    version="0.1.0",
    description="Fused masked AdamW for fine-tuning block-pruned LLMs with the pruned blocks kept exactly zero",
    packages=find_packages(include=["sparse_adamw", "sparse_adamw.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.6"],
        "pipeline": ["transformers>=4.46", "datasets", "accelerate", "gguf", "safetensors", "tqdm", "ninja"],
        "test": ["pytest", "triton>=3.6", "transformers>=4.46", "datasets", "accelerate", "gguf", "safetensors",
                 "tqdm", "ninja"],
    },
)
