"""orthorank: training-free token selection (OrthoRank) for HuggingFace Transformers models.

    import orthorank
    orthorank.patch(model, sparsity=0.2)   # selection layers on an already-loaded model (its plan:
                                           # shipped, cached, or calibrated on self-generated text)
    model.generate(...)                    # stock generate / pipeline
    orthorank.unpatch(model)               # back to the exact dense model
"""

from .baselines import random_control, shortgpt_plan, sleb_plan
from .calibration import SearchConfig, calibrate, plan_at_round
from .compat import supported_model_types
from .fingerprint import model_fingerprint
from .config import DECODE_POLICIES, DEFAULT_KEEP_RATIO, DEFAULT_SPARSITY, SELECTORS, PatchOptions
from .kvcache import BudgetCache, BudgetConfig
from .layer import LayerStats
from .metrics import perplexity
from .patch import get_plan, is_patched, layer_stats, patch, patched, unpatch
from .plan import Plan, default_plan, layers_plan
from .selfcalib import auto_calibrate, self_generated_ids
from .shipped import save_shipped_plan

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
    "SearchConfig",
    "auto_calibrate",
    "calibrate",
    "default_plan",
    "get_plan",
    "is_patched",
    "layer_stats",
    "layers_plan",
    "model_fingerprint",
    "patch",
    "patched",
    "perplexity",
    "plan_at_round",
    "random_control",
    "save_shipped_plan",
    "self_generated_ids",
    "shortgpt_plan",
    "sleb_plan",
    "supported_model_types",
    "unpatch",
]
