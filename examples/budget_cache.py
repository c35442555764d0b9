"""Generate with a bounded KV cache (``orthorank.BudgetCache``), with and without the OrthoRank patch.

    python examples/budget_cache.py                                   # SmolLM2-135M-Instruct from the Hub
    python examples/budget_cache.py --model "$(python -m benchmarks.embedded)" --budget 128 --policy sink_window

A ``BudgetCache`` keeps at most ``--budget`` tokens of keys and values per layer between forward
passes, evicting by ``--policy``; pass it to stock ``generate`` as the model's cache keyword. The
script generates the same sampled continuation of a prompt three ways (full cache, budget cache,
budget cache on a model patched with ``orthorank.patch``) and prints how much K/V each stored.
The measured quality and speed of every policy are in ``benchmarks/experiments/budget_cache.py``.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import orthorank
from orthorank.kvcache import POLICIES

PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle, "
    "and what happens over the following year."
)


def cache_keyword(model: torch.nn.Module) -> str:
    """The model's cache keyword: ``cache`` (transformers 5.24 on) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def kv_megabytes(cache: DynamicCache | orthorank.BudgetCache) -> float:
    """K/V the cache stores now, in MiB."""
    if isinstance(cache, orthorank.BudgetCache):
        return cache.kv_bytes() / 2**20
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id or local folder")
    parser.add_argument("--budget", type=int, default=256, help="most stored tokens per layer")
    parser.add_argument("--policy", choices=[p for p in POLICIES if p != "full"], default="attention")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.2, help="of the patched run")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    messages = [{"role": "user", "content": PROMPT}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
    else:
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    def generate(cache: DynamicCache | orthorank.BudgetCache) -> tuple[torch.Tensor, float]:
        torch.manual_seed(0)  # the same samples in every run, as long as the logits agree
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=True,
                             top_p=0.9, pad_token_id=tokenizer.eos_token_id, **{cache_keyword(model): cache})
        return out[0, ids.shape[1]:], time.perf_counter() - start

    full = DynamicCache(config=model.config)
    reference, seconds = generate(full)
    print(f"full cache     : {len(reference)} tokens in {seconds:.1f} s, {kv_megabytes(full):.1f} MiB of K/V")

    # The budget cache hooks the model's attention modules (the milestone and attention policies read
    # each step's query); `with` removes the hooks afterwards.
    with orthorank.BudgetCache(model, budget=args.budget, policy=args.policy) as cache:
        tokens, seconds = generate(cache)
    same = int((tokens[: len(reference)] == reference[: len(tokens)]).long().cumprod(0).sum())
    print(f"budget {args.budget:<7} : {len(tokens)} tokens in {seconds:.1f} s, {kv_megabytes(cache):.1f} MiB of K/V, "
          f"the first {same} equal to the full cache's")

    # The patch makes the prefill cheaper; the budget bounds the memory of the decode steps.
    with orthorank.patched(model, sparsity=args.sparsity), orthorank.BudgetCache(
        model, budget=args.budget, policy=args.policy
    ) as cache:
        tokens, seconds = generate(cache)
    print(f"patch + budget : {len(tokens)} tokens in {seconds:.1f} s, {kv_megabytes(cache):.1f} MiB of K/V")
    print("\n" + tokenizer.decode(tokens, skip_special_tokens=True)[:600])


if __name__ == "__main__":
    main()
