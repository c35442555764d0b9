"""The compared methods as plans, made on calibration text and cached on disk.

* ``dense``: the unpatched model.
* ``orthorank``: OrthoRank token selection; its layers calibrated with :func:`orthorank.calibration.calibrate`
  (``calibrated=True``) or the data-free `orthorank.plan.default_plan` (``calibrated=False``, labelled
  ``orthorank-default`` in results).
* ``sleb``: SLEB layer removal, ``orthorank.baselines.sleb_plan``.
* ``shortgpt``: ShortGPT layer removal, ``orthorank.baselines.shortgpt_plan``.
* ``random``: the OrthoRank plan's layers and keep ratios with random token selection.

Plans are cached as JSON by (model, method, sparsity, calibration data) so repeated runs do not
recalibrate. Calibration uses the ``calib`` split only, never the evaluation split.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orthorank import baselines, compat
from orthorank.calibration import calibrate
from orthorank.config import check_choice, check_fraction
from orthorank.plan import Plan, default_plan

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("dense", "orthorank", "sleb", "shortgpt", "random")


def check_methods(methods: Any) -> tuple[str, ...]:
    """Validate a sequence of method names (each one of :data:`METHODS`)."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    chosen = tuple(check_choice("method", m, METHODS) for m in methods)
    if not chosen:
        raise ValueError(f"give at least one method of {', '.join(METHODS)}")
    return chosen


def check_sparsity(value: Any) -> float:
    """A sparsity in (0, 1)."""
    value = check_fraction("sparsity", value, high_open=True)
    if value == 0.0:
        raise ValueError("sparsity must be in (0, 1) for a compared method; 'dense' is the 0 point")
    return value


def model_key(name_or_path: str | None) -> str:
    """A file-name-safe key of a model name or path (``smollm2-135m`` for the default)."""
    name = "smollm2-135m" if name_or_path is None else str(name_or_path).rstrip("/")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-80:]


def dense_plan(model: nn.Module) -> Plan:
    n = len(compat.decoder_layers(model))
    return Plan((1.0,) * n, model_type=model.config.model_type, method="dense")


def random_plan(orthorank_plan: Plan) -> Plan:
    """The same layers and keep ratios with random token selection."""
    return baselines.random_control(orthorank_plan)


def _make(method: str, model: nn.Module, calib_ids: torch.Tensor, sparsity: float, calibrated: bool) -> Plan:
    if method == "orthorank":
        if not calibrated:
            n = len(compat.decoder_layers(model))
            return default_plan(n, sparsity, model_type=model.config.model_type)
        return calibrate(model, None, calib_ids, sparsity)
    if method == "sleb":
        return baselines.sleb_plan(model, calib_ids, sparsity)
    if method == "shortgpt":
        return baselines.shortgpt_plan(model, calib_ids, sparsity)
    raise ValueError(f"no calibrated plan for method {method!r}")


class PlanCache:
    """Plans on disk under ``root``: one JSON file per (model, method, sparsity, calibration)."""

    def __init__(self, root: str | Path, model_name: str | None, calib_ids: torch.Tensor) -> None:
        self.root = Path(root)
        self.model = model_key(model_name)
        self.calib_ids = calib_ids
        self.calib_tag = f"c{calib_ids.shape[0]}x{calib_ids.shape[1]}"

    def path(self, method: str, sparsity: float, calibrated: bool = True) -> Path:
        label = method if calibrated or method != "orthorank" else "orthorank-default"
        return self.root / f"{self.model}_{label}_s{sparsity:.2f}_{self.calib_tag}.json"

    def get(self, method: str, model: nn.Module, sparsity: float, *, calibrated: bool = True) -> Plan:
        """The plan of ``method`` at ``sparsity``: from the cache, else made and cached."""
        check_choice("method", method, METHODS)
        sparsity = check_sparsity(sparsity)
        if method == "dense":
            return dense_plan(model)
        if method == "random":
            return random_plan(self.get("orthorank", model, sparsity, calibrated=calibrated))
        if method == "orthorank" and not calibrated:  # data-free and cheap: never cached, never stale
            return _make(method, model, self.calib_ids, sparsity, calibrated)
        path = self.path(method, sparsity, calibrated)
        if path.is_file():
            try:
                plan = Plan.load(path)
                plan.check_model(len(compat.decoder_layers(model)), model.config.model_type)
                logger.info("plan %s@%.2f from %s", method, sparsity, path)
                return plan
            except ValueError as err:
                logger.warning("ignoring cached plan %s: %s", path, err)
        start = time.perf_counter()
        plan = _make(method, model, self.calib_ids, sparsity, calibrated)
        elapsed = time.perf_counter() - start
        logger.info("made plan %s@%.2f in %.1f s: %s", method, sparsity, elapsed, plan)
        plan = dataclasses.replace(plan, meta={**plan.meta, "bench_make_s": round(elapsed, 2)})
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(path)
        return plan
