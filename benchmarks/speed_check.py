"""Prefill / forward / decode speed and peak memory of OrthoRank vs dense vs layer removal.

OrthoRank is what ``orthorank.patch(model, sparsity=s)`` installs (the shipped plan, else the
cached one, else one calibrated now), with its options (the floor of updated tokens counted in
the FLOP ideal); layer removal removes the number of layers SLEB removes at that sparsity
(ceil(L x sparsity), the first and last layers kept), from the middle of the stack (which layers
does not change the speed of a removed layer); ``orthorank@0`` is the all-dense patch, the cost of
the patch alone.

    python -m benchmarks.speed_check --contexts 512,1024,2048,4096 --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import orthorank
from orthorank.install import handle
from orthorank.text import token_windows

from benchmarks.embedded import load_model, wiki_texts
from benchmarks.suite.flops import ideal_decode_speedup, ideal_prefill_speedup
from benchmarks.suite.speed import median, prefill_peak_memory, speedup, time_decode, time_prefill

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def removal_plan(num_layers: int, sparsity: float) -> orthorank.Plan:
    """``ceil(L x sparsity)`` removed layers from the middle of the stack (first and last kept)."""
    n = math.ceil(num_layers * sparsity - 1e-9)
    start = (num_layers - n) // 2
    ratios = tuple(0.0 if start <= i < start + n else 1.0 for i in range(num_layers))
    return orthorank.Plan(ratios, method="layer-removal")


def patch_plan(model: torch.nn.Module, sparsity: float) -> tuple[orthorank.Plan, int]:
    """The plan ``orthorank.patch(model, sparsity=sparsity)`` installs, and its floor ``keep_min``."""
    orthorank.patch(model, sparsity=sparsity)
    try:
        return orthorank.get_plan(model), handle(model).options.keep_min
    finally:
        orthorank.unpatch(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--contexts", default="512,1024,2048,4096")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--forward", default="8,1024", help="full forward (all logits) at BATCH,CONTEXT; '' skips")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/speed_check.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []

    def report(kind: str, dtype: str, batch: int, context: int, times: dict, ideal: dict) -> None:
        row = {"kind": kind, "dtype": dtype, "batch": batch, "context": context, "threads": args.threads,
               "median_s": {k: median(v) for k, v in times.items()},
               "speedup": {k: speedup(times["dense"], v) for k, v in times.items()}, "ideal": ideal}
        rows.append(row)
        text = ", ".join(f"{k} x{row['speedup'][k]:.3f} (ideal x{ideal.get(k, 1.0):.3f})" for k in times if k != "dense")
        print(f"{kind:8s} {dtype:8s} b{batch} t{context:5d}: dense {row['median_s']['dense'] * 1e3:7.0f} ms; {text}", flush=True)

    for dtype in args.dtypes.split(","):
        model, tok = load_model(args.model, dtype=DTYPES[dtype])
        num_layers = model.config.num_hidden_layers
        plan, keep_min = patch_plan(model, args.sparsity)
        methods = {
            "dense": None,
            "orthorank@0": orthorank.Plan((1.0,) * num_layers),
            "orthorank": plan,
            "layer-removal": removal_plan(num_layers, args.sparsity),
        }
        contexts = [int(c) for c in args.contexts.split(",")]
        ids = token_windows(tok, wiki_texts("eval"), window=max(contexts), n_windows=8)
        for batch in [int(b) for b in args.batches.split(",")]:
            for context in contexts:
                x = ids[:batch, :context]
                times = time_prefill(model, methods, x, repeats=args.repeats)
                ideal = {k: ideal_prefill_speedup(model.config, p, context, keep_min=keep_min) for k, p in methods.items() if p}
                report("prefill", dtype, batch, context, times, ideal)
        if args.forward:
            batch, context = (int(v) for v in args.forward.split(","))
            x = ids[:batch, :context]
            times = time_prefill(model, methods, x, repeats=args.repeats, all_logits=True)
            ideal = {k: ideal_prefill_speedup(model.config, p, context, logits_tokens=context, keep_min=keep_min)
                     for k, p in methods.items() if p}
            report("forward", dtype, batch, context, times, ideal)
        if args.decode_steps:
            dec = {k: methods[k] for k in ("dense", "orthorank@0", "orthorank")}
            times = time_decode(model, dec, ids[:1, :512], steps=args.decode_steps, repeats=args.repeats)
            ideal = {k: ideal_decode_speedup(model.config, p, 512) for k, p in dec.items() if p}
            report("decode", dtype, 1, 512, times, ideal)
        peaks = prefill_peak_memory(model, methods, ids[:1, : max(contexts)])
        print(f"peak tensor memory of a {max(contexts)}-token prefill ({dtype}): "
              + ", ".join(f"{k} {v / 2**20:.1f} MiB ({v / peaks['dense']:.3f}x)" for k, v in peaks.items()), flush=True)
        rows.append({"kind": "memory", "dtype": dtype, "context": max(contexts), "peak_bytes": peaks})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    plot(rows, Path(args.out).with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    """Prefill speed-up over dense vs context, measured (solid) and FLOP-ideal (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    series = sorted({(r["dtype"], r["batch"]) for r in rows if r["kind"] == "prefill"})
    for (dtype, batch), color in zip(series, ("C0", "C1", "C2", "C3")):
        pts = [r for r in rows if r["kind"] == "prefill" and r["dtype"] == dtype and r["batch"] == batch]
        ctx = [r["context"] for r in pts]
        for method, marker in (("orthorank", "o"), ("layer-removal", "s")):
            ax.plot(ctx, [r["speedup"][method] for r in pts], marker=marker, color=color,
                    ls="-" if method == "orthorank" else ":", label=f"{method} {dtype} b{batch}")
        ax.plot(ctx, [r["ideal"]["orthorank"] for r in pts], color=color, ls="--", alpha=0.6,
                label=f"orthorank FLOP ideal {dtype} b{batch}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("prefill speed-up over dense")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
