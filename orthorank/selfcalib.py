"""Calibration without user data: the model writes its own calibration text.

:func:`self_generated_ids` samples continuations of the model's BOS token from the dense model;
:func:`auto_calibrate` runs the greedy plan search (:func:`orthorank.search.search_plan`) on
them, with the settings of a :class:`orthorank.recipe.Recipe`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from . import compat
from .config import SELECTORS, check_choice, check_fraction, check_positive_int
from .install import running_dense
from .metrics import check_batch_size
from .objective import generation_windows
from .plan import Plan
from .recipe import Recipe, check_temperature, recipe_for
from .runner import LossRunner
from .search import SearchConfig, search_plan

logger = logging.getLogger(__name__)

__all__ = ["auto_calibrate", "self_generated_ids", "start_token"]


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
    n_windows = check_positive_int("n_windows", n_windows)
    if check_positive_int("window", window) < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    temperature = check_temperature(temperature)
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
    runs the greedy search with the recipe's settings (``recipe`` defaults to
    :data:`orthorank.recipe.RECIPE`, the ``perplexity`` objective's).
    ``plan.meta`` records the source (``"self-generated"``), the recipe and its key, the keep
    ratio, the seconds spent (``seconds`` in all, ``generation_seconds``, ``search_seconds``), the
    dense and final calibration loss and the rounds of the search.
    """
    recipe = recipe_for("perplexity") if recipe is None else recipe
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be an orthorank.recipe.Recipe, got {type(recipe).__name__}")
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
