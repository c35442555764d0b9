"""Long-prompt fidelity of hand-made or saved plans, on a small prompt set (exploration, not the table).

Each plan of a JSON file is installed, then pass keys (and with ``--qa`` long-document questions)
at each length and the next-token perplexity after a prefill are measured, as in
``python -m benchmarks.longprompt`` but with fewer prompts and with a choice of prompt seed (the
README table uses seed 0; another seed gives prompts it never saw). The file maps a name to one of::

    {}                                          dense
    {"sparsity": 0.2, "objective": "generation"} orthorank.patch(model, sparsity=0.2, objective=...)
    {"file": "plan.json", "sparsity": 0.2}      a saved search, at its round closest to 0.2
    {"layers": {"20": 0.333, "21": 0.333}}      these keep ratios, the others dense

each with optional ``"selector"``, ``"keep_recent"``, ``"keep_min"``, ``"pooled_span"`` (the span
of the ``attention`` ranking's pooling, :data:`orthorank.layer.POOLED_SPAN`) and ``"observed_queries"``
(the prompt's last tokens whose attention that ranking reads, :data:`orthorank.layer.OBSERVED_QUERIES`),
the last two for that plan only.
``--probes-only`` measures the next-token perplexity alone (no pass keys or questions).

    python -m benchmarks.experiments.plan_probe --plans plans.json --qa --seed 1 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import orthorank
from orthorank import layer
from orthorank.plan import Plan
from orthorank.search import closest_round

from ..embedded import load_model, wiki_texts
from ..longprompt import measure, tasks
from ..longprompt.__main__ import fillers


def install(model: torch.nn.Module, spec: dict[str, Any]) -> None:
    """Patch ``model`` as ``spec`` says (see the module docstring); ``{}`` leaves it dense."""
    options = {k: spec[k] for k in ("selector", "keep_recent", "keep_min") if k in spec}
    if "layers" in spec:
        ratios = [1.0] * model.config.num_hidden_layers
        for layer, keep in spec["layers"].items():
            ratios[int(layer)] = float(keep)
        plan = Plan(tuple(ratios), selector=options.pop("selector", "attention"), model_type=model.config.model_type)
        orthorank.patch(model, plan=plan, **options)
    elif "file" in spec:
        plan = closest_round(Plan.load(spec["file"], model=model), float(spec["sparsity"]))
        orthorank.patch(model, plan=plan, **options)
    elif "sparsity" in spec:
        orthorank.patch(model, sparsity=float(spec["sparsity"]), objective=spec.get("objective", "generation"), **options)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.plan_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", type=Path, required=True, help="JSON file: name -> plan spec")
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--prompts", type=int, default=8, help="prompts per length and task")
    p.add_argument("--probes", type=int, default=32, help="next-token prefixes, log-uniform in 16..max length")
    p.add_argument("--qa", action="store_true", help="also long-document questions")
    p.add_argument("--probes-only", action="store_true", help="only the next-token perplexity (no pass keys, no QA)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (the README table uses 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(dtype=torch.bfloat16)
    texts = fillers(tokenizer)
    lengths = [int(v) for v in args.lengths.split(",")]
    prompts = []
    for n in [] if args.probes_only else lengths:
        prompts += tasks.passkey_prompts(tokenizer, texts, n, args.prompts, seed=args.seed)
        if args.qa:
            prompts += tasks.qa_prompts(tokenizer, texts, n, args.prompts, seed=args.seed)
    windows = tasks.prose_windows(tokenizer, list(wiki_texts("eval"))[400:], max(lengths) + 1, 8)
    probes = tasks.probe_lengths(16, max(lengths), args.probes, seed=args.seed)
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "probes_at": probes, "rows": {}}
    pooled_span, observed = layer.POOLED_SPAN, layer.OBSERVED_QUERIES
    for name, spec in json.loads(args.plans.read_text()).items():
        started = time.perf_counter()
        layer.POOLED_SPAN = int(spec.get("pooled_span", pooled_span))
        layer.OBSERVED_QUERIES = int(spec.get("observed_queries", observed))
        install(model, spec)
        try:
            row: dict[str, Any] = {}
            if prompts:
                row.update(measure.hits_by_length(prompts, measure.hits(prompts, measure.answers(model, tokenizer, prompts)), lengths))
            nll = measure.next_token_nll(model, windows, probes)
            row["next_token_ppl"] = round(measure.ppl(nll), 3)
            row["next_token_nll"] = [round(v, 5) for v in nll]
            plan = orthorank.get_plan(model)
            row["plan"] = None if plan is None else plan.to_dict()
        finally:
            orthorank.unpatch(model)
            layer.POOLED_SPAN, layer.OBSERVED_QUERIES = pooled_span, observed
        row["seconds"] = round(time.perf_counter() - started, 1)
        results["rows"][name] = row
        print(name, {k: v for k, v in row.items() if k not in ("plan", "next_token_nll")}, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
