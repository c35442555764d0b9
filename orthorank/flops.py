"""FLOP counts of a plan: what a selection layer still computes, for prefill and decode.

Matmul FLOPs only (2 per multiply-add), of a Llama-shaped decoder: :class:`LayerCosts` per token,
:func:`prefill_flops` / :func:`decode_flops` of a whole forward, :func:`flops_fraction` the share a
plan skips. Norms, RoPE, softmax, ranking and row copies are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .config import check_positive_int, tokens_to_keep


class PlanLike(Protocol):
    """What a FLOP count reads of a plan (:class:`orthorank.Plan` has it)."""

    @property
    def keep_ratios(self) -> tuple[float, ...]: ...

    @property
    def num_layers(self) -> int: ...


def _dims(config: Any) -> tuple[int, int, int, int, int, int, int]:
    """``(hidden, intermediate, heads, kv heads, head dim, vocab, layers)`` of a Llama-shaped
    config (or of a model's config)."""
    config = getattr(config, "config", config)
    try:
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        return (hidden, int(config.intermediate_size), heads, kv_heads, head_dim, int(config.vocab_size),
                int(config.num_hidden_layers))
    except AttributeError as err:
        raise TypeError(f"config must be a Llama-shaped transformers config (or a model); {err}") from err


@dataclass(frozen=True)
class LayerCosts:
    """Per-token matmul FLOPs (2 per multiply-add) of a Llama/Mistral decoder layer's parts.

    ``h`` hidden size, ``H`` query heads, ``G`` key/value heads, ``d`` head dim, ``I`` MLP width,
    ``V`` vocabulary: query ``2·h·H·d``, key+value ``4·h·G·d``, output ``2·H·d·h``, MLP ``6·h·I``,
    causal attention ``4·H·d`` per key attended, and the output layer ``2·h·V`` per token whose
    logits are computed. Norms, RoPE, softmax, scoring and gathers are not counted.
    """

    query: float
    key_value: float
    output: float
    mlp: float
    attention_per_key: float
    head: float
    num_layers: int

    @classmethod
    def from_config(cls, config: Any) -> "LayerCosts":
        """The costs of a transformers config (or of a model)."""
        h, inter, heads, kv_heads, d, vocab, layers = _dims(config)
        return cls(
            query=2.0 * h * heads * d,
            key_value=4.0 * h * kv_heads * d,
            output=2.0 * heads * d * h,
            mlp=6.0 * h * inter,
            attention_per_key=4.0 * heads * d,
            head=2.0 * h * vocab,
            num_layers=layers,
        )


def flops_fraction(plan: PlanLike, config: Any, seq_len: int, *, include_head: bool = True) -> float:
    """Estimated share of a dense forward's FLOPs (one ``seq_len``-token row) that ``plan`` skips.

    Counts the :class:`LayerCosts` of every layer and token, with causal attention over on average
    ``(seq_len + 1) / 2`` keys. A selection layer with keep ratio ``r`` still computes K/V for
    every token and the rest for a share ``r``; a removed layer costs nothing. With
    ``include_head`` the dense total includes the output embedding (the LM head), which no plan
    skips.
    """
    check_positive_int("seq_len", seq_len)
    c = LayerCosts.from_config(config)
    if c.num_layers != plan.num_layers:
        raise ValueError(f"the plan has {plan.num_layers} layers but the config has {c.num_layers}")
    kv = c.key_value
    rest = c.query + c.output + c.mlp + c.attention_per_key * (seq_len + 1) / 2
    dense = c.num_layers * (kv + rest) + (c.head if include_head else 0)
    skipped = sum(kv + rest if r == 0.0 else (1.0 - r) * rest for r in plan.keep_ratios)
    return skipped / dense


def _keep_ratios(plan: PlanLike | None, c: LayerCosts) -> tuple[float, ...]:
    ratios = (1.0,) * c.num_layers if plan is None else plan.keep_ratios
    if len(ratios) != c.num_layers:
        raise ValueError(f"plan has {len(ratios)} layers, the config {c.num_layers}")
    return ratios


def prefill_flops(config: Any, plan: PlanLike | None, seq: int, logits_tokens: int = 1, keep_min: int = 0) -> float:
    """FLOPs of one row's forward over ``seq`` tokens that starts the sequence (no cache).

    A selection layer computes key/value for every token and the rest (query, output, MLP,
    attention) for the ``tokens_to_keep(r, seq, keep_min)`` tokens it updates, their positions
    assumed spread evenly (attention costs ``k / seq`` of the dense layer's).

    Args:
        plan: ``None`` (or a dense plan) for the dense model.
        logits_tokens: tokens whose logits are computed (1 as in ``generate``'s prefill, ``seq``
            for a full forward).
        keep_min: the patch's floor of updated tokens (``PatchOptions.keep_min``; it matters only
            when ``seq < keep_min / r``).
    """
    check_positive_int("seq", seq)
    c = LayerCosts.from_config(config)
    dense_attention = c.attention_per_key * seq * (seq + 1) / 2
    total = 0.0
    for ratio in _keep_ratios(plan, c):
        if ratio == 0.0:
            continue
        k = seq if ratio == 1.0 else tokens_to_keep(ratio, seq, keep_min)
        total += seq * c.key_value + k * (c.query + c.output + c.mlp) + dense_attention * k / seq
    return total + logits_tokens * c.head


def decode_flops(config: Any, plan: PlanLike | None, context: int, decode: str = "dense") -> float:
    """FLOPs of one decode step (one new token per row) after ``context`` cached tokens.

    With ``decode="dense"`` selection layers run densely in decode steps; with ``"bypass"`` they
    only compute the new token's key/value. Removed layers cost nothing either way.
    """
    c = LayerCosts.from_config(config)
    full = c.query + c.key_value + c.output + c.mlp + c.attention_per_key * (context + 1)
    total = 0.0
    for ratio in _keep_ratios(plan, c):
        if ratio == 0.0:
            continue
        total += c.key_value if (ratio < 1.0 and decode == "bypass") else full
    return total + c.head
