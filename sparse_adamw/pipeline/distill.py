"""Distillation from the dense model a pruned one came from: SparseTrainer's `teacher=`.

The loss of a micro-batch is

    (1 - alpha) * LM loss  +  alpha * T^2 * KL(teacher || student)   [+ hidden_weight * SquareHead]

- LM loss: next-token cross-entropy, as the Hugging Face models compute it;
- KL: between the next-token distributions at temperature T, summed over the vocabulary, averaged over the same
  tokens as the LM loss (T^2 keeps the gradient's scale independent of T);
- SquareHead (optional, Neural Magic's sparse-model recipe): for every decoder layer, the mean squared error
  between the student's and the teacher's hidden states divided by the mean square of the teacher's, averaged
  over the layers.

Both terms of the logits are computed by `ChunkedDistillLoss` a block of tokens at a time: the fp32 copy of the
logits, the softmaxes and the gradient exist for one chunk only, and the gradient of the logits is kept in their
own dtype (bf16 on GPUs), as the plain LM loss's backward would give it. The teacher runs under no_grad; it is
frozen and in eval mode, so a resumed run sees exactly the targets an uninterrupted one saw.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch

IGNORE_INDEX = -100  # the Hugging Face label of a token without a target
DEFAULT_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class DistillConfig:
    """How SparseTrainer mixes the teacher into the loss (see the module docstring)."""

    alpha: float = 0.5
    temperature: float = 1.0
    hidden_weight: float = 0.0
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self):
        if not (0.0 <= self.alpha <= 1.0) or math.isnan(self.alpha):
            raise ValueError(f"the distillation weight alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0 or math.isinf(self.temperature):
            raise ValueError(f"the distillation temperature must be positive and finite, got {self.temperature}")
        if not self.hidden_weight >= 0 or math.isinf(self.hidden_weight):
            raise ValueError(f"the hidden-state (SquareHead) weight must be >= 0 and finite, got {self.hidden_weight}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")

    @property
    def uses_teacher(self) -> bool:
        """alpha = 0 without hidden-state terms is the plain LM loss: the teacher is not run at all."""
        return self.alpha > 0 or self.hidden_weight > 0

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, t + 1] for position t (the target of its logits), IGNORE_INDEX at the last position."""
    pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


class ChunkedDistillLoss(torch.autograd.Function):
    """sum over target tokens of (1 - alpha) * CE + alpha * T^2 * KL(teacher || student), divided by `denominator`.

    logits, teacher_logits: [N, V]; targets: [N] (IGNORE_INDEX: no target, no term). The gradient of the logits is
    computed in forward, chunk by chunk in fp32, and stored in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, teacher_logits, targets, alpha: float, temperature: float, denominator, chunk: int):
        grad = torch.zeros_like(logits)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            valid = targets[rows] != IGNORE_INDEX
            whole = bool(valid.all())  # the common case: no copies through a boolean index
            if not whole and not bool(valid.any()):
                continue
            pick = (lambda x: x[rows]) if whole else (lambda x: x[rows][valid])
            z, target = pick(logits).float(), pick(targets)
            # Few passes over [chunk, vocab]: on a CPU these, not the arithmetic, are the cost.
            log_q1 = torch.log_softmax(z, dim=-1)  # the student at T = 1: the LM loss
            total -= (1.0 - alpha) * log_q1.gather(1, target[:, None]).sum()
            g = log_q1.exp()  # (1 - a)(q1 - onehot) + a T (q - p), assembled in place
            if alpha > 0:
                t = pick(teacher_logits).float()
                log_p = torch.log_softmax(t if temperature == 1 else t / temperature, dim=-1)
                p = log_p.exp()
                if temperature == 1:
                    log_p.sub_(log_q1)
                    g.sub_(p, alpha=alpha)  # q1 - a p, with q = q1
                else:
                    log_q = torch.log_softmax(z / temperature, dim=-1)
                    log_p.sub_(log_q)
                    g.mul_(1.0 - alpha).add_(log_q.exp_().sub_(p), alpha=alpha * temperature)
                total += alpha * temperature ** 2 * torch.dot(p.view(-1), log_p.view(-1))  # KL(p || q)
            g[torch.arange(g.shape[0], device=g.device), target] -= 1.0 - alpha
            g = g.div_(denominator).to(grad.dtype)
            if whole:
                grad[rows] = g
            else:
                grad[rows][valid] = g
        ctx.save_for_backward(grad)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None


def squarehead_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over decoder layers of ||h_s - h_t||^2 / ||h_t||^2 (each layer's output, embeddings excluded)."""
    terms = []
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:]):
        ht = ht.float()
        terms.append((hs.float() - ht).pow(2).mean() / ht.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def distill_loss(model, teacher, inputs: Dict[str, torch.Tensor], config: DistillConfig,
                 num_items_in_batch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The micro-batch's loss (module docstring): divided by num_items_in_batch (the target tokens of the whole
    accumulated batch) when given, as the Hugging Face models do with it, else by its own target tokens."""
    labels = inputs["labels"]
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = config.hidden_weight > 0
    outputs = model(**forward, output_hidden_states=hidden, use_cache=False)
    with torch.no_grad():
        targets_of = teacher(**forward, output_hidden_states=hidden, use_cache=False)
    logits, teacher_logits = outputs.logits, targets_of.logits
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"the teacher's logits have shape {tuple(teacher_logits.shape)}, the student's "
                         f"{tuple(logits.shape)}: not the same vocabulary")
    targets = shifted_labels(labels).reshape(-1).to(logits.device)
    denominator = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    denominator = torch.as_tensor(denominator, device=logits.device).clamp_min(1).float()
    vocab = logits.shape[-1]
    loss = ChunkedDistillLoss.apply(logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), targets,
                                    config.alpha, config.temperature, denominator, config.chunk_tokens)
    if hidden:
        loss = loss + config.hidden_weight * squarehead_loss(outputs.hidden_states, targets_of.hidden_states)
    return loss


# ------------------------------------------------------------------------------------------------ the teacher
def freeze_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout), no gradients, no KV cache."""
    teacher.eval()
    teacher.requires_grad_(False)
    if getattr(teacher, "config", None) is not None:
        teacher.config.use_cache = False
    return teacher


def shard_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: shard the teacher as the Trainer shards the student (each decoder layer, then the root), so each rank
    holds 1/world of it and gathers one layer at a time in forward. Needs the process group."""
    from torch.distributed.fsdp import fully_shard

    from ..sparsity import decoder_layers

    for layer in decoder_layers(teacher):
        fully_shard(layer)
    fully_shard(teacher)
    return teacher


def check_teacher(student: torch.nn.Module, teacher: torch.nn.Module, config: DistillConfig) -> None:
    """The teacher must predict over the student's vocabulary, and (for SquareHead) have its layers and widths.
    ValueError naming the difference otherwise."""
    s, t = getattr(student, "config", None), getattr(teacher, "config", None)
    if s is None or t is None:
        raise ValueError("distillation needs Hugging Face models (with a .config) as student and teacher")
    s_out, t_out = student.get_output_embeddings(), teacher.get_output_embeddings()
    s_vocab = s_out.weight.shape[0] if s_out is not None else s.vocab_size
    t_vocab = t_out.weight.shape[0] if t_out is not None else t.vocab_size
    if s_vocab != t_vocab:
        raise ValueError(f"the teacher has a vocabulary of {t_vocab} tokens, the student {s_vocab}: distillation "
                         "needs the model the pruned one came from (--teacher)")
    if getattr(s, "model_type", None) != getattr(t, "model_type", None):
        raise ValueError(f"the teacher is a {t.model_type!r} model, the student a {s.model_type!r} model: "
                         "distillation needs the model the pruned one came from (--teacher)")
    if config.hidden_weight > 0:
        for key in ("num_hidden_layers", "hidden_size"):
            if getattr(s, key, None) != getattr(t, key, None):
                raise ValueError(f"hidden-state distillation (SquareHead) pairs the layers of student and teacher, "
                                 f"but their {key} differ: {getattr(s, key, None)} vs {getattr(t, key, None)}")
