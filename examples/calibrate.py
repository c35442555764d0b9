"""Calibrate a plan for your own model on your own text, save it, and patch with it.

    python examples/calibrate.py --text my_corpus.txt --sparsity 0.2 --out my-plan.json
    python -m benchmarks.embedded --texts calib > wiki_calib.json   # or: Wikipedia text, offline
    python examples/calibrate.py --model "$(python -m benchmarks.embedded)" --text wiki_calib.json

``orthorank.patch(model, sparsity=s)`` needs no text (it uses a shipped plan or calibrates on text
the model generates itself); ``orthorank.calibrate`` fits the plan to text like yours instead.
It searches, greedily, which layers select tokens (or are removed) at the least loss on
``--windows`` windows of ``--window`` tokens, checks the result against SLEB's layer removal on
further windows, and returns a ``Plan`` that ``Plan.save`` / ``Plan.load`` keep as JSON.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import orthorank
from orthorank.metrics import perplexity
from orthorank.text import read_texts, token_windows

CHECK_WINDOWS = 4  # calibrate's default: held-back windows that judge it against layer removal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id or local folder")
    parser.add_argument("--text", required=True, help="your documents: a .txt (blank-line separated), .json or .jsonl file")
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--windows", type=int, default=2, help="calibration windows")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument("--eval-windows", type=int, default=4, help="further windows to measure perplexity on")
    parser.add_argument("--out", default="plan.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # calibration progress

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    texts = read_texts(args.text)

    # Text in, plan out: the first --windows windows are searched on, the next 4 judge the result.
    plan = orthorank.calibrate(model, tokenizer, texts, args.sparsity, window=args.window, n_windows=args.windows)
    plan.save(args.out)
    print(f"{plan}\nsaved to {args.out} (search cost: {plan.meta['seconds']} s)")

    # Later, or on another machine: load it (checked against the model) and patch.
    used = args.windows + CHECK_WINDOWS
    held_out = token_windows(tokenizer, texts, args.window, used + args.eval_windows)[used:]
    dense = perplexity(model, held_out)
    orthorank.patch(model, plan=orthorank.Plan.load(args.out, model=model))
    patched = perplexity(model, held_out)
    orthorank.unpatch(model)
    print(f"perplexity on {args.eval_windows} windows neither search saw: dense {dense:.2f}, patched {patched:.2f}")


if __name__ == "__main__":
    main()
