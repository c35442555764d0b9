"""The defining property of a selection layer, checked against the dense layer.

In a selection layer ``out == where(selected, dense_layer(x), x)``, the selected tokens are the
most sink-orthogonal ones, and the cache equals what the dense layer writes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.functional import cosine_similarity
from transformers import DynamicCache, StaticCache

import orthorank
from orthorank.config import DEFAULT_KEEP_RECENT, tokens_to_keep

from conftest import cache_kwarg, left_padded_batch, tiny_model

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


def _expected_selection(x_norm: torch.Tensor, real: torch.Tensor, recent: int = RECENT) -> torch.Tensor:
    """Reference selection, row by row: K_b real non-sink tokens, the last ``recent`` ones (at
    most K_b) and those with the smallest |cos| to the sink."""
    selected = torch.zeros(real.shape, dtype=torch.bool)
    for b in range(real.shape[0]):
        cols = real[b].nonzero().flatten()
        sink, rest = cols[0], cols[1:]
        k = tokens_to_keep(KEEP, len(cols))
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


@pytest.mark.parametrize("chunk", [256, 3], ids=["one-chunk", "chunks-of-3"])
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "leftpad3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("cache_type", ["dynamic", "static"])
def test_selection_layer_is_dense_where_selected(arch, attn, padded, cache_type, chunk, monkeypatch):
    monkeypatch.setattr(orthorank.layer, "QUERY_CHUNK", chunk)
    model = tiny_model(arch, attn)
    ids, mask, position_ids = _inputs(padded)
    orthorank.patch(model, layers=SELECTION_LAYERS, keep_ratio=KEEP, keep_recent=RECENT)
    make = (lambda: DynamicCache(config=model.config)) if cache_type == "dynamic" else (
        lambda: StaticCache(config=model.config, max_cache_len=32)
    )
    cache = make()
    captured = _run_with_capture(model, ids, mask, position_ids, cache)
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()

    for i, got in captured.items():
        dense_cache = make()
        dense = _dense_layer(model, i, got["x"], got["kwargs"], dense_cache)
        assert_layer_property(model, i, got, dense, cache, dense_cache, SELECTION_LAYERS, real, recent=RECENT)


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


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("options,recent", [({}, DEFAULT_KEEP_RECENT), ({"keep_recent": 0}, 0), ({"keep_recent": 1}, 1),
                                            ({"keep_recent": 3}, 3), ({"keep_recent": 50}, 50)])
def test_keep_recent_selects_the_latest_tokens_then_by_score(options, recent, padded):
    model = tiny_model()
    ids, mask, position_ids = _inputs(padded)
    orthorank.patch(model, layers=[2], keep_ratio=KEEP, **options)
    captured = _run_with_capture(model, ids, mask, position_ids, DynamicCache(config=model.config))
    got = captured[2]
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    selected = _expected_selection(model.model.layers[2].input_layernorm(got["x"]), real, recent=recent)
    assert torch.equal((got["out"] != got["x"]).any(-1), selected)


@pytest.mark.parametrize("bad", [-1, 2.0, True, "8"])
def test_keep_recent_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="keep_recent must be an int >= 0"):
        orthorank.patch(tiny_model(), layers=[2], keep_recent=bad)


@pytest.mark.parametrize("value", [False, True])
def test_keep_recent_is_the_only_recency_option(value):
    with pytest.raises(TypeError, match="keep_last"):
        orthorank.patch(tiny_model(), layers=[2], keep_last=value)


def test_selection_really_skips_compute():
    """The MLP and the query projection of a selection layer see only the selected tokens."""
    model = tiny_model()
    orthorank.patch(model, layers=[2], keep_ratio=0.25)
    seen = {}
    layer = model.model.layers[2]
    hooks = [
        layer.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", a[0].shape)),
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", a[0].shape)),
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("k", a[0].shape)),
    ]
    with torch.no_grad():
        model(torch.randint(3, 97, (2, 40)))
    for h in hooks:
        h.remove()
    assert seen["mlp"][:2] == (2, 10)
    assert seen["q"][:2] == (2, 10)
    assert seen["k"][:2] == (2, 40)
    stats = orthorank.layer_stats(model)[2]
    assert (stats.selective_calls, stats.tokens, stats.updated) == (1, 80, 20)


@pytest.mark.parametrize("selector", ["least_orthogonal", "random"])
def test_other_selectors_keep_the_property(selector):
    model = tiny_model()
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    orthorank.patch(model, layers=[2], keep_ratio=KEEP, selector=selector, keep_recent=RECENT)
    captured = _run_with_capture(model, ids, None, torch.arange(24)[None], DynamicCache(config=model.config))
    got = captured[2]
    dense = _dense_layer(model, 2, got["x"], got["kwargs"], DynamicCache(config=model.config))
    changed = (got["out"] != got["x"]).any(-1)
    assert int(changed.sum()) == tokens_to_keep(KEEP, 24)
    assert not changed[0, 0], "the sink is never selected"
    assert changed[0, -RECENT:].all(), "the latest tokens are kept first"
    torch.testing.assert_close(got["out"][changed], dense[changed], atol=2e-5, rtol=1e-4)
    if selector == "least_orthogonal":
        x_norm = model.model.layers[2].input_layernorm(got["x"])
        cos = cosine_similarity(x_norm[0, 1:], x_norm[0, :1], dim=-1).abs()
        k, recent = tokens_to_keep(KEEP, 24), RECENT
        expected = torch.zeros(24, dtype=torch.bool)
        expected[24 - recent :] = True
        expected[1 + cos[: 23 - recent].argsort(descending=True)[: k - recent]] = True
        assert torch.equal(changed[0], expected)
