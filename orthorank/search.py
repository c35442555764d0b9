"""The greedy plan search, in the manner of SLEB: which layers select tokens, and how many they keep.

Each round tries, for every eligible layer, the next lower keep ratio among ``levels`` (with the
paper's ``levels=(1, 1/3)``: turning a dense layer into a selection layer), scores each candidate
by the calibration loss with the real selective layers active, and keeps the candidate that costs
the least loss per unit of sparsity gained. It stops when no step brings the plan's sparsity
closer to the target. Hidden states before the changed layer are reused from one recorded pass of
the round's parent plan (:class:`orthorank.runner.LossRunner`). A search records its rounds in the
plan, so one search to a high sparsity gives the plans of every lower one (:func:`plan_at_round`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from .config import DEFAULT_KEEP_RATIO, SELECTORS, check_choice, check_fraction
from .plan import Plan
from .runner import LossRunner

logger = logging.getLogger(__name__)

__all__ = ["SearchConfig", "closest_round", "plan_at_round", "removal_search", "round_sparsities", "search_plan"]

_TOL = 1e-9


@dataclass(frozen=True)
class SearchConfig:
    """What a greedy plan search may do.

    Attributes:
        sparsity: target sparsity in [0, 1) (``Plan.sparsity``: mean of ``1 - keep_ratio``).
        levels: keep ratios a layer may take, descending from 1.0 (e.g. ``(1.0, 1/3)``;
            ``(1.0, 1/3, 0.0)`` also lets a layer be removed; ``(1.0, 2/3, 1/3)`` finer steps).
        exclude: layers that stay dense (negative indices count from the end).
        selector: how selection layers rank tokens, one of :data:`orthorank.config.SELECTORS`.
        jumps: a step may skip intermediate levels (try every lower level, not just the next).
        shortlist: after the first round, re-score only this many candidates, those with the
            lowest cost in the previous round (``None``: every candidate, every round).
            :func:`orthorank.calibrate` uses 10.
        deepest: each round considers only the ``deepest`` last layers that can still step down
            (``None``: every eligible layer). A token a selection layer skips changes only the
            keys and values of the layers after it, so the plans of the ``generation`` objective
            grow from the end of the model; the loss decides which of the deepest layers goes
            next, stepping around layers that generation needs.
    """

    sparsity: float
    levels: tuple[float, ...] = (1.0, DEFAULT_KEEP_RATIO)
    exclude: tuple[int, ...] = (0, -1)
    selector: str = "orthogonal"
    jumps: bool = False
    shortlist: int | None = None
    deepest: int | None = None

    def __post_init__(self) -> None:
        for name in ("shortlist", "deepest"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        check_fraction("sparsity", self.sparsity, high_open=True)
        levels = tuple(check_fraction(f"levels[{i}]", v) for i, v in enumerate(self.levels))
        if len(levels) < 2 or levels[0] != 1.0 or any(a <= b for a, b in zip(levels, levels[1:])):
            raise ValueError(f"levels must start at 1.0 and strictly decrease, e.g. (1.0, 1/3); got {self.levels}")
        object.__setattr__(self, "levels", levels)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in self.exclude):
            raise TypeError(f"exclude must be a sequence of layer indices (ints); got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        check_choice("selector", self.selector, SELECTORS)

    def eligible(self, num_layers: int) -> list[int]:
        """Layers the search may change."""
        for i in self.exclude:
            if not -num_layers <= i < num_layers:
                raise ValueError(f"exclude holds layer {i}, outside the model's {num_layers} layers")
        excluded = {i % num_layers for i in self.exclude}
        return [i for i in range(num_layers) if i not in excluded]


def _steps(ratios: tuple[float, ...], layer: int, config: SearchConfig) -> list[float]:
    lower = [v for v in config.levels if v < ratios[layer]]
    return lower if config.jumps else lower[:1]


def _open_layers(ratios: tuple[float, ...], eligible: list[int], config: SearchConfig) -> list[int]:
    """The layers a round may step down: eligible, above the lowest level, the ``deepest`` last ones."""
    open_ = [i for i in eligible if ratios[i] > config.levels[-1]]
    return open_ if config.deepest is None else open_[-config.deepest:]


def search_plan(
    runner: LossRunner,
    config: SearchConfig,
    *,
    method: str = "calibrated",
    progress: bool = True,
    start: Plan | None = None,
) -> Plan:
    """Greedy search from the dense plan (or from ``start``) to ``config.sparsity`` (see the module docstring).

    Args:
        start: a plan made by an earlier search on the same windows (e.g. a prefix of a search
            to a higher sparsity, :func:`plan_at_round`): its rounds are kept and the search goes
            on from it. Its first round here re-scores every candidate (no shortlist yet).

    Returns a plan whose ``meta`` records the search: rounds (layer, new keep ratio, loss), dense
    and final loss, forward passes (full-forward equivalents over the calibration windows) and
    seconds.
    """
    started = time.perf_counter()
    n = runner.num_layers
    eligible = config.eligible(n)
    target = config.sparsity
    history: list[dict[str, Any]] = []
    dense_loss = None
    if start is not None:
        if not isinstance(start, Plan) or not isinstance(start.meta.get("rounds"), list):
            raise TypeError("start must be a Plan made by a search (with meta['rounds'])")
        start.check_model(n, runner.model_type)
        history = [dict(r) for r in start.meta["rounds"]]
        dense_loss = start.meta.get("dense_loss")
    ratios0 = start.keep_ratios if start is not None else (1.0,) * n
    current = Plan(ratios0, selector=config.selector, model_type=runner.model_type, method=method)
    parent = runner.record(current)
    if dense_loss is None:
        dense_loss = parent.loss
    last_cost: dict[tuple[int, float], float] = {}
    bar = tqdm(desc=f"{method} search", unit="cand", disable=not progress)
    while True:
        gap = abs(current.sparsity - target)
        candidates = []
        for layer in _open_layers(current.keep_ratios, eligible, config):
            for ratio in _steps(current.keep_ratios, layer, config):
                ratios = list(current.keep_ratios)
                ratios[layer] = ratio
                plan = Plan(tuple(ratios), config.selector, runner.model_type, method)
                if abs(plan.sparsity - target) < gap - _TOL:
                    candidates.append((layer, ratio, plan))
        if not candidates:
            break
        if config.shortlist is not None and last_cost:
            candidates.sort(key=lambda c: (last_cost.get((c[0], c[1]), float("-inf")), c[0]))
            candidates = candidates[: config.shortlist]
        bar.total = (bar.total or 0) + len(candidates)
        scored = []
        for layer, ratio, plan in candidates:
            loss = runner.loss(plan, parent)
            gained = plan.sparsity - current.sparsity
            scored.append(((loss - parent.loss) / gained, layer, -ratio, loss, plan))
            last_cost[(layer, ratio)] = scored[-1][0]
            bar.update()
        cost, layer, neg_ratio, loss, current = min(scored, key=lambda t: t[:3])
        history.append({"layer": layer, "keep_ratio": -neg_ratio, "loss": round(loss, 6)})
        logger.info("round %d: layer %d -> keep %.3g, loss %.4f", len(history), layer, -neg_ratio, loss)
        bar.set_postfix(layer=layer, loss=f"{loss:.4f}")
        parent = runner.record(current)
    bar.close()
    meta = {
        "levels": [round(v, 6) for v in config.levels],
        "exclude": list(config.exclude),
        "jumps": config.jumps,
        "shortlist": config.shortlist,
        "deepest": config.deepest,
        "calib_windows": runner.ids.shape[0],
        "calib_seq_len": runner.ids.shape[1],
        "calib_tokens": runner.ids.numel(),
        "dense_loss": round(dense_loss, 6),
        "final_loss": round(parent.loss, 6),
        "rounds": history,
        "forward_passes": round(runner.cost.forward_passes, 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return Plan(current.keep_ratios, config.selector, runner.model_type, method, meta)


def plan_at_round(plan: Plan, rounds: int) -> Plan:
    """The plan a search had after its first ``rounds`` rounds (from ``plan.meta["rounds"]``).

    A greedy search to a higher sparsity passes through the plans it would return for lower
    targets, so one search gives a whole sparsity sweep.
    """
    history = plan.meta.get("rounds")
    if not isinstance(history, list) or not 0 <= rounds <= len(history):
        raise ValueError(f"rounds must be in [0, {len(history) if isinstance(history, list) else 0}] for this plan")
    ratios = [1.0] * plan.num_layers
    for step in history[:rounds]:
        ratios[step["layer"]] = step["keep_ratio"]
    meta = {**plan.meta, "rounds": history[:rounds]}
    meta["final_loss"] = history[rounds - 1]["loss"] if rounds else meta.get("dense_loss")
    meta.pop("flops_saved", None)
    return Plan(tuple(ratios), plan.selector, plan.model_type, plan.method, meta)


def round_sparsities(plan: Plan) -> list[float] | None:
    """Sparsity after 0, 1, ... rounds of the search that made ``plan`` (``None`` without rounds)."""
    history = plan.meta.get("rounds")
    if not isinstance(history, list) or not history:
        return None
    ratios = [1.0] * plan.num_layers
    out = [0.0]
    for step in history:
        ratios[step["layer"]] = step["keep_ratio"]
        out.append(sum(1.0 - r for r in ratios) / plan.num_layers)
    return out


def closest_round(plan: Plan, sparsity: float) -> Plan:
    """The plan after the round of ``plan``'s search whose sparsity is closest to ``sparsity``
    (the earliest on ties; ``plan`` itself when it records no rounds)."""
    points = round_sparsities(plan)
    if points is None:
        return plan
    return plan_at_round(plan, min(range(len(points)), key=lambda r: (abs(points[r] - sparsity), r)))


def removal_search(
    runner: LossRunner, blocks: int, *, exclude: Sequence[int] = (0, -1), method: str = "sleb", progress: bool = True
) -> Plan:
    """SLEB's greedy block removal: ``blocks`` rounds, each removing the block that raises the loss least.

    Every eligible block is re-scored every round (no shortlist), as in SLEB.
    """
    eligible = SearchConfig(0.0, exclude=tuple(exclude)).eligible(runner.num_layers)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= len(eligible):
        raise ValueError(f"blocks must be an int in [0, {len(eligible)}] (the eligible blocks), got {blocks!r}")
    config = SearchConfig(sparsity=blocks / runner.num_layers, levels=(1.0, 0.0), exclude=tuple(exclude))
    return search_plan(runner, config, method=method, progress=progress)
