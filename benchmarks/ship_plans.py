"""``python -m benchmarks.ship_plans PLAN.json ... --dir orthorank/plans``: ship saved plans for a model.

Each plan (written by ``Plan.save``, e.g. a search result) becomes an entry of the shipped-plans
file of the model's fingerprint in ``--dir`` (see :mod:`orthorank.shipped`); ``orthorank/plans``
is the folder the package reads.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from orthorank.plan import Plan
from orthorank.shipped import save_shipped_plan

from .embedded import load_model


def main(argv: Sequence[str] | None = None) -> None:
    """Add the given plan files to the shipped plans of ``--model``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.ship_plans", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plans", nargs="+", help="plan files written by Plan.save")
    p.add_argument("--dir", required=True, help="output folder (orthorank/plans: the package's shipped plans)")
    p.add_argument("--model", default=None, help="HF id or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--sparsity", type=float, default=None, help="the sparsity each plan answers (one plan only)")
    p.add_argument("--keep-ratio", type=float, default=None)
    p.add_argument("--description", default=None)
    args = p.parse_args(argv)
    if args.sparsity is not None and len(args.plans) > 1:
        p.error("--sparsity applies to one plan at a time")
    model, _ = load_model(args.model)
    description = args.description or ("SmolLM2-135M-Instruct (embedded model)" if args.model is None else args.model)
    for name in args.plans:
        plan = Plan.load(name, model=model)
        path = save_shipped_plan(plan, model, args.sparsity, keep_ratio=args.keep_ratio,
                                 description=description, directory=args.dir)
        print(f"{name}: sparsity {plan.sparsity:.4f} -> {path}")


if __name__ == "__main__":
    main()
