"""Masked LoRA (sparse_adamw.pipeline.lora) against a direct computation that shares none of its code: the merged
weight is W + M ⊙ (B·A)·scale with M built by np.kron; the gradients of A, B and x match plain autograd through a
materialized Δ; the merged model's logits equal the adapted model's; pruned blocks stay bitwise zero through
training and the merge; nothing of the weight's size is saved for the backward."""
import math

import pytest
import torch
from torch import nn

from sparse_adamw.pipeline.lora import MaskedLoRALinear, add_masked_lora, merge_masked_lora

from tests.utils import kron_mask


def _kron_mask(block_mask, shape, bh, bw):
    return torch.from_numpy(kron_mask(block_mask, shape, bh, bw))


def _pruned_linear(rows, cols, bh, bw, seed):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(cols, rows, bias=True).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    block_mask = torch.rand(math.ceil(rows / bh), math.ceil(cols / bw), generator=g) > 0.3
    with torch.no_grad():
        linear.weight.mul_(_kron_mask(block_mask, (rows, cols), bh, bw))
    return linear, block_mask


@pytest.mark.parametrize("rows, cols, block", [(48, 32, (16, 16)), (37, 50, (16, 16)), (40, 24, (8, 16))])
def test_forward_backward_and_merge_against_a_direct_computation(rows, cols, block):
    bh, bw = block
    linear, block_mask = _pruned_linear(rows, cols, bh, bw, seed=rows)
    w0 = linear.weight.detach().clone()
    layer = MaskedLoRALinear(linear, block_mask, block, r=4, alpha=8.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(4, cols, generator=g, dtype=torch.float64))
        layer.lora_B.copy_(torch.randn(rows, 4, generator=g, dtype=torch.float64))
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    x = torch.randn(3, 5, cols, generator=g, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(3, 5, rows, generator=g, dtype=torch.float64)

    out = layer(x)
    (out * upstream).sum().backward()
    m = _kron_mask(block_mask, (rows, cols), bh, bw)
    ref = x_ref @ (w0 + m * (b @ a) * 2.0).t() + linear.bias.detach()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    assert linear.weight.grad is None  # frozen

    merged = layer.merged()
    torch.testing.assert_close(merged.weight.detach(), w0 + m * (b.detach() @ a.detach()) * 2.0, rtol=1e-12,
                               atol=1e-12)
    assert (merged.weight.detach()[m == 0] == 0).all()  # bitwise: every pruned entry is exactly zero


def test_nothing_weight_sized_is_saved_for_backward():
    linear, block_mask = _pruned_linear(64, 48, 16, 16, seed=0)
    layer = MaskedLoRALinear(linear.float(), block_mask, r=2)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(2, 7, 48, requires_grad=True)).sum().backward()
    weight_sized = [t for t in saved if t.numel() >= linear.weight.numel()]
    # F.linear of the frozen base keeps the weight itself (a parameter, not a copy); nothing else of its size
    assert all(t.data_ptr() == linear.weight.data_ptr() for t in weight_sized), [tuple(t.shape) for t in saved]


def test_the_merged_model_computes_what_the_adapted_one_did_and_pruned_blocks_stay_zero(tiny_llama):
    from sparse_adamw.pipeline.prune import prune_magnitude

    model = tiny_llama(seed=4).double()
    masks = prune_magnitude(model, 0.25, (16, 16), progress=False)
    targets = ("q_proj", "v_proj", "down_proj")
    adapters = add_masked_lora(model, masks, 16, target_modules=targets, r=4, alpha=4.0)
    assert len(adapters) == 3 * model.config.num_hidden_layers
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.{part}" for name in adapters for part in ("lora_A", "lora_B")}
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # B leaves zero: the adapters change the model
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    before = {f"{name}.weight": adapter.base.weight.detach().clone() for name, adapter in adapters.items()}
    model, count = merge_masked_lora(model)
    assert count == len(adapters) and not any(isinstance(m, MaskedLoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-9, atol=1e-9)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        weight = params[name].detach()
        full = _kron_mask(mask, weight.shape, 16, 16)
        assert (weight[full == 0] == 0).all(), f"{name}: a pruned block is nonzero after the merge"
        if name in before:
            assert not torch.equal(weight, before[name]), f"{name}: the merge changed nothing"


def test_bad_settings_are_refused():
    linear, block_mask = _pruned_linear(32, 32, 16, 16, seed=2)
    with pytest.raises(ValueError, match="rank"):
        MaskedLoRALinear(linear, block_mask, r=0)
    with pytest.raises(ValueError, match="dropout"):
        MaskedLoRALinear(linear, block_mask, dropout=1.0)
    with pytest.raises(ValueError, match="does not fit"):
        MaskedLoRALinear(linear, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no Linear"):
        add_masked_lora(nn.Sequential(linear), {}, target_modules=("q_proj",))


def test_a_dense_weight_masked_on_the_fly_computes_and_differentiates_as_the_pruned_one():
    """mask_base (the weight shared with the teacher is the dense one): outputs and gradients of x, A and B match a
    direct computation with the pruned weight, in fp64; the merge writes M ⊙ W + Δ; the backward keeps nothing of
    the weight's size but the weight itself."""
    rows, cols, bh, bw = 40, 50, 16, 16
    pruned, block_mask = _pruned_linear(rows, cols, bh, bw, seed=5)
    m = _kron_mask(block_mask, (rows, cols), bh, bw)
    g = torch.Generator().manual_seed(6)
    dense = nn.Linear(cols, rows, bias=True).double()
    with torch.no_grad():  # the dense parent: the pruned weight where it is live, anything in the pruned blocks
        dense.weight.copy_(pruned.weight + (1 - m) * torch.randn(rows, cols, generator=g, dtype=torch.float64))
        dense.bias.copy_(pruned.bias)
    layer = MaskedLoRALinear(dense, block_mask, (bh, bw), r=3, alpha=6.0)
    layer.mask_base = True
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(rows, 3, generator=g, dtype=torch.float64))
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    x = torch.randn(2, 7, cols, generator=g, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 7, rows, generator=g, dtype=torch.float64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    (out * upstream).sum().backward()
    ref = x_ref @ (pruned.weight.detach() + m * (b @ a) * 2.0).t() + pruned.bias.detach()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-10, atol=1e-10)
    weight_sized = [t for t in saved if t.numel() >= rows * cols]
    assert all(t.data_ptr() == dense.weight.data_ptr() for t in weight_sized), [tuple(t.shape) for t in saved]
    merged = layer.merged().weight.detach()
    torch.testing.assert_close(merged, pruned.weight.detach() + m * (b.detach() @ a.detach()) * 2.0, rtol=1e-12,
                               atol=1e-12)
    assert (merged[m == 0] == 0).all()


def test_the_teacher_shares_its_weights_only_where_the_student_is_it_with_blocks_zeroed(tiny_llama):
    from sparse_adamw.pipeline.lora import LoraSettings, prepare, share_teacher_weights
    from sparse_adamw.pipeline.prune import prune_magnitude

    def pair():
        student, teacher = tiny_llama(seed=7), tiny_llama(seed=7)
        return student, teacher, prune_magnitude(student, 0.25, (16, 16), progress=False)

    student, teacher, masks = pair()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pruned_logits = student(input_ids=ids).logits
    settings = LoraSettings(4, 8.0, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"))
    adapters, why_not = prepare(student, teacher, masks, (16, 16), settings, share=True)
    assert why_not is None and all(a.mask_base for a in adapters.values())
    ours, theirs = dict(student.named_parameters()), dict(teacher.named_parameters())
    assert ours["model.layers.0.mlp.down_proj.base.weight"] is theirs["model.layers.0.mlp.down_proj.weight"]
    assert ours["model.embed_tokens.weight"] is theirs["model.embed_tokens.weight"]
    with torch.no_grad():  # B = 0: the student still computes the pruned model, with the dense weights in hand
        torch.testing.assert_close(student(input_ids=ids).logits, pruned_logits, rtol=0, atol=0)

    # Not shared: targets that leave a pruned weight without an adapter; a student that differs in a live entry.
    student, teacher, masks = pair()
    assert "without an adapter" in share_teacher_weights(student, teacher, masks, (16, 16), ("q_proj",))
    student, teacher, masks = pair()
    with torch.no_grad():
        teacher.model.layers[1].self_attn.o_proj.weight.add_(1e-3)
    why_not = share_teacher_weights(student, teacher, masks, (16, 16), settings.target_modules)
    assert "model.layers.1.self_attn.o_proj.weight differs" in why_not
    assert student.model.layers[1].self_attn.o_proj.weight is not teacher.model.layers[1].self_attn.o_proj.weight
