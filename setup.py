import importlib.util
import os

from setuptools import find_packages, setup


def extension():
    """sparse_adamw._C (CPU kernel, plus the CUDA kernel where torch is a CUDA build and nvcc is found), or nothing.

    Where torch is not importable (pip's isolated build environment: pulling torch into it would download
    gigabytes), nothing is built and sparse_adamw/backends/build.py compiles the extension on first use.
    Environment switches: see that file.
    """
    if os.environ.get("SPARSE_ADAMW_SKIP_BUILD") == "1":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return {}
    # Loaded by path: importing the package would import torch-dependent modules.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_adamw", "backends", "build.py")
    spec = importlib.util.spec_from_file_location("sparse_adamw_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
            and os.environ.get("SPARSE_ADAMW_SKIP_CUDA_BUILD") != "1")
    archs = os.environ.get("SPARSE_ADAMW_CUDA_ARCHS", build.SETUP_CUDA_ARCHS)
    make = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    ext = make("sparse_adamw._C", build.sources(cuda), extra_link_args=build.ld_flags(),
               extra_compile_args={"cxx": build.cxx_flags(cuda), "nvcc": build.nvcc_flags(archs)})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}}


setup(
    name="sparse_adamw",
    version="0.1.0",
    description="Fused masked AdamW for fine-tuning block-pruned LLMs with the pruned blocks kept exactly zero",
    packages=find_packages(include=["sparse_adamw", "sparse_adamw.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "ninja"],  # ninja: the C++ extension is compiled on first use where not built
    extras_require={
        "triton": ["triton>=3.6"],
        "pipeline": ["transformers>=4.46", "datasets", "accelerate", "gguf", "safetensors", "tqdm"],
        # GPUs: Liger-Kernel's fused RMSNorm/SwiGLU/RoPE/linear cross-entropy, used by the fine-tune when present.
        "gpu": ["triton>=3.6", "liger-kernel>=0.8"],
        # peft: the tests check that it reads --lora's adapter as written
        "test": ["pytest", "triton>=3.6", "transformers>=4.46", "datasets", "accelerate", "gguf", "safetensors",
                 "tqdm", "peft"],
    },
    **extension(),
)
