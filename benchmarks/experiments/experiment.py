"""Which data-free calibration recipe gives plans closest to a plan calibrated on real text?

    OMP_NUM_THREADS=1 python -m benchmarks.experiments.experiment --recipes wiki-paper gen-t1.0-2x512-paper ...

Each recipe = calibration ids (wiki ``calib`` windows, or text the model samples itself from its
BOS token with a seeded generator) + a greedy search (:func:`orthorank.search.search_plan`) to
the highest sparsity; its prefixes give the plans at lower sparsities. Every plan is evaluated on
two held-out sets (``heldout.py``: wiki ``eval`` and outside prose). One JSON per recipe is written
to ``--out`` (re-running skips finished recipes). bf16 throughout, 1 thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from pathlib import Path

import torch

from orthorank.baselines import blocks_to_remove, sleb_plan
from orthorank.plan import Plan
from orthorank.runner import LossRunner
from orthorank.search import SearchConfig, closest_round, plan_at_round, search_plan
from orthorank.text import token_windows

from benchmarks.embedded import load_model, wiki_texts
from benchmarks.experiments.heldout import outside_windows, wiki_eval_windows

SEARCHES = {"paper": ((1.0, 1 / 3), False), "hybrid": ((1.0, 1 / 3, 0.0), True)}
# "<search>x": one search per target sparsity (exact targets) instead of the prefixes of one search
SAVED = Path(__file__).resolve().parents[1] / "results" / "plans"  # saved SLEB / ShortGPT plans (wiki calib 2x512, bf16)
CHAT_PROMPT = "Write a long, detailed article about a topic of your choice."


@torch.inference_mode()
def sample_ids(model, tok, rows: int, length: int, *, temperature: float = 1.0, top_p: float = 1.0,
               seed: int = 0, chat: bool = False) -> torch.Tensor:
    """``[rows, length]`` token ids sampled from the model, starting at its BOS token (or a chat prompt).

    Special tokens are never sampled (the text stays one document). KV cache, one step per token.
    """
    g = torch.Generator().manual_seed(seed)
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    else:
        prompt = [tok.bos_token_id]
    ids = torch.tensor([prompt] * rows)
    banned = torch.tensor(sorted(set(tok.all_special_ids)))
    out = model(input_ids=ids, use_cache=True)
    cache, seq = out.past_key_values, [ids]
    while sum(s.shape[1] for s in seq) < length:
        logits = out.logits[:, -1].float()
        logits[:, banned] = -float("inf")
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        nxt = torch.multinomial(probs, 1, generator=g)
        seq.append(nxt)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return torch.cat(seq, dim=1)[:, :length]


def parse_recipe(name: str) -> dict:
    """``wiki-paper``, ``wiki-hybrid``, ``sleb``, or ``gen|chat-t<T>[-p<P>]-<N>x<SEQ>-<search>[-sl<K>][-seed<S>]``."""
    if name in ("sleb-saved", "shortgpt-saved"):
        return {"source": "saved", "method": name.split("-")[0]}
    m = re.fullmatch(r"wiki(\d*)-(paper|hybrid|hybridx|sleb)", name)
    if m:
        return {"source": "wiki", "n": int(m[1] or 2), "seq": 512, "search": m[2], "shortlist": 10}
    m = re.fullmatch(r"(gen|chat)-t([\d.]+)(?:-p([\d.]+))?-(\d+)x(\d+)-(paper|hybrid|hybridx|sleb)(?:-sl(\d+))?(?:-seed(\d+))?", name)
    if not m:
        raise SystemExit(f"bad recipe {name!r}")
    return {"source": m[1], "temperature": float(m[2]), "top_p": float(m[3] or 1.0), "n": int(m[4]),
            "seq": int(m[5]), "search": m[6], "shortlist": int(m[7] or 10), "seed": int(m[8] or 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", required=True)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/selfcalib"))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(None, dtype=torch.bfloat16)
    n_layers = model.config.num_hidden_layers
    evals = {"wiki": LossRunner(model, wiki_eval_windows(tok)), "outside": LossRunner(model, outside_windows(tok))}
    top = max(args.sparsities)
    for name in args.recipes:
        path = args.out / f"{name}.json"
        if path.is_file():
            continue
        r = parse_recipe(name)
        t0 = time.perf_counter()
        if r["source"] == "saved":
            plans = {s: Plan.load(SAVED / f"{r['method']}@{s}.json") for s in args.sparsities}
            res = {"recipe": r, "plans": {}}
            evaluate_all(res, plans, evals, path, name)
            continue
        if r["source"] == "wiki":
            ids = token_windows(tok, wiki_texts("calib"), r["seq"], r["n"])
        else:
            # generated text is cached per (source, temperature, top-p, windows, seed); the time is the first run's
            key = f"{r['source']}-t{r['temperature']}-p{r['top_p']}-{r['n']}x{r['seq']}-seed{r['seed']}"
            cached = args.out / f"ids-{key}.pt"
            if cached.is_file():
                ids, gen_s = torch.load(cached)
            else:
                ids = sample_ids(model, tok, r["n"], r["seq"], temperature=r["temperature"], top_p=r["top_p"],
                                 seed=r["seed"], chat=r["source"] == "chat")
                gen_s = time.perf_counter() - t0
                torch.save((ids, gen_s), cached)
        gen_s = gen_s if r["source"] != "wiki" else time.perf_counter() - t0
        runner = LossRunner(model, ids)
        t1 = time.perf_counter()
        if r["search"] == "hybridx":
            # exact targets: one search to the top; each lower target resumes from the last prefix below it
            config = SearchConfig(top, levels=SEARCHES["hybrid"][0], jumps=True, shortlist=r["shortlist"])
            full = search_plan(runner, config, progress=False)
            plans = {top: full}
            for s in args.sparsities:
                if s != top:
                    k = max(k for k in range(len(full.meta["rounds"]) + 1) if plan_at_round(full, k).sparsity <= s + 1e-9)
                    plans[s] = search_plan(runner, dataclasses.replace(config, sparsity=s), progress=False,
                                           start=plan_at_round(full, k))
        elif r["search"] == "sleb":
            full = sleb_plan(model, ids, top, progress=False)
            plans = {s: plan_at_round(full, blocks_to_remove(n_layers, s)) for s in args.sparsities}
        else:
            levels, jumps = SEARCHES[r["search"]]
            full = search_plan(runner, SearchConfig(top, levels=levels, jumps=jumps, shortlist=r["shortlist"]),
                               progress=False)
            plans = {s: closest_round(full, s) for s in args.sparsities}
        search_s = time.perf_counter() - t1
        res = {"recipe": r, "generate_s": round(gen_s, 1), "search_s": round(search_s, 1),
               "search_forward_passes": full.meta.get("forward_passes"), "full_plan": full.to_dict(),
               "sample": tok.decode(ids[0, :80]) if r["source"] != "wiki" else None, "plans": {}}
        evaluate_all(res, plans, evals, path, name)


def evaluate_all(res: dict, plans: dict, evals: dict, path: Path, name: str) -> None:
    """Held-out perplexity of every plan; writes the recipe's JSON."""
    for s, plan in plans.items():
        row = {"sparsity": round(plan.sparsity, 4), "selection": plan.selection_layers,
               "removed": plan.removed_layers, "calib_loss": plan.meta.get("final_loss")}
        for key, ev in evals.items():
            row[f"ppl_{key}"] = round(math.exp(ev.loss(plan)), 3)
        row["plan"] = plan.to_dict()
        res["plans"][str(s)] = row
    path.write_text(json.dumps(res, indent=1))
    print(name, f"gen {res.get('generate_s')}s search {res.get('search_s')}s",
          {s: (v["sparsity"], v["ppl_wiki"], v["ppl_outside"]) for s, v in res["plans"].items()}, flush=True)


if __name__ == "__main__":
    main()
