"""The teacher's text (sparse_adamw.pipeline.teacher_text): greedy continuation against a step-by-step reference
decode with no cache, whatever the batching; sampling that a seed repeats and that never ends a sequence early;
the rows it replaces; the KV-cache size against a real cache; the fallbacks; and the kept file."""
import math

import pytest
import torch

from sparse_adamw.pipeline import teacher_text
from sparse_adamw.pipeline.teacher_text import TextSettings


def _reference_greedy(model, prompts, length):
    """Argmax continuation, one full forward per token (no KV cache, no generate)."""
    ids = prompts.clone()
    with torch.no_grad():
        while ids.shape[1] < length:
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def _model(tiny_llama, seed=3):
    model = tiny_llama(seed=seed).eval()
    model.generation_config.eos_token_id = 2
    return model


@pytest.mark.parametrize("batch", [7, 3, 1])
def test_top_k_1_is_the_greedy_reference_in_any_batching(tiny_llama, batch):
    model = _model(tiny_llama)
    prompts = torch.randint(0, 256, (7, 5), generator=torch.Generator().manual_seed(batch))
    made = teacher_text.generate(model, prompts, 19, TextSettings(1.0, top_k=1), seed=0, batch=batch,
                                 say=lambda _: None)
    assert made["ids"].shape == (7, 19) and made["ids"].dtype == torch.int64
    torch.testing.assert_close(made["ids"], _reference_greedy(model, prompts, 19), rtol=0, atol=0)


def test_sampling_repeats_under_a_seed_and_keeps_the_prompts(tiny_llama):
    model = _model(tiny_llama)
    prompts = torch.randint(3, 256, (6, 4), generator=torch.Generator().manual_seed(0))
    settings = TextSettings(1.0, temperature=1.5, top_k=0)
    run = lambda seed: teacher_text.generate(model, prompts, 40, settings, seed=seed, batch=4,  # noqa
                                             say=lambda _: None)["ids"]
    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:, :4], prompts) and torch.equal(c[:, :4], prompts)


def test_end_of_text_never_ends_a_sequence(tiny_llama):
    """The end-of-text token is made the one greedy decoding writes fourth: it is skipped, and every sequence runs
    to its length."""
    model = _model(tiny_llama)
    prompts = torch.randint(3, 256, (3, 4), generator=torch.Generator().manual_seed(6))
    eos = int(_reference_greedy(model, prompts, 8)[0, 7])
    model.generation_config.eos_token_id = eos
    ids = teacher_text.generate(model, prompts, 30, TextSettings(1.0, top_k=1), seed=0, batch=3,
                                say=lambda _: None)["ids"]
    assert ids.shape == (3, 30)
    assert not (ids[:, 4:] == eos).any()


def test_top_k_keeps_every_token_among_the_k_most_likely(tiny_llama):
    model = _model(tiny_llama)
    prompts = torch.randint(3, 256, (4, 3), generator=torch.Generator().manual_seed(1))
    ids = teacher_text.generate(model, prompts, 20, TextSettings(1.0, top_k=3), seed=5, batch=4,
                                say=lambda _: None)["ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    top3 = logits[:, 2:-1].topk(3, dim=-1).indices  # the candidates for tokens 3..19
    assert (top3 == ids[:, 3:, None]).any(-1).all()


def test_settings_are_checked():
    for bad, message in ((dict(fraction=1.5), "in \\[0, 1\\]"), (dict(fraction=-0.1), "in \\[0, 1\\]"),
                         (dict(fraction=math.nan), "in \\[0, 1\\]"),
                         (dict(fraction=0.5, temperature=0.0), "positive"),
                         (dict(fraction=0.5, temperature=-1.0), "positive"),
                         (dict(fraction=0.5, temperature=math.inf), "finite"),
                         (dict(fraction=0.5, top_k=-1), "top_k"),
                         (dict(fraction=0.5, prompt_tokens=0), "prompt_tokens"),
                         (dict(fraction=0.5, mode="append"), "--generated_mode must be one of replace, add"),
                         (dict(fraction=1.0, mode="add"), "must be below 1")):
        with pytest.raises(ValueError, match=message):
            TextSettings(**bad)
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        TextSettings(0.5, prompt_tokens=32).check_block_size(32)
    TextSettings(0.0, prompt_tokens=32).check_block_size(32)  # nothing is generated: no constraint


def test_the_prompt_rows_replace_a_share_of_the_blocks():
    rows = teacher_text.prompt_rows(101, TextSettings(0.3, mode="replace"), seed=4)
    assert len(rows) == 30 and len(set(rows.tolist())) == 30
    assert rows.tolist() == sorted(rows.tolist()) and 0 <= rows.min() and rows.max() < 101
    assert torch.equal(rows, teacher_text.prompt_rows(101, TextSettings(0.3), seed=4))
    assert not torch.equal(rows, teacher_text.prompt_rows(101, TextSettings(0.3), seed=5))
    assert teacher_text.prompt_rows(101, TextSettings(1.0), seed=0).tolist() == list(range(101))
    assert len(teacher_text.prompt_rows(101, TextSettings(0.0), seed=0)) == 0


@pytest.mark.parametrize("n, fraction, count", [(101, 0.2, 25), (10, 0.5, 10), (10, 0.75, 30), (7, 0.0, 0)])
def test_the_prompt_rows_to_add_make_the_fraction_of_the_mix(n, fraction, count):
    rows = teacher_text.prompt_rows(n, TextSettings(fraction, mode="add"), seed=3)
    assert len(rows) == count and abs(count / (n + count) - fraction) <= 0.5 / (n + count)
    # every block prompts once before any prompts twice
    uses = torch.bincount(rows, minlength=n)
    assert uses.max() - uses.min() <= 1 and len(uses) == n  # and no row outside the corpus
    assert torch.equal(rows, teacher_text.prompt_rows(n, TextSettings(fraction, mode="add"), seed=3))
    if count > 1:
        assert not torch.equal(rows, teacher_text.prompt_rows(n, TextSettings(fraction, mode="add"), seed=4))


def test_equal_batches_cover_every_row_once():
    for n, batch in ((10, 4), (7, 7), (7, 100), (1000, 412), (5, 1)):
        parts = teacher_text.equal_batches(n, batch)
        assert [i for part in parts for i in part] == list(range(n))
        assert all(len(part) <= batch for part in parts)
        assert len(parts) == -(-n // batch)
        assert max(map(len, parts)) - min(map(len, parts)) <= len(parts)  # as even as the count allows


def test_the_kv_cache_size_is_what_a_cache_holds(tiny_llama):
    model = tiny_llama()  # 2 layers, 4 heads, 2 of them for keys and values, hidden 64
    with torch.no_grad():
        cache = model(input_ids=torch.zeros(1, 37, dtype=torch.long), use_cache=True).past_key_values
    held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4  # fp32
    assert teacher_text.kv_bytes_per_sequence(model.config, 37, 4) == held
    per_sequence = held + 16 * model.config.vocab_size
    assert teacher_text.batch_for(model.config, 37, 4, available=10 * per_sequence, n=100) == 8  # 80% of 10
    assert teacher_text.batch_for(model.config, 37, 4, available=10 ** 12, n=100) == 100
    assert teacher_text.batch_for(model.config, 37, 4, available=0, n=100) == 1
    assert teacher_text.batch_for(model.config, 37, 4, available=None, n=100) == teacher_text.CPU_BATCH


def test_out_of_memory_halves_the_batch(tiny_llama, monkeypatch):
    model = _model(tiny_llama)
    prompts = torch.randint(3, 256, (9, 3), generator=torch.Generator().manual_seed(2))
    reference = _reference_greedy(model, prompts, 12)
    real = teacher_text.sample
    calls = []

    def flaky(model, prompts, length, temperature, top_k, seed):
        calls.append(prompts.shape[0])
        if prompts.shape[0] > 3:
            raise torch.OutOfMemoryError("fake")
        return real(model, prompts, length, temperature, top_k, seed)

    monkeypatch.setattr(teacher_text, "sample", flaky)
    said = []
    made = teacher_text.generate(model, prompts, 12, TextSettings(1.0, top_k=1), seed=0, batch=9, say=said.append)
    torch.testing.assert_close(made["ids"], reference, rtol=0, atol=0)
    # 9 rows in one batch: out of memory; batches of at most 4 are 3 of 3 rows, which fit
    assert made["batch"] == 4 and calls == [9, 3, 3, 3]
    assert any("out of memory" in line for line in said)


def _key(prompts, **changes):
    settings = TextSettings(0.5)
    key = teacher_text.text_key(settings, teacher="/m", teacher_files=[], seed=0, prompts=prompts, length=8)
    key.update(changes)
    return key


def test_the_kept_text_is_read_back_under_its_key_only(tmp_path):
    prompts = torch.randint(0, 50, (3, 2))
    ids = torch.randint(0, 50000, (3, 8))
    path = tmp_path / teacher_text.TEXT_FILE
    teacher_text.write_text(path, ids, _key(prompts))
    back = teacher_text.read_text(path, _key(prompts))
    assert back.dtype == torch.int64 and torch.equal(back, ids)
    assert teacher_text.read_text(path, _key(prompts, seed=1)) is None
    assert teacher_text.read_text(path, _key(prompts, temperature=0.7)) is None
    assert teacher_text.read_text(path, _key(prompts + 1)) is None  # other prompts: another corpus
    assert teacher_text.read_text(tmp_path / "absent", _key(prompts)) is None
    path.write_bytes(path.read_bytes()[:40])  # damaged
    assert teacher_text.read_text(path, _key(prompts)) is None
    assert not list(tmp_path.glob("*.tmp"))


def _share(model, train, tmp_path, settings):
    return teacher_text.teacher_share(
        train, model, teacher_path=str(tmp_path), settings=settings, seed=1, output_dir=tmp_path / "out",
        device=torch.device("cpu"), max_memory_gb=None, rank=0, world_size=1, say=lambda _: None)


def test_the_share_replaces_blocks_is_kept_and_leaves_the_random_state_alone(tiny_llama, tmp_path):
    model = _model(tiny_llama)
    train = torch.randint(3, 256, (10, 12), generator=torch.Generator().manual_seed(8))
    original = train.clone()
    state = torch.get_rng_state()
    settings = TextSettings(0.4, top_k=1, prompt_tokens=3)
    blocks, info = _share(model, train, tmp_path, settings)
    assert blocks is train and torch.equal(torch.get_rng_state(), state)
    changed = (train != original).any(dim=1).nonzero().flatten()
    assert len(changed) == 4 and info["sequences"] == 4 and info["reused"] is False
    torch.testing.assert_close(train[changed], _reference_greedy(model, original[changed, :3], 12), rtol=0, atol=0)
    again = original.clone()
    blocks, info = _share(model, again, tmp_path, settings)
    assert info["reused"] is True and torch.equal(blocks, train)


def test_the_share_added_follows_the_whole_corpus_and_is_kept(tiny_llama, tmp_path):
    model = _model(tiny_llama)
    train = torch.randint(3, 256, (10, 12), generator=torch.Generator().manual_seed(8))
    original = train.clone()
    settings = TextSettings(0.25, top_k=1, prompt_tokens=3, mode="add")  # 10 x 0.25 / 0.75: 3 sequences
    blocks, info = _share(model, train, tmp_path, settings)
    assert torch.equal(train, original) and blocks.shape == (13, 12) and torch.equal(blocks[:10], original)
    assert info["sequences"] == 3 and info["mode"] == "add"
    # greedy continuations of the first tokens of three distinct corpus blocks
    prompts = {tuple(row) for row in original[:, :3].tolist()}
    assert all(tuple(row) in prompts for row in blocks[10:, :3].tolist())
    torch.testing.assert_close(blocks[10:], _reference_greedy(model, blocks[10:, :3], 12), rtol=0, atol=0)
    again, info = _share(model, original.clone(), tmp_path, settings)
    assert info["reused"] is True and torch.equal(again, blocks)
    # the other mode is another key: written afresh
    assert _share(model, original.clone(), tmp_path, TextSettings(0.25, top_k=1, prompt_tokens=3))[1]["reused"] is False


def test_decoding_attention_is_sdpa_over_the_written_positions_with_query_heads_packed(tiny_llama):
    """decoding_attention against transformers' SDPA attention (which repeats each KV head for its query heads) with
    a static cache's mask, the unwritten positions holding garbage: one new token, and the prompt attending
    causally. decode runs under it, without cuDNN's SDPA kernels, and puts the model's attention back afterwards."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = _model(tiny_llama)
    assert model.config._attn_implementation == "sdpa" and model.config.num_key_value_heads == 2
    attention = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(3, 2, 11, 16, generator=g) * 100 for _ in range(2))  # 11 cache positions, 7 written
    q = torch.randn(3, 4, 1, 16, generator=g)
    written = torch.arange(11)[None, None, None, :] < 7
    reference, _ = sdpa_attention_forward(attention, q, k, v, written.expand(3, 1, 1, 11), scaling=0.25)
    teacher_text._FILLED[0] = 7
    ours, _ = teacher_text.decoding_attention(attention, q, k, v, None, scaling=0.25)
    assert ours.shape == reference.shape == (3, 1, 4, 16)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)

    prompt = torch.randn(3, 4, 7, 16, generator=g)  # the prompt's 7 tokens, each seeing itself and those before
    causal = written & (torch.arange(11)[None, None, None, :] <= torch.arange(7)[None, None, :, None])
    reference, _ = sdpa_attention_forward(attention, prompt, k, v, causal.expand(3, 1, 7, 11), scaling=0.25)
    ours, _ = teacher_text.decoding_attention(attention, prompt, k, v, None, scaling=0.25)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)

    seen, cudnn = [], []
    attention.register_forward_hook(lambda module, args, out: seen.append(module.config._attn_implementation))
    attention.register_forward_hook(lambda module, args, out: cudnn.append(torch.backends.cuda.cudnn_sdp_enabled()))
    teacher_text.generate(model, torch.randint(0, 256, (2, 4), generator=g), 9, TextSettings(1.0), seed=0, batch=2,
                          say=lambda _: None)
    assert len(seen) == 9 - 4 and set(seen) == {teacher_text.DECODING}  # the prompt, then one forward per token
    assert model.config._attn_implementation == "sdpa"
    # cuDNN's SDPA builds a graph per key length, and each step has a new one: decode leaves it out, then puts the
    # process's choice back
    assert set(cudnn) == {False} and torch.backends.cuda.cudnn_sdp_enabled()

    # a sliding window is attention decode does not compute: transformers' generate writes instead
    model.config.sliding_window = 4
    seen.clear()
    teacher_text.generate(model, torch.randint(0, 256, (2, 4), generator=g), 9, TextSettings(1.0), seed=0, batch=2,
                          say=lambda _: None)
    assert seen and set(seen) == {"sdpa"}
