"""The share of attention the sink receives, per layer, from a pass with eager attention.

Fused kernels (sdpa, flash) never materialize attention weights, so the model is switched to
``eager`` for this pass and switched back afterwards. A forward hook on each layer's ``self_attn``
reduces the weights ``[batch, heads, q, kv]`` on the spot, so no layer's full matrix is kept.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .inputs import Batch, candidate_mask, decoder_layers, iter_progress, run_decoder, sink_index

logger = logging.getLogger(__name__)


def sink_attention_weights(weights: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Attention each query pays to its row's sink, averaged over heads.

    Args:
        weights: attention probabilities ``[batch, heads, q, kv]`` (queries and keys are the same tokens).
        sink: ``[batch]`` column of each row's sink.

    Returns:
        ``[batch, q]`` float32.
    """
    if weights.dim() != 4:
        raise ValueError(f"attention weights must be [batch, heads, q, kv], got shape {tuple(weights.shape)}")
    index = sink.to(weights.device).view(-1, 1, 1, 1).expand(-1, weights.shape[1], weights.shape[2], 1)
    return weights.float().gather(3, index).squeeze(3).mean(dim=1)


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily switch ``model`` to attention implementation ``name`` (restored on exit)."""
    previous = model.config._attn_implementation
    if previous == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def sink_attention_profile(model: nn.Module, batches: Sequence[Batch], *, progress: bool = False) -> list[float]:
    """Mean attention weight on the sink per layer, over heads and real non-sink queries.

    Args:
        model: a Llama-style causal LM whose attention modules return ``(output, weights)``.
        batches: right-padded batches (see :func:`.inputs.make_batches`).

    Returns:
        One value per decoder layer.
    """
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    state: dict[str, torch.Tensor] = {}
    handles = []
    for idx, layer in enumerate(layers):

        def hook(module: nn.Module, args: tuple, output: tuple, idx: int = idx) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("attention weights are unavailable; eager attention is required")
            share = sink_attention_weights(weights, state["sink"])
            sums[idx] += float(share[state["queries"].to(share.device)].sum())

        handles.append(layer.self_attn.register_forward_hook(hook))
    try:
        with attention_implementation(model, "eager"):
            for batch in iter_progress(batches, "sink attention", progress):
                sink = sink_index(batch.attention_mask)
                state["sink"] = sink
                state["queries"] = candidate_mask(batch.attention_mask, sink)
                count += int(state["queries"].sum())
                run_decoder(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("no query besides the sinks was analysed")
    return (sums / count).tolist()
