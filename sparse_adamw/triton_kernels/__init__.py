"""Triton kernels of sparse_adamw. Leaves: they import only torch and triton (tests/test_architecture.py checks)."""
