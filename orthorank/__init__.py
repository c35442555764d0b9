"""orthorank: training-free token selection (OrthoRank) for HuggingFace Transformers models.

    import orthorank
    orthorank.patch(model, sparsity=0.2)   # selection layers on an already-loaded model
    model.generate(...)                    # stock generate / pipeline
    orthorank.unpatch(model)               # back to the exact dense model
"""

from .compat import supported_model_types
from .config import DECODE_POLICIES, DEFAULT_KEEP_RATIO, DEFAULT_SPARSITY, SELECTORS, PatchOptions
from .kvcache import BudgetCache, BudgetConfig
from .layer import LayerStats
from .patch import get_plan, is_patched, layer_stats, patch, patched, unpatch
from .plan import Plan, default_plan, layers_plan

__version__ = "0.1.0"

__all__ = [
    "BudgetCache",
    "BudgetConfig",
    "DECODE_POLICIES",
    "DEFAULT_KEEP_RATIO",
    "DEFAULT_SPARSITY",
    "LayerStats",
    "PatchOptions",
    "Plan",
    "SELECTORS",
    "default_plan",
    "get_plan",
    "is_patched",
    "layer_stats",
    "layers_plan",
    "patch",
    "patched",
    "supported_model_types",
    "unpatch",
]
