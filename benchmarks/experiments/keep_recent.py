"""How many of a prompt's latest tokens should a selection layer update first (``keep_recent``)?

For each plan at sparsity 0.2 (the shipped one, the self-calibrated one in
``benchmarks/results/plans/selfcalib@0.2.json``, and optionally more) and each ``keep_recent`` value, measure
what generation sees: the next-token perplexity right after a prefill (the model sees only the
prefix; :func:`benchmarks.suite.quality.prefill_next_token_nll`) on short prompts (12 lengths in
[16, 96]) and long ones (6 lengths in [97, 511]), over 24 windows of 512 tokens (the two halves of
8 wiki ``eval`` windows and of the 4 outside documents, ``heldout.py``), and the full-window
perplexity on the held-out sets (4x1024 tokens each).

    python -m benchmarks.experiments.keep_recent --threads 2 --out benchmarks/results/selfcalib/keep_recent.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from orthorank.metrics import mean_nll

from benchmarks.embedded import load_model
from benchmarks.experiments.heldout import compared_plans, outside_windows, sweep_keep_recent, wiki_eval_windows
from benchmarks.suite.quality import prefill_next_token_nll


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recent", type=int, nargs="+", default=[0, 1, 8, 16, 32, 64])
    p.add_argument("--plans", nargs="*", default=[], help="NAME=PLAN.json plans to add")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(None, dtype=torch.bfloat16)
    wiki, outside = wiki_eval_windows(tok), outside_windows(tok)
    more = wiki_eval_windows(tok, n=8)
    ids = torch.cat([more[:, :512], more[:, 512:], outside[:, :512], outside[:, 512:]])

    def measure() -> dict:
        short = prefill_next_token_nll(model, ids[:, :97], 12, min_prefix=16)
        long = prefill_next_token_nll(model, ids, 6, min_prefix=97)
        return {"next_token_ppl_short": round(math.exp(short), 3), "next_token_ppl_long": round(math.exp(long), 3),
                "ppl_wiki": round(math.exp(mean_nll(model, wiki)), 3),
                "ppl_outside": round(math.exp(mean_nll(model, outside)), 3)}

    results = {"dense": measure()}
    print("dense", results["dense"], flush=True)
    sweep_keep_recent(model, compared_plans(model, args.plans), args.recent, measure, results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
