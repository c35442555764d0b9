"""The selection-layer property as a check other tests reuse: ``out == where(selected, dense, x)``.

Runs a patched model with hooks that capture every decoder layer's input and output, reruns the
dense layer on the same input, and compares, with a row-by-row reference of the selection.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn.functional import cosine_similarity

from orthorank.config import DEFAULT_KEEP_RECENT, tokens_to_keep
from tests.tiny_models import cache_kwarg, left_padded_batch

SELECTION_LAYERS = [1, 3, 4]
KEEP = 0.4
#: latest tokens kept first in these tests: the rows are short (7-24 tokens), so the default (16)
#: would fill the whole budget and leave nothing to the score; test_keep_recent_* covers it
RECENT = 3


def _inputs(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if padded:
        ids, mask = left_padded_batch([20, 13, 7], 20)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        return ids, mask, position_ids
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    return ids, None, torch.arange(20)[None]


def _expected_selection(
    x_norm: torch.Tensor, real: torch.Tensor, recent: int = RECENT, keep_min: int = 0
) -> torch.Tensor:
    """Reference selection, row by row: K_b real non-sink tokens (``ceil(KEEP * n_b)``, at least
    ``keep_min``, at most ``n_b - 1``), the last ``recent`` ones (at most K_b) and those with the
    smallest |cos| to the sink; a row of at most ``keep_min`` tokens whole."""
    selected = torch.zeros(real.shape, dtype=torch.bool)
    for b in range(real.shape[0]):
        cols = real[b].nonzero().flatten()
        sink, rest = cols[0], cols[1:]
        if len(cols) <= keep_min:  # the whole row, sink included
            selected[b, cols] = True
            continue
        k = tokens_to_keep(KEEP, len(cols)) if keep_min == 0 else min(len(rest), max(keep_min, math.ceil(KEEP * len(cols))))
        forced = min(recent, k)
        selected[b, rest[len(rest) - forced :]] = True
        rest, k = rest[: len(rest) - forced], k - forced
        cos = cosine_similarity(x_norm[b, rest].float(), x_norm[b, sink].float()[None], dim=-1).abs()
        selected[b, rest[cos.argsort()[:k]]] = True
    return selected


def _run_with_capture(model, ids, mask, position_ids, cache):
    """Run ``model`` and capture every decoder layer's input, call kwargs and output."""
    captured: dict[int, dict] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def pre(mod, args, kwargs, i=i):
            captured[i] = {"x": args[0].clone(), "kwargs": dict(kwargs)}

        def post(mod, args, kwargs, out, i=i):
            captured[i]["out"] = out.clone()

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{cache_kwarg(model): cache})
    finally:
        for h in hooks:
            h.remove()
    return captured


def _dense_layer(model, i, x, kwargs, cache):
    layer = model.model.layers[i]
    with torch.no_grad():
        return type(layer).forward(
            layer,
            x,
            attention_mask=kwargs["attention_mask"],
            position_ids=kwargs["position_ids"],
            position_embeddings=kwargs["position_embeddings"],
            use_cache=True,
            **{cache_kwarg(layer): cache},
        )


def _layer_keys(cache, i):
    return cache.layers[i].keys, cache.layers[i].values


def assert_layer_property(
    model: torch.nn.Module, i: int, got: dict, dense: torch.Tensor, cache: Any, dense_cache: Any,
    selection_layers: Any, real: torch.Tensor, recent: int = DEFAULT_KEEP_RECENT,
) -> None:
    """Layer ``i`` of a patched run (``got``: its input ``x`` and output ``out``) against the dense
    layer's output ``dense`` on the same input: ``out == where(selected, dense, x)`` in a selection
    layer, ``out == dense`` elsewhere, and the layer's cache equal to the dense layer's.
    ``recent``: the ``keep_recent`` the model was patched with."""
    x, out = got["x"], got["out"]
    if i in selection_layers:
        selected = _expected_selection(model.model.layers[i].input_layernorm(x), real, recent)
        assert selected.any()
        torch.testing.assert_close(out[selected], dense[selected], atol=2e-5, rtol=1e-4)
        assert torch.equal(out[~selected], x[~selected]), "bypassed tokens must leave the layer unchanged"
    else:
        torch.testing.assert_close(out, dense, atol=0, rtol=0)
    for ours, theirs in zip(_layer_keys(cache, i), _layer_keys(dense_cache, i)):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
