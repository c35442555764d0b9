"""Bounded-memory decoding: a KV cache that keeps at most ``budget`` tokens per layer.

``BudgetCache`` plugs into stock ``generate()`` (also on an OrthoRank-patched model) with one of the
policies ``milestone`` (reasoning-aware timestamps), ``attention`` (TOVA: the newest query's
attention), ``sink_window`` (attention sink + recent
window), ``separators`` (sink + punctuation/newline tokens + recent window) or ``full`` (control).
"""

from .cache import BudgetCache
from .layer import BudgetLayer
from .policies import POLICIES, BudgetConfig, separator_ids

__all__ = ["POLICIES", "BudgetCache", "BudgetConfig", "BudgetLayer", "separator_ids"]
