"""lm-eval-harness on a patched model: ``python -m orthorank.eval`` and :func:`evaluate`.

    from orthorank.eval import evaluate
    orthorank.patch(model, sparsity=0.2)
    result = evaluate(model, tokenizer, ["orthorank_wiki_cloze"], batch_size=8,
                      include_path="benchmarks/tasks")
    result["results"]["orthorank_wiki_cloze"]["acc,none"]

lm-eval is an optional dependency (``pip install 'orthorank[eval]'``), imported only when a
function here runs (or ``MaskedHFLM`` is read). Its ``HFLM`` calls the model on right-padded
batches without an attention mask; ``MaskedHFLM`` (:mod:`orthorank.eval.adapter`) passes the mask,
so a patched model computes each row as if alone and results do not depend on the batch size.
"""

from __future__ import annotations

from typing import Any

from .adapter import masked_hflm
from .run import EvalOptions, evaluate, lm_eval_model, require_lm_eval, to_json

__all__ = ["EvalOptions", "MaskedHFLM", "evaluate", "lm_eval_model", "require_lm_eval", "to_json"]


def __getattr__(name: str) -> Any:
    if name == "MaskedHFLM":
        require_lm_eval()
        return masked_hflm()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
