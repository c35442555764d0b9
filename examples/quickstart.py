"""Patch a model with OrthoRank, generate, and compare with the dense model.

    python examples/quickstart.py                                   # SmolLM2-135M-Instruct from the Hub
    python examples/quickstart.py --model "$(python -m benchmarks.embedded)"   # the embedded copy, offline
    python examples/quickstart.py --model Qwen/Qwen2.5-0.5B --text my_notes.txt

The prompt is ``--context`` tokens of ``--text`` (a .txt/.json/.jsonl file), else of a built-in
paragraph repeated. The script generates greedily with the dense model, patches it with
``orthorank.patch(model, sparsity=...)`` (or ``--plan``), generates again, and times the prefill
(the forward that produces the first token) both ways.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import orthorank
from orthorank.text import read_texts, token_windows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

SAMPLE = (
    "The river rises in the hills north of the town and runs south through farmland for about forty "
    "kilometres before it reaches the sea. Mills were built along its banks in the eighteenth century, "
    "and a canal joined it to the harbour in 1820. Today the old towpath is a footpath, the mills are "
    "houses and workshops, and the water meadows flood most winters, as they always have."
)


def prompt_ids(tokenizer: AutoTokenizer, text: str | None, context: int) -> torch.Tensor:
    """``[1, context]`` token ids: the start of the documents in ``text``, or of the sample paragraph."""
    documents = read_texts(text) if text else [SAMPLE] * (context // 40 + 1)
    return token_windows(tokenizer, documents, window=context, n_windows=1)


def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Time of a prefill (the forward that produces the first token), after one warm-up run."""
    with torch.no_grad():
        model(ids, logits_to_keep=1)
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id or local folder")
    parser.add_argument("--text", default=None, help="a .txt/.json/.jsonl file the prompt is cut from")
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--plan", default=None, help="a saved plan (Plan.save) to use instead of --sparsity")
    parser.add_argument("--context", type=int, default=1024, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    ids = prompt_ids(tokenizer, args.text, args.context)
    print(f"model: {type(model).__name__}, {model.config.num_hidden_layers} layers, {args.dtype}, "
          f"{torch.get_num_threads()} threads; prompt {ids.shape[1]} tokens, ending with:\n"
          f"  ...{tokenizer.decode(ids[0, -48:])!r}\n")

    def generate() -> str:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    dense_text = generate()

    # The patch: a shipped or cached plan for this model, else one calibrated now on text the
    # model generates itself (a few minutes on a CPU, once; then cached).
    if args.plan:
        orthorank.patch(model, plan=orthorank.Plan.load(args.plan, model=model))
    else:
        orthorank.patch(model, sparsity=args.sparsity)
    plan = orthorank.get_plan(model)
    print(plan, "\n")
    patched_text = generate()
    orthorank.unpatch(model)  # the exact dense model again
    print(f"dense    : {dense_text!r}\northorank: {patched_text!r}\n")

    # Prefill times in interleaved rounds (dense, patched, dense, ...), so that a busy moment on
    # a shared machine slows both alike; medians.
    dense_times, patched_times = [], []
    for _ in range(args.repeats):
        dense_times.append(prefill_seconds(model, ids))
        with orthorank.patched(model, plan=plan):
            patched_times.append(prefill_seconds(model, ids))
    dense_time, patched_time = statistics.median(dense_times), statistics.median(patched_times)
    print(f"prefill of {ids.shape[1]} tokens: dense {dense_time * 1e3:.0f} ms, orthorank {patched_time * 1e3:.0f} ms "
          f"(speed-up x{dense_time / patched_time:.2f}, medians of {args.repeats} interleaved rounds)")


if __name__ == "__main__":
    main()
