"""Long-prompt fidelity of patched models next to dense: pass key, long-document QA, the next token
after a prefill, chat answers, whole-window perplexity and the prefill speed-up, one row per method.

    python -m benchmarks.longprompt --out benchmarks/results/longprompt/main.json        # measure
    python -m benchmarks.longprompt --table benchmarks/results/longprompt/main.json      # README table

Methods: ``dense``; ``default`` = ``orthorank.patch(model, sparsity=s)``; ``perplexity`` =
``patch(model, sparsity=s, objective="perplexity")`` (the paper's search on whole-window loss);
``paper`` = that plan with ``selector="orthogonal", keep_recent=0`` (OrthoRank as published);
``sleb`` / ``shortgpt`` = layer removal at the same sparsity (plans in
``benchmarks/results/plans/``, made by ``python -m benchmarks.experiments.make_table``);
``selfcalib`` = the plan the default calibrates for a model with no shipped plan
(``selfcalib-generation@s.json``, from ``python -m benchmarks.experiments.fresh_user``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import orthorank
from orthorank.install import handle
from orthorank.plan import Plan

from ..embedded import load_model, wiki_texts
from ..experiments.chat_validation import QUESTIONS
from ..suite.flops import ideal_prefill_speedup
from ..suite.quality import chat_answers
from . import measure, tasks
from .table import print_table

PLANS = Path(__file__).resolve().parents[1] / "results" / "plans"
#: ``selfcalib``: the plan a first ``patch(model, sparsity=s)`` calibrates for a model no plan is
#: shipped for (saved by ``python -m benchmarks.experiments.fresh_user``)
PLAN_FAMILY = {"selfcalib": "generation"}


def install(model: torch.nn.Module, method: str, sparsity: float) -> None:
    """Patch ``model`` as ``method`` at ``sparsity`` (``dense``: leave it as it is)."""
    if method == "default":
        orthorank.patch(model, sparsity=sparsity)
    elif method == "perplexity":
        orthorank.patch(model, sparsity=sparsity, objective="perplexity")
    elif method == "paper":
        orthorank.patch(model, sparsity=sparsity, objective="perplexity", selector="orthogonal", keep_recent=0)
    elif method in ("sleb", "shortgpt", "selfcalib"):
        orthorank.patch(model, plan=Plan.load(PLANS / f"{method}-{PLAN_FAMILY[method]}@{sparsity}.json"
                                              if method == "selfcalib" else PLANS / f"{method}@{sparsity}.json", model=model))
    elif method != "dense":
        raise ValueError(f"unknown method {method!r}")


def fillers(tokenizer: Any) -> dict[str, list[int]]:
    """Filler prose: Wikipedia evaluation extracts and English prose from outside the wiki data."""
    return {
        "wiki": tasks.wiki_filler(tokenizer, wiki_texts("eval")),
        "outside": tasks.prose_stream(tokenizer, [tasks.read_prose(f) for f in tasks.OUTSIDE_FILES]),
    }


def measure_row(model, tokenizer, prompts, windows, probes, args) -> dict[str, Any]:
    row: dict[str, Any] = {}
    generated = measure.answers(model, tokenizer, prompts, batch_size=args.batch_size)
    row.update(measure.hits_by_length(prompts, measure.hits(prompts, generated), args.lengths))
    nll = measure.next_token_nll(model, windows, probes)
    row["next_token_nll"] = nll
    if args.chat:
        answers = chat_answers(model, tokenizer, [q.question for q in QUESTIONS])
        row["chat"] = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        row["chat_right"] = [sum(q.correct(a) for q, a in zip(QUESTIONS, row["chat"])), len(QUESTIONS)]
    row["window_ppl"] = measure.window_ppl(model, windows[:, : args.window])
    plan = orthorank.get_plan(model)
    row["plan"] = None if plan is None else plan.to_dict()
    if plan is not None:
        row["flops_ideal_2048"] = flops_ideal(model, plan)
    return row


def flops_ideal(model: torch.nn.Module, plan: Plan) -> float:
    """Dense FLOPs / ``plan``'s FLOPs of the timed prefill: 2048 tokens, the logits of the last one
    (``logits_to_keep=1``, as :func:`measure.speedup` times it), the patch's ``keep_min`` counted."""
    return ideal_prefill_speedup(model.config, plan, 2048, keep_min=handle(model).options.keep_min)


def respeed(model: torch.nn.Module, results: dict[str, Any], windows: torch.Tensor, args: argparse.Namespace) -> None:
    """Time again the prefill speed-up of the chosen rows of ``results`` and write ``args.out``."""
    ids = windows[:1, :2048].to(next(model.parameters()).device)
    wanted = {(m, float(s)) for m in args.methods.split(",") for s in args.sparsities.split(",")}
    for row in results["rows"]:
        if (row["method"], row["sparsity"]) not in wanted:
            continue
        install(model, row["method"], row["sparsity"])
        try:
            row["prefill_speedup"] = measure.speedup(model, ids, rounds=args.speed_rounds)
            row["speed_rounds"] = args.speed_rounds
            row["flops_ideal_2048"] = flops_ideal(model, orthorank.get_plan(model))
        finally:
            orthorank.unpatch(model)
        print(row["method"], row["sparsity"], f"prefill x{row['prefill_speedup']:.3f}", flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.longprompt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write results here (JSON); runs the measurement")
    p.add_argument("--table", type=Path, help="print the markdown table of a results file")
    p.add_argument("--methods", default="dense,default,perplexity,paper,sleb,shortgpt")
    p.add_argument("--sparsities", default="0.2")
    p.add_argument("--lengths", default="512,1024,2048,4096")
    p.add_argument("--prompts", type=int, default=24, help="pass-key and QA prompts per length (each)")
    p.add_argument("--probes", type=int, default=96, help="next-token probes, prefixes log-uniform in 16..4096")
    p.add_argument("--window", type=int, default=1024, help="whole-window perplexity window")
    p.add_argument("--no-chat", dest="chat", action="store_false")
    p.add_argument("--speed", action="store_true", help="also time the prefill of 2048 tokens against dense")
    p.add_argument("--speed-rounds", type=int, default=5, help="interleaved dense / patched rounds of the timing")
    p.add_argument("--respeed", action="store_true",
                   help="only time again the prefill of the rows of --methods / --sparsities already in --out")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    if args.table:
        print_table(json.loads(args.table.read_text()))
        return
    if not args.out:
        p.error("give --out (measure) or --table (print)")
    args.lengths = [int(v) for v in args.lengths.split(",")]
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(dtype=getattr(torch, args.dtype))
    texts = fillers(tokenizer)
    prompts = [q for n in args.lengths for q in tasks.passkey_prompts(tokenizer, texts, n, args.prompts)
               + tasks.qa_prompts(tokenizer, texts, n, args.prompts)]
    windows = tasks.prose_windows(tokenizer, list(wiki_texts("eval"))[400:], 4097, 8)
    probes = tasks.probe_lengths(16, 4096, args.probes)
    results: dict[str, Any] = {
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "table")}, "probes_at": probes,
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")},
        "rows": [],
    }
    if args.out.exists():
        results["rows"] = json.loads(args.out.read_text()).get("rows", [])
    if args.respeed:
        respeed(model, results, windows, args)
        return
    done = {(r["method"], r["sparsity"]) for r in results["rows"]}
    for method in args.methods.split(","):
        for sparsity in ([0.0] if method == "dense" else [float(s) for s in args.sparsities.split(",")]):
            if (method, sparsity) in done:
                continue
            started = time.perf_counter()
            install(model, method, sparsity)
            try:
                row = measure_row(model, tokenizer, prompts, windows, probes, args)
                if args.speed and method != "dense":
                    row["prefill_speedup"] = measure.speedup(model, windows[:1, :2048].to(next(model.parameters()).device),
                                                             rounds=args.speed_rounds)
            finally:
                orthorank.unpatch(model)
            row.update(method=method, sparsity=sparsity, seconds=round(time.perf_counter() - started, 1))
            results["rows"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            print(method, sparsity, {k: v for k, v in row.items() if "@" in k}, f"{row['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
