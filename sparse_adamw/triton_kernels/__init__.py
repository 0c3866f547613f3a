"""Triton kernels of sparse_adamw (leaves: they import only torch and triton)."""
