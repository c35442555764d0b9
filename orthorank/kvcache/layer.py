"""One layer of a budgeted KV cache: stores K/V plus absolute positions and priorities."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from .policies import SEPARATOR_BONUS, BudgetConfig, attention_hits, eviction_count, page_priority, select_keep

logger = logging.getLogger(__name__)


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
            query: ``[B, H_q, T, D]`` post-RoPE queries of the new tokens (``milestone``); ``None``
                leaves old timestamps unrefreshed for this step.
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
                    hits = attention_hits(query, keys, scaling, cfg.top_fraction, cfg.head_reduce)  # [B, T, S+T]
                    stamp = torch.where(hits, new_pos[:, :, None], -1).amax(dim=1)  # [B, S+T]
                priorities = torch.maximum(priorities, stamp)

        self.keys, self.values, self.positions, self.priorities = keys, values, positions, priorities
        if cfg.evicts:
            self._evict()
        return keys, values

    def _check_prompt(self, prompt_length: int) -> None:
        cfg = self.config
        if cfg.policy == "milestone" and cfg.protect_prompt and cfg.evicts:
            if prompt_length + cfg.window > cfg.budget:
                raise ValueError(
                    f"budget={cfg.budget} cannot hold the protected prompt ({prompt_length} tokens) plus the "
                    f"recent window ({cfg.window}); raise the budget or use protect_prompt=False"
                )

    def protected_mask(self) -> torch.Tensor:
        """``[B, S]`` bool: stored tokens the policy never evicts (sink, recent window, prompt)."""
        cfg = self.config
        pos = self.positions
        keep = (pos < cfg.n_sink) | (pos >= self.cumulative_length - cfg.window)
        if cfg.policy == "milestone" and cfg.protect_prompt:
            keep |= pos < (self.prompt_length or 0)
        return keep

    def _evict(self) -> None:
        cfg = self.config
        stored = self.stored_length
        if stored <= cfg.budget:
            return
        protected = self.protected_mask()
        n_protected = int(protected.sum(-1).max())
        n_evict = eviction_count(stored, cfg.budget, n_protected, cfg.page_size)
        if n_evict <= 0:
            return
        prio = page_priority(self.priorities, self.positions, cfg.page_size)
        keep = select_keep(prio, protected, n_evict)  # [B, S - n_evict]
        self._gather(keep)
        self.evicted += n_evict

    def _gather(self, index: torch.Tensor) -> None:
        """Keep the stored tokens at ``index`` (``[B, S']`` long) in every row."""
        if index.shape[0] == 1:  # one row: a plain index_select is much faster than gather
            self.keys = self.keys.index_select(2, index[0])
            self.values = self.values.index_select(2, index[0])
        else:
            kv_index = index[:, None, :, None]
            self.keys = self.keys.gather(2, kv_index.expand(-1, self.keys.shape[1], -1, self.keys.shape[-1]))
            self.values = self.values.gather(2, kv_index.expand(-1, self.values.shape[1], -1, self.values.shape[-1]))
        self.positions = self.positions.gather(1, index)
        self.priorities = self.priorities.gather(1, index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the mask: the stored tokens plus the new queries."""
        return self.stored_length + query_length, 0

    def get_seq_length(self) -> int:
        """Absolute number of tokens seen (not the stored count), used to place new positions."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.config.budget is None or not self.config.evicts else self.config.budget

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
