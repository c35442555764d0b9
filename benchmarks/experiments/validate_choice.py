"""Does the calibration-loss comparison with SLEB transfer? Losses on calibration text the search did not see.

    OMP_NUM_THREADS=1 python -m benchmarks.experiments.validate_choice

The searches used the first 2x512 tokens of the wiki ``calib`` split; this scores the hybrid plans
(``benchmarks/results/plans/recommended@s.json``) and the SLEB plans (``sleb@s.json``) on the next 4x512
tokens of the same split (still disjoint from every evaluation set).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from orthorank.plan import Plan
from orthorank.runner import LossRunner
from orthorank.text import token_windows

from benchmarks.embedded import load_model, wiki_texts

PLANS = Path(__file__).resolve().parents[1] / "results" / "plans"

if __name__ == "__main__":
    torch.set_num_threads(1)
    model, tok = load_model(None, dtype=torch.bfloat16)
    runner = LossRunner(model, token_windows(tok, wiki_texts("calib"), 512, 6)[2:])
    out = {}
    for s in ("0.1", "0.2", "0.3"):
        for stem in ("recommended", "sleb"):
            plan = Plan.load(PLANS / f"{stem}@{s}.json")
            out[f"{stem}@{s}"] = {"search_windows_loss": plan.meta.get("final_loss"), "unseen_windows_loss": round(runner.loss(plan), 6)}
            print(f"{stem}@{s}", out[f"{stem}@{s}"], flush=True)
    (Path(__file__).resolve().parents[1] / "results" / "selfcalib" / "validate_choice.json").write_text(json.dumps(out, indent=1))
