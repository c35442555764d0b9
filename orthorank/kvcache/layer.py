"""One layer of a budgeted KV cache: stores K/V plus absolute positions and priorities."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from ..compat import mask_query_length

from .policies import (
    SEPARATOR_BONUS,
    BudgetConfig,
    attention_hits,
    attention_scores,
    eviction_count,
    page_priority,
    select_keep,
    top_keys,
)

logger = logging.getLogger(__name__)


def _take(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``states[b, h, index[b], :]`` for ``states`` ``[B, H, S, D]`` and ``index`` ``[B, S']``.

    Done as one ``index_select`` on the flattened tensor, several times faster on CPU than
    ``gather`` with an expanded index or advanced indexing of a 4-D tensor.
    """
    bsz, heads, length, dim = states.shape
    if bsz == 1:
        flat = index[0]
        return states.reshape(heads, length, dim).index_select(1, flat).view(1, heads, -1, dim)
    offsets = torch.arange(bsz * heads, device=index.device).view(bsz, heads, 1) * length
    flat = (index[:, None, :] + offsets).reshape(-1)
    return states.reshape(bsz * heads * length, dim).index_select(0, flat).view(bsz, heads, -1, dim)


class BudgetLayer(CacheLayerMixin):
    """K/V of one decoder layer, kept within ``config.budget`` tokens between forward passes.

    Stored tensors (``S`` = tokens currently stored, in increasing position order):

    * ``keys``, ``values``: ``[B, H_kv, S, D]``, keys after RoPE (at their absolute positions).
    * ``positions``: ``[B, S]`` long, absolute position of each stored token.
    * ``priorities``: ``[B, S]`` long, the policy's eviction priority (see :mod:`.policies`).

    ``get_seq_length`` reports the ABSOLUTE length (tokens seen so far), from which the model
    derives the RoPE positions of new tokens; ``get_mask_sizes`` and ``stored_length`` report
    what is really stored, from which the attention mask is sized.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, config: BudgetConfig) -> None:
        super().__init__()
        self.config = config
        self.positions: torch.Tensor | None = None
        self.priorities: torch.Tensor | None = None
        self.cumulative_length = 0
        self.prompt_length: int | None = None
        self.evicted = 0
        self.unscored_updates = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        bsz, n_kv, _, dim = key_states.shape
        self.keys = key_states.new_zeros((bsz, n_kv, 0, dim))
        self.values = value_states.new_zeros((bsz, value_states.shape[1], 0, value_states.shape[-1]))
        self.positions = torch.zeros((bsz, 0), dtype=torch.long, device=self.device)
        self.priorities = torch.zeros((bsz, 0), dtype=torch.long, device=self.device)
        self.is_initialized = True

    @property
    def stored_length(self) -> int:
        """Tokens actually stored."""
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args: object,
        query: torch.Tensor | None = None,
        scaling: float | None = None,
        separators: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``T`` new tokens, return all K/V for this step's attention, then evict.

        Args:
            key_states: ``[B, H_kv, T, D]`` new keys (after RoPE).
            value_states: ``[B, H_kv, T, D]`` new values.
            query: ``[B, H_q, T, D]`` post-RoPE queries of the new tokens (``milestone``; ``attention``
                when this step evicts); ``None`` leaves old timestamps unrefreshed for this step
                (``attention``: evicts the oldest instead).
            scaling: softmax scale of the attention module (with ``query``).
            separators: ``[B, T]`` bool, which new tokens are separators (``separators``).

        Returns:
            ``(keys, values)`` of shape ``[B, H_kv, S + T, D]``: the stored tokens followed by the new
            ones, as the causal mask (sized by :meth:`get_mask_sizes`) expects. Afterwards at most
            ``budget`` tokens stay stored.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cfg = self.config
        bsz, _, t_new, _ = key_states.shape
        if bsz != self.keys.shape[0]:
            raise ValueError(f"batch size changed from {self.keys.shape[0]} to {bsz} in the same cache")
        if self.prompt_length is None:
            self._check_prompt(t_new)
            self.prompt_length = t_new
        past = self.stored_length
        start = self.cumulative_length
        self.cumulative_length += t_new
        new_pos = torch.arange(start, start + t_new, device=self.device).expand(bsz, t_new)

        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        positions = torch.cat([self.positions, new_pos], dim=-1)
        new_prio = new_pos
        if cfg.policy == "separators" and separators is not None:
            new_prio = new_pos + separators.to(self.device, torch.long) * SEPARATOR_BONUS
        priorities = torch.cat([self.priorities, new_prio], dim=-1)

        if cfg.policy == "milestone" and past > 0 and cfg.evicts:
            if query is None:
                self.unscored_updates += 1
            else:
                with torch.no_grad():
                    if t_new == 1:  # the query's position exceeds every timestamp: just overwrite
                        priorities.scatter_(1, top_keys(query, keys, scaling, cfg.top_fraction, cfg.head_reduce), start)
                    else:
                        hits = attention_hits(query, keys, scaling, cfg.top_fraction, cfg.head_reduce)  # [B, T, S+T]
                        stamp = torch.where(hits, new_pos[:, :, None], -1).amax(dim=1)  # [B, S+T]
                        priorities = torch.maximum(priorities, stamp)

        self.keys, self.values, self.positions, self.priorities = keys, values, positions, priorities
        if cfg.evicts and self.stored_length > cfg.budget:
            scores = None
            if cfg.policy == "attention":
                if query is None:
                    self.unscored_updates += 1
                else:
                    with torch.no_grad():
                        scores = attention_scores(query, keys, scaling, cfg.head_reduce)  # [B, S+T]
            self._evict(scores)
        return keys, values

    def _check_prompt(self, prompt_length: int) -> None:
        cfg = self.config
        if cfg.policy == "milestone" and cfg.protect_prompt and cfg.evicts:
            if prompt_length + cfg.window > cfg.budget - cfg.headroom:
                raise ValueError(
                    f"budget - headroom = {cfg.budget - cfg.headroom} cannot hold the protected prompt "
                    f"({prompt_length} tokens) plus the recent window ({cfg.window}); raise the budget or use "
                    "protect_prompt=False"
                )

    def protected_counts(self) -> tuple[int, int]:
        """``(head, tail)``: the first ``head`` and last ``tail`` stored tokens are never evicted.

        The head is the sink (and, for ``milestone`` with ``protect_prompt``, the prompt), the tail
        the recent window. Protected tokens are never evicted, so they are always stored, and
        storage is in position order: they are exactly the first ``head`` and the last ``tail``.
        """
        cfg = self.config
        stored = self.stored_length
        head = cfg.n_sink
        if cfg.policy == "milestone" and cfg.protect_prompt:
            head = max(head, self.prompt_length or 0)
        head = min(head, stored)
        return head, min(cfg.window, stored - head)

    def needs_query(self, t_new: int) -> bool:
        """Whether the next update of ``t_new`` tokens uses the query (scoring happens then)."""
        cfg = self.config
        if not cfg.evicts:
            return False
        if cfg.policy == "milestone":
            return self.stored_length > 0
        return cfg.policy == "attention" and self.stored_length + t_new > cfg.budget

    def _evict(self, scores: torch.Tensor | None = None) -> None:
        """Evict down to ``budget - headroom`` once above ``budget``: lowest ``scores`` (``[B, S]``
        float, ``attention``) or else lowest priority first, never the protected tokens."""
        cfg = self.config
        stored = self.stored_length
        head, tail = self.protected_counts()
        n_evict = eviction_count(stored, cfg.budget, head + tail, cfg.page_size, cfg.headroom)
        if n_evict <= 0:
            return
        rank = self.priorities if scores is None else scores
        prio = page_priority(rank, self.positions, cfg.page_size)[:, head : stored - tail]
        bsz = prio.shape[0]
        self.evicted += n_evict
        if n_evict == 1 and bsz == 1:  # the common decode step: drop one token, no sort or gather
            self._drop(head + int(prio.argmin()))  # argmin: first of equal minima, the oldest (as select_keep)
            return
        middle = select_keep(prio, n_evict) + head  # [B, M - n_evict]
        index = torch.cat(
            [
                torch.arange(head, device=self.device).expand(bsz, head),
                middle,
                torch.arange(stored - tail, stored, device=self.device).expand(bsz, tail),
            ],
            dim=1,
        )
        self._gather(index)

    def _drop(self, i: int) -> None:
        """Remove stored token ``i`` (batch size 1)."""
        self.keys = torch.cat([self.keys[:, :, :i], self.keys[:, :, i + 1 :]], dim=2)
        self.values = torch.cat([self.values[:, :, :i], self.values[:, :, i + 1 :]], dim=2)
        self.positions = torch.cat([self.positions[:, :i], self.positions[:, i + 1 :]], dim=1)
        self.priorities = torch.cat([self.priorities[:, :i], self.priorities[:, i + 1 :]], dim=1)

    def _gather(self, index: torch.Tensor) -> None:
        """Keep the stored tokens at ``index`` (``[B, S']`` long) in every row."""
        self.keys = _take(self.keys, index)
        self.values = _take(self.values, index)
        self.positions = self.positions.gather(1, index)
        self.priorities = self.priorities.gather(1, index)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the mask: the stored tokens plus the new queries.

        The queries keep their absolute positions (``get_seq_length`` onwards), so the keys are
        numbered as if the stored ones were the tokens just before them: offset ``seen - stored``.
        ``query_length`` is the query count (or ``cache_position`` on releases before 5.4).
        """
        stored = self.stored_length
        return stored + mask_query_length(query_length), self.cumulative_length - stored

    def get_seq_length(self) -> int:
        """Absolute number of tokens seen (not the stored count), used to place new positions."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.config.budget is None or not self.config.evicts else self.config.budget

    def get_max_cache_shape(self) -> int:
        """The name of :meth:`get_max_length` before transformers 5.24 (abstract there)."""
        return self.get_max_length()

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.priorities = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.prompt_length = None
        self.evicted = 0
        self.unscored_updates = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a budgeted cache cannot be cropped (evicted tokens cannot be restored)")

    def _select_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension selection to every stored tensor."""
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.positions, self.priorities = fn(self.positions), fn(self.priorities)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda t: t[indices, ...])
