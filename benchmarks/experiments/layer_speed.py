"""Where the time of one selection layer goes, against the dense layer (docs/results.md, speed).

The input of one decoder layer is recorded from a dense forward over a wiki window; then the dense
layer and each piece of a selection layer (``orthorank.layer.SelectiveForward``) are timed on it:
norm, keys/values of all tokens, scoring and choice, the selected queries (gather, q_proj, RoPE),
their attention, o_proj, MLP and scatter. Last, the masked attention of a third of the queries
against the whole causal attention, on random tensors of the model's shapes, in interleaved rounds.

    python -m benchmarks.experiments.layer_speed --layer 20 --tokens 2048 --threads 2 [--keep 0.0833]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import orthorank
from orthorank.attend import QUERY_CHUNK, gather_rows, queries_at, query_chunks, scatter_rows
from orthorank.plan import Plan
from orthorank.state import ForwardState
from orthorank.text import token_windows

from ..embedded import load_model, wiki_texts


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def layer_inputs(model: torch.nn.Module, ids: torch.Tensor, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states ``[1, seq, hidden]`` and keyword arguments that layer ``index`` receives."""
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k in ("attention_mask", "position_ids", "position_embeddings")}

    handle = model.model.layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return seen["h"], seen["kwargs"]


def pieces(model: torch.nn.Module, index: int, h: torch.Tensor, kwargs: dict[str, Any], selector: str,
           repeats: int, keep: float = 1 / 3) -> dict[str, float]:
    """Milliseconds of each piece of selection layer ``index`` (keep ratio ``keep``) with ``selector``."""
    layer = model.model.layers[index]
    ratios = [1.0] * model.config.num_hidden_layers
    ratios[index] = keep
    orthorank.patch(model, plan=Plan(tuple(ratios), selector=selector))
    try:
        fwd = layer.forward
        state = ForwardState(1, h.shape[1], "select", n_max=h.shape[1])
        x = layer.input_layernorm(h)
        key, value = fwd._keys_values(x, kwargs)
        index_ = fwd._choose(x, key, state, kwargs).index
        cos, sin = kwargs["position_embeddings"]
        attn = fwd.attn

        def queries() -> torch.Tensor:
            return queries_at(attn, None, x, cos, sin, index_)

        q = queries()
        out = fwd._attend(q, key, value, index_, kwargs.get("attention_mask"), state)
        selected = gather_rows(h, index_) + attn.o_proj(out)
        times = {
            "whole layer": median_ms(lambda: fwd.select(h, state, kwargs), repeats),
            "norm": median_ms(lambda: layer.input_layernorm(h), repeats),
            "keys and values": median_ms(lambda: fwd._keys_values(x, kwargs), repeats),
            "scoring and choice": median_ms(lambda: fwd._choose(x, key, state, kwargs), repeats),
            "selected queries": median_ms(queries, repeats),
            "attention": median_ms(lambda: fwd._attend(q, key, value, index_, kwargs.get("attention_mask"), state), repeats),
            "o_proj": median_ms(lambda: attn.o_proj(out), repeats),
            "mlp": median_ms(lambda: layer.mlp(layer.post_attention_layernorm(selected)), repeats),
            "scatter": median_ms(lambda: scatter_rows(h, index_, selected), repeats),
        }
        times["mean selected position"] = float(index_.float().mean())
    finally:
        orthorank.unpatch(model)
    return times


def masked_against_causal(config: Any, tokens: int, rounds: int, dtype: torch.dtype) -> dict[str, float]:
    """Masked attention of a third of the queries (in chunks, as a selection layer runs it) against
    the whole causal attention, interleaved rounds, medians in ms."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, dim, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, tokens, dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, tokens, dim, generator=g).to(dtype)
    picked = torch.sort(torch.randperm(tokens - 1, generator=g)[: tokens // 3] + 1).values
    qs = q[:, :, picked]

    def masked(chunk: int) -> torch.Tensor:
        outs = []
        for c in query_chunks(picked.numel(), chunk):
            rows = picked[c]
            end = int(rows[-1]) + 1
            mask = (torch.arange(end) <= rows[:, None])[None, None]
            outs.append(F.scaled_dot_product_attention(qs[:, :, c], k[:, :, :end], v[:, :, :end],
                                                       attn_mask=mask, enable_gqa=True))
        return torch.cat(outs, 2)

    variants = {
        "causal, all queries": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "a third, no mask (all keys)": lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True),
        "a third, masked, chunks of 128 (before)": lambda: masked(128),
        f"a third, masked, chunks of {QUERY_CHUNK}": lambda: masked(QUERY_CHUNK),
        "a third, masked, one call": lambda: masked(tokens),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.layer_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=20)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", type=float, default=1 / 3, help="the selection layer's keep ratio")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(dtype=torch.bfloat16)
    ids = token_windows(tokenizer, wiki_texts("eval"), window=args.tokens, n_windows=1)
    with torch.inference_mode():
        h, kwargs = layer_inputs(model, ids, args.layer)
        dense = median_ms(lambda: model.model.layers[args.layer](h, **kwargs), args.repeats)
        print(f"dense layer {args.layer}, {args.tokens} tokens, bf16, {args.threads} threads: {dense:.2f} ms")
        for selector in ("attention", "orthogonal"):
            times = pieces(model, args.layer, h, kwargs, selector, args.repeats, args.keep)
            print(f"{selector:10s} " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))
        for name, ms in masked_against_causal(model.config, args.tokens, 25, torch.bfloat16).items():
            print(f"{name:32s} {ms:.2f} ms")


if __name__ == "__main__":
    main()
