"""What a new user's first ``orthorank.patch(model, sparsity=0.2)`` costs and gives, measured.

The embedded model is loaded as a user would (bf16), with an empty plan cache and no shipped plan
(the shipped folder is pointed at an empty directory, as for weights no plan is shipped for), so
the call calibrates on text the model generates itself. Then a second call on a freshly loaded
copy (the cache answers), held-out perplexity of the self-calibrated plan next to the shipped plan
(the paper's search on wiki text), and chat answers of dense / shipped / self-calibrated.

    python -m benchmarks.experiments.fresh_user --threads 2 --out benchmarks/results/selfcalib/fresh_user.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import orthorank
from orthorank import shipped
from orthorank.runner import LossRunner

from benchmarks.embedded import default_model_dir, load_model
from benchmarks.experiments.heldout import outside_windows, wiki_eval_windows
from benchmarks.suite import quality, tasks


def chat(model: torch.nn.Module, tokenizer) -> list[str]:
    answers = quality.chat_answers(model, tokenizer, [c.question for c in tasks.CHAT_ITEMS], new_tokens=24)
    return [tokenizer.decode(a, skip_special_tokens=True) for a in answers]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--out", default=None)
    p.add_argument("--save-plan", default=None, help="also save the self-calibrated plan (Plan.save) here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"threads": args.threads, "dtype": "bfloat16", "sparsity": args.sparsity}
    shipped_dir = shipped.SHIPPED_DIR
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as empty:
        import os

        os.environ["ORTHORANK_CACHE"] = cache
        # the embedded checkpoint is read from the usual cache: link it in (read only)
        Path(cache, "smollm2-135m").symlink_to(default_model_dir(Path.home() / ".cache" / "orthorank"))
        shipped.SHIPPED_DIR = Path(empty)
        model, tok = load_model(dtype=torch.bfloat16)
        start = time.perf_counter()
        orthorank.patch(model, sparsity=args.sparsity)
        result["first_patch_seconds"] = round(time.perf_counter() - start, 1)
        selfcal = orthorank.get_plan(model)
        result["self_plan"] = selfcal.to_dict()
        copy, _ = load_model(dtype=torch.bfloat16)
        start = time.perf_counter()
        orthorank.patch(copy, sparsity=args.sparsity)
        result["second_patch_seconds"] = round(time.perf_counter() - start, 2)
        assert orthorank.get_plan(copy).keep_ratios == selfcal.keep_ratios
        shipped.SHIPPED_DIR = shipped_dir
    orthorank.unpatch(model)
    orthorank.patch(model, sparsity=args.sparsity)  # the shipped plan (ORTHORANK_CACHE no longer matters)
    ship = orthorank.get_plan(model)
    orthorank.unpatch(model)
    result["shipped_plan"] = ship.to_dict()
    sets = {"wiki": wiki_eval_windows(tok), "outside": outside_windows(tok)}
    for name, ids in sets.items():
        runner = LossRunner(model, ids)
        for label, plan in (("dense", None), ("shipped", ship), ("self", selfcal)):
            plan = plan or orthorank.Plan((1.0,) * model.config.num_hidden_layers, model_type="llama", method="dense")
            result[f"ppl_{name}_{label}"] = round(math.exp(runner.loss(plan)), 3)
    for label, plan in (("dense", None), ("shipped", ship), ("self", selfcal)):
        if plan is not None:
            orthorank.patch(model, plan=plan)
        answers = chat(model, tok)
        orthorank.unpatch(model)
        result[f"chat_{label}"] = answers
        result[f"chat_correct_{label}"] = sum(c.correct(a) for c, a in zip(tasks.CHAT_ITEMS, answers))
    summary = {k: v for k, v in result.items() if not k.startswith(("chat_dense", "chat_shipped", "chat_self", "self_plan", "shipped_plan"))}
    print(json.dumps(summary, indent=1))
    for i in (0, 1):
        print(tasks.CHAT_ITEMS[i].question, "|", *(repr(result[f"chat_{k}"][i]) for k in ("dense", "shipped", "self")))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.save_plan:
        selfcal.save(args.save_plan)


if __name__ == "__main__":
    main()
