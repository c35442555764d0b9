"""FLOP-ideal speed-ups of a plan, from the model config alone.

Matmul FLOPs (2 per multiply-add) of a Llama/Mistral decoder layer over ``n`` tokens, per token:
query ``2·h·H·d``, key+value ``4·h·G·d``, output ``2·H·d·h``, MLP ``6·h·I`` (``h`` hidden size,
``H`` query heads, ``G`` key/value heads, ``d`` head dim, ``I`` MLP width), plus causal attention
``4·H·d·(p + 1)`` for the query at position ``p``. In a selection layer every token still pays its
key/value projections; only the ``k`` selected tokens pay query, output, MLP and attention (their
positions assumed spread evenly, so attention costs ``k / n`` of the dense layer's). A removed
layer costs nothing. The output layer costs ``2·h·V`` per token whose logits are computed.
Norms, RoPE, softmax, scoring and gathers are ignored: the ideal is an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import tokens_to_keep
from ..plan import Plan


@dataclass(frozen=True)
class LayerCosts:
    """Per-token FLOPs of one decoder layer's parts (see the module docstring)."""

    query: float
    key_value: float
    output: float
    mlp: float
    attention_per_key: float
    head: float

    @classmethod
    def from_config(cls, config: Any) -> "LayerCosts":
        h = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        d = getattr(config, "head_dim", None) or h // heads
        return cls(
            query=2.0 * h * heads * d,
            key_value=4.0 * h * kv_heads * d,
            output=2.0 * heads * d * h,
            mlp=6.0 * h * config.intermediate_size,
            attention_per_key=4.0 * heads * d,
            head=2.0 * h * config.vocab_size,
        )


def prefill_flops(config: Any, plan: Plan | None, seq: int, logits_tokens: int = 1) -> float:
    """FLOPs of one row's forward over ``seq`` tokens (a cache-less start of the sequence).

    Args:
        plan: ``None`` or a dense plan for the dense model.
        logits_tokens: tokens whose logits are computed (1 as in ``generate``'s prefill, ``seq``
            for a full forward).
    """
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq must be a positive int, got {seq!r}")
    c = LayerCosts.from_config(config)
    ratios = (1.0,) * config.num_hidden_layers if plan is None else plan.keep_ratios
    if len(ratios) != config.num_hidden_layers:
        raise ValueError(f"plan has {len(ratios)} layers, the config {config.num_hidden_layers}")
    dense_attention = c.attention_per_key * seq * (seq + 1) / 2
    total = 0.0
    for ratio in ratios:
        if ratio == 0.0:
            continue
        k = seq if ratio == 1.0 else tokens_to_keep(ratio, seq)
        total += seq * c.key_value + k * (c.query + c.output + c.mlp) + dense_attention * k / seq
    return total + logits_tokens * c.head


def decode_flops(config: Any, plan: Plan | None, context: int, decode: str = "dense") -> float:
    """FLOPs of one decode step (one new token per row) after ``context`` cached tokens.

    With ``decode="dense"`` selection layers run densely in decode steps; with ``"bypass"`` they
    only compute the new token's key/value. Removed layers cost nothing either way.
    """
    c = LayerCosts.from_config(config)
    ratios = (1.0,) * config.num_hidden_layers if plan is None else plan.keep_ratios
    full = c.query + c.key_value + c.output + c.mlp + c.attention_per_key * (context + 1)
    total = 0.0
    for ratio in ratios:
        if ratio == 0.0:
            continue
        total += c.key_value if (ratio < 1.0 and decode == "bypass") else full
    return total + c.head


def ideal_prefill_speedup(config: Any, plan: Plan | None, seq: int, logits_tokens: int = 1) -> float:
    """Dense FLOPs / plan FLOPs for a forward over ``seq`` tokens."""
    return prefill_flops(config, None, seq, logits_tokens) / prefill_flops(config, plan, seq, logits_tokens)


def ideal_decode_speedup(config: Any, plan: Plan | None, context: int, decode: str = "dense") -> float:
    """Dense FLOPs / plan FLOPs for one decode step after ``context`` tokens."""
    return decode_flops(config, None, context) / decode_flops(config, plan, context, decode)
