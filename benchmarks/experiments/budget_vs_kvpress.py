"""KV-budget benchmark: orthorank ``BudgetCache`` policies side by side with kvpress decoding presses.

The same held-out text (wiki eval split: titles outside the calibration split) is fed to SmolLM2-135M
(float32, sdpa, one thread): a ``--prompt``-token prefill, then ONE token per forward. Every method
steps in lockstep (method order rotated at each position), so their CPU times are measured
interleaved under the same machine load. Per method and budget ``B``:

* perplexity of every token after the prompt (teacher forcing);
* peak stored tokens: the most K/V entries any layer holds during a step (stored + the new token);
* CPU ms/token: median of the per-step process CPU times, and total CPU time / tokens.

Every budgeted method keeps the peak at or under ``B``:

* ``BudgetCache(budget=B - 1, headroom=h)``: a step attends to at most ``B - 1`` stored tokens plus
  the new one; above ``B - 1`` the layer evicts down to ``B - 1 - h``;
* kvpress ``DecodingPress(press, compression_interval=N, target_size=B - N)``: every ``N`` steps it
  compresses to ``B - N`` after the step's attention (so the peak is ``B``). kvpress leaves the
  cache's length at the stored count, so the new tokens' absolute positions are passed explicitly
  (``position_ids`` and ``cache_position``) to every method.

kvpress is optional: where it is not installed its rows are skipped with a note. kvpress 0.5.5 pins
``transformers<5.3``. Results are checkpointed every 128 positions (``positions_done``), so a run
stopped early still leaves a complete comparison on a shorter text. Run from the repository root
(``PYTHONPATH=.``), one process per budget, then merge (JSON + plot next to the first file)::

    python -m benchmarks.experiments.budget_vs_kvpress --tokens 640 --budgets 256 \
        --policies milestone attention sink_window --headroom-policies \
        --out benchmarks/results/kvcache/vs_kvpress_256.json
    python -m benchmarks.experiments.budget_vs_kvpress --render benchmarks/results/kvcache/vs_kvpress_*.json

A step costs about 0.08 CPU-seconds, so 7 methods x 600 tokens is about 6 CPU-minutes per budget.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import DynamicCache

from orthorank.kvcache import BudgetCache, separator_ids
from orthorank.text import token_windows

from benchmarks.embedded import load_model, wiki_texts

logger = logging.getLogger("budget_vs_kvpress")

ORTHORANK_POLICIES = ("milestone", "attention", "sink_window", "separators")
KVPRESS_PRESSES = ("TOVAPress", "KnormPress", "StreamingLLMPress")


@dataclass
class Method:
    """One cache configuration and its running totals."""

    name: str
    family: str  # "full", "orthorank" or "kvpress"
    budget: int | None
    cache: Any
    press: Any = None
    nll: float = 0.0
    count: int = 0
    peak: int = 0
    times: list[float] = field(default_factory=list)
    last: torch.Tensor | None = None

    def row(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "family": self.family,
            "budget": self.budget,
            "ppl": math.exp(self.nll / self.count),
            "tokens_scored": self.count,
            "peak_stored_tokens": self.peak,
            "ms_per_token_median": statistics.median(self.times) * 1000,
            "ms_per_token_total": sum(self.times) * 1000 / len(self.times),
        }


def stored_tokens(cache: Any) -> int:
    """The most K/V entries a layer of ``cache`` holds now."""
    return max((layer.keys.shape[-2] for layer in cache.layers if layer.is_initialized), default=0)


def gated_hook(press: Any, active: list[Any]) -> Callable[..., Any]:
    """The press's forward hook, run only while ``press`` is the active one (several presses share
    one model; each enters its own ``with press(model)`` once for the whole run)."""
    hook = press.forward_hook

    def run(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        return hook(module, args, kwargs, output) if active[0] is press else output

    return run


def kvpress_methods(budget: int, interval: int, active: list[Any]) -> list[Method]:
    """DecodingPress(TOVA / Knorm / StreamingLLM) compressing every ``interval`` steps to ``budget - interval``."""
    try:
        import kvpress
    except ImportError:
        return []
    methods = []
    for name in KVPRESS_PRESSES:
        press = kvpress.DecodingPress(
            base_press=getattr(kvpress, name)(), compression_interval=interval, target_size=budget - interval
        )
        press.forward_hook = gated_hook(press, active)  # instance attribute: what press(model) registers
        methods.append(Method(f"kvpress {name[:-5]}", "kvpress", budget, DynamicCache(), press))
    return methods


def orthorank_methods(
    model: Any, budget: int, policies: list[str], headroom: int, headroom_policies: list[str], seps: list[int]
) -> list[Method]:
    methods = []
    for policy in policies:
        extra = {"separator_ids": seps} if policy == "separators" else {}
        for room in sorted({0, headroom if policy in headroom_policies else 0}):
            name = f"orthorank {policy}" + (f" (headroom {room})" if room else "")
            cache = BudgetCache(model, budget=budget - 1, policy=policy, headroom=room, **extra)
            methods.append(Method(name, "orthorank", budget, cache))
    return methods


@torch.no_grad()
def run(
    model: Any, ids: torch.Tensor, prompt: int, methods: list[Method], active: list[Any],
    checkpoint: Callable[[int], None] | None = None,
) -> None:
    """Prefill, then one token per forward for every method in lockstep (rotating the order);
    ``checkpoint(position)`` every 128 positions."""
    base_params = inspect.signature(type(model.model).forward).parameters
    cache_kw = "cache" if "cache" in base_params else "past_key_values"
    explicit_cache_position = "cache_position" in base_params
    total = ids.shape[1]
    for m in methods:
        active[0] = m.press
        m.last = model(ids[:, :prompt], **{cache_kw: m.cache}).logits[:, -1]
        m.peak = stored_tokens(m.cache)
    for pos in range(prompt, total):
        x = ids[:, pos : pos + 1]
        extra = {"position_ids": torch.tensor([[pos]])}
        if explicit_cache_position:
            extra["cache_position"] = torch.tensor([pos])
        shift = pos % len(methods)
        for m in methods[shift:] + methods[:shift]:
            active[0] = m.press
            before = stored_tokens(m.cache)
            start = time.process_time()
            logits = model(x, **{cache_kw: m.cache}, **extra).logits
            m.times.append(time.process_time() - start)
            m.nll += torch.nn.functional.cross_entropy(m.last.float(), x[:, 0], reduction="sum").item()
            m.count += 1
            m.last = logits[:, -1]
            m.peak = max(m.peak, before + 1)
        if (pos - prompt) % 128 == 127:
            logger.info("position %d/%d", pos + 1, total)
            if checkpoint is not None:
                checkpoint(pos + 1)
    active[0] = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1536, help="text length (prompt included)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--policies", nargs="+", default=list(ORTHORANK_POLICIES), choices=ORTHORANK_POLICIES)
    parser.add_argument("--interval", type=int, default=16, help="kvpress compression interval; also the "
                        "orthorank headroom variant (headroom = interval - 1)")
    parser.add_argument("--headroom-policies", nargs="*", default=["attention"], choices=ORTHORANK_POLICIES,
                        help="policies also run with headroom = interval - 1 (evicting every interval steps)")
    parser.add_argument("--no-full", action="store_true", help="skip the full-cache row")
    parser.add_argument("--no-kvpress", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "kvcache" / "budget_vs_kvpress.json")
    parser.add_argument("--render", type=Path, nargs="+", help="only merge these JSON files: table + plot")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.render:
        merged = merge([json.loads(p.read_text()) for p in args.render])
        args.render[0].with_name("budget_vs_kvpress.json").write_text(json.dumps(merged, indent=2))
        print(render(merged))
        plot(merged, args.render[0].with_name("budget_vs_kvpress.png"))
        return
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(None, arch="llama")
    ids = token_windows(tokenizer, wiki_texts("eval"), window=args.tokens, n_windows=1)
    active: list[Any] = [None]
    methods = [] if args.no_full else [Method("full cache", "full", None, DynamicCache())]
    seps = separator_ids(tokenizer) if "separators" in args.policies else []
    for budget in args.budgets:
        methods += orthorank_methods(model, budget, args.policies, args.interval - 1, args.headroom_policies, seps)
        if not args.no_kvpress:
            methods += kvpress_methods(budget, args.interval, active)
    notes = []
    if not args.no_kvpress and not any(m.family == "kvpress" for m in methods):
        notes.append("kvpress is not installed: its rows are skipped")
        logger.warning(notes[-1])
    started = time.perf_counter()

    def report(position: int) -> dict[str, Any]:
        return {
        "model": "SmolLM2-135M-Instruct (embedded), float32, sdpa",
        "text": f"wiki eval split (titles outside the calibration split), first {position} tokens",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "kvpress": _kvpress_version(),
        "threads": args.threads,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
        "positions_done": position,
        "rows": [m.row() for m in methods],
        }

    def write(position: int) -> dict[str, Any]:
        out = report(position)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
        return out

    with ExitStack() as stack:
        for m in methods:
            if m.press is not None:
                stack.enter_context(m.press(model))
        run(model, ids, args.prompt, methods, active, write)
    for m in methods:
        if isinstance(m.cache, BudgetCache):
            m.cache.detach()
    print(render(write(args.tokens)))


def _kvpress_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("kvpress")
    except Exception:  # noqa: BLE001 - not installed
        return None


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs of the same text (e.g. budgets split across processes).

    Each row gets ``ms_vs_full``: its median ms/token over the full cache's of the same run (the
    rows of a run are measured interleaved; runs are not). The full-cache row is kept once.
    """
    merged = dict(reports[0])
    merged["rows"] = []
    for r in reports:
        full = next((row for row in r["rows"] if row["budget"] is None), None)
        for row in r["rows"]:
            ratio = row["ms_per_token_median"] / full["ms_per_token_median"] if full else None
            if row["budget"] is not None or not any(m["budget"] is None for m in merged["rows"]):
                merged["rows"].append(row | {"ms_vs_full": ratio})
    merged["notes"] = sorted({n for r in reports for n in r["notes"]})
    done = {r.get("positions_done") for r in reports}
    if len(done) != 1:
        raise ValueError(f"the runs stopped at different positions {sorted(done)}: not the same text")
    merged["text"] = f"wiki eval split (titles outside the calibration split), first {done.pop()} tokens"
    merged["runs"] = [
        {"budgets": r["args"]["budgets"], "seconds": r["seconds"], "positions_done": r.get("positions_done")}
        for r in reports
    ]
    return merged


def render(report: dict[str, Any]) -> str:
    """Markdown table: one row per method and budget (best perplexity first within a budget)."""
    lines = [
        "| budget | method | ppl | peak stored tokens | CPU ms/token median / mean | median vs full cache |",
        "|---|---|---|---|---|---|",
    ]
    rows = sorted(report["rows"], key=lambda r: (r["budget"] or 0, r["ppl"]))
    for r in rows:
        ratio = f"{r['ms_vs_full']:.2f}" if r.get("ms_vs_full") else "-"
        lines.append(
            f"| {r['budget'] or '-'} | {r['method']} | {r['ppl']:.2f} | {r['peak_stored_tokens']} | "
            f"{r['ms_per_token_median']:.1f} / {r['ms_per_token_total']:.1f} | {ratio} |"
        )
    return "\n".join(lines + [f"\n{n}" for n in report["notes"]])


def plot(report: dict[str, Any], path: Path) -> None:
    """Perplexity and CPU time relative to the full cache against the budget, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = ("ppl", "ms_vs_full")
    names = sorted({r["method"] for r in report["rows"] if r["budget"] is not None})
    for name in names:
        rows = sorted((r for r in report["rows"] if r["method"] == name), key=lambda r: r["budget"])
        style = "-o" if name.startswith("orthorank") else "--s"
        for ax, key in zip(axes, keys):
            ax.plot([r["budget"] for r in rows], [r.get(key) or float("nan") for r in rows], style, label=name,
                    markersize=5)
    full = next((r for r in report["rows"] if r["budget"] is None), None)
    if full is not None:
        axes[0].axhline(full["ppl"], color="black", linestyle=":", label="full cache")
        axes[1].axhline(1.0, color="black", linestyle=":", label="full cache")
    titles = ("perplexity (lower is better)", "CPU time per token / full cache's (median, interleaved)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak stored tokens per layer (budget)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M fp32, 1 thread, {report['text']}; transformers {report['transformers']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
