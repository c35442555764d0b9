"""Does a calibration loss that matches generation pick better layers for generation?

    OMP_NUM_THREADS=1 python -m benchmarks.experiments.generation_loss --recipes gen-p256 wiki-p256 ...

A recipe is ``<text>[<N>x<SEQ>]-<objective>``: ``text`` is ``wiki`` (windows of the wiki ``calib``
split) or ``gen`` (text the model samples itself, :func:`orthorank.selfcalib.self_generated_ids`
with the default recipe's seed, at temperature T, default the recipe's), N windows of SEQ tokens
(default 2 x 512); ``objective`` is ``full`` (every token's NLL in
a prefill: the search's historical loss) or ``p<P>`` (the NLL of the tokens after the first ``P``
of each window, scored as generated tokens: :class:`orthorank.runner.LossRunner` with ``prompt``).
Each recipe runs the paper's search (selection layers only, shortlist 10) to 0.3; its prefixes
give the plans at 0.1 and 0.2. Every plan is scored on held-out text (wiki ``eval`` and outside
prose, ``heldout.py``) by full-window perplexity and by answer perplexity (the second half of
each 1024-token window as generated tokens after the first half as prompt), and on 16 chat
questions (greedy, 24 tokens: correct answers and agreement with the dense answers). One JSON per
recipe in ``--out``; finished recipes are skipped. bf16, ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch

from orthorank.install import plan_installed
from orthorank.plan import Plan
from orthorank.runner import LossRunner
from orthorank.search import SearchConfig, closest_round, search_plan
from orthorank.recipe import RECIPE
from orthorank.selfcalib import self_generated_ids
from orthorank.text import token_windows

from benchmarks.embedded import load_model, wiki_texts
from benchmarks.experiments.heldout import outside_windows, wiki_eval_windows
from benchmarks.suite.quality import chat_answers
from benchmarks.suite.tasks import CHAT_ITEMS, chat_agreement


def chat_scores(model, tok, plan: Plan | None, reference: list[list[int]] | None) -> dict:
    questions = [c.question for c in CHAT_ITEMS]
    if plan is None:
        answers = chat_answers(model, tok, questions)
    else:
        with plan_installed(model, plan):
            answers = chat_answers(model, tok, questions)
    texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
    row = {"chat_correct": sum(c.correct(t) for c, t in zip(CHAT_ITEMS, texts)), "answers": texts, "ids": answers}
    if reference is not None:
        prefix, exact = chat_agreement(reference, answers)
        row.update(chat_prefix=round(prefix, 4), chat_exact=round(exact, 4))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", required=True)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/selfcalib/generation"))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(None, dtype=torch.bfloat16)
    held = {"wiki": wiki_eval_windows(tok), "outside": outside_windows(tok)}
    evals = {}
    for key, ids in held.items():
        evals[f"ppl_{key}"] = LossRunner(model, ids)
        evals[f"answer_ppl_{key}"] = LossRunner(model, ids, prompt=ids.shape[1] // 2)
    dense_path = args.out / "dense.json"
    if not dense_path.is_file():
        dense = Plan((1.0,) * model.config.num_hidden_layers)
        row = {k: round(math.exp(ev.loss(dense)), 3) for k, ev in evals.items()}
        row.update(chat_scores(model, tok, None, None))
        dense_path.write_text(json.dumps(row, indent=1))
    reference = json.loads(dense_path.read_text())["ids"]
    for name in args.recipes:
        path = args.out / f"{name}.json"
        if path.is_file():
            continue
        m = re.fullmatch(r"(wiki|gen)(?:(\d+)x(\d+))?(?:-t([\d.]+))?-(full|p(\d+))", name)
        if not m:
            raise SystemExit(f"bad recipe {name!r}: expected (wiki|gen)[<N>x<SEQ>][-t<T>]-(full|p<P>)")
        temperature = float(m[4]) if m[4] else RECIPE.temperature
        rows, seq = (int(m[2]), int(m[3])) if m[2] else (RECIPE.windows, RECIPE.window)
        t0 = time.perf_counter()
        if m[1] == "wiki":
            ids = token_windows(tok, wiki_texts("calib"), seq, rows)
        else:
            cached = args.out / f"ids-gen{rows}x{seq}-t{temperature}.pt"
            if not cached.is_file():
                torch.save(self_generated_ids(model, rows, seq, seed=RECIPE.seed, temperature=temperature), cached)
            ids = torch.load(cached)
        runner = LossRunner(model, ids, prompt=int(m[6]) if m[6] else None)
        config = SearchConfig(max(args.sparsities), levels=(1.0, 1 / 3), jumps=False, shortlist=10)
        full = search_plan(runner, config, progress=False)
        res = {"recipe": name, "search_s": round(time.perf_counter() - t0, 1), "full_plan": full.to_dict(), "plans": {}}
        for s in args.sparsities:
            plan = closest_round(full, s)
            row = {"sparsity": round(plan.sparsity, 4), "selection": plan.selection_layers,
                   "calib_loss": plan.meta.get("final_loss")}
            row.update({k: round(math.exp(ev.loss(plan)), 3) for k, ev in evals.items()})
            row.update(chat_scores(model, tok, plan, reference))
            res["plans"][str(s)] = row
            print(name, s, {k: v for k, v in row.items() if k not in ("answers", "ids")}, flush=True)
        path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
