"""Batch invariance as a property: every row of a batch gets the result of the row run alone.

A seeded generator draws batch compositions (batch sizes 1-6, row lengths, left or right padding
per row, always with the attention mask) and every row of the patched model's logits, at its real
positions, is compared with the same row run alone, for each architecture and attention kernel.

Right padding WITHOUT a mask is not covered and cannot be: a trailing pad id may be a real token,
so the patched model ranks what it is given (the README's FAQ; ``orthorank.eval`` passes masks).

Chunked prefill (``generate(prefill_chunk_size=c)``): the first chunk starts the sequence and
selects; the later chunks continue the cache, so they follow the decode policy (``dense`` by
default), as any pass that continues a cache does. Chunked and unchunked prefill therefore differ
by design, and the properties checked are: rows of an unpadded batch equal the rows alone under the
same chunking, and the chunked result equals its definition (first chunk patched, later chunks
dense, on one cache).
"""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from transformers import DynamicCache

import orthorank
from tests.tiny_models import VOCAB, tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
KERNELS = ["eager", "sdpa"]
LAYERS = [0, 2, 3, 5]  # full-attention and (mistral, qwen 3+) sliding-window layers; layer 0 selects first
KEEP = 0.4
ATOL = RTOL = 1e-4  # float32 noise of other batch shapes; a changed selection moves logits by >1e-2


def draw_batch(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, int]]]:
    """A random composition: ``ids`` ``[batch, seq]``, its mask (``None`` without padding) and the
    ``(start, end)`` columns of each row's real tokens."""
    batch, seq = rng.randint(1, 6), rng.randint(4, 28)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    mask = torch.zeros(batch, seq, dtype=torch.long)
    spans = []
    for row in range(batch):
        n = seq if rng.random() < 0.3 else rng.randint(1, seq)
        start = seq - n if rng.random() < 0.5 else 0  # left or right padding
        mask[row, start : start + n] = 1
        spans.append((start, start + n))
    ids[mask == 0] = 0
    return ids, (None if bool(mask.all()) else mask), spans


def positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Position ids counting real tokens only (as ``generate`` makes them)."""
    return None if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("attn", KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_row_of_a_random_batch_equals_the_row_alone(arch: str, attn: str) -> None:
    model = orthorank.patch(tiny_model(arch, attn), layers=LAYERS, keep_ratio=KEEP)
    dense = tiny_model(arch, attn)
    rng = random.Random(f"{arch}-{attn}")
    padded_rows = differs = 0
    with torch.inference_mode():
        for _ in range(4):
            ids, mask, spans = draw_batch(rng)
            pos = positions(mask) if rng.random() < 0.5 else None  # as generate makes them, or the default
            logits = model(ids, attention_mask=mask, position_ids=pos).logits
            for row, (start, end) in enumerate(spans):
                alone = model(ids[row : row + 1, start:end]).logits[0]
                torch.testing.assert_close(logits[row, start:end], alone, atol=ATOL, rtol=RTOL)
                padded_rows += end - start < ids.shape[1]
                differs += not torch.allclose(alone, dense(ids[row : row + 1, start:end]).logits[0], atol=1e-2)
    assert padded_rows > 0  # the draws did exercise padding
    assert differs > 0  # and the selection changed results (the comparison can fail)


def _fresh_cache(model: torch.nn.Module) -> dict[str, DynamicCache]:
    """An explicit empty cache for ``generate`` (releases before 5.4 refuse chunked prefill without
    one), under the keyword the installed release's forward takes."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: DynamicCache(config=model.config)}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_rows_of_an_unpadded_batch_equal_the_rows_alone(arch: str) -> None:
    model = orthorank.patch(tiny_model(arch), layers=LAYERS, keep_ratio=KEEP)
    ids = torch.randint(3, VOCAB, (3, 19), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, prefill_chunk_size=8,
                  output_logits=True, return_dict_in_generate=True)
    both = model.generate(ids, **kwargs, **_fresh_cache(model))
    for row in range(ids.shape[0]):
        alone = model.generate(ids[row : row + 1], **kwargs, **_fresh_cache(model))
        assert torch.equal(both.sequences[row], alone.sequences[0])
        for a, b in zip(both.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("lengths", [[19, 12, 6], [19, 19, 19]], ids=["left-padded", "unpadded"])
def test_chunked_prefill_is_first_chunk_patched_then_dense(lengths: list[int]) -> None:
    """``generate(prefill_chunk_size=8)`` == a patched forward of the first chunk, then dense forwards
    of the other chunks on the same cache (the decode policy ``dense``); rows whose first chunk is all
    padding included."""
    model = orthorank.patch(tiny_model("llama"), layers=LAYERS, keep_ratio=KEEP)
    seq, chunk = 19, 8
    ids = torch.randint(3, VOCAB, (len(lengths), seq), generator=torch.Generator().manual_seed(6))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, seq - n :] = 1
    ids[mask == 0] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0,
                         prefill_chunk_size=chunk, output_logits=True, return_dict_in_generate=True,
                         **_fresh_cache(model))
    plan = orthorank.get_plan(model)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        for start in range(0, seq, chunk):
            end = min(start + chunk, seq)
            if start == chunk:
                orthorank.unpatch(model)
            logits = model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                           **{cache_name: cache}).logits
        orthorank.patch(model, plan=plan)
        unchunked = model(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out.logits[0], logits[:, -1], atol=ATOL, rtol=RTOL)
    assert not torch.allclose(out.logits[0], unchunked[:, -1], atol=1e-2)  # chunking is not a no-op here
