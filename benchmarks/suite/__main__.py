"""``python -m benchmarks.suite``: quality and speed of OrthoRank against dense and layer pruning.

    python -m benchmarks.suite                      # quick run (a few minutes on 2 CPU cores)
    python -m benchmarks.suite --full               # the README numbers
    python -m benchmarks.suite --speed-only --contexts 512,1024,2048,4096 --batch 1,8 \\
        --dtype float32,bfloat16 --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from .methods import METHODS
from .report import BenchResults, summary_table
from .runner import run
from .settings import DTYPES, BenchSettings


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        n, length = (int(x) for x in parts)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected NxLENGTH such as 8x512, got {text!r}") from err
    return n, length


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the full preset (README numbers); default: quick")
    p.add_argument("--model", help="HF id or local path (default: the embedded SmolLM2-135M)")
    p.add_argument("--text", help="a .txt/.json/.jsonl file (default: the embedded Wikipedia extracts)")
    p.add_argument("--out", default="results/bench", help="results root (default results/bench)")
    p.add_argument("--name", help="run folder name under --out (default: a timestamp)")
    p.add_argument("--methods", type=_names, help=f"quality methods, comma-separated, of {','.join(METHODS)}")
    p.add_argument("--sparsity", type=_floats, help="sparsities, e.g. 0.1,0.2,0.3")
    p.add_argument("--default-plan", action="store_true", help="OrthoRank layers from the data-free default plan")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quality-dtype", choices=tuple(DTYPES), help="dtype of the quality part")
    q = p.add_argument_group("quality workloads")
    q.add_argument("--calib", type=_shape, help="calibration windows NxLENGTH (calib split), e.g. 4x256")
    q.add_argument("--ppl", type=_shape, help="perplexity windows NxLENGTH (eval split), e.g. 8x512")
    q.add_argument("--cloze", type=int, help="number of last-word cloze items")
    q.add_argument("--gen", type=_shape, help="greedy generations PROMPTSxNEW_TOKENS, e.g. 8x64")
    q.add_argument("--next-token", type=int, help="prefix lengths sampled for the next-token-after-prefill NLL (0 skips)")
    q.add_argument("--chat", type=_shape, help="chat questions QUESTIONSxNEW_TOKENS, e.g. 16x24 (0x24 skips)")
    q.add_argument("--passkey", type=_ints, help="passkey context lengths, e.g. 1024,4096,8192")
    q.add_argument("--passkey-trials", type=int, help="passkey prompts per length")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--speed-only", action="store_true")
    part.add_argument("--quality-only", action="store_true")
    s = p.add_argument_group("speed")
    s.add_argument("--contexts", type=_ints, help="prefill contexts, e.g. 512,1024,2048,4096")
    s.add_argument("--batch", type=_ints, help="batch sizes, e.g. 1,8")
    s.add_argument("--dtype", type=_names, help="speed dtypes, e.g. float32,bfloat16")
    s.add_argument("--repeats", type=int)
    s.add_argument("--warmup", type=int)
    s.add_argument("--speed-methods", type=_names, help="e.g. dense,orthorank,sleb")
    s.add_argument("--speed-sparsity", type=_floats, help="sparsities timed, e.g. 0.2")
    s.add_argument("--forward", type=_ints, help="full forward with all logits at BATCH,CONTEXT, e.g. 8,1024")
    s.add_argument("--decode-steps", type=int, help="decode steps per repeat (0 skips decode)")
    s.add_argument("--decode-context", type=int)
    s.add_argument("--max-tokens", type=int, help="skip prefill shapes above BATCH*CONTEXT tokens (0: no cap)")
    s.add_argument("--profile", action="store_true", help="also profile the layers of dense and OrthoRank (per-layer ms)")
    s.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--replot", metavar="FOLDER", help="only redraw plots, CSV and summary of FOLDER/results.json")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    return p


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The run's settings: the preset, then every flag given."""
    settings = BenchSettings.preset_settings("full" if args.full else "quick")
    top = {k: v for k, v in {
        "model": args.model, "text": args.text, "out": args.out, "name": args.name, "methods": args.methods,
        "sparsities": args.sparsity, "threads": args.threads, "quality_dtype": args.quality_dtype,
    }.items() if v is not None}
    for flag, (count, length) in (("calib", ("calib_windows", "calib_window")), ("ppl", ("ppl_windows", "ppl_window")),
                                  ("gen", ("gen_prompts", "gen_tokens")), ("chat", ("chat_questions", "chat_tokens"))):
        value = getattr(args, flag)
        if value is not None:
            top[count], top[length] = value
    for flag, name in (("next_token", "next_token_prefixes"), ("cloze", "cloze_items"), ("passkey", "passkey_lengths"), ("passkey_trials", "passkey_trials")):
        if getattr(args, flag) is not None:
            top[name] = getattr(args, flag)
    if args.default_plan:
        top["calibrated"] = False
    if args.speed_only:
        top["quality"] = False
    speed = settings.speed
    if args.quality_only:
        speed = None
    elif speed is not None:
        fields = {k: v for k, v in {
            "contexts": args.contexts, "batches": args.batch, "dtypes": args.dtype, "repeats": args.repeats,
            "warmup": args.warmup, "methods": args.speed_methods, "sparsities": args.speed_sparsity,
            "forward": args.forward, "decode_steps": args.decode_steps, "decode_context": args.decode_context,
        }.items() if v is not None}
        if args.max_tokens is not None:
            fields["max_tokens"] = args.max_tokens or None
        if args.profile:
            fields["profile"] = True
        if args.no_memory:
            fields["memory"] = False
        speed = dataclasses.replace(speed, **fields)
    return dataclasses.replace(settings, speed=speed, **top)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.replot:
        results = BenchResults.load(args.replot)
        results.write(args.replot)
        print(summary_table(results))
        return 0
    try:
        settings = settings_from_args(args)
    except (ValueError, TypeError) as err:
        parser().error(str(err))
    results, folder = run(settings)
    print(summary_table(results))
    print(f"\nresults: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
