"""Calibration without user data: the model writes its own calibration text.

:func:`self_generated_ids` samples continuations of the model's BOS token from the dense model;
:func:`auto_calibrate` runs the greedy plan search (:func:`orthorank.search.search_plan`) on
them. Every constant of that procedure lives in :data:`RECIPE` (a :class:`Recipe`), and
``RECIPE.key()`` is part of the plan-cache key, so plans cached under an older recipe are not
reused after it changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from . import compat
from .config import OBJECTIVES, SELECTORS, check_choice, check_fraction
from .install import running_dense
from .metrics import check_batch_size
from .objective import generation_windows
from .plan import Plan
from .runner import LossRunner
from .search import SearchConfig, search_plan

logger = logging.getLogger(__name__)

__all__ = ["GENERATION_RECIPE", "RECIPE", "Recipe", "auto_calibrate", "recipe_for", "self_generated_ids", "start_token"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_temperature(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Recipe:
    """How :func:`auto_calibrate` makes a plan.

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
        _positive_int("windows", self.windows)
        _positive_int("window", self.window)
        if self.window < 2:
            raise ValueError(f"window must be >= 2 tokens, got {self.window}")
        _check_temperature(self.temperature)
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


def _token_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def start_token(model: nn.Module) -> int:
    """The token generated text starts from: BOS, else EOS (a document boundary in models without BOS).

    Read from ``model.config``, then ``model.generation_config``.

    Raises:
        ValueError: the model declares neither.
    """
    sources = [getattr(model, "config", None), getattr(model, "generation_config", None)]
    for attr in ("bos_token_id", "eos_token_id"):
        for source in sources:
            token = _token_id(getattr(source, attr, None))
            if token is not None:
                return token
    raise ValueError(
        "the model's config declares no bos_token_id or eos_token_id to start self-generated text from; "
        "calibrate on your own text (orthorank.calibrate) and pass plan=, or pass layers="
    )


def _row_generator(seed: int, row: int) -> torch.Generator:
    """The private generator of one generated row (distinct for every (seed, row))."""
    digest = hashlib.sha256(f"orthorank-selfcalib:{seed}:{row}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.inference_mode()
def _sample_rows(
    model: nn.Module, window: int, start: int, temperature: float, gens: list[torch.Generator], bar: Any
) -> torch.Tensor:
    """``[len(gens), window]`` ids: ``start`` then ``window - 1`` tokens, row ``r`` sampled with ``gens[r]``."""
    rows = len(gens)
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    name = compat.model_cache_kwarg(model)
    tokens = [torch.full((rows, 1), start, dtype=torch.long)]
    for _ in range(window - 1):
        logits = model(input_ids=tokens[-1].to(device), use_cache=True, logits_to_keep=1, **{name: cache}).logits
        probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1).cpu()
        tokens.append(torch.cat([torch.multinomial(probs[r : r + 1], 1, generator=g) for r, g in enumerate(gens)]))
        bar.update(rows)
    return torch.cat(tokens, dim=1)


def self_generated_ids(
    model: nn.Module,
    n_windows: int,
    window: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Text sampled from the dense model itself, starting at its BOS token (see :func:`start_token`).

    Each row draws from its own private ``torch.Generator`` derived from ``seed`` and the row index:
    the result depends only on the model, ``seed``, ``n_windows`` and ``window`` (not on
    ``batch_size``), and the global RNG state is left untouched. A patched model is
    sampled densely (its patch is restored afterwards). Sampled EOS tokens do not stop a row.

    Args:
        n_windows: rows to generate.
        window: tokens per row, the start token included (>= 2).
        temperature: softmax temperature (> 0).
        batch_size: rows per generation batch (default: all at once).

    Returns:
        LongTensor ``[n_windows, window]`` on the CPU.
    """
    n_windows = _positive_int("n_windows", n_windows)
    if _positive_int("window", window) < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    temperature = _check_temperature(temperature)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    batch_size = n_windows if batch_size is None else check_batch_size(batch_size)
    compat.arch_spec(model)
    start = start_token(model)
    chunks = []
    with running_dense(model), tqdm(
        total=n_windows * (window - 1), desc="orthorank: generating calibration text", unit="tok", disable=not progress
    ) as bar:
        for first in range(0, n_windows, batch_size):
            gens = [_row_generator(seed, row) for row in range(first, min(first + batch_size, n_windows))]
            chunks.append(_sample_rows(model, window, start, temperature, gens, bar))
    return torch.cat(chunks)


def auto_calibrate(
    model: nn.Module,
    sparsity: float,
    keep_ratio: float,
    selector: str = "orthogonal",
    *,
    recipe: Recipe | None = None,
    progress: bool = True,
) -> Plan:
    """A plan for ``model`` at ``sparsity`` searched on text the model generates (no user data).

    Generates ``recipe.windows`` x ``recipe.window`` tokens with :func:`self_generated_ids`, then
    runs the greedy search with the recipe's settings (``recipe`` defaults to :data:`RECIPE`).
    ``plan.meta`` records the source (``"self-generated"``), the recipe and its key, the keep
    ratio, the seconds spent (``seconds`` in all, ``generation_seconds``, ``search_seconds``), the
    dense and final calibration loss and the rounds of the search.
    """
    recipe = RECIPE if recipe is None else recipe
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be an orthorank.selfcalib.Recipe, got {type(recipe).__name__}")
    keep_ratio = check_fraction("keep_ratio", keep_ratio, low_open=True, high_open=True)
    check_choice("selector", selector, SELECTORS)
    config = SearchConfig(
        sparsity=sparsity,
        levels=recipe.levels(keep_ratio),
        exclude=recipe.exclude,
        selector=selector,
        jumps=recipe.jumps,
        shortlist=recipe.shortlist,
        deepest=recipe.deepest,
    )
    started = time.perf_counter()
    window = min(recipe.window, int(getattr(model.config, "max_position_embeddings", None) or recipe.window))
    ids = self_generated_ids(
        model, recipe.windows, window, seed=recipe.seed, temperature=recipe.temperature,
        batch_size=recipe.batch_size, progress=progress,
    )
    generated = time.perf_counter() - started
    prompt = None
    if recipe.objective == "generation":
        ids, prompt = generation_windows(ids, prompt_docs=recipe.prompt_docs, answer=recipe.answer, count=recipe.rows)
    runner = LossRunner(model, ids, batch_size=recipe.batch_size, prompt=prompt)
    plan = search_plan(runner, config, progress=progress)
    total = time.perf_counter() - started
    plan.meta.update(
        source="self-generated",
        objective=recipe.objective,
        recipe=recipe.to_dict(),
        recipe_key=recipe.key(),
        keep_ratio=round(keep_ratio, 6),
        target_sparsity=round(sparsity, 6),
        generation_seconds=round(generated, 1),
        search_seconds=plan.meta["seconds"],
        seconds=round(total, 1),
        flops_saved=round(plan.flops_fraction(model.config, window), 4),
        flops_seq_len=window,
    )
    return plan
