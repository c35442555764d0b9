"""Calibrated plans for a model and its text: the greedy search (:mod:`orthorank.search`) on
calibration windows, then, as SLEB would, block removal to the same sparsity; the plan with the
lower loss on held-back windows is returned (``versus_removal``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import DEFAULT_KEEP_RATIO, check_fraction
from .plan import Plan
from .runner import LossRunner
from .search import SearchConfig, removal_search, search_plan
from .text import token_windows

logger = logging.getLogger(__name__)

__all__ = ["SAME_SPARSITY", "calibrate", "calibration_ids"]

#: a removal plan competes with a searched plan when their sparsities differ by at most this much
SAME_SPARSITY = 0.005


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
    return token_windows(tokenizer, texts_or_ids, window, n_windows)


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
        levels, exclude, selector, jumps: see :class:`orthorank.search.SearchConfig`.
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
