"""The Triton step kernel compiled for a GPU without one: registers and SASS instruction count per variant.

    python benchmarks/kernel_sass.py                       # this checkout, sm_90
    python benchmarks/kernel_sass.py --tree /tmp/old       # another checkout (git archive REV sparse_adamw | ...)

A proxy, not a timing: it tells whether a change to the kernel adds instructions or registers, before a GPU
measures it. Needs `cuobjdump`, which Triton ships (triton/backends/nvidia/bin).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

VARIANTS = {  # name: (param and grad dtype, state dtype, stochastic rounding)
    "fp32": ("float32", "float32", False),
    "bf16 params (stochastic), fp32 states": ("bfloat16", "float32", True),
    "bf16 params (stochastic), bf16 states": ("bfloat16", "bfloat16", True),
}


def cuobjdump() -> str:
    import triton

    found = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                      "cuobjdump")
    if not os.path.exists(found):
        raise SystemExit("cuobjdump not found (Triton's nvidia backend ships one)")
    return found


def compile_variant(kernel, param, state, stochastic, arch):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"shape_ptr": "*i64", "dyn_ptr": "*i64", "seed_mix_ptr": "*i64", "hyper_ptr": "*fp32",
                 "prog_tensor_ptr": "*i32", "block_ids_ptr": "*i32", "grad_scale_ptr": "*fp32"}
    constants = dict(P_DTYPE=getattr(tl, param), G_DTYPE=getattr(tl, param), S_DTYPE=getattr(tl, state), BH=16,
                     BW=16, TILE_H=16, TILE_W=16, K=4, INDEX_64=False, CHECK_EDGES=False, EXACT_BF16=False,
                     ALIGNED=True, STOCHASTIC=stochastic, SCALE_GRAD=True)
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4, enable_fp_fusion=True))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = cuobjdump()
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", default=os.path.join(os.path.dirname(__file__), ".."),
                   help="a checkout holding sparse_adamw/ (default: this one)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.tree))
    from sparse_adamw.triton_kernels import sparse_adamw as kernels

    print(f"{os.path.abspath(args.tree)}, sm_{args.arch}: registers, SASS instructions")
    for name, (param, state, stochastic) in VARIANTS.items():
        regs, n = compile_variant(kernels._sparse_adamw_kernel, param, state, stochastic, args.arch)
        print(f"  {name}: {regs} registers, {n} instructions")


if __name__ == "__main__":
    main()
