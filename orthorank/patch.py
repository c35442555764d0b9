"""The front door: ``patch`` / ``unpatch`` / ``patched`` on one model instance, reversibly.

:func:`patch` chooses the plan from its arguments (explicit layers, a plan, or a sparsity or
quality budget answered by :mod:`orthorank.autoplan`) and installs it with
:mod:`orthorank.install`, which holds everything about what is installed and how.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from os import PathLike
from typing import Any

from torch import nn

from . import autoplan, compat
from .config import (
    DEFAULT_KEEP_RATIO, DEFAULT_OBJECTIVE, DEFAULT_SPARSITY, OBJECTIVE_DEFAULTS, OBJECTIVES, PatchOptions, check_choice,
    check_fraction,
)
from .install import get_plan, handle, install, is_patched, layer_stats, restore, uninstall
from .plan import Plan, layers_plan

logger = logging.getLogger(__name__)

__all__ = ["get_plan", "is_patched", "layer_stats", "patch", "patched", "unpatch"]


def _make_plan(
    model: nn.Module,
    sparsity: float | None,
    layers: Sequence[int] | None,
    keep_ratio: float,
    plan: Plan | None,
    selector: str,
    objective: str,
    max_ppl_increase: float | None = None,
    cache: bool = True,
    progress: bool = True,
) -> Plan:
    num_layers = len(compat.decoder_layers(model))
    model_type = model.config.model_type
    given = [
        name
        for name, v in (("sparsity", sparsity), ("layers", layers), ("plan", plan), ("max_ppl_increase", max_ppl_increase))
        if v is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give one of sparsity, layers, plan or max_ppl_increase; got {', '.join(given)}")
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be True or False, got {cache!r}")
    if plan is not None:
        if not isinstance(plan, Plan):
            hint = ""
            if isinstance(plan, (str, PathLike)):
                hint = " (load a saved plan with orthorank.Plan.load(path, model=model))"
            raise TypeError(f"plan must be an orthorank.Plan, got {type(plan).__name__}{hint}")
        plan.check_model(num_layers, model_type)
        return plan
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise TypeError("layers must be a sequence of layer indices, e.g. [12, 15, 18]")
        return layers_plan(num_layers, list(layers), keep_ratio, selector=selector, model_type=model_type)
    if max_ppl_increase is not None:
        return autoplan.budget_plan(model, max_ppl_increase, keep_ratio, selector, objective, cache=cache, progress=progress)
    sparsity = DEFAULT_SPARSITY if sparsity is None else check_fraction("sparsity", sparsity, high_open=True)
    if sparsity == 0.0:
        return Plan((1.0,) * num_layers, selector=selector, model_type=model_type, method="dense")
    return autoplan.resolve_plan(model, sparsity, keep_ratio, selector, objective, cache=cache, progress=progress)


def patch(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    layers: Sequence[int] | None = None,
    keep_ratio: float = DEFAULT_KEEP_RATIO,
    plan: Plan | None = None,
    max_ppl_increase: float | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    selector: str | None = None,
    decode: str = "dense",
    keep_recent: int | None = None,
    keep_min: int | None = None,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Install OrthoRank token selection on ``model`` (in place) and return it.

    Give at most one of:
        sparsity: overall fraction of per-layer token updates to skip, in [0, 1) (default 0.2).
            The plan is the one shipped with orthorank for this model, else the one in the plan
            cache, else one calibrated now on text the model generates itself (then cached); see
            :mod:`orthorank.autoplan`. ``0`` installs nothing.
        layers: explicit selection layers, each updating ``keep_ratio`` of the tokens.
        plan: a :class:`orthorank.Plan` (e.g. from :func:`orthorank.calibrate`).
        max_ppl_increase: a quality budget (> 0; 0.1 = +10% perplexity): the highest sparsity
            whose calibration perplexity rose at most that much (found like ``sparsity``).

    Args:
        keep_ratio: fraction of each row's tokens a selection layer updates, in (0, 1).
        objective: what the plan of ``sparsity`` / ``max_ppl_increase`` is chosen for:
            ``generation`` (default: prompts prefilled, then generated from; the plans keep what the
            prompt says) or ``perplexity`` (every token of a text scored, the paper's search).
            It also sets the defaults of ``selector``, ``keep_recent`` and ``keep_min``
            (:data:`orthorank.config.OBJECTIVE_DEFAULTS`: ``attention``, 32 and 64;
            ``orthogonal``, 1 and 0).
        selector: ``attention`` (query-aware: the tokens the prompt's latest tokens attend to most
            in the layer), ``orthogonal`` (OrthoRank: most sink-orthogonal first),
            ``orthogonal+attention`` (both rankings interleaved), ``least_orthogonal`` or
            ``random`` (controls). ``selector="orthogonal", keep_recent=0, keep_min=0`` is the
            paper's method.
        decode: what selection layers do in decode steps: ``dense`` (default) or ``bypass``.
        keep_recent: each row's last ``keep_recent`` tokens are selected first (the latest first),
            within the ``keep_ratio`` slots; the last token's output is the next-token prediction
            ``generate`` reads. ``0``: every token is ranked by the selector alone (the paper).
        keep_min: a selection layer updates at least this many tokens of each row, so a prompt
            of up to ``keep_min`` tokens runs the dense layers and one under
            ``keep_min / keep_ratio`` tokens saves less; long prompts are untouched. ``0``: the
            keep ratio alone (the paper).
        seed: seed of the ``random`` selector.
        cache: read and write the plan cache (``$ORTHORANK_CACHE/plans``) when calibrating.
        progress: show progress bars when a plan is calibrated.

    A plan that records its calibration loss logs its expected quality cost in the objective's own
    terms (the perplexity of generated answers, or of every token), and one above 25% warns
    (``UserWarning``) naming a sparsity that stays under. Patching a patched model
    replaces the previous patch (a calibration still measures the dense model). Undo with
    :func:`unpatch`.
    """
    spec = compat.arch_spec(model)
    keep_ratio = check_fraction("keep_ratio", keep_ratio, low_open=True, high_open=True)
    default_selector, default_recent, default_min = OBJECTIVE_DEFAULTS[check_choice("objective", objective, OBJECTIVES)]
    selector = default_selector if selector is None else selector
    options = PatchOptions(
        decode=decode,
        keep_recent=default_recent if keep_recent is None else keep_recent,
        seed=seed,
        keep_min=default_min if keep_min is None else keep_min,
    )
    new_plan = _make_plan(model, sparsity, layers, keep_ratio, plan, selector, objective, max_ppl_increase, cache, progress)
    autoplan.report_quality(new_plan, warn=max_ppl_increase is None, stacklevel=2)
    install(model, new_plan, options, spec)
    logger.info("orthorank: %s", new_plan)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the dense model exactly (a no-op on a model that is not patched)."""
    return uninstall(model)


@contextlib.contextmanager
def patched(model: nn.Module, sparsity: float | None = None, **kwargs: Any) -> Iterator[nn.Module]:
    """``with orthorank.patched(model, sparsity=0.2): ...`` patches inside the block only.

    On exit the model returns to what it was before: dense, or its previous patch.
    """
    previous = handle(model)
    patch(model, sparsity, **kwargs)
    try:
        yield model
    finally:
        restore(model, previous)
