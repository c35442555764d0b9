"""What generation reads from a long prompt, measured through stock ``generate`` / forward calls."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from orthorank.install import running_dense

from .tasks import Prompt, is_right


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def answers(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], *, new_tokens: int = 8,
            batch_size: int = 4) -> list[str]:
    """Greedy continuations (``new_tokens`` tokens) of each prompt, decoded; prompts of one length
    run as an unpadded batch through ``model.generate``."""
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.length, []).append(i)
    texts: dict[int, str] = {}
    for length, rows in by_length.items():
        for start in range(0, len(rows), batch_size):
            group = rows[start:start + batch_size]
            ids = torch.tensor([prompts[i].ids for i in group], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad)
            for i, row in zip(group, gen[:, length:].tolist()):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    return [texts[i] for i in range(len(prompts))]


def hits(prompts: Sequence[Prompt], generated: Sequence[str]) -> list[bool]:
    return [is_right(p, g) for p, g in zip(prompts, generated)]


def hits_by_length(prompts: Sequence[Prompt], right: Sequence[bool], lengths: Sequence[int]) -> dict[str, list[int]]:
    """``{"passkey@512": [right, asked], "qa@512": ...}`` for every task and length that has prompts."""
    counts = {}
    for task in ("passkey", "qa"):
        for n in lengths:
            got = [r for p, r in zip(prompts, right) if p.task == task and p.length == n]
            if got:
                counts[f"{task}@{n}"] = [sum(got), len(got)]
    return counts


@torch.inference_mode()
def next_token_nll(model: nn.Module, windows: torch.Tensor, lengths: Sequence[int]) -> list[float]:
    """NLL of token ``n`` after a prefill of the first ``n`` tokens of each window, for each ``n``
    in ``lengths`` (one window per length, taken in turn). ``[len(lengths)]`` floats."""
    device = _device(model)
    out = []
    for i, n in enumerate(lengths):
        row = windows[i % windows.shape[0]]
        prefix = row[:n].unsqueeze(0).to(device)
        logits = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1).logits[0, -1]
        out.append(float(nn.functional.cross_entropy(logits.float(), row[n].to(device))))
    return out


@torch.inference_mode()
def prefill_seconds(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median time of one prefill (``logits_to_keep=1``, as ``generate`` does) after a warm-up."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2]


@torch.inference_mode()
def window_ppl(model: nn.Module, windows: torch.Tensor) -> float:
    """Perplexity of whole windows ``[n, seq]``, every token scored as a prefill token (one forward each)."""
    device = _device(model)
    total, count = 0.0, 0
    for row in windows:
        ids = row[None].to(device)
        logits = model(ids).logits[0, :-1].float()
        total += float(nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(total / count)


def speedup(model: nn.Module, ids: torch.Tensor, rounds: int = 5) -> float:
    """Prefill time of the dense model over the patched ``model``'s, measured in interleaved rounds
    in this process (median of ``rounds`` each; the patch is lifted for the dense timings)."""
    dense, patched = [], []
    for _ in range(rounds):
        with running_dense(model):
            dense.append(prefill_seconds(model, ids, repeats=1))
        patched.append(prefill_seconds(model, ids, repeats=1))
    return sorted(dense)[rounds // 2] / sorted(patched)[rounds // 2]


def ppl(nlls: Sequence[float]) -> float:
    return math.exp(sum(nlls) / len(nlls)) if nlls else float("nan")
