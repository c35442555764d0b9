"""Command line: ``python -m orthorank.analysis --model ... --text ...``.

Writes ``sink_profile.png``, ``saturation.png`` and ``summary.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..cliargs import DTYPES, fraction, load_pretrained, non_negative_int, positive_int
from ..config import DEFAULT_KEEP_RECENT
from ..text import read_texts, token_windows
from .plots import plot_saturation_profile, plot_sink_profile
from .saturation import saturation_profile
from .sink import sink_profile

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m orthorank.analysis``."""
    p = argparse.ArgumentParser(
        prog="python -m orthorank.analysis",
        description="Sink phenomenon and ordered top-k saturation of a causal LM: figures and a JSON summary.",
    )
    p.add_argument("--model", required=True, help="Hub id or local folder")
    p.add_argument("--text", required=True, help="a .txt/.json/.jsonl file of documents")
    p.add_argument("--n-texts", type=positive_int, default=32, help="rows analysed (texts, or windows with --pack)")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="tokens per row at most")
    p.add_argument("--pack", action="store_true", help="concatenate texts into full windows of --max-tokens")
    p.add_argument("--keep-ratio", type=fraction(low_open=True), default=1 / 3, help="fraction of tokens a selection keeps")
    p.add_argument("--keep-recent", type=non_negative_int, default=DEFAULT_KEEP_RECENT,
                   help=f"each row's latest tokens a selection updates first (default {DEFAULT_KEEP_RECENT}; 0: score only)")
    p.add_argument("--top-k", type=positive_int, default=5, help="ranks followed for saturation")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--no-attention", action="store_true", help="skip the eager pass for the sink attention share")
    p.add_argument("--no-saturation", action="store_true", help="skip the logit-lens saturation analysis")
    p.add_argument("--out", default="results/analysis", help="output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def load_rows(args: argparse.Namespace, tokenizer: Any) -> list[str] | torch.Tensor:
    """The texts (or packed token windows) the command analyses."""
    texts = read_texts(args.text)
    if args.pack:
        return token_windows(tokenizer, texts, window=args.max_tokens, n_windows=args.n_texts)
    return texts[: args.n_texts]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the analyses and write the figures and ``summary.json``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_pretrained(args.model, dtype=DTYPES[args.dtype])
    rows = load_rows(args, tokenizer)
    name = args.model
    common = dict(max_tokens=args.max_tokens, batch_size=args.batch_size, progress=not args.quiet)
    summary: dict[str, Any] = {"model": name, "settings": {k: v for k, v in vars(args).items() if k not in ("quiet",)}}

    start = time.perf_counter()
    sink = sink_profile(model, tokenizer, rows, keep_ratio=args.keep_ratio, keep_recent=args.keep_recent,
                        attention=not args.no_attention, **common)
    sink.meta["model"] = name
    plot_sink_profile(sink, out / "sink_profile.png")
    summary["sink"] = sink.to_dict()
    if not args.no_saturation:
        sat = saturation_profile(model, tokenizer, rows, top_k=args.top_k, **common)
        sat.meta["model"] = name
        plot_saturation_profile(sat, out / "saturation.png")
        summary["saturation"] = sat.to_dict()
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", out / "summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
