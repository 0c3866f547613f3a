"""sparse_adamw: a fused AdamW that updates only the live blocks of block-pruned weights."""
from .masks import block_mask_from_zeros, random_block_mask
from .sparsity import check_sparsity, sparsity_report

__version__ = "0.1.0"
