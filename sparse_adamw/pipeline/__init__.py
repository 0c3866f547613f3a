"""The fine-tuning pipeline built on the core: data, models, prune, evaluate, SparseTrainer and the fine-tune.

It imports transformers and datasets; the core (`sparse_adamw`) never imports it. The commands:

    python -m sparse_adamw.pipeline.prune      # block pruning (Wanda or magnitude), masks and a report
    python -m sparse_adamw.pipeline.evaluate   # perplexity and sparsity
    python -m sparse_adamw.pipeline.finetune   # full fine-tuning with SparseAdamW (run_dense_finetune.sh runs it)
"""
