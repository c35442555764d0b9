"""Perplexity table of OrthoRank plans and layer-pruning baselines on SmolLM2-135M (wiki text).

    python -m benchmarks.experiments.make_table --out benchmarks/results/plans
    python -m benchmarks.experiments.make_table --heldout     # the README table: saved plans, two held-out sets

``--heldout`` evaluates the saved plans ``benchmarks/results/plans/<row>@<s>.json`` of :data:`HELDOUT_ROWS`
on the wiki ``eval`` split and on outside prose (``benchmarks/experiments/heldout.py``), 4x1024 tokens
each, selection layers as ``patch`` installs them (``keep_recent`` at its default; entries measured
under another value are measured again): perplexity at every sparsity, and at ``--faithful-at`` the next-token NLL right after a
prefill of sampled prefixes (8 lengths in [16, 511] x 8 windows) and greedy chat agreement with dense (``benchmarks.suite``). Results
are cached in ``benchmarks/results/plans/heldout.json``; the table goes to ``benchmarks/results/plans/heldout.md``.

Calibration and evaluation windows come from the disjoint ``calib`` / ``eval`` splits of
:func:`benchmarks.embedded.wiki_texts`. One greedy search to the highest sparsity gives the plans of
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
from orthorank.config import DEFAULT_KEEP_RECENT as KEEP_RECENT
from orthorank.patch import patched
from orthorank.plan import Plan, default_plan
from orthorank.runner import LossRunner
from orthorank.search import SearchConfig, closest_round, plan_at_round, search_plan
from orthorank.text import token_windows

from benchmarks.embedded import load_model, wiki_texts
from benchmarks.experiments.heldout import outside_windows, wiki_eval_windows
from benchmarks.suite import quality, tasks

VARIANTS = {
    # name: (levels, jumps)
    "orthorank": ((1.0, 1 / 3), False),  # the paper's search: selection layers only
    "orthorank-keep1/2": ((1.0, 1 / 2), False),
    "orthorank-fine": ((1.0, 2 / 3, 1 / 3), False),
    "hybrid": ((1.0, 1 / 3, 0.0), True),  # calibrate()'s default
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/plans"))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--calib", type=int, nargs=2, default=[2, 512], metavar=("N", "SEQ"))
    p.add_argument("--eval", type=int, nargs=2, default=[4, 1024], metavar=("N", "SEQ"))
    p.add_argument("--shortlist", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--table-only", action="store_true", help="only write <out>/table.md from results.json")
    p.add_argument("--heldout", action="store_true", help="the held-out table of saved plans (see the docstring)")
    p.add_argument("--faithful-at", type=float, default=0.2, help="sparsity of the next-token and chat columns")
    p.add_argument("--prefixes", type=int, default=8, help="sampled prefix lengths (next-token NLL, first 512 tokens of each window)")
    p.add_argument("--rows", nargs="+", default=None, help="only these rows of HELDOUT_ROWS (default: all)")
    p.add_argument("--methods", nargs="+", default=["dense", "default", "orthorank", "hybrid", "shortgpt", "sleb"],
                   help=f"among dense, default, shortgpt, sleb, {', '.join(VARIANTS)}")
    return p.parse_args()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.heldout:
        heldout_table(args)
        return
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
                prefix = closest_round(full, s)
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


HELDOUT_ROWS = {
    # row: (label, plan file stem in benchmarks/results/plans, or None for dense / "default" for the old data-free plan)
    "dense": ("dense", None),
    "shipped": ("**new default** `patch(model, sparsity=s)`: shipped plans (paper search on wiki)", "shipped/shipped"),
    "selfcalib": ("self-calibrated: a model no plan is shipped for (its own text, paper search)", "selfcalib"),
    "recommended": ("`calibrate` default on wiki (hybrid search, then SLEB check)", "recommended"),
    "sleb": ("SLEB (greedy block removal) on wiki", "sleb"),
    "shortgpt": ("ShortGPT (Block Influence)", "shortgpt"),
    "olddefault": ("old data-free default (middle block; no longer used)", "default"),
}


def heldout_table(args: argparse.Namespace) -> None:
    """Evaluate saved plans on the two held-out sets; write ``heldout.json`` and ``heldout.md``."""
    log = logging.getLogger("make_table")
    torch.set_num_threads(args.threads)
    folder = Path(__file__).resolve().parents[1] / "results" / "plans"
    path = folder / "heldout.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    model, tok = load_model(None, dtype=getattr(torch, args.dtype))
    sets = {"wiki": wiki_eval_windows(tok), "outside": outside_windows(tok)}
    runners = {k: LossRunner(model, v) for k, v in sets.items()}
    n = model.config.num_hidden_layers
    questions = [c.question for c in tasks.CHAT_ITEMS]

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    def plan_for(stem: str | None, s: float) -> Plan | None:
        if stem is None:
            return None
        file = folder / f"{stem}@{s}.json"
        return Plan.load(file) if file.is_file() else None

    for row, (_, stem) in HELDOUT_ROWS.items():
        if args.rows and row not in args.rows:
            continue
        # the old default is shown only where the faithful metrics are (it is far off everywhere)
        targets = [0.0] if stem is None else [args.faithful_at] if row == "olddefault" else args.sparsities
        for s in targets:
            plan = Plan((1.0,) * n, model_type="llama", method="dense") if stem is None else plan_for(stem, s)
            if plan is None:
                log.info("%s@%s: no plan file, skipped", row, s)
                continue
            key = f"{row}@{s}"
            entry = results.get(key)
            recent = KEEP_RECENT if plan.selection_layers else None  # no selection layer: it does not matter
            if entry is None or entry.get("keep_ratios") != list(plan.keep_ratios) or entry.get("keep_recent") != recent:
                entry = {"keep_ratios": list(plan.keep_ratios), "keep_recent": recent,
                         "sparsity": round(plan.sparsity, 4), "selection": plan.selection_layers,
                         "removed": plan.removed_layers}
            for other in results.values():  # the same plan in another row: its measurements hold here too
                if other is not entry and other.get("keep_ratios") == list(plan.keep_ratios) and other.get("keep_recent") == recent:
                    entry.update({k: v for k, v in other.items() if k.startswith(("ppl_", "next_", "chat_")) and k not in entry})
            for name, runner in runners.items():
                if f"ppl_{name}" not in entry:
                    entry[f"ppl_{name}"] = round(math.exp(runner.loss(plan)), 3)
            if (stem is None or abs(s - args.faithful_at) < 1e-9) and "chat_answers" not in entry:
                with patched(model, plan=plan):
                    nll = [quality.prefill_next_token_nll(model, w[:, :512], args.prefixes, batch_size=4) for w in sets.values()]
                    answers = quality.chat_answers(model, tok, questions, new_tokens=24)
                entry["next_token_ppl"] = round(math.exp(sum(nll) / len(nll)), 3)
                entry["chat_answers"] = answers
                entry["chat_text"] = [tok.decode(a, skip_special_tokens=True) for a in answers]
                entry["chat_correct"] = sum(c.correct(t) for c, t in zip(tasks.CHAT_ITEMS, entry["chat_text"])) / len(questions)
            results[key] = entry
            save()
            log.info("%s: %s", key, {k: v for k, v in entry.items() if k.startswith(("ppl", "next", "chat_c"))})
    dense = results.get("dense@0.0", {}).get("chat_answers")
    for key, entry in results.items():
        if dense and "chat_answers" in entry:
            entry["chat_prefix"], entry["chat_exact"] = (round(v, 3) for v in tasks.chat_agreement(dense, entry["chat_answers"]))
    save()
    write_heldout_table(results, folder / "heldout.md", args.sparsities, args.faithful_at)


def write_heldout_table(results: dict, path: Path, sparsities: list[float], faithful_at: float) -> None:
    """Markdown: ppl wiki / outside per sparsity, then next-token ppl and chat metrics at ``faithful_at``."""
    head = ["method"] + [f"s={s}: wiki / outside ppl (sparsity)" for s in sparsities] + [
        f"next-token ppl @{faithful_at}", f"chat: prefix / exact / correct @{faithful_at}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, (label, stem) in HELDOUT_ROWS.items():
        cells, faithful = [label], None
        for s in sparsities:
            r = results.get(f"{row}@{0.0 if stem is None else s}")
            cells.append("-" if r is None else f"{r['ppl_wiki']:.2f} / {r['ppl_outside']:.2f} ({r['sparsity']:.3f})")
            if r is not None and (stem is None or abs(s - faithful_at) < 1e-9):
                faithful = r
        if all(c == "-" for c in cells[1:]):
            continue
        if faithful and "next_token_ppl" in faithful:
            cells += [f"{faithful['next_token_ppl']:.2f}",
                      f"{faithful.get('chat_prefix', 0):.2f} / {faithful.get('chat_exact', 0):.2f} / {faithful['chat_correct']:.2f}"]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
