"""orthorank: training-free token selection (OrthoRank) for HuggingFace Transformers models.

    import orthorank
    orthorank.patch(model, sparsity=0.2)   # selection layers on an already-loaded model (its plan:
                                           # shipped, cached, or calibrated on self-generated text)
    model.generate(...)                    # stock generate / pipeline
    orthorank.unpatch(model)               # back to the exact dense model

Everything else lives in the submodules: plans (:mod:`orthorank.plan`: ``layers_plan``,
``default_plan``; their FLOPs: :mod:`orthorank.flops`), the greedy plan search
(:mod:`orthorank.search`), calibration on your text (:mod:`orthorank.calibration`), layer-pruning
baselines (:mod:`orthorank.baselines`), self-calibration (:mod:`orthorank.selfcalib`; its settings:
:mod:`orthorank.recipe`), shipped plans (:mod:`orthorank.shipped`), the KV budget
(:mod:`orthorank.kvcache`), the analysis (:mod:`orthorank.analysis`) and lm-eval
(:mod:`orthorank.eval`).
"""

from .calibration import calibrate
from .compat import supported_model_types
from .kvcache import BudgetCache
from .patch import get_plan, is_patched, layer_stats, patch, patched, unpatch
from .plan import Plan

__version__ = "0.1.0"

__all__ = [
    "BudgetCache",
    "Plan",
    "__version__",
    "calibrate",
    "get_plan",
    "is_patched",
    "layer_stats",
    "patch",
    "patched",
    "supported_model_types",
    "unpatch",
]
