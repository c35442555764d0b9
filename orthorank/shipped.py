"""Plans shipped with the package, found by model fingerprint before the user's cache.

Format: one file per model, ``orthorank/plans/<fingerprint>.json`` (package data), where the
fingerprint is :func:`orthorank.fingerprint.model_fingerprint` of the model the plans were made
for::

    {
      "format": "orthorank-shipped-plans",
      "version": 1,
      "fingerprint": "75862926133233e0",
      "model_type": "llama",
      "num_layers": 30,
      "description": "SmolLM2-135M-Instruct (embedded model)",
      "plans": [
        {"sparsity": 0.2, "keep_ratio": 0.3333, "selector": "attention", "objective": "generation",
         "plan": {<Plan.to_dict()>}},
        ...
      ]
    }

An entry serves ``patch(model, sparsity=s, keep_ratio=k, selector=sel, objective=o)`` when its
keep ratio (within 1e-3), selector and objective match (an entry without ``objective`` is a
``perplexity`` one) and either its sparsity (or its plan's) is within half a
selection step of ``s``, or one of the rounds of its search (``plan.meta["rounds"]``) is:
then the plan after that round is used (:func:`orthorank.search.plan_at_round`). How a plan was
calibrated does not matter. Write entries with :func:`save_shipped_plan` (into a folder you name:
the package's own ``orthorank/plans`` in a source checkout) or ``python -m benchmarks.ship_plans``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from . import compat
from .config import check_fraction
from .fingerprint import model_fingerprint
from .plan import Plan
from .plancache import atomic_write_text

logger = logging.getLogger(__name__)

FORMAT = "orthorank-shipped-plans"
VERSION = 1

#: Folder of the shipped plan files (package data).
SHIPPED_DIR = Path(__file__).resolve().parent / "plans"


def shipped_path(fingerprint: str, directory: str | Path | None = None) -> Path:
    """The shipped-plans file of ``fingerprint`` in ``directory`` (default: the package's plans)."""
    return Path(SHIPPED_DIR if directory is None else directory) / f"{fingerprint}.json"


def plan_keep_ratio(plan: Plan) -> float:
    """The keep ratio of ``plan``'s selection layers (``meta["keep_ratio"]`` if recorded)."""
    recorded = plan.meta.get("keep_ratio")
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
        return float(recorded)
    ratios = {round(r, 6) for r in plan.keep_ratios if 0.0 < r < 1.0}
    if len(ratios) != 1:
        raise ValueError(
            f"cannot tell the keep ratio of this plan (selection keep ratios {sorted(ratios)}); pass keep_ratio="
        )
    return ratios.pop()


def entry_objective(entry: dict[str, Any]) -> str:
    """The objective of a shipped entry (or a plan's ``meta``); entries written before objectives
    existed are ``perplexity`` ones."""
    return str(entry.get("objective", "perplexity"))


def read_entries(fingerprint: str, num_layers: int, model_type: str | None, directory: str | Path | None = None) -> list[dict[str, Any]]:
    """The entries shipped for ``fingerprint`` (``[]`` if none; a bad file is skipped with a warning).

    Each entry is ``{"sparsity", "keep_ratio", "selector", "objective", "plan": Plan}``.
    """
    path = shipped_path(fingerprint, directory)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a version-{VERSION} {FORMAT!r} file")
        if data.get("fingerprint") != fingerprint:
            raise ValueError(f"it holds plans of fingerprint {data.get('fingerprint')!r}")
        entries = []
        for item in data["plans"]:
            plan = Plan.from_dict(item["plan"])
            plan.check_model(num_layers, model_type)
            entries.append(
                {"sparsity": float(item["sparsity"]), "keep_ratio": float(item["keep_ratio"]),
                 "selector": str(item["selector"]), "objective": entry_objective(item),
                 "plan": plan}
            )
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        logger.warning("orthorank: ignoring the shipped plans %s (%s)", path, err)
        return []
    return entries


def save_shipped_plan(
    plan: Plan,
    model: nn.Module,
    sparsity: float | None = None,
    *,
    directory: str | Path,
    keep_ratio: float | None = None,
    description: str | None = None,
) -> Path:
    """Add ``plan`` to the shipped plans of ``model`` (replacing an entry with the same request).

    Args:
        plan: a plan for ``model`` (ideally a search result, whose rounds also serve lower sparsities).
        sparsity: the ``patch(sparsity=...)`` it answers (default: ``meta["target_sparsity"]``,
            else ``plan.sparsity``).
        keep_ratio: the ``patch(keep_ratio=...)`` it answers (default: :func:`plan_keep_ratio`).
        directory: the folder to write to (the package reads :data:`SHIPPED_DIR`; never written
            unless named here).
        description: free text naming the model (kept in the file).

    Returns:
        The path of the file written.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an orthorank.Plan, got {type(plan).__name__}")
    if not isinstance(directory, (str, Path)):
        raise TypeError(f"directory must be a folder (str or Path), got {type(directory).__name__}")
    num_layers = len(compat.decoder_layers(model))
    plan.check_model(num_layers, model.config.model_type)
    if sparsity is None:
        target = plan.meta.get("target_sparsity")
        sparsity = float(target) if isinstance(target, (int, float)) else plan.sparsity
    sparsity = check_fraction("sparsity", sparsity, high_open=True)
    keep_ratio = check_fraction("keep_ratio", plan_keep_ratio(plan) if keep_ratio is None else keep_ratio,
                                low_open=True, high_open=True)
    fingerprint = model_fingerprint(model)
    path = shipped_path(fingerprint, directory)
    data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                            "model_type": model.config.model_type, "num_layers": num_layers,
                            "description": description or "", "plans": []}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("format") == FORMAT and old.get("fingerprint") == fingerprint:
            data["plans"] = list(old.get("plans", []))
            data["description"] = description or old.get("description", "")
    entry = {"sparsity": round(sparsity, 4), "keep_ratio": round(keep_ratio, 4), "selector": plan.selector,
             "objective": entry_objective(plan.meta),
             "plan": plan.to_dict()}
    def request(e: dict[str, Any]) -> tuple[Any, ...]:
        return e.get("sparsity"), e.get("keep_ratio"), e.get("selector"), entry_objective(e)

    data["plans"] = [e for e in data["plans"] if request(e) != request(entry)]
    data["plans"].append(entry)
    data["plans"].sort(key=lambda e: (entry_objective(e), e["selector"], e["keep_ratio"], e["sparsity"]))
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    logger.info("orthorank: shipped plan %s@%.4f written to %s", plan.method, sparsity, path)
    return path
