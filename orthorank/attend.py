"""Pieces of a decoder layer's attention run on a subset of its tokens.

A selection layer (:mod:`orthorank.layer`) computes keys and values for every token and the rest
of the layer for the tokens it updates: these helpers split projections into heads, apply RoPE at
the tokens' true positions, copy rows in and out of ``[batch, seq, hidden]`` tensors, and attend
the selected queries over all keys in chunks with the mask the dense layer would apply.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` ``[batch, heads, seq, head_dim]`` with ``cos``/``sin`` ``[batch, seq, head_dim]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def split_heads(attn: nn.Module, proj: nn.Module, norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """``proj(x)`` split into heads, per-head norm if any: ``[batch, heads, seq, head_dim]``."""
    y = proj(x).view(*x.shape[:2], -1, attn.head_dim)
    if norm is not None:
        y = norm(y)
    return y.transpose(1, 2)


def flat_rows(index: torch.Tensor, seq: int) -> torch.Tensor:
    """Row numbers ``[batch * k]`` of ``index`` ``[batch, k]`` in a ``[batch * seq, dim]`` view."""
    if index.shape[0] == 1:
        return index.reshape(-1)
    return (index + seq * torch.arange(index.shape[0], device=index.device).unsqueeze(1)).reshape(-1)


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` ``[batch or 1, seq, dim]`` at ``index`` ``[batch, k]`` -> ``[batch, k, dim]``.

    Whole rows are copied (``index_select``), which is several times faster than an element-wise
    ``gather`` with an expanded index.
    """
    batch, k = index.shape
    if t.shape[0] == 1:
        return t[0].index_select(0, index.reshape(-1)).view(batch, k, t.shape[-1])
    return t.reshape(-1, t.shape[-1]).index_select(0, flat_rows(index, t.shape[1])).view(batch, k, t.shape[-1])


def scatter_rows(t: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` ``[batch, seq, dim]`` whose rows at ``index`` ``[batch, k]`` (distinct within
    a row) are ``rows`` ``[batch, k, dim]``; ``t`` itself is left as it is."""
    out = t.clone(memory_format=torch.contiguous_format)
    out.view(-1, t.shape[-1]).index_copy_(0, flat_rows(index, t.shape[1]), rows.reshape(-1, t.shape[-1]))
    return out


def queries_at(
    attn: nn.Module, norm: nn.Module | None, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Queries of the rows ``index`` ``[batch, k]`` of ``x`` ``[batch, seq, hidden]`` (normalised),
    RoPE at their true positions: ``[batch, heads, k, head_dim]``."""
    return rotate(split_heads(attn, attn.q_proj, norm, gather_rows(x, index)), gather_rows(cos, index), gather_rows(sin, index))


#: Selected queries are attended in chunks of this many; each chunk reads only the keys up to its
#: last position, which recovers most of what a causal kernel skips (and bounds the mask's size).
#: The remainder is the first chunk, where the keys are fewest: a masked kernel's cost grows with
#: the keys it reads more than with the queries.
QUERY_CHUNK = 256


def query_chunks(k: int, chunk: int) -> list[slice]:
    """``k`` selected queries in chunks of ``chunk``, the remainder first: ``[slice, ...]``."""
    first = k % chunk or min(k, chunk)
    return [slice(0, first)] + [slice(start, start + chunk) for start in range(first, k, chunk)]


def selection_mask(
    layer_mask: Any, index: torch.Tensor, seq: int, kv_len: int, real: torch.Tensor | None, window: int | None
) -> torch.Tensor:
    """Which of the first ``kv_len`` keys each selected query may attend to: ``[batch, 1, k, kv_len]``.

    When the model handed the layer a 4-D mask (``[batch or 1, 1, seq, kv_len]``, boolean or
    additive float), its rows at the selected queries are used as they are: padding, sliding
    window and anything else the model encoded stay exactly as in the dense layer. Otherwise (no
    mask: plain causal; or a 2-D padding mask, as flash-attention receives) a boolean mask is built:
    causal by column (the pass starts the sequence, so column = position), padding keys excluded,
    ``query - key < window``; padding slots of a padded selection may see themselves so that no row
    is empty (their results are discarded).
    """
    if isinstance(layer_mask, torch.Tensor) and layer_mask.dim() == 4 and layer_mask.shape[2] == seq:
        layer_mask = layer_mask[..., :kv_len].expand(index.shape[0], -1, -1, -1)
        return layer_mask.gather(2, index[:, None, :, None].expand(-1, layer_mask.shape[1], -1, kv_len))
    key = torch.arange(kv_len, device=index.device)
    query = index.unsqueeze(-1)
    allowed = key <= query
    if window is not None:
        allowed &= (query - key) < window
    if real is not None:
        if real.shape[1] < kv_len:
            real = nn.functional.pad(real, (0, kv_len - real.shape[1]), value=False)
        allowed &= real.unsqueeze(1)
        allowed |= key == query
    return allowed.unsqueeze(1)


def sdpa_grouped(
    attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """SDPA with grouped key/value heads read in place (``enable_gqa``): ``[batch, q, heads, head_dim]``.

    Used on CPU, where the masked kernel supports grouped heads; elsewhere transformers' sdpa
    function repeats the key/value heads so that a fused masked kernel can run.
    """
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=kwargs["scaling"], enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2), None
