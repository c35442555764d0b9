"""Held-out evaluation text for the quality experiments: wiki ``eval`` windows and outside prose.

The outside set is real English prose installed on the machine, not Wikipedia and never used for
calibration: four documents, one 1024-token window each (from the start of the document, white
space collapsed, terminal escapes and overstrikes removed):

* ``/usr/share/common-licenses/GPL-3`` (the GNU GPL v3, legal prose),
* ``/usr/share/common-licenses/GFDL-1.3`` (the GNU Free Documentation License, legal prose),
* ``/usr/share/doc/libjpeg-dev/structure.txt.gz`` (libjpeg's system architecture, technical prose),
* ``/usr/share/doc/man-db/man-db-manual.txt.gz`` (the man-db manual, technical prose).
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import torch

import orthorank
from orthorank.plan import Plan
from orthorank.text import token_windows

from benchmarks.embedded import wiki_texts

SAVED_PLANS = Path(__file__).resolve().parents[1] / "results" / "plans"

OUTSIDE_FILES = (
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/GFDL-1.3",
    "/usr/share/doc/libjpeg-dev/structure.txt.gz",
    "/usr/share/doc/man-db/man-db-manual.txt.gz",
)


def _read(path: str) -> str:
    raw = gzip.open(path, "rt").read() if path.endswith(".gz") else Path(path).read_text()
    raw = re.sub(r"\x1b\[[0-9;]*m", "", raw)  # the man-db manual is rendered with terminal escapes
    raw = re.sub(r".\x08", "", raw)  # and with overstrike (char, backspace, char)
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", raw)]
    return "\n\n".join(p for p in paragraphs if p)


def outside_windows(tokenizer, window: int = 1024) -> torch.Tensor:
    """``[4, window]``: one window from the start of each file in :data:`OUTSIDE_FILES`."""
    return torch.cat([token_windows(tokenizer, [_read(f)], window, 1) for f in OUTSIDE_FILES])


def wiki_eval_windows(tokenizer, n: int = 4, window: int = 1024) -> torch.Tensor:
    """``[n, window]`` windows of the wiki ``eval`` split (disjoint from ``calib``)."""
    return token_windows(tokenizer, wiki_texts("eval"), window, n)


def compared_plans(model: torch.nn.Module, specs: list[str], sparsity: float = 0.2) -> dict[str, Plan]:
    """``shipped`` (what ``patch(model, sparsity=...)`` installs), ``self-calibrated`` (the saved
    ``benchmarks/results/plans/selfcalib@<sparsity>.json``) and one plan per ``NAME=PLAN.json`` in ``specs``."""
    orthorank.patch(model, sparsity=sparsity)
    plans = {"shipped": orthorank.get_plan(model), "self-calibrated": Plan.load(SAVED_PLANS / f"selfcalib@{sparsity}.json")}
    orthorank.unpatch(model)
    for spec in specs:
        name, path = spec.split("=", 1)
        plans[name] = Plan.load(path)
    return plans


def sweep_keep_recent(model: torch.nn.Module, plans: dict[str, Plan], values: list[int], measure, results: dict) -> None:
    """``results["<name> keep_recent=<r>"] = measure()`` with ``model`` patched with each plan and value."""
    for name, plan in plans.items():
        for recent in values:
            orthorank.patch(model, plan=plan, keep_recent=recent)
            try:
                results[f"{name} keep_recent={recent}"] = row = measure()
            finally:
                orthorank.unpatch(model)
            print(name, plan.selection_layers, "keep_recent", recent,
                  {k: v for k, v in row.items() if not isinstance(v, list)}, flush=True)
