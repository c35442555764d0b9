"""Quality metrics of a (possibly patched) causal LM: perplexity, cloze, generation, passkey.

Every function runs the model as it is (patched or not) under ``torch.inference_mode``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from orthorank.metrics import check_batch_size, check_ids
from orthorank.metrics import perplexity as library_perplexity

from .tasks import ClozeItem, PasskeyItem, chat_prompt_ids, encode_cloze, passkey_correct

logger = logging.getLogger(__name__)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 1) -> float:
    """Perplexity of ``model`` on windows ``ids`` ``[n, seq]`` (:func:`orthorank.metrics.perplexity`)."""
    return float(library_perplexity(model, ids, batch_size=batch_size))


def _hidden_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        raise TypeError("model must be a causal LM with a base model and an output embedding (lm_head)")
    return base, head


@torch.inference_mode()
def cloze_accuracy(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[ClozeItem],
    *,
    batch_size: int = 8,
    max_context_tokens: int | None = 256,
) -> float:
    """Share of items whose target word the model predicts exactly (greedy, teacher-forced).

    Rows are right-padded (so positions are unchanged) with an attention mask; only the hidden
    states at the target positions go through the output layer.
    """
    if not items:
        raise ValueError("items is empty")
    batch_size = check_batch_size(batch_size)
    base, head = _hidden_and_head(model)
    device = _device(model)
    encoded = sorted((encode_cloze(tokenizer, item, max_context_tokens) for item in items), key=lambda e: len(e[0]))
    correct = 0
    for start in range(0, len(encoded), batch_size):
        group = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, (seq, _) in enumerate(group):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        for row, (seq, n_target) in enumerate(group):
            # position t predicts token t + 1: the targets sit at len-n_target .. len-1
            positions = torch.arange(len(seq) - n_target - 1, len(seq) - 1, device=device)
            predicted = head(hidden[row, positions]).argmax(dim=-1).cpu()
            correct += int(torch.equal(predicted, torch.tensor(seq[-n_target:])))
    return correct / len(encoded)


def _pad_id(model: nn.Module, tokenizer: Any | None) -> int:
    for source in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                   getattr(model.config, "pad_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(source, int):
            return source
    return 0


@torch.inference_mode()
def greedy_continuations(
    model: nn.Module, prompts: torch.Tensor, new_tokens: int, *, batch_size: int = 8, tokenizer: Any | None = None
) -> torch.Tensor:
    """Greedy continuations of exactly ``new_tokens`` tokens (end-of-text suppressed).

    Args:
        prompts: LongTensor ``[n, prompt_len]`` (equal-length prompts, no padding).

    Returns:
        LongTensor ``[n, new_tokens]`` on the CPU.
    """
    prompts = check_ids(prompts, "prompts")
    batch_size = check_batch_size(batch_size)
    outputs = []
    for start in range(0, prompts.shape[0], batch_size):
        chunk = prompts[start : start + batch_size].to(_device(model))
        out = model.generate(
            input_ids=chunk,
            attention_mask=torch.ones_like(chunk),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=_pad_id(model, tokenizer),
        )
        outputs.append(out[:, chunk.shape[1] :].cpu())
    return torch.cat(outputs)


@torch.inference_mode()
def passkey_results(model: nn.Module, tokenizer: Any, items: Sequence[PasskeyItem], *, new_tokens: int = 8) -> list[bool]:
    """Whether the model retrieves each item's key (greedy generation, one prompt at a time)."""
    device = _device(model)
    results = []
    for item in items:
        ids = torch.tensor([item.input_ids], dtype=torch.long, device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=_pad_id(model, tokenizer),
        )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        results.append(passkey_correct(text, item.key))
    return results


def prefix_lengths(seq: int, prefixes: int, *, min_prefix: int = 16, seed: int = 0) -> list[int]:
    """``prefixes`` prefix lengths drawn uniformly from ``[min_prefix, seq - 1]`` by a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min_prefix, seq, (prefixes,), generator=g).tolist()


@torch.inference_mode()
def prefill_next_token_nll(
    model: nn.Module, ids: torch.Tensor, prefixes: int, *, min_prefix: int | None = None, seed: int = 0,
    batch_size: int = 8,
) -> float:
    """Mean NLL of the token right after a prefill, as generation sees it.

    ``prefixes`` lengths ``n`` are drawn uniformly from ``[min_prefix, seq - 1]`` (seeded;
    ``min_prefix`` defaults to ``min(16, seq // 2)``); for
    each, every window's first ``n`` tokens go through the model alone (a prefill: nothing after
    the prefix exists, so token selection cannot look ahead) and the NLL of token ``n`` is read
    from the last position's logits.

    Args:
        ids: LongTensor ``[n_windows, seq]``.

    Returns:
        The mean NLL over ``prefixes * n_windows`` predictions (``exp`` of it is a perplexity).
    """
    ids = check_ids(ids)
    batch_size = check_batch_size(batch_size)
    if min_prefix is None:
        min_prefix = max(1, min(16, ids.shape[1] // 2))
    if isinstance(prefixes, bool) or not isinstance(prefixes, int) or prefixes < 1:
        raise ValueError(f"prefixes must be a positive int, got {prefixes!r}")
    if isinstance(min_prefix, bool) or not isinstance(min_prefix, int) or not 1 <= min_prefix < ids.shape[1]:
        raise ValueError(f"min_prefix must be an int in [1, {ids.shape[1] - 1}], got {min_prefix!r}")
    lengths = prefix_lengths(ids.shape[1], prefixes, min_prefix=min_prefix, seed=seed)
    device = _device(model)
    total, count = 0.0, 0
    for n in lengths:
        for start in range(0, ids.shape[0], batch_size):
            rows = ids[start : start + batch_size]
            prefix = rows[:, :n].to(device)
            logits = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True).logits[:, -1]
            nll = nn.functional.cross_entropy(logits.float(), rows[:, n].to(device), reduction="sum")
            total += float(nll)
            count += rows.shape[0]
    return total / count


@torch.inference_mode()
def chat_answers(
    model: nn.Module, tokenizer: Any, questions: Sequence[str], *, new_tokens: int = 24, batch_size: int = 16
) -> list[list[int]]:
    """Greedy answers (at most ``new_tokens`` tokens, up to end-of-text) to each question as a chat turn.

    Prompts of a batch are left-padded with an attention mask. Returns the answer token ids, each
    cut after its first end-of-text token.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be a positive int, got {new_tokens!r}")
    batch_size = check_batch_size(batch_size)
    device = _device(model)
    pad = _pad_id(model, tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [chat_prompt_ids(tokenizer, q) for q in questions[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=pad)
        for answer in out[:, width:].tolist():
            answers.append(answer[: answer.index(eos) + 1] if eos in answer else answer)
    return answers
