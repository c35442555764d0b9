"""Perplexity table of OrthoRank plans and layer-pruning baselines on SmolLM2-135M (wiki text).

    python examples/plans/make_table.py --out examples/plans

Calibration and evaluation windows come from the disjoint ``calib`` / ``eval`` splits of
:func:`orthorank.data.wiki_texts`. One greedy search to the highest sparsity gives the plans of
all lower sparsities (its prefixes). Results are cached in ``<out>/results.json`` (re-running
resumes); plans are saved next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from orthorank.baselines import blocks_to_remove, random_control, shortgpt_plan, sleb_plan
from orthorank.calibration import SearchConfig, plan_at_round, search_plan
from orthorank.data import load_model, token_windows, wiki_texts
from orthorank.plan import Plan, default_plan
from orthorank.runner import LossRunner

VARIANTS = {
    # name: (levels, jumps)
    "orthorank": ((1.0, 1 / 3), False),  # the paper's search: selection layers only
    "orthorank-keep1/2": ((1.0, 1 / 2), False),
    "orthorank-fine": ((1.0, 2 / 3, 1 / 3), False),
    "hybrid": ((1.0, 1 / 3, 0.0), True),  # calibrate()'s default
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("examples/plans"))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--calib", type=int, nargs=2, default=[2, 512], metavar=("N", "SEQ"))
    p.add_argument("--eval", type=int, nargs=2, default=[4, 1024], metavar=("N", "SEQ"))
    p.add_argument("--shortlist", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--table-only", action="store_true", help="only write <out>/table.md from results.json")
    p.add_argument("--methods", nargs="+", default=["dense", "default", "orthorank", "hybrid", "shortgpt", "sleb"],
                   help=f"among dense, default, shortgpt, sleb, {', '.join(VARIANTS)}")
    return p.parse_args()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("make_table")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.table_only:
        write_table(results, args.out / "table.md", args.sparsities)
        return
    model, tok = load_model(None, dtype=getattr(torch, args.dtype))
    n = model.config.num_hidden_layers
    calib = token_windows(tok, wiki_texts("calib"), args.calib[1], args.calib[0])
    evals = token_windows(tok, wiki_texts("eval"), args.eval[1], args.eval[0])
    runner = LossRunner(model, evals, batch_size=1)
    setting = f"calib {args.calib[0]}x{args.calib[1]}, eval {args.eval[0]}x{args.eval[1]}, {args.dtype}"
    results.setdefault("setting", setting)

    def evaluate(key: str, plan: Plan) -> None:
        if key in results:
            return
        plan.save(args.out / f"{key.replace('/', '_')}.json")
        t = time.perf_counter()
        ppl = math.exp(runner.loss(plan))
        results[key] = {"ppl": round(ppl, 3), "sparsity": round(plan.sparsity, 4),
                        "flops_saved": round(plan.flops_fraction(model.config, args.eval[1]), 4),
                        "selection": plan.selection_layers, "removed": plan.removed_layers,
                        "calib_seconds": plan.meta.get("seconds"), "forward_passes": plan.meta.get("forward_passes")}
        results_path.write_text(json.dumps(results, indent=1))
        log.info("%s: ppl %.3f (sparsity %.3f, eval %.0fs)", key, ppl, plan.sparsity, time.perf_counter() - t)

    top = max(args.sparsities)
    for method in args.methods:
        if method == "dense":
            evaluate("dense", Plan((1.0,) * n, model_type="llama", method="dense"))
        elif method == "default":
            for s in args.sparsities:
                evaluate(f"default@{s}", default_plan(n, s, model_type="llama"))
        elif method == "shortgpt":
            for s in args.sparsities:
                evaluate(f"shortgpt@{s}", shortgpt_plan(model, calib, s))
        elif method == "sleb":
            if all(f"sleb@{s}" in results for s in args.sparsities):
                continue
            full = sleb_plan(model, calib, top, progress=False)
            for s in args.sparsities:
                evaluate(f"sleb@{s}", plan_at_round(full, blocks_to_remove(n, s)))
        elif method in VARIANTS:
            if all(f"{method}@{s}" in results for s in args.sparsities):
                continue
            levels, jumps = VARIANTS[method]
            config = SearchConfig(top, levels=levels, jumps=jumps, shortlist=args.shortlist)
            full = search_plan(LossRunner(model, calib), config, progress=False)
            full.save(args.out / f"{method.replace('/', '_')}-search.json")
            for s in args.sparsities:
                prefix = _closest_prefix(full, s)
                evaluate(f"{method}@{s}", prefix)
                if method in ("orthorank", "hybrid"):
                    evaluate(f"{method}+random@{s}", random_control(prefix))
        else:
            raise SystemExit(f"unknown method {method!r}")
    write_table(results, args.out / "table.md", args.sparsities)
    log.info("done: %s", json.dumps(results))


def write_table(results: dict, path: Path, sparsities: list[float]) -> None:
    """Markdown table: one row per method, ``ppl (achieved sparsity)`` per target sparsity."""
    methods = sorted({k.split("@")[0] for k in results if "@" in k})
    lines = [f"Setting: {results.get('setting', '?')}; dense perplexity {results.get('dense', {}).get('ppl', '?')}", "",
             "| method | " + " | ".join(f"s={s}" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    for m in methods:
        cells = []
        for s in sparsities:
            r = results.get(f"{m}@{s}")
            cells.append(f"{r['ppl']:.2f} ({r['sparsity']:.3f})" if r else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def _closest_prefix(plan: Plan, sparsity: float) -> Plan:
    """The prefix of a search whose sparsity is closest to ``sparsity`` (earliest on ties)."""
    best = min(range(len(plan.meta["rounds"]) + 1),
               key=lambda k: (abs(plan_at_round(plan, k).sparsity - sparsity) + 1e-9 * k))
    return plan_at_round(plan, best)


if __name__ == "__main__":
    main()
