"""Training text the dense teacher writes: the fine-tune's --generated_fraction.

Distillation on the corpus alone teaches the pruned student what the teacher does on encyclopedic text. On text
of other kinds it wins back much less (held_out.py measures it). The teacher knows more than the corpus holds, and
its own samples carry that over: a share of the training sequences is written by the teacher.

- Which sequences (`prompt_rows`), by `mode`:
  - "replace": round(fraction x n) of the n training blocks, picked at random (seeded by the run's --seed), are
    replaced by sequences of the same length that the teacher writes, each prompted with the first
    `prompt_tokens` tokens of the block it replaces (so it starts from the corpus, then goes where the teacher
    takes it). The number of training sequences, and so the schedule, stays what it was.
  - "add" (the fine-tune's default, finetune_config.py): the corpus stays whole and the teacher's sequences join
    it, fraction of the mix: round(n x fraction / (1 - fraction)) of them, prompted from blocks drawn at random
    (each at most once until all were). The fine-tune keeps the corpus's number of steps (fewer passes over the
    larger mix), so the run costs what it did, plus the writing.
- How: sampled at `temperature` from the `top_k` most likely tokens (0, the default: the whole distribution; its
  text is noisier, and distilling on it recovered more out of domain than top-k 50 did), end-of-text suppressed
  so every sequence is whole, in equal batches with a static KV cache, by `decode` (below). The batch is the
  largest whose KV cache fits the free memory (or --max_memory_gb) with a margin, halved on an out-of-memory
  error. The process's random state is put back afterwards, so training draws what it would have drawn.
- Each process of a data-parallel run writes every world_size-th sequence; they exchange them, so all hold all.
- Kept: the sequences go to TEXT_FILE in the output folder, keyed by the teacher (its path, its weight files'
  sizes and times), the settings, the seed and the prompts. A resume, a rerun or --overwrite_output_dir with the
  same key reads them back instead of generating again; any other key generates afresh (the settings are also in
  run_config.json, where a changed one refuses a resume like any other flag that changes the result).
- The same seed, teacher, prompts, batch size and machine give the same text.
- Decoding: `decode` runs the model's forwards itself rather than transformers' generate. Each step's attention
  reads only the cache positions written so far (no mask), runs the query heads that share a KV head as that
  head's query positions (transformers before 5.25 repeats each KV head instead), and draws among the top k
  logits rather than processing the whole vocabulary, with cuDNN's attention kept out (DECODING_BACKENDS)
  (benchmarks/RESULTS.md, "How fast the teacher writes").
"""
from __future__ import annotations

import gc
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

TEXT_FILE = "teacher_text.safetensors"
TEXT_FORMAT = 1
MAX_BATCH = 1024  # beyond this the sampling's [batch, vocab] fp32 buffers grow for little gain
MEMORY_SHARE = 0.8  # of the free memory the KV cache may take; the rest is the step's activations and logits
CPU_BATCH = 32
PROGRESS_S = 10.0  # at most one progress line this often
MODES = ("replace", "add")  # how the teacher's sequences join the corpus (the module's docstring)


@dataclass(frozen=True)
class TextSettings:
    """What the teacher writes: the share of training sequences, how it samples, the prompt length."""

    fraction: float
    temperature: float = 1.0
    top_k: int = 0
    prompt_tokens: int = 16
    mode: str = "replace"  # one of MODES

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0 or math.isnan(self.fraction):
            raise ValueError(f"--generated_fraction must be in [0, 1], got {self.fraction}")
        if self.mode not in MODES:
            raise ValueError(f"--generated_mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "add" and self.fraction == 1:
            raise ValueError("--generated_mode add keeps the corpus, so its --generated_fraction must be below 1 "
                             "(--generated_mode replace with fraction 1 trains on the teacher's text only)")
        if not self.temperature > 0 or math.isinf(self.temperature):
            raise ValueError(f"--generated_temperature must be positive and finite, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--generated_top_k must be >= 0 (0: the whole distribution), got {self.top_k}")
        if self.prompt_tokens < 1:
            raise ValueError(f"--generated_prompt_tokens must be at least 1, got {self.prompt_tokens}")

    def check_block_size(self, block_size: int) -> None:
        if self.fraction > 0 and self.prompt_tokens >= block_size:
            raise ValueError(f"--generated_prompt_tokens {self.prompt_tokens} leaves nothing to generate in a "
                             f"sequence of {block_size} tokens (--block_size)")

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def prompt_rows(n: int, settings: TextSettings, seed: int) -> torch.Tensor:
    """The training blocks whose first tokens prompt the teacher, one per sequence it writes: in "replace" mode the
    sorted indices of the round(fraction x n) blocks its text replaces; in "add" mode round(n x fraction /
    (1 - fraction)) blocks in a random order, each drawn once before any is drawn again."""
    generator = torch.Generator().manual_seed(seed)
    if settings.mode == "replace":
        return torch.randperm(n, generator=generator)[:round(settings.fraction * n)].sort().values
    count = round(n * settings.fraction / (1 - settings.fraction))
    orders = [torch.randperm(n, generator=generator) for _ in range(-(-count // n))] if n else []
    return torch.cat(orders)[:count] if orders else torch.empty(0, dtype=torch.long)


def kv_bytes_per_sequence(config, length: int, dtype_bytes: int) -> int:
    """The static KV cache of one sequence of `length` tokens."""
    text = getattr(config, "text_config", config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers * 2 * kv_heads * head_dim * length * dtype_bytes


def batch_for(config, length: int, dtype_bytes: int, available: Optional[int], n: int) -> int:
    """The largest batch (at most n and MAX_BATCH) whose KV cache and sampling buffers fit MEMORY_SHARE of
    `available` bytes; CPU_BATCH when `available` is None (the CPU)."""
    if available is None:
        return max(1, min(n, CPU_BATCH))
    vocab = getattr(getattr(config, "text_config", config), "vocab_size", 0)
    per_sequence = kv_bytes_per_sequence(config, length, dtype_bytes) + 16 * vocab  # logits, scores, probs (fp32)
    return max(1, min(n, MAX_BATCH, int(MEMORY_SHARE * available) // per_sequence))


def equal_batches(n: int, batch: int) -> List[range]:
    """n rows in batches of one size (the last filled up by repeating rows, see `generate`): every batch is the
    size the memory was checked for."""
    count = -(-n // batch)
    size = -(-n // count)
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def _seed_of(seed: int, first_row: int) -> int:
    return (seed * 1_000_003 + first_row) % (2**63)


def _release(model) -> None:
    """Drop what transformers' generate keeps on the model (its cache) and free the cached GPU memory."""
    for attr in ("_cache", "_previous_max_cache_length"):
        if hasattr(model, attr):
            delattr(model, attr)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


DECODING = "sparse_adamw_decoding"  # the attention implementation `decode` registers and runs under
# The SDPA kernels `decode` may use: not cuDNN's, which recent PyTorch prefers on Hopper and which builds a graph for
# each new key length, while each step of `decode` has a new one (the positions written so far). Measured in one
# call on an H200, batch 199 at the 135M shape: 27 ms a step without cuDNN, 114 ms with it (benchmarks/RESULTS.md).
DECODING_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
_FILLED = [0]  # how many positions of the static cache `decode` has written before the forward it runs
OWN_DECODING = True  # benchmarks/bench_generate.py turns it off to time transformers' generate beside it


def decoding_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """Attention for `decode`'s forwards over a static cache of shape [b, kv_heads, length, d]: the keys and
    values cut to the _FILLED[0] positions written so far, so no mask is built or read and a step reads half the
    cache on average. The prompt attends causally; one new token under grouped-query attention runs the query
    heads that share a KV head as that head's query positions (no KV head repeated). Returns ([b, q, heads, d],
    None), as transformers' attention functions do."""
    filled = _FILLED[0]
    key, value = key[:, :, :filled], value[:, :, :filled]
    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if q_len == 1:
        out = sdpa(query.reshape(b, kv_heads, heads // kv_heads, d), key, value, scale=scaling)
        return out.reshape(b, heads, 1, d).transpose(1, 2), None
    if q_len != filled:
        raise RuntimeError(f"decode runs the prompt whole or one token at a time, not {q_len} of {filled}")
    out = sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=kv_heads != heads)
    return out.transpose(1, 2), None


def _no_mask(*args, **kwargs):
    return None  # decoding_attention masks by cutting the cache to the positions written


@contextmanager
def _decoding_attention(model) -> Iterator[None]:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(DECODING, decoding_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODING, _no_mask)
    previous = model.config._attn_implementation
    model.config._attn_implementation = DECODING
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def _eos_ids(model) -> List[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _pick(logits: torch.Tensor, temperature: float, top_k: int, suppressed: torch.Tensor,
          generator: torch.Generator) -> torch.Tensor:
    """[b] tokens drawn at `temperature` from the `top_k` most likely of fp32 `logits` [b, vocab] (0: all), the
    token ids `suppressed` (on the logits' device: no copy from the host each step) never."""
    logits = logits.float().index_fill_(-1, suppressed, -math.inf)
    index = None
    if 0 < top_k < logits.shape[-1]:
        logits, index = logits.topk(top_k, dim=-1)  # the draw runs over k candidates, not the vocabulary
    choice = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)
    return (choice if index is None else index.gather(-1, choice))[:, 0]


@torch.no_grad()
def decode(model, prompts: torch.Tensor, length: int, temperature: float, top_k: int, seed: int) -> torch.Tensor:
    """[b, length] token ids: the prompts [b, p] continued by sampling at `temperature` from the `top_k` most likely
    tokens (0: all), end-of-text suppressed, with a static KV cache. A loop of the model's forwards rather than
    transformers' generate: on an H200, 1M tokens at the 135M shape (batch 993) in 29 s; at batch 199, 1.5x
    generate's speed in the same call; at the 7B shape, generate's (benchmarks/RESULTS.md)."""
    import inspect

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import StaticCache

    b, p = prompts.shape
    device = prompts.device
    generator = torch.Generator(device=device).manual_seed(seed)
    suppressed = torch.tensor(_eos_ids(model), dtype=torch.long, device=device)
    cache = StaticCache(config=model.config, max_cache_len=length)
    accepted = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.2x
    takes_cache_position = "cache_position" in accepted
    positions = torch.arange(length, device=device)
    ids = torch.empty(b, length, dtype=torch.long, device=device)
    ids[:, :p] = prompts
    start = 0
    with _decoding_attention(model), sdpa_kernel([getattr(SDPBackend, name) for name in DECODING_BACKENDS]):
        for pos in range(p, length):
            _FILLED[0] = pos
            extra = {"cache_position": positions[start:pos]} if takes_cache_position else {}
            logits = model(input_ids=ids[:, start:pos], position_ids=positions[None, start:pos], use_cache=True,
                           logits_to_keep=1, **{cache_kw: cache}, **extra).logits[:, -1]
            ids[:, pos] = _pick(logits, temperature, top_k, suppressed, generator)
            start = pos
    return ids


def _decodes_itself(config) -> bool:
    """Whether `decode` computes what the model's own attention would: SDPA attention over every earlier position
    (no sliding window, no logit soft-capping)."""
    text = getattr(config, "text_config", config)
    return (config._attn_implementation == "sdpa" and not getattr(text, "sliding_window", None)
            and not getattr(text, "attn_logit_softcapping", None))


@torch.no_grad()
def sample(model, prompts: torch.Tensor, length: int, temperature: float, top_k: int, seed: int) -> torch.Tensor:
    """`decode`, or transformers' generate for a model whose attention decode does not cover (or with OWN_DECODING
    off). (Compiling generate's step, CUDA graphs included, took 105 s for 1M tokens on an H100: no faster.)"""
    if OWN_DECODING and _decodes_itself(model.config):
        return decode(model, prompts, length, temperature, top_k, seed)
    torch.manual_seed(seed)
    new = length - prompts.shape[1]
    eos = _eos_ids(model)
    out = model.generate(
        prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=temperature, top_k=top_k,
        top_p=1.0, min_p=None, typical_p=1.0, repetition_penalty=1.0, max_new_tokens=new, min_new_tokens=new,
        cache_implementation="static", disable_compile=True, num_beams=1,
        pad_token_id=eos[0] if eos else None)
    return out[:, :length]


def generate(model, prompts: torch.Tensor, length: int, settings: TextSettings, seed: int, *,
             batch: int, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Continue every prompt [n, p] to `length` tokens, `batch` at a time, halved on an out-of-memory error.

    Returns {"ids": [n, length] int64 on the CPU, "seconds", "batch"}. Progress goes to `say`, every PROGRESS_S
    seconds at most."""
    device = next(model.parameters()).device
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        while True:
            try:
                rows = _batches(model, prompts, length, settings, seed, batch, device, say, started)
                break
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                _release(model)
                batch = max(1, batch // 2)
                say(f"  out of memory while writing: trying batches of {batch}")
    finally:
        model.train(was_training)
        _release(model)
    return {"ids": torch.cat(rows).long(), "seconds": time.perf_counter() - started, "batch": batch}


def _batches(model, prompts, length, settings, seed, batch, device, say, started) -> List[torch.Tensor]:
    n, rows, said = prompts.shape[0], [], started
    batches = equal_batches(n, batch)
    size = len(batches[0])
    for part in batches:
        chunk = prompts[list(part)]
        if len(part) < size:  # fill the last batch up to the same size (the extra rows are dropped)
            chunk = torch.cat([chunk, chunk[:1].expand(size - len(part), -1)])
        ids = sample(model, chunk.to(device), length, settings.temperature, settings.top_k, _seed_of(seed, part.start))
        rows.append(ids[:len(part)].cpu())
        now = time.perf_counter()
        if now - said >= PROGRESS_S and part.stop < n:
            said = now
            say(f"  teacher's text: {part.stop:,}/{n:,} sequences in {now - started:.0f} s")
    return rows


def generate_shared(model, prompts: torch.Tensor, length: int, settings: TextSettings, seed: int, *, batch: int,
                    rank: int, world_size: int, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """`generate`, each process of a distributed run writing rows rank, rank + world_size, ...; every process
    returns all the rows, the slowest process's time, and how many rows each process wrote ("per_process")."""
    if world_size == 1:
        result = generate(model, prompts, length, settings, seed, batch=batch, say=say)
        return {**result, "per_process": [prompts.shape[0]]}
    mine = torch.arange(rank, prompts.shape[0], world_size)
    result = generate(model, prompts[mine], length, settings, _seed_of(seed, 1 + rank), batch=batch, say=say)
    shares: List[Any] = [None] * world_size
    torch.distributed.all_gather_object(shares, (mine, result["ids"], result["seconds"]))
    ids = torch.empty(prompts.shape[0], length, dtype=torch.long)
    for where, rows, _ in shares:
        ids[where] = rows
    return {**result, "ids": ids, "seconds": max(share[2] for share in shares),
            "per_process": [len(share[0]) for share in shares]}


def teacher_share(train: torch.Tensor, teacher, *, teacher_path: str, settings: TextSettings, seed: int,
                  output_dir: Path, device: torch.device, max_memory_gb: Optional[float], rank: int,
                  world_size: int, say: Callable[[str], None]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The training blocks `train` [n, length] with the teacher's share in them (by settings.mode: in place of
    blocks of `train`, which changes in place, or after them): the text kept in `output_dir` under the same key,
    else text written now (each process its part; the main one keeps it). Returns (the blocks, what the report says
    about the text)."""
    from .run_folder import weight_files

    length = train.shape[1]
    rows = prompt_rows(len(train), settings, seed)
    prompts = train[rows, :settings.prompt_tokens]
    where = (f"in place of as many of the {len(train):,} corpus blocks" if settings.mode == "replace" else
             f"added to the {len(train):,} corpus blocks")
    path = Path(output_dir) / TEXT_FILE
    key = text_key(settings, teacher=teacher_path, teacher_files=weight_files(teacher_path), seed=seed,
                   prompts=prompts, length=length)
    ids = read_text(path, key)
    if world_size > 1:  # every process reads it back, or all write it anew (they write together)
        found: List[Any] = [None] * world_size
        torch.distributed.all_gather_object(found, ids is not None)
        ids = ids if all(found) else None
    info = {**settings.as_dict(), "sequences": len(rows), "file": str(path), "reused": ids is not None}
    if ids is not None:
        say(f"Teacher's text: {len(rows):,} sequences {where}, read back from {path}")
    else:
        say(f"Teacher's text: writing {len(rows):,} sequences {where} ({settings.fraction:g} of the mix) with the "
            f"teacher, {length - settings.prompt_tokens} tokens each after the first {settings.prompt_tokens} of a "
            f"corpus block, at T={settings.temperature:g}, top-k {settings.top_k or 'off'}...")
        teacher.to(device)
        available = None
        if device.type == "cuda":
            available, _ = torch.cuda.mem_get_info(device)
            if max_memory_gb:
                available = min(available, int(max_memory_gb * 1024 ** 3) - torch.cuda.memory_reserved(device))
        batch = batch_for(teacher.config, length, next(teacher.parameters()).element_size(), available,
                          -(-len(rows) // world_size))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # sampling reseeds
            made = generate_shared(teacher, prompts, length, settings, seed, batch=batch, rank=rank,
                                   world_size=world_size, say=say)
        ids = made["ids"]
        tokens = len(rows) * (length - settings.prompt_tokens)
        info.update(batch=made["batch"], seconds=made["seconds"],
                    per_process=made["per_process"],
                    tokens_per_s=tokens / made["seconds"] if made["seconds"] > 0 else None)
        say(f"Teacher's text: {tokens:,} tokens in {made['seconds']:.1f} s ({info['tokens_per_s']:,.0f} tokens/s, "
            f"batches of {made['batch']}), kept in {path}")
        if rank == 0:
            write_text(path, ids, key)
        if world_size > 1:
            torch.distributed.barrier()
    if settings.mode == "add":
        return torch.cat([train, ids.to(train.dtype)]), info
    train[rows] = ids
    return train, info


# ----------------------------------------------------------------------------------------- kept in the run folder
def text_key(settings: TextSettings, *, teacher: str, teacher_files: List[Path], seed: int, prompts: torch.Tensor,
             length: int) -> Dict[str, Any]:
    """What the written text depends on: a file with another key is not reused. The teacher is known by its path
    and its weight files' sizes and modification times (hashing 13 GB of weights would take longer than it saves);
    the corpus, by the prompts themselves."""
    import hashlib

    digest = hashlib.sha256(prompts.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in teacher_files}
    return {"format": TEXT_FORMAT, "teacher": teacher, "teacher_files": files, "seed": seed, "length": length,
            "count": int(prompts.shape[0]), "prompts_sha256": digest, **settings.as_dict()}


def read_text(path: Path, key: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The kept sequences when `path` holds them under `key`; None when it is absent, damaged or keyed otherwise."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("key", "null"))
            if stored != json.loads(json.dumps(key)):
                return None
            ids = f.get_tensor("input_ids")
    except (OSError, ValueError, SafetensorError):
        return None
    if tuple(ids.shape) != (key["count"], key["length"]):
        return None
    return ids.long()


def write_text(path: Path, ids: torch.Tensor, key: Dict[str, Any]) -> None:
    """Keep the sequences (int32: every vocabulary fits), written whole or not at all."""
    from .checkpoints import save_safetensors
    from .run_folder import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_safetensors(tmp, {"input_ids": ids.to(torch.int32).contiguous()},
                                                    {"format": "pt", "key": json.dumps(key)}))
