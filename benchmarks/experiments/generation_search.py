"""The generation-objective search shipped for the embedded model, and its shipping.

    python -m benchmarks.experiments.generation_search --out benchmarks/results/plans/generation-search.json
    python -m benchmarks.experiments.generation_search --ship benchmarks/results/plans/generation-search.json

The search is exactly what ``orthorank.patch(model, sparsity=0.4)`` would calibrate for a model no
plan is shipped for (:data:`orthorank.recipe.GENERATION_RECIPE`, ``attention`` selector, keep
1/3), taken to sparsity 0.4 so that its rounds also serve 0.1, 0.2 and 0.3. ``--ship`` adds it to
the package's shipped plans for the embedded model's Llama and Mistral layouts (same weights,
identical logits, so one search serves both).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from orthorank.plan import Plan
from orthorank.recipe import GENERATION_RECIPE
from orthorank.selfcalib import auto_calibrate
from orthorank.shipped import SHIPPED_DIR, save_shipped_plan

from ..embedded import load_model

SPARSITY = 0.4


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.generation_search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="run the search and save the plan here")
    p.add_argument("--ship", type=Path, help="ship a saved search for the embedded model (both layouts)")
    p.add_argument("--prompt-docs", type=int, default=GENERATION_RECIPE.prompt_docs,
                   help="generated documents before the scored answers (the recipe's prompt_docs; an experiment)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.out:
        model, _ = load_model(dtype=torch.bfloat16)
        recipe = dataclasses.replace(GENERATION_RECIPE, prompt_docs=args.prompt_docs)
        plan = auto_calibrate(model, SPARSITY, 1 / 3, "attention", recipe=recipe)
        plan.save(args.out)
        print(plan)
    if args.ship:
        plan = Plan.load(args.ship)
        for arch in ("llama", "mistral"):
            model, _ = load_model(arch=arch)
            shipped = dataclasses.replace(plan, model_type=model.config.model_type,
                                          meta={**plan.meta, "searched_on": "llama layout"})
            path = save_shipped_plan(shipped, model, SPARSITY, directory=SHIPPED_DIR,
                                     description=f"SmolLM2-135M-Instruct (the embedded model, {arch})")
            print(f"{arch}: {path}")


if __name__ == "__main__":
    main()
