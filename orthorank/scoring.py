"""Token scores and the choice of the tokens a selection layer updates.

Everything here is vectorised over the batch: no Python loop over rows or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Score of a token that must never be selected (the sink, padding).
_BLOCKED = float("inf")


def sink_cosine(x: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Cosine between every token and its row's sink, in float32.

    Args:
        x: normalised hidden states ``[batch, seq, hidden]``.
        sink: index of each row's sink ``[batch]``, or ``None`` when it is column 0 of every row.

    Returns:
        ``[batch, seq]`` cosines in [-1, 1].
    """
    x = x.float()
    s = x[:, 0] if sink is None else x[torch.arange(x.shape[0], device=x.device), sink]
    dot = torch.einsum("bth,bh->bt", x, s)
    norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    return dot / norms.clamp_min(torch.finfo(torch.float32).tiny)


def token_scores(
    x: torch.Tensor, sink: torch.Tensor | None, selector: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scores ``[batch, seq]``; a SMALLER score means a MORE important token.

    ``orthogonal``: |cos(x_i, x_sink)| (OrthoRank); ``least_orthogonal``: -|cos|; ``random``:
    uniform noise from ``generator``.
    """
    if selector == "random":
        return torch.rand(x.shape[:2], generator=generator, device=x.device)
    score = sink_cosine(x, sink).abs()
    return -score if selector == "least_orthogonal" else score


def recent_attention(
    query: torch.Tensor, key: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor, scaling: float,
    real: torch.Tensor | None, window: int | None,
) -> torch.Tensor:
    """Attention mass each key receives from a few queries (the prompt's latest tokens), ``[batch, seq]``.

    Args:
        query: ``[batch, heads, w, head_dim]`` queries of columns ``cols`` (RoPE applied).
        key: ``[batch, kv_heads, seq, head_dim]`` keys of every column (RoPE applied).
        cols: ``[batch, w]`` the queries' columns; ``valid`` ``[batch, w]`` which of them count.
        real: ``[batch, seq]`` real-token mask, or ``None`` without padding.
        window: sliding window of the attention, or ``None``.

    Each query's causal softmax over the keys (in float32) is summed over heads and queries.
    """
    batch, heads, w, dim = query.shape
    kv_heads, seq = key.shape[1], key.shape[2]
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group * w, dim)
    logits = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scaling)  # [b, kv, g * w, seq]
    pos = torch.arange(seq, device=key.device)
    allowed = (pos <= cols.unsqueeze(-1)) & valid.unsqueeze(-1)  # [b, w, seq]
    if window is not None:
        allowed &= (cols.unsqueeze(-1) - pos) < window
    if real is not None:
        allowed &= real.unsqueeze(1)
    logits.view(batch, kv_heads, group, w, seq).masked_fill_(~allowed[:, None, None], -torch.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    return probs.sum(dim=(1, 2))


def pool_span(mass: torch.Tensor, sink: torch.Tensor | None, span: int) -> torch.Tensor:
    """Each column's largest ``mass`` within ``span`` columns centred on it, ``[batch, seq]``.

    The sink's own mass (column 0, or ``sink[b]``) is left out first: it is not ranked (a row is
    kept whole or without it), and its large share would otherwise lift its neighbours. Padding
    columns hold no mass (0), so they lift nothing; ``span`` 1 returns ``mass`` unchanged.

    Args:
        mass: ``[batch, seq]`` attention mass (>= 0).
        sink: ``[batch]`` column of each row's sink, or ``None`` when it is column 0 of every row.
        span: an odd window length >= 1.
    """
    if span < 1 or span % 2 == 0:
        raise ValueError(f"span must be an odd number of columns >= 1, got {span}")
    if span == 1:
        return mass
    mass = mass.clone()
    if sink is None:
        mass[:, 0] = 0.0
    else:
        mass.scatter_(1, sink.unsqueeze(1), 0.0)
    return nn.functional.max_pool1d(mass.unsqueeze(1), span, stride=1, padding=span // 2).squeeze(1)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every column among its row's scores ``[batch, seq]`` (0 = lowest; a stable sort makes
    ties go to the earlier column)."""
    order = scores.argsort(dim=1, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))


def rank_fusion(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Scores ``[batch, seq]`` whose order interleaves two rankings (smaller = more important):
    a token's score is its better rank in either, so the top ``k`` holds about the top ``k / 2``
    of each (ties go to ``first``)."""
    r1, r2 = ranks(first), ranks(second)
    return torch.minimum(r1, r2).float() + 0.5 * (r2 < r1)


def prefer_recent(scores: torch.Tensor, end: int | torch.Tensor, recent: int, sink: torch.Tensor | None = None) -> None:
    """Rank each row's ``recent`` tokens before ``end`` ahead of every scored token (in place).

    The latest ranks first, so a budget smaller than ``recent`` keeps the latest ones. The sink
    (and anything before it: left padding) is never preferred.

    Args:
        scores: ``[batch, seq]`` scores (smaller = more important, all >= -1).
        end: one past the last token of every row (an int), or ``[batch]`` per row.
        recent: how many tokens (>= 0).
        sink: ``[batch]`` column of each row's sink (``None``: column 0).
    """
    if recent <= 0:
        return
    if isinstance(end, int):
        first = max(1, end - recent)
        if first < end:  # the last column gets -2 - (count - 1), the lowest
            scores[:, first:end] = -2.0 - torch.arange(end - first, device=scores.device, dtype=scores.dtype)
        return
    back = torch.arange(recent, device=scores.device)
    cols = end.unsqueeze(1) - 1 - back  # [batch, recent], latest first
    floor = torch.zeros_like(end) if sink is None else sink
    valid = cols > floor.unsqueeze(1)
    cols = cols.clamp_min(0)
    values = (-2.0 - (recent - 1 - back)).to(scores.dtype).expand_as(cols)
    scores.scatter_(1, cols, torch.where(valid, values, scores.gather(1, cols)))


@dataclass
class Selection:
    """Tokens a selection layer updates, in their original order.

    Attributes:
        index: ``[batch, k]`` column indices, ascending within each row's real picks.
        valid: ``[batch, k]`` bool, or ``None`` when every slot is a real pick. A batch whose rows
            keep different numbers of tokens is padded to the longest row with distinct padding
            columns; their results are discarded.
    """

    index: torch.Tensor
    valid: torch.Tensor | None

    @property
    def k(self) -> int:
        return self.index.shape[1]


def select_uniform(scores: torch.Tensor, k: int) -> Selection:
    """Rows without padding: the ``k`` lowest scores of each row, sink (column 0) last (taken
    only when ``k`` is the whole row).

    Ties go to the earlier column, as in :func:`select_padded`, so that a row selects the same
    tokens alone and in a padded batch (equal scores are common in a first layer: a repeated token
    has the same hidden state; ``topk`` breaks ties arbitrarily).

    Args:
        scores: ``[batch, seq]``, modified in place at column 0.
    """
    scores[:, 0] = _BLOCKED
    index = scores.argsort(dim=1, stable=True)[:, :k]
    return Selection(index=index.sort(dim=1).values, valid=None)


def select_padded(
    scores: torch.Tensor, real: torch.Tensor, sink: torch.Tensor, keep: torch.Tensor, k: int, n_real: torch.Tensor
) -> Selection:
    """Rows with padding: row ``b`` keeps its ``keep[b]`` lowest-scoring real, non-sink tokens
    (all its real tokens, sink included, when ``keep[b]`` is their number).

    Args:
        scores: ``[batch, seq]`` scores (modified in place).
        real: ``[batch, seq]`` bool, True for real (non-padding) tokens.
        sink: ``[batch]`` column of each row's sink.
        keep: ``[batch]`` number of tokens to keep per row (at most the row's real tokens - 1, or
            all of them).
        k: ``keep.max()``, known on the host (no device sync here).
        n_real: ``[batch]`` real tokens per row (``real.sum(dim=1)``, as the caller has it).
    """
    batch, seq = scores.shape
    rows = torch.arange(batch, device=scores.device)
    candidate = real.clone()
    candidate[rows, sink] = keep >= n_real  # the sink only when the whole row is kept
    scores.masked_fill_(~candidate, _BLOCKED)
    picked = candidate & (ranks(scores) < keep[:, None])
    # picked columns first (in column order), then padding columns (discarded slots), then the rest
    group = torch.where(picked, 0, torch.where(real, 2, 1))
    index = (group * seq + torch.arange(seq, device=scores.device)).argsort(dim=1)[:, :k]
    valid = torch.arange(k, device=scores.device)[None, :] < keep[:, None]
    return Selection(index=index, valid=valid)
