"""The plan of ``patch(model, sparsity=s)`` when no plan or layers are given, and its quality report.

Resolution order (:func:`resolve_plan`):

1. a plan shipped with the package for this model (:mod:`orthorank.shipped`, by fingerprint);
2. a plan in the user's cache (:mod:`orthorank.plancache`) made with the current recipe;
3. a plan calibrated now on text the model generates itself (:func:`orthorank.selfcalib.auto_calibrate`),
   then written to the cache.

A greedy search to a higher sparsity passes through the plans it gives at lower ones, so a
shipped or cached search also serves any sparsity one of its rounds reaches (within half a
selection step). :func:`budget_plan` uses that to answer a quality budget: it takes the search
to :data:`BUDGET_MAX_SPARSITY` and the highest-sparsity round whose calibration perplexity rose
at most that much. :func:`report_quality` logs a plan's expected perplexity increase and warns
above :data:`QUALITY_WARNING`.

Logging: a calibration (minutes on a CPU, then cached) is announced by one line at WARNING level
on the ``orthorank.autoplan`` logger, because transformers users rarely configure logging and
Python's last-resort handler prints only warnings and above; what it found in the shipped plans
or the cache is logged at INFO. Progress bars (tqdm, ``progress=``) show the generation and search.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any

from torch import nn

from . import compat, plancache, selfcalib, shipped
from .config import DEFAULT_OBJECTIVE
from .fingerprint import model_fingerprint
from .layer import ranking_key
from .plan import Plan
from .recipe import Recipe, recipe_for
from .search import SearchConfig, closest_round, plan_at_round, round_sparsities

logger = logging.getLogger(__name__)

#: ``patch`` warns when a plan's expected perplexity increase (calibration text) is above this.
QUALITY_WARNING = 0.25

#: The sparsity a quality-budget search goes up to (capped by what the model can reach).
BUDGET_MAX_SPARSITY = 0.5

_KEEP_MATCH = 1e-3


def step_tolerance(num_layers: int, keep_ratio: float) -> float:
    """Half the sparsity one selection layer adds: a search lands this close to any reachable target."""
    return 0.5 * (1.0 - keep_ratio) / num_layers + 1e-9


def max_sparsity(num_layers: int, keep_ratio: float, recipe: Recipe) -> float:
    """The highest sparsity the recipe's search can reach on a model with ``num_layers`` layers."""
    eligible = SearchConfig(0.1, exclude=recipe.exclude).eligible(num_layers)
    lowest = min(recipe.levels(keep_ratio))
    return len(eligible) * (1.0 - lowest) / num_layers


def round_increases(plan: Plan) -> list[float] | None:
    """Expected perplexity increase after 0, 1, ... rounds (``None`` without rounds and losses)."""
    history, dense = plan.meta.get("rounds"), plan.meta.get("dense_loss")
    if not isinstance(history, list) or not history or not isinstance(dense, (int, float)):
        return None
    return [0.0] + [math.expm1(step["loss"] - dense) for step in history]


def plan_for_sparsity(plan: Plan, sparsity: float, tolerance: float) -> Plan | None:
    """``plan`` itself, or the plan after one of its search rounds, if within ``tolerance`` of ``sparsity``."""
    if abs(plan.sparsity - sparsity) <= tolerance:
        return plan
    best = closest_round(plan, sparsity)
    return best if best is not plan and abs(best.sparsity - sparsity) <= tolerance else None


def _tag(plan: Plan, origin: str) -> Plan:
    return dataclasses.replace(plan, meta={**plan.meta, "origin": origin})


def _from_shipped(
    fp: str, sparsity: float, keep: float, selector: str, objective: str, n: int, model_type: str | None
) -> Plan | None:
    tol = step_tolerance(n, keep)
    entries = [
        e for e in shipped.read_entries(fp, n, model_type)
        if e["selector"] == selector and e["objective"] == objective and abs(e["keep_ratio"] - keep) <= _KEEP_MATCH
    ]
    for entry in sorted(entries, key=lambda e: abs(e["sparsity"] - sparsity)):
        if abs(entry["sparsity"] - sparsity) <= tol:
            return entry["plan"]
    for entry in sorted(entries, key=lambda e: e["sparsity"]):
        found = plan_for_sparsity(entry["plan"], sparsity, tol)
        if found is not None:
            return found
    return None


def _from_cache(fp: str, sparsity: float, keep: float, selector: str, key: str, n: int, model_type: str | None) -> Plan | None:
    request = plancache.request_dict(sparsity, keep, selector, key)
    exact = plancache.plan_path(fp, sparsity, keep, selector, key)
    plan = plancache.read_plan(exact, fp, n, model_type, request)
    if plan is not None:
        return plan
    any_sparsity = {**request, "sparsity": None}
    for path in plancache.cached_searches(fp, keep, selector, key):
        if path == exact:
            continue
        other = plancache.read_plan(path, fp, n, model_type, any_sparsity)
        found = None if other is None else plan_for_sparsity(other, sparsity, step_tolerance(n, keep))
        if found is not None:
            return found
    return None


def resolve_plan(
    model: nn.Module, sparsity: float, keep_ratio: float, selector: str = "attention",
    objective: str = DEFAULT_OBJECTIVE, *, cache: bool = True, progress: bool = True,
) -> Plan:
    """The plan for ``model`` at ``sparsity`` > 0 chosen for ``objective``: shipped, else cached,
    else calibrated now with the objective's recipe (:func:`orthorank.recipe.recipe_for`), and cached.

    ``plan.meta["origin"]`` says which: ``"shipped"``, ``"cache"`` or ``"calibrated"``.

    Raises:
        ValueError: ``sparsity`` out of the recipe's reach on this model (the message gives the limit).
    """
    recipe = recipe_for(objective)
    n = len(compat.decoder_layers(model))
    model_type = model.config.model_type
    limit = max_sparsity(n, keep_ratio, recipe)
    if sparsity > limit + step_tolerance(n, keep_ratio):
        raise ValueError(
            f"sparsity {sparsity} is out of reach: at keep_ratio {keep_ratio:.3g}, "
            f"{len(SearchConfig(0.1, exclude=recipe.exclude).eligible(n))} of {n} layers may select (the "
            f"{objective!r} objective leaves layers {list(recipe.exclude)} dense); "
            f"use sparsity <= {math.floor(limit * 1000) / 1000} or a lower keep_ratio"
        )
    fp = model_fingerprint(model)
    plan = _from_shipped(fp, sparsity, keep_ratio, selector, objective, n, model_type)
    if plan is not None:
        logger.info("orthorank: using the plan shipped for this model (fingerprint %s) at sparsity %.3f", fp, sparsity)
        return _tag(plan, "shipped")
    key = search_key(recipe, selector)
    if cache:
        plan = _from_cache(fp, sparsity, keep_ratio, selector, key, n, model_type)
        if plan is not None:
            return _tag(plan, "cache")
    plan = selfcalib.auto_calibrate(model, sparsity, keep_ratio, selector, recipe=recipe, progress=progress)
    plan = dataclasses.replace(plan, meta={**plan.meta, "fingerprint": fp})
    where = "not cached (cache=False)"
    if cache:
        path = plancache.plan_path(fp, sparsity, keep_ratio, selector, key)
        request = plancache.request_dict(sparsity, keep_ratio, selector, key)
        where = f"cached in {path}" if plancache.write_plan(path, plan, fp, request) else "not cached (see above)"
    increase = plan.expected_ppl_increase
    logger.warning(
        "orthorank: no plan known for this model at sparsity %.3f (objective %r), so one was calibrated on %dx%d "
        "tokens the model generated itself in %.1f s (expected %s %+.1f%% on that text); %s",
        sparsity, objective, recipe.windows, recipe.window, plan.meta["seconds"], quality_metric(plan),
        100 * (increase or 0.0), where,
    )
    return _tag(plan, "calibrated")


def search_key(recipe: Recipe, selector: str) -> str:
    """The plan-cache key of a search: the recipe's and the selector's ranking's."""
    return recipe.key() + ranking_key(selector)


def check_budget(value: Any) -> float:
    """A quality budget: a finite number > 0 (0.1 allows perplexity to rise by 10%)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"max_ppl_increase must be a number, got {type(value).__name__}")
    if not 0.0 < float(value) < math.inf:
        raise ValueError(f"max_ppl_increase must be a finite number > 0 (0.1 = +10% perplexity), got {value}")
    return float(value)


def budget_plan(
    model: nn.Module, max_ppl_increase: float, keep_ratio: float, selector: str = "attention",
    objective: str = DEFAULT_OBJECTIVE, *, cache: bool = True, progress: bool = True,
) -> Plan:
    """The highest-sparsity plan whose calibration perplexity rose at most ``max_ppl_increase``.

    Picks among the rounds of the search to ``min(BUDGET_MAX_SPARSITY, reachable)`` found by
    :func:`resolve_plan`; the dense plan when no round fits the budget.
    """
    budget = check_budget(max_ppl_increase)
    n = len(compat.decoder_layers(model))
    cap = min(BUDGET_MAX_SPARSITY, max_sparsity(n, keep_ratio, recipe_for(objective)))
    search = resolve_plan(model, cap, keep_ratio, selector, objective, cache=cache, progress=progress)
    increases = round_increases(search)
    if increases is None:
        raise ValueError("the plan found for this model records no search rounds; pass sparsity= instead")
    best = max(r for r, inc in enumerate(increases) if inc <= budget)
    plan = plan_at_round(search, best)
    logger.info(
        "orthorank: max_ppl_increase %.3g -> sparsity %.3f after %d of %d search rounds (expected perplexity %+.1f%%)",
        budget, plan.sparsity, best, len(increases) - 1, 100 * increases[best],
    )
    return plan


def quality_metric(plan: Plan) -> str:
    """What ``plan.expected_ppl_increase`` measures, in words (from the objective it was searched for)."""
    if plan.meta.get("objective") == "generation":
        return "perplexity of answers generated after a prompt (half of them recalled from it)"
    return "perplexity of every token of a text"


def report_quality(plan: Plan, *, warn: bool = True, stacklevel: int = 2) -> None:
    """Log ``plan``'s expected quality cost; warn if it exceeds :data:`QUALITY_WARNING`."""
    increase = plan.expected_ppl_increase
    if increase is None:
        return
    metric = quality_metric(plan)
    logger.info("orthorank: expected %s %+.1f%% (on the calibration text)", metric, 100 * increase)
    if not warn or increase <= QUALITY_WARNING:
        return
    points, increases = round_sparsities(plan), round_increases(plan)
    if points is None or increases is None:
        advice = "use a lower sparsity"
    else:
        fits = [r for r, inc in enumerate(increases) if inc <= QUALITY_WARNING and r > 0]
        advice = (
            f"sparsity {points[max(fits)]:.3f} stays under {QUALITY_WARNING:.0%} "
            f"(or pass max_ppl_increase={QUALITY_WARNING} instead of sparsity)"
            if fits else f"no sparsity of its search stays under {QUALITY_WARNING:.0%}"
        )
    warnings.warn(
        f"orthorank: this plan (sparsity {plan.sparsity:.3f}) raises the {metric} by about {increase:.0%} "
        f"on its calibration text, more than {QUALITY_WARNING:.0%}; {advice}",
        UserWarning,
        stacklevel=stacklevel + 1,
    )
