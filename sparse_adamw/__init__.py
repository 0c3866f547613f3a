"""sparse_adamw: a fused AdamW that updates only the live blocks of block-pruned weights."""
from .layout import compact_to_dense, dense_to_compact
from .masks import apply_block_mask_, block_mask_from_zeros, random_block_mask
from .optimizer import SparseAdamW
from .reference import sparse_adamw_reference
from .sparsity import check_sparsity, sparsity_report

__all__ = [
    "SparseAdamW",
    "apply_block_mask_",
    "block_mask_from_zeros",
    "check_sparsity",
    "compact_to_dense",
    "dense_to_compact",
    "random_block_mask",
    "sparse_adamw_reference",
    "sparsity_report",
]
__version__ = "0.1.0"
