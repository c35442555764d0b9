"""Calibrated plans: a greedy search, in the manner of SLEB, for the layers that select tokens.

Each round tries, for every eligible layer, the next lower keep ratio among ``levels`` (with the
paper's ``levels=(1, 1/3)``: turning a dense layer into a selection layer), scores each candidate
by the calibration loss with the real selective layers active, and keeps the candidate that costs
the least loss per unit of sparsity gained. It stops when no step brings the plan's sparsity
closer to the target. Hidden states before the changed layer are reused from one recorded pass of
the round's parent plan (:class:`orthorank.runner.LossRunner`). :func:`calibrate` then compares
the result with SLEB's block removal at the same sparsity, judged on held-back windows, and
returns the better plan (``versus_removal``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import DEFAULT_KEEP_RATIO, SELECTORS, check_choice, check_fraction
from .metrics import perplexity
from .plan import Plan
from .runner import LossRunner
from .text import token_windows

logger = logging.getLogger(__name__)

__all__ = [
    "SearchConfig", "calibrate", "calibration_ids", "closest_round", "perplexity", "plan_at_round", "removal_search",
    "round_sparsities", "search_plan",
]

_TOL = 1e-9
#: a removal plan competes with a searched plan when their sparsities differ by at most this much
SAME_SPARSITY = 0.005


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
            :func:`calibrate` uses 10.
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


def _versus_removal(
    runner: LossRunner, plan: Plan, exclude: Sequence[int], progress: bool, check: LossRunner | None = None
) -> Plan:
    """``plan``, or the SLEB plan of the same sparsity (within :data:`SAME_SPARSITY`) when its loss
    is lower: on ``check`` (held-back windows neither search saw) if given, else on the search
    windows. The comparison is recorded in ``meta["versus_removal"]``."""
    blocks = round(plan.sparsity * runner.num_layers)
    eligible = len(SearchConfig(0.0, exclude=tuple(exclude)).eligible(runner.num_layers))
    if plan.is_dense or abs(blocks / runner.num_layers - plan.sparsity) > SAME_SPARSITY or not 1 <= blocks <= eligible:
        plan.meta["versus_removal"] = None
        return plan
    removal = removal_search(runner, blocks, exclude=exclude, method=plan.method, progress=progress)
    searched_loss, removal_loss = plan.meta["final_loss"], removal.meta["final_loss"]
    comparison: dict[str, Any] = {"searched_loss": searched_loss, "removal_loss": removal_loss, "removal_blocks": blocks,
                                  "judged_on": "search windows"}
    if check is not None:
        searched_loss, removal_loss = check.loss(plan), check.loss(removal)
        comparison.update(judged_on=f"{check.ids.shape[0]} held-back windows", searched_check_loss=round(searched_loss, 6),
                          removal_check_loss=round(removal_loss, 6))
    chosen = removal if removal_loss < searched_loss else plan
    comparison.update(chosen="removal" if chosen is removal else "searched",
                      removal_forward_passes=removal.meta["forward_passes"])
    if chosen is removal:
        comparison["searched_rounds"] = plan.meta["rounds"]
        for key in ("levels", "jumps", "shortlist"):
            removal.meta[key] = plan.meta[key]
    chosen.meta["versus_removal"] = comparison
    chosen.meta["forward_passes"] = round(runner.cost.forward_passes, 2)
    chosen.meta["seconds"] = round(plan.meta["seconds"] + removal.meta["seconds"], 1)
    logger.info("orthorank: searched plan loss %.4f, removal (SLEB) plan loss %.4f at sparsity %.3f (%s): %s wins",
                searched_loss, removal_loss, plan.sparsity, comparison["judged_on"], comparison["chosen"])
    return chosen


def calibration_ids(
    tokenizer: Any, texts_or_ids: Sequence[str] | torch.Tensor, *, window: int, n_windows: int | None
) -> torch.Tensor:
    """``[n, seq]`` token ids: ``texts_or_ids`` itself if it is a tensor, else windows cut from texts."""
    if isinstance(texts_or_ids, torch.Tensor):
        return texts_or_ids
    if tokenizer is None:
        raise TypeError("calibrating on texts needs a tokenizer; pass one, or token ids [n, seq] as a LongTensor")
    return token_windows(tokenizer, list(texts_or_ids), window, n_windows)


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    texts_or_ids: Sequence[str] | torch.Tensor,
    sparsity: float,
    *,
    keep_ratio: float = DEFAULT_KEEP_RATIO,
    levels: Sequence[float] | None = None,
    exclude: Sequence[int] = (0, -1),
    selector: str = "orthogonal",
    jumps: bool = True,
    shortlist: int | None = 10,
    window: int = 512,
    n_windows: int | None = 2,
    batch_size: int = 1,
    versus_removal: bool = True,
    check_windows: int = 4,
    progress: bool = True,
) -> Plan:
    """Search the plan of ``model`` at ``sparsity`` on calibration text (see the module docstring).

    Args:
        tokenizer: used when ``texts_or_ids`` are strings (``None`` with token ids).
        texts_or_ids: documents (cut into ``n_windows`` windows of ``window`` tokens) or a LongTensor
            ``[n, seq]`` of token ids (used as given).
        sparsity: target sparsity; the result is the closest the levels reach (``plan.sparsity``).
        keep_ratio: keep ratio of selection layers when ``levels`` is not given. The default
            levels are ``(1.0, keep_ratio, 0.0)`` with ``jumps``: each round a layer may become a
            selection layer or be removed, whichever costs less loss per unit of sparsity (a
            hybrid plan; measured best on SmolLM2, see the README). ``levels=(1.0, keep_ratio)``
            with ``jumps=False`` is the paper's search (selection layers only).
        levels, exclude, selector, jumps: see :class:`SearchConfig`.
        batch_size: windows per forward pass.
        versus_removal: also run SLEB's block removal to the same sparsity (when whole blocks reach
            it within :data:`SAME_SPARSITY`) on the same windows and return whichever plan has the
            lower loss (it costs one more search). ``meta["versus_removal"]`` records both.
        check_windows: with texts, the two plans are compared on this many further windows cut
            after the search windows (text neither search saw: on the search windows the
            search's own plan is favoured by overfitting); with token ids, or when the texts
            run out, on the search windows.
        progress: show a progress bar.

    Returns:
        A :class:`orthorank.Plan` with ``method="calibrated"`` and the search cost in ``meta``.
    """
    keep_ratio = check_fraction("keep_ratio", keep_ratio, low_open=False, high_open=True)
    if isinstance(check_windows, bool) or not isinstance(check_windows, int) or check_windows < 0:
        raise ValueError(f"check_windows must be an int >= 0, got {check_windows!r}")
    config = SearchConfig(
        sparsity=sparsity,
        levels=tuple(levels) if levels is not None else (1.0, keep_ratio, 0.0),
        exclude=tuple(exclude),
        selector=selector,
        jumps=jumps,
        shortlist=shortlist,
    )
    ids = calibration_ids(tokenizer, texts_or_ids, window=window, n_windows=n_windows)
    check = None
    if versus_removal and check_windows and not isinstance(texts_or_ids, torch.Tensor) and n_windows is not None:
        try:
            more = calibration_ids(tokenizer, texts_or_ids, window=window, n_windows=n_windows + check_windows)
            check = LossRunner(model, more[n_windows:], batch_size=batch_size)
        except ValueError:
            logger.info("orthorank: not enough text for %d held-back windows; comparing on the search windows", check_windows)
    runner = LossRunner(model, ids, batch_size=batch_size)
    plan = search_plan(runner, config, progress=progress)
    if versus_removal:
        plan = _versus_removal(runner, plan, config.exclude, progress, check)
    seq = ids.shape[1]
    plan.meta.update(flops_saved=round(plan.flops_fraction(model.config, seq), 4), flops_seq_len=seq)
    logger.info("orthorank: calibrated %s", plan)
    return plan
