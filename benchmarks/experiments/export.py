"""Turn experiment results into the saved plans of the held-out table and the shipped plans.

    python -m benchmarks.experiments.export --results benchmarks/results/selfcalib --selfcalib gen-t1.0-2x512-paper

Writes ``benchmarks/results/plans/<stem>@<s>.json`` for the rows of ``make_table.py --heldout``:

* ``orthorank-heldout``: the paper search on wiki (recipe ``wiki-paper``, closest prefixes);
* ``recommended``: per sparsity, the hybrid search to exactly ``s`` (recipe ``wiki-hybridx``) or
  the SLEB plan of the same sparsity on the same windows (``benchmarks/results/plans/sleb@<s>.json``),
  whichever has the lower loss on the 4 held-back calibration windows scored by
  ``validate_choice.py`` (what ``calibrate(versus_removal=True, check_windows=4)`` does);
* ``shipped/shipped``: the paper search on wiki (selection layers only: in generation, measured by
  the next-token NLL after a prefill and chat agreement, removed layers cost far more than
  perplexity shows), with ``meta["keep_ratio"]`` and ``meta["target_sparsity"]`` for
  ``python -m benchmarks.ship_plans``;
* ``selfcalib``: the plans of the chosen data-free recipe.

Held-out perplexities already measured by ``experiment.py`` (same windows, same code) are copied
into ``benchmarks/results/plans/heldout.json`` so the table script does not recompute them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orthorank.plan import Plan
from orthorank.search import plan_at_round

PLANS = Path(__file__).resolve().parents[1] / "results" / "plans"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "selfcalib")  # experiment.py --out
    p.add_argument("--selfcalib", default="gen-t1.0-2x512-paper", help="the recipe whose plans a fresh model gets")
    args = p.parse_args()
    table_path = PLANS / "heldout.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}

    def load(name: str) -> dict | None:
        f = args.results / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def put(row: str, stem: str, s: str, plan: Plan, measured: dict) -> None:
        out = PLANS / f"{stem}@{s}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        plan.save(out)
        entry = table.get(f"{row}@{s}", {})
        if entry.get("keep_ratios") != list(plan.keep_ratios):
            entry = {"keep_ratios": list(plan.keep_ratios), "sparsity": round(plan.sparsity, 4),
                     "selection": plan.selection_layers, "removed": plan.removed_layers}
        entry.update({k: measured[k] for k in ("ppl_wiki", "ppl_outside") if k in measured})
        table[f"{row}@{s}"] = entry

    def prefix_plan(res: dict, s: str) -> Plan:
        full = Plan.from_dict(res["full_plan"])
        row = res["plans"][s]
        if "plan" in row:
            return Plan.from_dict(row["plan"])
        for k in range(len(full.meta["rounds"]) + 1):
            cand = plan_at_round(full, k)
            if cand.selection_layers == row["selection"] and cand.removed_layers == row["removed"]:
                return cand
        raise ValueError(f"no prefix of the search matches the evaluated plan at {s}")

    for name, row, stem in (("wiki-paper", "orthorank", "orthorank-heldout"), (args.selfcalib, "selfcalib", "selfcalib")):
        res = load(name)
        if res:
            for s, measured in res["plans"].items():
                plan = prefix_plan(res, s)
                plan.meta["recipe"] = name
                put(row, stem, s, plan, measured)
    for name, row in (("sleb-saved", "sleb"), ("shortgpt-saved", "shortgpt")):
        res = load(name)
        if res:
            for s, measured in res["plans"].items():
                put(row, row, s, Plan.load(PLANS / f"{row}@{s}.json"), measured)
    hybrid, sleb = load("wiki-hybridx"), load("sleb-saved")
    check_file = Path(__file__).resolve().parents[1] / "results" / "selfcalib" / "validate_choice.json"
    check = json.loads(check_file.read_text()) if check_file.is_file() else {}
    if hybrid and sleb:
        for s, measured in hybrid["plans"].items():
            searched = Plan.from_dict(measured["plan"])
            removal = Plan.load(PLANS / f"sleb@{s}.json")
            same = abs(searched.sparsity - removal.sparsity) <= 0.005
            versus = {"searched_loss": searched.meta["final_loss"], "removal_loss": removal.meta["final_loss"],
                      "judged_on": "search windows"}
            if f"sleb@{s}" in check:  # calibrate(check_windows=4): judged on the next 4 windows of the text
                versus.update(judged_on="4 held-back windows",
                              searched_check_loss=check[f"recommended@{s}"]["unseen_windows_loss"],
                              removal_check_loss=check[f"sleb@{s}"]["unseen_windows_loss"])
                use_removal = same and versus["removal_check_loss"] < versus["searched_check_loss"]
            else:
                use_removal = same and versus["removal_loss"] < versus["searched_loss"]
            versus["chosen"] = "removal" if use_removal else "searched"
            chosen = removal if use_removal else searched
            chosen.meta["versus_removal"] = versus if same else None
            put("recommended", "recommended", s, chosen, sleb["plans"][s] if use_removal else measured)
            print(s, chosen.meta["versus_removal"])
    paper = load("wiki-paper")
    if paper:  # shipped: the paper search on wiki (best next-token NLL after a prefill and chat agreement)
        for s, measured in paper["plans"].items():
            plan = prefix_plan(paper, s)
            plan.meta.update(recipe="wiki-paper", keep_ratio=round(1 / 3, 6), target_sparsity=float(s))
            put("shipped", "shipped/shipped", s, plan, measured)
    table_path.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
