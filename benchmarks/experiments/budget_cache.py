"""Benchmark of orthorank.kvcache.BudgetCache on the embedded SmolLM2-135M (CPU friendly).

Three measurements, written to ``results/kvcache/budget_cache.json`` and printed as tables:

1. Teacher-forced long text: a wiki text (eval-split extracts concatenated) is fed through the cache
   after a short prompt, in chunks of ``--chunk`` tokens, and single tokens inside three timing
   windows (near position 256, near 1024, and at the end). Reported per policy and budget:
   perplexity of every token after the prompt, peak stored K/V bytes, decode ms/token per window.
   Times are process CPU time (one compute thread by default), which other jobs sharing the cores
   do not inflate the way they inflate wall time.
2. Long generation: sampled ``model.generate(..., cache=BudgetCache(...))`` of ``--gen-tokens`` new
   tokens (greedy decoding of this small model falls into a loop that any cache reproduces):
   per-step time early vs late, peak K/V bytes, the perplexity of the generated text under the
   full model (one dense pass), its distinct 4-gram share, and how many tokens equal the
   full-cache run before the first difference.
3. Composition: OrthoRank prefill (``orthorank.patch(model, sparsity=0.2)``) of a long prompt, then
   budgeted teacher-forced decoding of the rest; perplexity of the continuation, all four
   combinations of dense/OrthoRank prefill and full/budgeted cache.

    python -m benchmarks.experiments.budget_cache    # everything: about 9 CPU-minutes, one thread
    python -m benchmarks.experiments.budget_cache --skip-generation --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import orthorank
from orthorank.kvcache import BudgetCache, separator_ids
from orthorank.text import token_windows

from benchmarks.embedded import load_model, wiki_texts

logger = logging.getLogger("budget_cache")


def kv_bytes(cache: Any) -> int:
    """Bytes of the K/V tensors a cache stores now."""
    if isinstance(cache, BudgetCache):
        return cache.kv_bytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def make_cache(model: Any, policy: str, budget: int | None, seps: list[int], **params: Any) -> Any:
    if policy == "dynamic":
        return DynamicCache(config=model.config)
    extra = {"separator_ids": seps} if policy == "separators" else {}
    return BudgetCache(model, budget=budget, policy=policy, **extra, **params)


@torch.no_grad()
def teacher_forced(
    model: Any, ids: torch.Tensor, cache: Any, prompt: int, chunk: int, windows: list[tuple[int, int]]
) -> dict[str, Any]:
    """Perplexity of ``ids[:, prompt:]`` fed through ``cache``; ms/token in single-token ``windows``."""
    total = ids.shape[1]
    last = model(ids[:, :prompt], cache=cache).logits[:, -1]
    nll, count, peak, pos = 0.0, 0, kv_bytes(cache), prompt
    times: dict[int, list[float]] = {i: [] for i in range(len(windows))}
    while pos < total:
        window = next((i for i, (a, b) in enumerate(windows) if a <= pos < b), None)
        step = 1 if window is not None else min(chunk, total - pos, *[a - pos for a, _ in windows if a > pos])
        x = ids[:, pos : pos + step]
        start = time.process_time()
        logits = model(x, cache=cache).logits
        elapsed = time.process_time() - start
        if window is not None:
            times[window].append(elapsed * 1000)
        preds = torch.cat([last[:, None], logits[:, :-1]], dim=1)
        nll += torch.nn.functional.cross_entropy(preds.flatten(0, 1).float(), x.flatten(), reduction="sum").item()
        count += x.numel()
        last = logits[:, -1]
        peak = max(peak, kv_bytes(cache))
        pos += step
    return {
        "ppl": math.exp(nll / count),
        "tokens_scored": count,
        "peak_kv_bytes": peak,
        "ms_per_token": [statistics.median(times[i]) if times[i] else None for i in range(len(windows))],
    }


class StepRecorder(LogitsProcessor):
    """Records the process CPU time and stored K/V bytes at every generation step."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.stamps: list[float] = []
        self.bytes: list[int] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.process_time())
        self.bytes.append(kv_bytes(self.cache))
        return scores


@torch.no_grad()
def generation(
    model: Any, prompt_ids: torch.Tensor, cache: Any, new_tokens: int, early: int, probe: int = 64, seed: int = 0
) -> dict[str, Any]:
    """Sampled generation (temperature 0.8, top-p 0.95, fixed seed: every cache draws the same random
    numbers); CPU time of ``probe`` steps from step ``early`` vs the last ``probe`` steps."""
    recorder = StepRecorder(cache)
    torch.manual_seed(seed)
    out = model.generate(
        prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=0.8,
        top_p=0.95, cache=cache, logits_processor=LogitsProcessorList([recorder]),
    )
    steps = [1000 * (b - a) for a, b in zip(recorder.stamps, recorder.stamps[1:])]
    generated = out[0, prompt_ids.shape[1] :]
    logits = model(out).logits[0, prompt_ids.shape[1] - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.float(), generated, reduction="mean").item()
    grams = [tuple(generated[i : i + 4].tolist()) for i in range(len(generated) - 3)]
    return {
        "new_tokens": len(generated),
        "early_step": early,
        "ms_per_token_early": statistics.median(steps[early : early + probe]),
        "ms_per_token_late": statistics.median(steps[-probe:]),
        "peak_kv_bytes": max(recorder.bytes),
        "full_model_ppl_of_text": math.exp(nll),
        "distinct_4gram": len(set(grams)) / max(1, len(grams)),
        "tokens": generated.tolist(),
    }


def timed(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["cpu_seconds"] = round(time.process_time() - cpu, 1)
    logger.info("%s: %s", label, {k: v for k, v in result.items() if k != "tokens"})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="teacher-forced text length")
    parser.add_argument("--prompt", type=int, default=32, help="prefill length before token-wise feeding")
    parser.add_argument("--chunk", type=int, default=8, help="tokens per forward outside timing windows")
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--policies", nargs="+", default=["milestone", "sink_window", "separators"])
    parser.add_argument("--gen-tokens", type=int, default=2048)
    parser.add_argument("--gen-budget", type=int, default=256)
    parser.add_argument("--gen-policies", nargs="+", default=["milestone"])
    parser.add_argument("--compose-prompt", type=int, default=1024)
    parser.add_argument("--compose-budget", type=int, default=512)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-composition", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/kvcache/budget_cache.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    started, started_cpu = time.perf_counter(), time.process_time()

    model, tokenizer = load_model(None, arch="llama")
    seps = separator_ids(tokenizer)
    ids = token_windows(tokenizer, wiki_texts("eval"), window=args.tokens, n_windows=1)
    windows = [(p, p + 32) for p in (256, 1024) if p + 32 <= args.tokens - 32] + [(args.tokens - 32, args.tokens)]
    report: dict[str, Any] = {
        "model": "SmolLM2-135M (embedded, float32, sdpa)",
        "threads": args.threads,
        "args": vars(args) | {"out": str(args.out)},
        "timing_windows": windows,
        "kv_bytes_per_token": None,
        "teacher_forced": [],
        "generation": [],
        "composition": [],
    }

    configs = [("dynamic", None)] + [(p, b) for b in args.budgets for p in args.policies]
    for policy, budget in configs:
        cache = make_cache(model, policy, budget, seps)
        row = timed(
            f"tf {policy}@{budget}", lambda: teacher_forced(model, ids, cache, args.prompt, args.chunk, windows)
        )
        if isinstance(cache, BudgetCache):
            cache.detach()
        report["teacher_forced"].append({"policy": policy, "budget": budget, **row})
    report["kv_bytes_per_token"] = report["teacher_forced"][0]["peak_kv_bytes"] / args.tokens

    if not args.skip_generation:
        prompt_ids = ids[:, :64]
        early = min(args.gen_budget, max(0, args.gen_tokens - 128))  # budgeted caches are full from here on
        for policy, budget in [("dynamic", None)] + [(p, args.gen_budget) for p in args.gen_policies]:
            cache = make_cache(model, policy, budget, seps)
            row = timed(f"gen {policy}@{budget}", lambda: generation(model, prompt_ids, cache, args.gen_tokens, early))
            if isinstance(cache, BudgetCache):
                cache.detach()
            report["generation"].append({"policy": policy, "budget": budget, **row})
        full = report["generation"][0]["tokens"]
        for row in report["generation"]:
            same = [a == b for a, b in zip(row["tokens"], full)]
            row["tokens_equal_to_full_before_divergence"] = same.index(False) if False in same else len(same)
            row.pop("tokens")

    if not args.skip_composition:
        prompt = args.compose_prompt
        for prefill in ("dense", "orthorank"):
            if prefill == "orthorank":
                orthorank.patch(model, sparsity=0.2)
            for policy, budget in (("dynamic", None), ("milestone", args.compose_budget)):
                cache = make_cache(model, policy, budget, seps, protect_prompt=False)
                row = timed(
                    f"compose {prefill}+{policy}@{budget}",
                    lambda: teacher_forced(model, ids, cache, prompt, args.chunk, [(args.tokens - 16, args.tokens)]),
                )
                if isinstance(cache, BudgetCache):
                    cache.detach()
                report["composition"].append({"prefill": prefill, "policy": policy, "budget": budget, **row})
        orthorank.unpatch(model)

    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["total_cpu_seconds"] = round(time.process_time() - started_cpu, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(render(report))


def render(report: dict[str, Any]) -> str:
    """Markdown tables of a report."""
    mib = 1 / 2**20
    labels = ", ".join(f"@{a}" for a, _ in report["timing_windows"])
    lines = [f"| policy | budget | ppl | peak K/V MiB | ms/token ({labels}) |", "|---|---|---|---|---|"]
    for r in report["teacher_forced"]:
        ms = " / ".join(f"{m:.1f}" for m in r["ms_per_token"] if m is not None)
        name = "full (DynamicCache)" if r["policy"] == "dynamic" else r["policy"]
        lines.append(f"| {name} | {r['budget'] or '-'} | {r['ppl']:.2f} | {r['peak_kv_bytes'] * mib:.1f} | {ms} |")
    if report["generation"]:
        lines += [
            "",
            "| generation | budget | ms/token early / late (steps) | peak K/V MiB | full-model ppl of text "
            "| distinct 4-grams | tokens equal to full |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["generation"]:
            name = "full (DynamicCache)" if r["policy"] == "dynamic" else r["policy"]
            lines.append(
                f"| {name} | {r['budget'] or '-'} | {r['ms_per_token_early']:.1f} / {r['ms_per_token_late']:.1f} "
                f"({r['early_step']}+ / last 64) | "
                f"{r['peak_kv_bytes'] * mib:.1f} | {r['full_model_ppl_of_text']:.2f} | {r['distinct_4gram']:.2f} | "
                f"{r['tokens_equal_to_full_before_divergence']} |"
            )
    if report["composition"]:
        lines += ["", "| prefill | cache | continuation ppl | peak K/V MiB |", "|---|---|---|---|"]
        for r in report["composition"]:
            cache = "full" if r["policy"] == "dynamic" else f"{r['policy']}@{r['budget']}"
            lines.append(f"| {r['prefill']} | {cache} | {r['ppl']:.2f} | {r['peak_kv_bytes'] * mib:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
