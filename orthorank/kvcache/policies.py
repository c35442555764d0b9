"""Eviction policies of :class:`~orthorank.kvcache.BudgetCache`: configuration and tensor kernels.

Every policy is expressed the same way. Each stored token carries its absolute position and an
integer *priority*; when a layer holds more than ``budget`` tokens, the protected tokens stay and
the others are evicted lowest priority first (ties: oldest position first). What differs is the
priority and the protected set:

============== ====================================================== ==========================
policy         priority of a token                                    always kept
============== ====================================================== ==========================
``milestone``  last step whose query gave it strong attention         sink, recent ``window``,
               (its own position until then)                          prompt if ``protect_prompt``
``attention``  the newest query's attention to it (TOVA), computed      sink, recent ``window``
               only when the layer evicts; its position until then
``sink_window`` its position                                          sink (+ recent ``window``)
``separators`` its position, plus a large bonus for separator tokens  sink, recent ``window``
``full``       never evicts (control)                                 everything
============== ====================================================== ==========================

A layer evicts once it holds more than ``budget`` tokens, down to ``budget - headroom``: with
``headroom=h`` single-token decoding evicts (and ``attention`` scores) every ``h + 1`` steps, and a
step never attends to more than ``budget + 1`` tokens (the stored ones and the new one).

All functions here work on whole tensors, without Python loops over tokens.
"""

from __future__ import annotations

import logging
import math
import string
from dataclasses import dataclass
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

POLICIES = ("milestone", "attention", "sink_window", "separators", "full")
#: Policies that read the queries of each step (the cache hooks the attention modules for them).
QUERY_POLICIES = ("milestone", "attention")
HEAD_REDUCTIONS = ("mean", "max")
#: Priority bonus that ranks every separator above every ordinary token (positions stay far below).
SEPARATOR_BONUS = 1 << 40
#: Characters a token must consist of (after stripping whitespace) to count as a separator.
SEPARATOR_CHARS = frozenset(".,;:!?")

@dataclass(frozen=True)
class BudgetConfig:
    """Parameters of a budgeted cache, validated on creation.

    Attributes:
        policy: one of :data:`POLICIES`.
        budget: most tokens a layer stores between forward passes; ``None`` only for ``"full"``.
        n_sink: first tokens of the sequence that are never evicted (attention sinks).
        window: most recent tokens that are never evicted (``milestone``, ``separators``,
            ``sink_window``; for the latter the budget left after the sink is a window anyway).
        top_fraction: ``milestone`` only: share of the visible keys, ranked by the new query's
            attention, whose timestamp is refreshed to the query's position at each step. The
            default 0.3 was the best of 0.03-0.5 on calibration-split wiki text (budget 128);
            the differences there were small (about 1% perplexity).
        head_reduce: how the attention of the query heads of a layer is combined into one score
            per key before ranking: ``"mean"`` or ``"max"``.
        page_size: eviction granularity. Pages are blocks of ``page_size`` consecutive absolute
            positions; a page's priority is the highest of its tokens, and eviction removes a
            multiple of ``page_size`` tokens at once. ``1`` means token by token.
        protect_prompt: ``milestone`` only: never evict the tokens of the first forward pass
            (the prompt), as RaaS keeps the prefill tokens.
        headroom: extra tokens evicted at each eviction: a layer above ``budget`` evicts down to
            ``budget - headroom``, so evictions happen every ``headroom + 1`` single-token steps
            (less per-step work; on average fewer stored tokens).
    """

    policy: str = "milestone"
    budget: int | None = 1024
    n_sink: int = 4
    window: int = 32
    top_fraction: float = 0.3
    head_reduce: str = "mean"
    page_size: int = 1
    protect_prompt: bool = True
    headroom: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {self.head_reduce!r}")
        for name in ("n_sink", "window", "headroom"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {self.page_size!r}")
        if not isinstance(self.top_fraction, (int, float)) or not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction!r}")
        if self.budget is None:
            if self.policy != "full":
                raise ValueError(f"policy {self.policy!r} needs an int budget; budget=None is only for 'full'")
            return
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget must be a positive int or None, got {self.budget!r}")
        if self.policy != "full" and self.budget - self.headroom < self.n_sink + self.window:
            raise ValueError(
                f"budget - headroom = {self.budget} - {self.headroom} is smaller than the always-kept tokens "
                f"n_sink + window = {self.n_sink} + {self.window}; raise the budget or lower them"
            )

    @property
    def evicts(self) -> bool:
        """Whether this configuration ever evicts."""
        return self.policy != "full" and self.budget is not None


def separator_ids(tokenizer: object, chars: Iterable[str] = SEPARATOR_CHARS) -> list[int]:
    """Ids of the tokens that are punctuation or line breaks, for the ``separators`` policy.

    A token counts if its decoded text contains a newline, or is non-empty after stripping
    whitespace and consists only of ``chars``.

    Args:
        tokenizer: a HuggingFace tokenizer (needs ``len()`` and ``decode``).
        chars: punctuation characters; default ``. , ; : ! ?``.

    Returns:
        Sorted list of token ids.
    """
    allowed = set(chars)
    if not allowed or any(len(c) != 1 or c not in string.punctuation for c in allowed):
        raise ValueError(f"chars must be single punctuation characters, got {sorted(allowed)!r}")
    ids = []
    for token_id in range(len(tokenizer)):  # type: ignore[arg-type]
        text = tokenizer.decode([token_id])  # type: ignore[attr-defined]
        core = text.strip()
        if "\n" in text or (core and set(core) <= allowed):
            ids.append(token_id)
    return ids


def page_priority(prio: torch.Tensor, pos: torch.Tensor, page_size: int) -> torch.Tensor:
    """Give every token the highest priority found in its page.

    Args:
        prio: ``[B, S]`` priorities (long, or float scores).
        pos: ``[B, S]`` long absolute positions (pages are ``pos // page_size``).
        page_size: positions per page.

    Returns:
        ``[B, S]`` page priorities (``prio`` itself when ``page_size == 1``).
    """
    if page_size == 1 or prio.shape[-1] == 0:
        return prio
    page = pos // page_size
    n_pages = int(page.max()) + 1
    lowest = float("-inf") if prio.is_floating_point() else torch.iinfo(prio.dtype).min
    best = torch.full((prio.shape[0], n_pages), lowest, dtype=prio.dtype, device=prio.device)
    best.scatter_reduce_(1, page, prio, reduce="amax")
    return best.gather(1, page)


def eviction_count(stored: int, budget: int, n_protected: int, page_size: int, headroom: int = 0) -> int:
    """How many tokens to evict from a layer holding ``stored`` tokens.

    Nothing up to ``budget``; above it, the overflow above ``budget - headroom``, rounded up to
    whole pages, and never more than the tokens that are not protected.
    """
    if stored <= budget:
        return 0
    overflow = stored - (budget - headroom)
    if overflow <= 0:
        return 0
    rounded = math.ceil(overflow / page_size) * page_size
    return min(rounded, stored - n_protected)


def select_keep(prio: torch.Tensor, n_evict: int) -> torch.Tensor:
    """Indices of the tokens that survive evicting the ``n_evict`` lowest-priority ones per row.

    Tokens must be stored in increasing position order; ties in priority are broken toward
    evicting the older token (stable sort).

    Args:
        prio: ``[B, M]`` priorities of the evictable tokens (already page-reduced if paging).
        n_evict: tokens to evict per row, ``0 <= n_evict <= M``.

    Returns:
        ``[B, M - n_evict]`` long indices into ``prio``'s columns, increasing (order preserved).
    """
    if not 0 <= n_evict <= prio.shape[-1]:
        raise ValueError(f"cannot evict {n_evict} of {prio.shape[-1]} evictable tokens")
    order = torch.sort(prio, dim=-1, stable=True).indices
    return order[:, n_evict:].sort(dim=-1).values


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """The attention probabilities of the new queries, recomputed as the model's attention does
    (softmax of ``q . k * scaling`` over the visible keys, causal inside the new chunk), in float32.

    Args:
        query: ``[B, Hq, T, D]`` post-RoPE queries of the ``T`` new tokens.
        keys: ``[B, Hkv, S + T, D]`` post-RoPE keys: ``S`` stored, then the ``T`` new ones.
            ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention).
        scaling: the attention module's softmax scale.

    Returns:
        ``[B, Hq, T, S + T]`` float32 probabilities (zero on the keys a query cannot see).
    """
    bsz, n_q, t_new, dim = query.shape
    n_kv, total = keys.shape[1], keys.shape[2]
    if n_q % n_kv:
        raise ValueError(f"query heads ({n_q}) must be a multiple of key heads ({n_kv})")
    q = query.float().reshape(bsz, n_kv, (n_q // n_kv) * t_new, dim)  # heads of a group are contiguous
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scaling).view(bsz, n_q, t_new, total)
    if t_new > 1:
        logits = logits.masked_fill(~causal_visibility(t_new, total, keys.device), float("-inf"))
    return logits.softmax(dim=-1)


def causal_visibility(t_new: int, total: int, device: torch.device) -> torch.Tensor:
    """``[T, S + T]`` bool: which keys each of the ``T`` new queries sees (the last ``T`` keys are theirs)."""
    key_idx = torch.arange(total, device=device)
    return key_idx[None, :] <= (total - t_new + torch.arange(t_new, device=device))[:, None]


def reduce_heads(probs: torch.Tensor, head_reduce: str) -> torch.Tensor:
    """``[B, H, ...]`` -> ``[B, ...]``: mean or max over the query heads."""
    return probs.mean(dim=1) if head_reduce == "mean" else probs.amax(dim=1)


def attention_scores(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, head_reduce: str = "mean"
) -> torch.Tensor:
    """TOVA's score: the attention of the newest query (the last of the ``T``) to every key.

    Args: as :func:`attention_probs`; ``head_reduce`` combines the query heads.

    Returns:
        ``[B, S + T]`` float32, one score per key, shared by the key heads of the layer.
    """
    return reduce_heads(attention_probs(query[:, :, -1:], keys, scaling), head_reduce)[:, 0]


def top_keys(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, top_fraction: float, head_reduce: str
) -> torch.Tensor:
    """For ONE new query (``T == 1``): indices ``[B, k]`` of the ``k = ceil(top_fraction * (S + 1))``
    keys it attends to most, what :func:`attention_hits` marks, without building the mask."""
    scores = reduce_heads(attention_probs(query, keys, scaling), head_reduce)[:, 0]  # [B, S+1]
    return scores.topk(max(1, math.ceil(top_fraction * keys.shape[2])), dim=-1).indices


def attention_hits(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    top_fraction: float,
    head_reduce: str = "mean",
) -> torch.Tensor:
    """Which keys are in the top share of each new query's attention.

    The attention probabilities are recomputed exactly as the model's attention does (softmax of
    ``q . k * scaling`` over the visible keys, causal inside the new chunk), in float32.

    Args:
        query: ``[B, Hq, T, D]`` post-RoPE queries of the ``T`` new tokens.
        keys: ``[B, Hkv, S + T, D]`` post-RoPE keys: ``S`` stored, then the ``T`` new ones.
            ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention).
        scaling: the attention module's softmax scale.
        top_fraction: share of the visible keys marked per query (at least one).
        head_reduce: ``"mean"`` or ``"max"`` over the ``Hq`` heads.

    Returns:
        ``[B, T, S + T]`` bool; row ``t`` marks the keys among the top ``ceil(top_fraction * (S + t + 1))``.
    """
    t_new, total = query.shape[2], keys.shape[2]
    scores = reduce_heads(attention_probs(query, keys, scaling), head_reduce)  # [B, T, S+T]
    k_max = max(1, math.ceil(top_fraction * total))
    top = scores.topk(k_max, dim=-1).indices
    hits = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if t_new == 1:
        return hits.scatter_(-1, top, True)
    visible = causal_visibility(t_new, total, keys.device)
    per_row = torch.ceil(top_fraction * visible.sum(-1).float()).long().clamp_(min=1)  # [T]
    take = torch.arange(k_max, device=keys.device)[None, :] < per_row[:, None]
    hits.scatter_(-1, top, take.expand(scores.shape[0], -1, -1))
    return hits & visible
