"""The selective decoder layer: the forward installed on each selection layer.

In a selection layer every token's key and value are computed (RoPE at its true position) and
written through the model's own cache; only the selected tokens run the query projection,
attention over all keys, the output projection, the residual and the MLP. The others leave the
layer unchanged. So, token by token, ``out == where(selected, dense_layer(x), x)``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from . import compat, hooks
from .attend import (
    QUERY_CHUNK, gather_rows, queries_at, query_chunks, rotate, scatter_rows, sdpa_grouped, selection_mask, split_heads,
)
from .config import QUERY_AWARE_SELECTORS, tokens_to_keep, tokens_to_keep_per_row
from .scoring import (
    Selection, pool_span, prefer_recent, rank_fusion, recent_attention, select_padded, select_uniform, token_scores,
)
from .state import STATE_KWARG, ForwardContext, ForwardState, LayerStats

logger = logging.getLogger(__name__)


#: Query-aware selectors score tokens by the attention of the prompt's last this many tokens.
OBSERVED_QUERIES = 16

#: Query-aware selectors give each token the largest attention mass within this many columns
#: centred on it (odd), so that the tokens around an attended one (the rest of a name, a number,
#: a fact) are updated with it. SnapKV pools attention scores over neighbouring tokens for the
#: same reason (Li et al. 2024, arXiv 2404.14469). 1 turns pooling off.
POOLED_SPAN = 7


def ranking_key(selector: str) -> str:
    """What decides a selector's ranking besides its name (``""`` when nothing does): part of the
    plan-cache key, so that plans searched under another ranking are searched again."""
    if selector in QUERY_AWARE_SELECTORS and POOLED_SPAN > 1:
        return f"-span{POOLED_SPAN}"
    return ""


class SelectiveForward:
    """Forward of one selection layer (installed per instance by :func:`orthorank.patch`)."""

    def __init__(
        self,
        layer: nn.Module,
        keep_ratio: float,
        selector: str,
        decode: str,
        keep_recent: int,
        context: ForwardContext,
        spec: compat.ArchSpec,
        seed: int = 0,
        keep_min: int = 0,
    ) -> None:
        self.layer = layer
        self.attn = layer.self_attn
        self.keep_ratio = keep_ratio
        self.selector = selector
        self.decode = decode
        self.keep_recent = keep_recent
        self.keep_min = keep_min
        self.context = context
        self.q_norm = getattr(self.attn, "q_norm", None) if spec.qk_norm else None
        self.k_norm = getattr(self.attn, "k_norm", None) if spec.qk_norm else None
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.stats = LayerStats()
        #: the forward this one replaced; set by :func:`compat.install_forward`'s caller
        self.original: Callable[..., Any] = layer.forward
        #: the attention module's forward while patched (runs its hooks in selective passes)
        self.route: hooks.AttentionRoute | None = None

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state = kwargs.pop(STATE_KWARG) if STATE_KWARG in kwargs else self.context.state
        usable = not args and state is not None and state.matches(hidden_states)
        usable = usable and kwargs.get("position_embeddings") is not None
        if usable and state.mode == "select":
            return self.select(hidden_states, state.to(hidden_states.device), kwargs)
        self.stats.other_calls += 1
        if usable and state.mode == "continue" and self.decode == "bypass":
            x = self.layer.input_layernorm(hidden_states)
            if self.route is not None and hooks.has_hooks(self.attn):
                self.route.run(x, kwargs, self._keys_values_only)
            else:
                self._keys_values(x, kwargs)
            return hidden_states
        return self.original(hidden_states, *args, **kwargs)

    def _keys_values(self, x: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of all tokens of ``x`` ``[batch, seq, hidden]`` (normalised), written to the cache."""
        cos, sin = kwargs["position_embeddings"]
        attn = self.attn
        key = rotate(split_heads(attn, attn.k_proj, self.k_norm, x), cos, sin)
        value = split_heads(attn, attn.v_proj, None, x)
        cache = compat.find_cache(kwargs)
        if cache is not None:
            key, value = compat.update_cache(cache, key, value, attn.layer_idx, kwargs)
        return key, value

    def _keys_values_only(self, x: torch.Tensor, kwargs: dict[str, Any]) -> tuple[None, None]:
        """A bypassing decode step: K/V written, nothing selected (for :meth:`AttentionRoute.run`)."""
        self._keys_values(x, kwargs)
        return None, None

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The ``random`` selector's generator on ``device`` (made on first use, seeded).

        One stream per layer: concurrent forwards draw from it in the order the threads run.
        """
        if self.selector != "random":
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _choose(self, x: torch.Tensor, key: torch.Tensor, state: ForwardState, kwargs: dict[str, Any]) -> Selection | None:
        scores = self._scores(x, key, state, kwargs)
        if state.real is None:
            n = state.seq if state.prompt is None else state.prompt
            prefer_recent(scores, n, self.keep_recent)
            k = tokens_to_keep(self.keep_ratio, n, self.keep_min)
            if state.prompt is not None:  # the generated columns are always updated
                scores[:, n:] = -torch.inf
                k += state.seq - n
            return select_uniform(scores, k) if k > 0 else None
        prefer_recent(scores, state.last + 1, self.keep_recent, state.sink)
        k = tokens_to_keep(self.keep_ratio, state.n_max, self.keep_min)
        if k == 0:
            return None
        keep = tokens_to_keep_per_row(self.keep_ratio, state.n_real, self.keep_min)
        return select_padded(scores, state.real, state.sink, keep, k, state.n_real)

    def _scores(self, x: torch.Tensor, key: torch.Tensor, state: ForwardState, kwargs: dict[str, Any]) -> torch.Tensor:
        """``[batch, seq]`` scores of the layer's selector (smaller = more important, all >= -1)."""
        if self.selector not in QUERY_AWARE_SELECTORS:
            return token_scores(x, state.sink, self.selector, self._generator(x.device))
        attended = self._attention_scores(x, key, state, kwargs)
        if self.selector == "attention":
            return attended
        return rank_fusion(token_scores(x, state.sink, "orthogonal"), attended)

    def _attention_scores(
        self, x: torch.Tensor, key: torch.Tensor, state: ForwardState, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """Minus the share of attention each token gets from the prompt's last
        :data:`OBSERVED_QUERIES` tokens in this layer, pooled over :data:`POOLED_SPAN` columns,
        ``[batch, seq]`` in [-1, 0]."""
        attn, batch, device = self.attn, x.shape[0], x.device
        back = torch.arange(OBSERVED_QUERIES, device=device)
        if state.real is None:
            end = state.seq if state.prompt is None else state.prompt
            cols = (end - 1 - back).expand(batch, -1)
            valid = cols > 0
        else:
            cols = state.last.unsqueeze(1) - back
            valid = cols > state.sink.unsqueeze(1)
        cols = cols.clamp_min(0)
        cos, sin = kwargs["position_embeddings"]
        query = queries_at(attn, self.q_norm, x, cos, sin, cols)
        mass = recent_attention(
            query, key[:, :, : state.seq], cols, valid, attn.scaling, state.real, compat.sliding_window(attn)
        )
        mass = compat.sum_over_head_shards(attn, query.shape[1], mass)
        mass = pool_span(mass, state.sink, POOLED_SPAN)
        return -mass / mass.sum(dim=1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)

    def select(self, hidden_states: torch.Tensor, state: ForwardState, kwargs: dict[str, Any]) -> torch.Tensor:
        """``[batch, seq, hidden]`` -> ``[batch, seq, hidden]``, updating only the selected tokens.

        Hooks on the MLP module see the selected tokens only (``[batch, k, hidden]``).
        """
        layer = self.layer
        x = layer.input_layernorm(hidden_states)
        hooks.reset_prefill_state(self.attn)
        if self.route is not None and hooks.has_hooks(self.attn):
            chosen, attn_out = self.route.run(x, kwargs, lambda hs, kw: self._attention(hs, state, kw))
        else:
            chosen, attn_out = self._attention(x, state, kwargs)
        if chosen is None:
            return hidden_states
        index = chosen.index
        residual = gather_rows(hidden_states, index)
        h = residual + attn_out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if chosen.valid is not None:
            h = torch.where(chosen.valid.unsqueeze(-1), h, residual)
        return scatter_rows(hidden_states, index, h)

    def _attention(
        self, x: torch.Tensor, state: ForwardState, kwargs: dict[str, Any]
    ) -> tuple[Selection | None, torch.Tensor | None]:
        """Write the K/V of all tokens of ``x`` ``[batch, seq, hidden]`` (normalised), select, and
        return the selection and the selected tokens' attention output ``[batch, k, hidden]``
        (after ``o_proj``); ``(None, None)`` when no token is selected."""
        attn = self.attn
        key, value = self._keys_values(x, kwargs)
        chosen = self._choose(x, key, state, kwargs)
        self.stats.selective_calls += 1
        self.stats.tokens += x.shape[0] * x.shape[1]
        if chosen is None:
            return None, None
        index = chosen.index
        self.stats.updated += index.numel()
        cos, sin = kwargs["position_embeddings"]
        query = queries_at(attn, self.q_norm, x, cos, sin, index)
        out = self._attend(query, key, value, index, kwargs.get("attention_mask"), state)
        return chosen, attn.o_proj(out)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        index: torch.Tensor,
        layer_mask: Any,
        state: ForwardState,
    ) -> torch.Tensor:
        """Attention of the selected queries over all keys: ``[batch, k, heads * head_dim]``.

        Args:
            query: ``[batch, heads, k, head_dim]`` (RoPE applied).
            key, value: ``[batch, kv_heads, kv_len, head_dim]``, all tokens of the layer.
            index: ``[batch, k]`` columns of the selected queries.
        """
        attn = self.attn
        function, wants_float = compat.attention_function(attn)
        extra = {} if wants_float else {"is_causal": False}
        if not wants_float and query.device.type == "cpu":
            function = sdpa_grouped
        window = compat.sliding_window(attn)
        batch, k = index.shape
        chunks = query_chunks(k, QUERY_CHUNK)
        if len(chunks) == 1:
            ends = [key.shape[2]]
        else:  # one host sync for all chunks: the keys each chunk needs (the remainder padded in front)
            padded = nn.functional.pad(index, (len(chunks) * QUERY_CHUNK - k, 0), value=0)
            ends = (padded.view(batch, len(chunks), QUERY_CHUNK).amax(dim=(0, 2)) + 1).tolist()
        outs = []
        for rows, kv_len in zip(chunks, ends):
            mask = selection_mask(layer_mask, index[:, rows], state.seq, kv_len, state.real, window)
            if wants_float and mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(
                    ~mask, torch.finfo(query.dtype).min
                )
            out, _ = function(
                attn, query[:, :, rows], key[:, :, :kv_len], value[:, :, :kv_len], mask,
                scaling=attn.scaling, dropout=0.0, **extra,
            )
            outs.append(out)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out.reshape(batch, k, -1)


class DenseForward:
    """Forward of a layer that stays dense in a patched model: its own forward, without the state
    keyword (:data:`STATE_KWARG`), which is meant for the selection layers only."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        #: the forward this one replaced; set by :func:`compat.install_forward`'s caller
        self.original: Callable[..., Any] = layer.forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop(STATE_KWARG, None)
        return self.original(*args, **kwargs)


class RemovedForward:
    """Forward of a removed layer (keep ratio 0): the identity, no cache write."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.stats = LayerStats()

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.stats.other_calls += 1
        return hidden_states
