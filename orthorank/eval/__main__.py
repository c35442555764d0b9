"""``python -m orthorank.eval``: lm-eval-harness tasks on a patched (or dense) model.

    python -m orthorank.eval --model HuggingFaceTB/SmolLM2-135M --sparsity 0.2 --tasks orthorank_wiki \\
        --include-path benchmarks/tasks --batch-size 8 --limit 100 --output results.json
    python -m orthorank.eval --model HuggingFaceTB/SmolLM2-135M --plan plan.json --tasks hellaswag,arc_easy
    python -m orthorank.eval --model HuggingFaceTB/SmolLM2-135M --dense --tasks piqa,winogrande

Prints lm-eval's results table; ``--output`` writes lm-eval's results object plus ``"plan"``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from ..cliargs import DTYPES, fraction, load_pretrained, non_negative_int, positive_int
from ..config import DEFAULT_OBJECTIVE, OBJECTIVES
from ..install import handle
from ..patch import patch
from ..plan import Plan
from .run import evaluate, require_lm_eval, to_json

logger = logging.getLogger("orthorank.eval")


def _limit(text: str) -> int | float:
    try:
        value: int | float = float(text) if "." in text else int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or a fraction in (0, 1), got {text!r}") from err
    if (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0 < value < 1):
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or a fraction in (0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orthorank.eval",
        description="lm-eval-harness on a model patched with orthorank (each row computed as if alone).",
    )
    p.add_argument("--model", required=True, help="Hub id or local folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter dtype (default float32)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--sparsity", type=fraction(high_open=True), help="orthorank.patch(model, sparsity=S)")
    how.add_argument("--plan", type=Path, help="an orthorank plan JSON file (orthorank.Plan.save)")
    how.add_argument("--dense", action="store_true", help="the unpatched model")
    p.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                   help="what the plan of --sparsity is chosen for (default %(default)s; perplexity: rolling perplexity)")
    p.add_argument("--keep-recent", type=non_negative_int, default=None,
                   help="each row's latest tokens a selection layer updates first (default: the objective's; 0: score only)")
    p.add_argument("--keep-min", type=non_negative_int, default=None,
                   help="the fewest tokens of a row a selection layer updates (default: the objective's; 0: the ratio only)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    p.add_argument("--include-path", action="append", default=None, help="folder of extra task YAMLs (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="rows per forward (default 1)")
    p.add_argument("--limit", type=_limit, default=None, help="documents per task: an int, or a fraction")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    p.add_argument("--max-length", type=positive_int, default=None, help="longest row in tokens (default: model's)")
    p.add_argument("--bootstrap-iters", type=int, default=100_000, help="resamples for stderr (0: none)")
    p.add_argument("--log-samples", action="store_true", help="keep per-document outputs in --output")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--output", type=Path, default=None, help="write the results JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    require_lm_eval()
    from lm_eval.utils import make_table

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    plan = None
    if args.plan is not None:
        try:
            plan = Plan.load(args.plan)
        except (OSError, ValueError) as err:
            raise SystemExit(f"--plan {args.plan}: {err}") from err
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_pretrained(args.model, dtype=DTYPES[args.dtype])
    model.to(device)
    options = dict(objective=args.objective, keep_recent=args.keep_recent, keep_min=args.keep_min)
    if plan is not None:
        try:
            patch(model, plan=plan, **options)
        except ValueError as err:
            raise SystemExit(f"--plan {args.plan}: {err}") from err
    elif not args.dense:
        patch(model, sparsity=args.sparsity, **options)
    start = time.perf_counter()
    result = evaluate(
        model,
        tokenizer,
        args.tasks,
        batch_size=args.batch_size,
        limit=args.limit,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        max_length=args.max_length,
        bootstrap_iters=args.bootstrap_iters,
        log_samples=args.log_samples,
    )
    if not result:
        return 0
    result["orthorank"] = {
        "model": args.model,
        "dtype": args.dtype,
        "device": device,
        "batch_size": args.batch_size,
        "objective": None if args.dense else args.objective,
        "keep_recent": None if args.dense else handle(model).options.keep_recent,
        "keep_min": None if args.dense else handle(model).options.keep_min,
        "limit": args.limit,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    print(make_table(result))
    if "groups" in result and result["groups"]:
        print(make_table(result, "groups"))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(to_json(result), encoding="utf-8")
        logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
