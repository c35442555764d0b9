"""Patch a model with OrthoRank, generate, and compare with the dense model.

    python examples/quickstart.py                       # embedded SmolLM2-135M, offline
    python examples/quickstart.py --model Qwen/...      # any supported Hub id or local folder
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import orthorank
from orthorank.data import load_model, token_windows, wiki_texts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Median time of a prefill (the forward that produces the first token)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--plan", default=None, help="a saved plan (Plan.save) to use instead of --sparsity")
    parser.add_argument("--context", type=int, default=1024, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    ids = token_windows(tokenizer, wiki_texts("eval"), window=args.context, n_windows=1)
    prompt = tokenizer.decode(ids[0, -48:])
    print(f"model: {type(model).__name__}, {model.config.num_hidden_layers} layers, {args.dtype}, "
          f"{torch.get_num_threads()} threads; prompt {ids.shape[1]} tokens, ending with:\n  ...{prompt!r}\n")

    def generate() -> str:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    dense_text, dense_time = generate(), prefill_seconds(model, ids, args.repeats)
    if args.plan:
        orthorank.patch(model, plan=orthorank.Plan.load(args.plan, model=model))
    else:
        orthorank.patch(model, sparsity=args.sparsity)
    print(orthorank.get_plan(model), "\n")
    patched_text, patched_time = generate(), prefill_seconds(model, ids, args.repeats)
    orthorank.unpatch(model)

    print(f"dense    : {dense_text!r}\northorank: {patched_text!r}\n")
    print(f"prefill of {ids.shape[1]} tokens: dense {dense_time * 1e3:.0f} ms, orthorank {patched_time * 1e3:.0f} ms "
          f"(speed-up x{dense_time / patched_time:.2f}, median of {args.repeats})")


if __name__ == "__main__":
    main()
