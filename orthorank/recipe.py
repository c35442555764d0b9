"""How self-calibration makes a plan: the :class:`Recipe` of each objective.

Every constant of the procedure in :mod:`orthorank.selfcalib` lives in a recipe: :data:`RECIPE`
for the ``perplexity`` objective, :data:`GENERATION_RECIPE` for ``generation``
(:func:`recipe_for` picks one). ``Recipe.key()`` is part of the plan-cache key, so plans cached
under an older recipe are not reused after it changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import OBJECTIVES, check_choice, check_fraction, check_positive_int
from .metrics import check_batch_size
from .objective import generation_windows
from .search import SearchConfig

__all__ = ["GENERATION_RECIPE", "RECIPE", "Recipe", "check_temperature", "recipe_for"]


def check_temperature(value: object) -> float:
    """A sampling temperature as a float: a finite number > 0, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Recipe:
    """How :func:`orthorank.selfcalib.auto_calibrate` makes a plan.

    Attributes:
        windows: number of generated windows.
        window: tokens per window (BOS included), capped at the model's ``max_position_embeddings``.
        temperature: sampling temperature of the generated text (> 0; 1 samples the model as is).
        seed: seed of the sampling generator.
        removal: the search may also remove layers (levels ``(1, keep_ratio, 0)``); else it only
            makes selection layers (``(1, keep_ratio)``, the paper's search).
        low_keep_ratio: a lower keep ratio a selection layer may step down to in a later round
            (levels ``(1, keep_ratio, low_keep_ratio)``), or ``None``; ignored for a ``keep_ratio``
            at or below it.
        jumps, shortlist, exclude, deepest: see :class:`orthorank.search.SearchConfig`.
        batch_size: windows per forward pass (generation and search).
        objective: ``perplexity`` searches on the whole-window loss of the generated windows;
            ``generation`` builds continuation and recall windows from them
            (:func:`orthorank.objective.generation_windows`, ``prompt_docs``, ``answer``,
            ``rows``) and searches on the loss of the answers after a prefill of the prompt.

    The defaults were chosen by measurement on the embedded SmolLM2-135M-Instruct at sparsity 0.2
    (``benchmarks/experiments/generation_loss.py``): 8 windows of 128 tokens gave 11 of 16 chat answers
    right (dense: 14; 2 x 512: 10; 16 x 64: 11) at held-out perplexity within 3% of the plan
    searched on real text, and generate 4x faster than 2 x 512 (one step per token, 8 rows a
    step); sampling at temperature 0.7 or 0.5 gave plans 40-50% worse on held-out text.
    """

    windows: int = 8
    window: int = 128
    temperature: float = 1.0
    seed: int = 0
    removal: bool = False
    low_keep_ratio: float | None = None
    jumps: bool = False
    shortlist: int | None = 10
    exclude: tuple[int, ...] = (0, -1)
    deepest: int | None = None
    batch_size: int = 1
    objective: str = "perplexity"
    prompt_docs: int = 1
    answer: int = 64
    rows: int | None = None

    def __post_init__(self) -> None:
        check_positive_int("windows", self.windows)
        check_positive_int("window", self.window)
        if self.window < 2:
            raise ValueError(f"window must be >= 2 tokens, got {self.window}")
        check_temperature(self.temperature)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        check_batch_size(self.batch_size)
        if self.low_keep_ratio is not None:
            check_fraction("low_keep_ratio", self.low_keep_ratio, low_open=True, high_open=True)
        check_choice("objective", self.objective, OBJECTIVES)
        if self.objective == "generation":  # validates the window sizes
            generation_windows(torch.zeros(self.windows, self.window, dtype=torch.long), prompt_docs=self.prompt_docs,
                               answer=self.answer, count=self.rows)
        SearchConfig(0.1, exclude=tuple(self.exclude), jumps=self.jumps, shortlist=self.shortlist,
                     deepest=self.deepest)  # validates

    def levels(self, keep_ratio: float) -> tuple[float, ...]:
        """Keep ratios the search may give a layer, descending."""
        low = self.low_keep_ratio
        selection = (1.0, keep_ratio) if low is None or low >= keep_ratio else (1.0, keep_ratio, low)
        return selection + (0.0,) if self.removal else selection

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "exclude": list(self.exclude)}

    def key(self) -> str:
        """Short hash of the recipe (part of the plan-cache key)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


#: The recipe of the ``perplexity`` objective (the only place its constants live).
RECIPE = Recipe()

#: The recipe of the ``generation`` objective: 8 generated documents of 128 tokens; 4 prompts of
#: two whole documents and half of a third (320 tokens), each scored on 64 answer tokens twice:
#: the rest of the third document (continuation) and a span of the first (recall). The search
#: grows the plan from the end of the model (``deepest=4``: each round steps down one of the 4
#: deepest layers that can still step down, the last layer included): on the embedded model a
#: search free to pick any layer chose early layers whose cost the 320-token prompts do not show
#: and lost pass keys at 512-4096 tokens (docs/results.md). A selection layer may later step down
#: from 1/3 to 1/12 (``low_keep_ratio``): the late layers then carry more of the sparsity, and the
#: middle layers, which retrieval needs, stay dense longer (benchmarks/RESEARCH.md). The plans
#: shipped for the embedded model were searched with it (``benchmarks/experiments/generation_search.py``).
GENERATION_RECIPE = Recipe(objective="generation", windows=8, window=128, prompt_docs=2, answer=64, rows=4,
                           exclude=(0,), deepest=4, low_keep_ratio=1 / 12)


def recipe_for(objective: str) -> Recipe:
    """The self-calibration recipe of ``objective`` (one of :data:`orthorank.config.OBJECTIVES`)."""
    check_choice("objective", objective, OBJECTIVES)
    return GENERATION_RECIPE if objective == "generation" else RECIPE
