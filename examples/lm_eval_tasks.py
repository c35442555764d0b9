"""Evaluate a patched model with lm-eval-harness on a local task, next to the dense model.

    python examples/lm_eval_tasks.py --limit 50                       # SmolLM2-135M-Instruct from the Hub
    python examples/lm_eval_tasks.py --model "$(python -m benchmarks.embedded)" --tasks orthorank_wiki_mc

Needs ``pip install -e ".[eval]"``. The tasks are the offline Wikipedia tasks in
``benchmarks/tasks`` (``orthorank_wiki_cloze``, ``orthorank_wiki_mc``, ``orthorank_wiki_ppl``, or
the group ``orthorank_wiki``); any lm-eval task name works too (downloaded by lm-eval). The same
from the command line: ``python -m orthorank.eval --model M --sparsity 0.2 --tasks ...``. (The file
is not named ``lm_eval.py``: run as a script, it would shadow the ``lm_eval`` package.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import orthorank
from orthorank.eval import evaluate

TASKS = Path(__file__).resolve().parents[1] / "benchmarks" / "tasks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id or local folder")
    parser.add_argument("--tasks", default="orthorank_wiki_cloze", help="comma-separated task names")
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()

    for label in ("dense", f"sparsity {args.sparsity}"):
        if label != "dense":
            orthorank.patch(model, sparsity=args.sparsity)
        # evaluate() passes each batch's padding mask to the model, so a patched model scores every
        # row as if it were alone: the numbers do not depend on --batch-size.
        result = evaluate(model, tokenizer, args.tasks, batch_size=args.batch_size, limit=args.limit,
                          include_path=TASKS, bootstrap_iters=0)
        for task, metrics in sorted(result["results"].items()):
            shown = ", ".join(f"{k.split(',')[0]} {v:.4g}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            print(f"{label:>16} | {task}: {shown}")
    orthorank.unpatch(model)


if __name__ == "__main__":
    main()
