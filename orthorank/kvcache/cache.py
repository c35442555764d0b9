"""`BudgetCache`: a transformers `Cache` that keeps each layer's K/V within a token budget.

Works with stock ``model.generate(..., past_key_values=cache)`` (or ``cache=cache``) and with a
plain ``model(input_ids, cache=cache)`` loop. Design decisions:

* Positions stay absolute. ``get_seq_length()`` returns the number of tokens seen, so the model
  places new tokens (RoPE) at their true positions and numbers the queries of the mask with them;
  ``get_mask_sizes`` returns the stored count plus the new tokens, at offset ``seen - stored``, so the
  causal mask matches the stored keys (on every release: the mask takes the query positions from
  ``cache_position`` up to 5.3 and from ``get_seq_length`` / ``get_query_offset`` after). Cached keys carry RoPE of
  their own absolute positions already.
* ``milestone`` and ``attention`` scores come from the real query of the step (``attention`` only
  reads it in the steps that evict): the cache registers, on the model
  instance only, a forward pre-hook on each attention module (RoPE ``cos``/``sin`` and scale) and a
  forward hook on its ``q_proj`` (the projected query). In ``update`` it applies RoPE to that query
  and recomputes the softmax over the stored keys, so it works with every attention kernel (sdpa,
  eager, ...). Hooks are installed by passing the model instead of its config, or by
  :meth:`BudgetCache.attach`, and removed by :meth:`BudgetCache.detach` (or leaving a ``with`` block).
* The same hooks give the ``separators`` policy the token ids, and reject padded batches (a 2D
  attention mask with zeros): after eviction the stored tokens no longer line up with the columns of
  the padding mask. Batches without padding work, each row evicting its own tokens.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from .layer import BudgetLayer
from .policies import QUERY_POLICIES, BudgetConfig, separator_ids as tokenizer_separator_ids

logger = logging.getLogger(__name__)


@dataclass
class _QuerySlot:
    """What the hooks captured for one attention module during the current forward."""

    cos: torch.Tensor
    sin: torch.Tensor
    scaling: float
    query: torch.Tensor | None = None  # [B, T, H_q * D], q_proj output before RoPE
    #: the thread whose forward armed the slot: a q_proj output of another thread (another
    #: generation running on the same model at the same time) is not this cache's query
    thread: int = field(default_factory=threading.get_ident)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _uses_cache(cache: "BudgetCache", kwargs: dict[str, Any]) -> bool:
    return kwargs.get("cache") is cache or kwargs.get("past_key_values") is cache


class BudgetCache(Cache):
    """A KV cache that never stores more than ``budget`` tokens per layer between forward passes.

    Args:
        model_or_config: the model (hooks are attached at once, needed by ``milestone``,
            ``attention`` and ``separators``) or its config (call :meth:`attach` later if the policy needs it).
        budget: most stored tokens per layer; ``None`` with ``policy="full"``.
        policy: one of ``"milestone"``, ``"attention"``, ``"sink_window"``, ``"separators"``, ``"full"``.
        tokenizer: for ``separators``: its punctuation/newline tokens are the separators.
        separator_ids: for ``separators``: explicit token ids instead of ``tokenizer``.
        **params: other :class:`~orthorank.kvcache.policies.BudgetConfig` fields
            (``n_sink``, ``window``, ``top_fraction``, ``head_reduce``, ``page_size``, ``protect_prompt``,
            ``headroom``).

    Example::

        cache = BudgetCache(model, budget=1024, policy="milestone")
        out = model.generate(input_ids, max_new_tokens=4096, past_key_values=cache)
    """

    def __init__(
        self,
        model_or_config: nn.Module | PretrainedConfig,
        budget: int | None = 1024,
        policy: str = "milestone",
        *,
        tokenizer: Any = None,
        separator_ids: Iterable[int] | None = None,
        **params: Any,
    ) -> None:
        model = model_or_config if isinstance(model_or_config, nn.Module) else None
        config = model.config if model is not None else model_or_config
        if not isinstance(config, PretrainedConfig):
            raise TypeError(f"expected a model or a transformers config, got {type(model_or_config).__name__}")
        self.config = config.get_text_config(decoder=True)
        self.budget_config = BudgetConfig(policy=policy, budget=budget, **params)
        super().__init__(layers=[BudgetLayer(self.budget_config) for _ in range(self.config.num_hidden_layers)])
        self._separator_table = self._build_separator_table(tokenizer, separator_ids)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._slots: dict[int, _QuerySlot] = {}
        self._step_separators: torch.Tensor | None = None
        if getattr(self.config, "sliding_window", None) is not None and self.budget_config.evicts:
            logger.info("the model's sliding window is applied to the stored tokens as if they were contiguous")
        if model is not None:
            self.attach(model)

    # ----------------------------------------------------------------------------------- setup
    def _build_separator_table(self, tokenizer: Any, ids: Iterable[int] | None) -> torch.Tensor | None:
        if self.budget_config.policy != "separators":
            if tokenizer is not None or ids is not None:
                raise ValueError("tokenizer / separator_ids only apply to policy='separators'")
            return None
        if (tokenizer is None) == (ids is None):
            raise ValueError("policy='separators' needs exactly one of tokenizer= or separator_ids=")
        chosen = list(tokenizer_separator_ids(tokenizer) if tokenizer is not None else ids)
        vocab = max(self.config.vocab_size, len(tokenizer) if tokenizer is not None else 0)
        if not chosen or min(chosen) < 0 or max(chosen) >= vocab:
            raise ValueError(f"separator ids must be a non-empty set within [0, {vocab})")
        table = torch.zeros(vocab, dtype=torch.bool)
        table[torch.tensor(chosen, dtype=torch.long)] = True
        return table

    @property
    def attached(self) -> bool:
        """Whether hooks are installed on a model."""
        return bool(self._hooks)

    def attach(self, model: nn.Module) -> "BudgetCache":
        """Install the capture hooks on this model instance (idempotent per cache). Returns ``self``."""
        if self._hooks:
            self.detach()
        ref = weakref.ref(self)
        self._hooks.append(model.register_forward_pre_hook(_model_pre_hook(ref), with_kwargs=True))
        if self.budget_config.policy in QUERY_POLICIES:
            found = 0
            for module in model.modules():
                if hasattr(module, "q_proj") and isinstance(getattr(module, "layer_idx", None), int):
                    self._hooks.append(module.register_forward_pre_hook(_attention_pre_hook(ref), with_kwargs=True))
                    self._hooks.append(module.q_proj.register_forward_hook(_q_proj_hook(ref, module.layer_idx)))
                    found += 1
            if found == 0:
                self.detach()
                raise ValueError(
                    f"no attention module with q_proj and layer_idx found; "
                    f"{self.budget_config.policy!r} cannot see queries"
                )
        return self

    def detach(self) -> None:
        """Remove every hook this cache installed."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._slots.clear()

    def __enter__(self) -> "BudgetCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ----------------------------------------------------------------------------------- hooks
    def _on_model_forward(self, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 2:
                raise ValueError("BudgetCache supports only 2D attention masks (or none)")
            if not bool(mask.all()):
                raise ValueError(
                    "BudgetCache does not support padded batches: after eviction the stored tokens no longer "
                    "match the columns of the padding mask. Use equal-length rows or batch size 1."
                )
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._step_separators = None
        if self._separator_table is not None and isinstance(ids, torch.Tensor):
            if self._separator_table.device != ids.device:
                self._separator_table = self._separator_table.to(ids.device)
            self._step_separators = self._separator_table[ids]

    def _arm(self, layer_idx: int, position_embeddings: Any, scaling: float) -> None:
        if isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2:
            cos, sin = position_embeddings
            self._slots[layer_idx] = _QuerySlot(cos=cos, sin=sin, scaling=float(scaling))
        else:
            self._slots.pop(layer_idx, None)

    def _capture_query(self, layer_idx: int, output: torch.Tensor) -> None:
        slot = self._slots.get(layer_idx)
        if slot is not None and slot.query is None and slot.thread == threading.get_ident():
            slot.query = output

    def _take_query(self, layer_idx: int, key_states: torch.Tensor) -> tuple[torch.Tensor | None, float | None]:
        """The post-RoPE query ``[B, H_q, T, D]`` captured for this layer and step, or ``None``."""
        slot = self._slots.pop(layer_idx, None)
        if slot is None or slot.query is None:
            return None, None
        bsz, _, t_new, dim = key_states.shape
        raw = slot.query
        if raw.shape[0] != bsz or raw.shape[1] != t_new or raw.shape[-1] % dim:
            return None, None
        query = raw.view(bsz, t_new, -1, dim).transpose(1, 2)
        cos, sin = slot.cos.unsqueeze(1), slot.sin.unsqueeze(1)
        return torch.addcmul(query * cos, _rotate_half(query), sin), slot.scaling

    # ----------------------------------------------------------------------------------- Cache API
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new K/V of ``layer_idx`` (``[B, H_kv, T, D]``) and return ``[B, H_kv, S + T, D]``."""
        layer = self.layers[layer_idx]
        policy = self.budget_config.policy
        query, scaling, separators = None, None, None
        if policy in QUERY_POLICIES and self.budget_config.evicts:
            needs = layer.needs_query(key_states.shape[-2])
            if needs:
                query, scaling = self._take_query(layer_idx, key_states)
            else:
                self._slots.pop(layer_idx, None)
            if query is None and needs:
                if not self.attached:
                    raise RuntimeError(
                        f"policy={policy!r} needs the queries: create BudgetCache(model, ...) "
                        "or call cache.attach(model)"
                    )
                if layer.unscored_updates == 0:
                    logger.warning("layer %d: no query captured for this step; scored by position instead", layer_idx)
        elif policy == "separators":
            separators = self._step_separators
            if separators is None or separators.shape != key_states.shape[:1] + key_states.shape[2:3]:
                raise RuntimeError(
                    "policy='separators' needs the token ids of each forward: create BudgetCache(model, ...) or call "
                    "cache.attach(model), and pass input_ids (not inputs_embeds)"
                )
        return layer.update(key_states, value_states, query=query, scaling=scaling, separators=separators)

    def reset(self) -> None:
        super().reset()
        self._slots.clear()
        self._step_separators = None

    # ----------------------------------------------------------------------------------- reporting
    def kv_bytes(self) -> int:
        """Bytes of the K/V tensors stored now, all layers."""
        return sum(
            layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized
        )

    def stats(self) -> dict[str, int]:
        """Stored and absolute lengths (layer 0), evicted and unscored counts (all layers), K/V bytes."""
        first = self.layers[0]
        return {
            "stored": first.stored_length,
            "seen": first.cumulative_length,
            "evicted": sum(layer.evicted for layer in self.layers),
            "unscored_updates": sum(layer.unscored_updates for layer in self.layers),
            "kv_bytes": self.kv_bytes(),
        }

    def __repr__(self) -> str:
        cfg = self.budget_config
        return f"BudgetCache(policy={cfg.policy!r}, budget={cfg.budget}, layers={len(self.layers)})"


#: torch registers a ``with_kwargs`` hook in two steps (the hook, then its "with kwargs" flag): a
#: forward running in another thread between them calls it without ``kwargs``. Such a forward is
#: not this cache's (the cache's own generation starts after ``attach`` returns), so the hooks
#: below take ``kwargs=None`` as "not mine".


def _model_pre_hook(ref: "weakref.ref[BudgetCache]"):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> None:
        cache = ref()
        if cache is not None and kwargs is not None and _uses_cache(cache, kwargs):
            cache._on_model_forward(args, kwargs)

    return hook


def _attention_pre_hook(ref: "weakref.ref[BudgetCache]"):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> None:
        cache = ref()
        if cache is None or kwargs is None or not _uses_cache(cache, kwargs):
            return
        embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        scaling = getattr(module, "scaling", module.head_dim**-0.5)
        cache._arm(module.layer_idx, embeddings, scaling)

    return hook


def _q_proj_hook(ref: "weakref.ref[BudgetCache]", layer_idx: int):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        cache = ref()
        if cache is not None:
            cache._capture_query(layer_idx, output)

    return hook
