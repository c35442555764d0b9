"""FLOP-ideal speed-ups of a plan, from the model config alone.

The FLOP count is the library's (:class:`orthorank.flops.LayerCosts`, :func:`orthorank.flops.prefill_flops`,
:func:`orthorank.flops.decode_flops`): matmul FLOPs of every decoder layer, where a selection layer
pays key/value projections for every token and the rest only for the tokens it updates, and a
removed layer costs nothing. Norms, RoPE, softmax, scoring and gathers are ignored: the ideal is
an upper bound.
"""

from __future__ import annotations

from typing import Any

from orthorank.flops import LayerCosts, decode_flops, prefill_flops
from orthorank.plan import Plan

__all__ = ["LayerCosts", "decode_flops", "ideal_decode_speedup", "ideal_prefill_speedup", "prefill_flops"]


def ideal_prefill_speedup(config: Any, plan: Plan | None, seq: int, logits_tokens: int = 1, keep_min: int = 0) -> float:
    """Dense FLOPs / plan FLOPs for a forward over ``seq`` tokens (``keep_min``: the patch's floor)."""
    return prefill_flops(config, None, seq, logits_tokens) / prefill_flops(config, plan, seq, logits_tokens, keep_min)


def ideal_decode_speedup(config: Any, plan: Plan | None, context: int, decode: str = "dense") -> float:
    """Dense FLOPs / plan FLOPs for one decode step after ``context`` tokens."""
    return decode_flops(config, None, context) / decode_flops(config, plan, context, decode)
