"""The markdown table of a ``python -m benchmarks.longprompt`` results file."""

from __future__ import annotations

import math
from typing import Any

NAMES = {
    "dense": "dense",
    "default": "**`patch(model, sparsity=s)`** (default)",
    "perplexity": "`objective=\"perplexity\"` (the paper's search)",
    "paper": "OrthoRank as published (`objective=\"perplexity\", keep_recent=0`)",
    "selfcalib": "default, self-calibrated (no shipped plan)",
    "sleb": "SLEB (layer removal)",
    "shortgpt": "ShortGPT (layer removal)",
}


def _ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll)) if nll else float("nan")


def _ppl_text(value: float) -> str:
    """A perplexity for the table: two decimals, or two significant digits above 10,000 (``2.0e6``)."""
    return f"{value:.2f}" if value < 1e4 else f"{value:.1e}".replace("e+0", "e").replace("e+", "e")


def _hits(row: dict[str, Any], task: str, lengths: list[int]) -> str:
    return " / ".join(f"{row[f'{task}@{n}'][0]}" for n in lengths)


def print_table(results: dict[str, Any]) -> None:
    settings, rows = results["settings"], results["rows"]
    lengths = settings["lengths"]
    probes = settings["probes_at"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    n = rows[0][f"passkey@{lengths[0]}"][1] if rows else 0
    length_names = " / ".join(f"{v // 1024}k" if v >= 1024 else str(v) for v in lengths)
    print(f"| method | s | pass key ({n} each), {length_names} | QA ({n} each), {length_names} | "
          f"next-token ppl ({len(probes)} prefixes 16-4096) | chat right (of 32) | whole-window ppl | prefill speed-up (FLOP ideal), 2048 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["method"] != "dense", list(NAMES).index(r["method"]) if r["method"] in NAMES else 99, r["sparsity"])):
        nt = _ppl(row["next_token_nll"])
        ratio = f" (×{nt / _ppl(dense['next_token_nll']):.2f})" if dense and row is not dense else ""
        chat = f"{row['chat_right'][0]}" if "chat_right" in row else "-"
        speed = "-"
        if "prefill_speedup" in row:
            speed = f"{row['prefill_speedup']:.2f}× ({row['flops_ideal_2048']:.2f}×)"
        sparsity = "-" if row["method"] == "dense" else f"{row['sparsity']:.1f}"
        print(f"| {NAMES.get(row['method'], row['method'])} | {sparsity} | {_hits(row, 'passkey', lengths)} | "
              f"{_hits(row, 'qa', lengths)} | {nt:.2f}{ratio} | {chat} | {_ppl_text(row['window_ppl'])} | {speed} |")
