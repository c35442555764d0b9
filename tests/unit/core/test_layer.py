"""The defining property of a selection layer, checked against the dense layer.

In a selection layer ``out == where(selected, dense_layer(x), x)``, the selected tokens are the
most sink-orthogonal ones, and the cache equals what the dense layer writes.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import cosine_similarity
from transformers import DynamicCache, StaticCache

import orthorank
from orthorank.attend import gather_rows, query_chunks, scatter_rows
from orthorank.config import DEFAULT_KEEP_RECENT, tokens_to_keep
from tests.layer_checks import (
    KEEP, RECENT, SELECTION_LAYERS, _dense_layer, _expected_selection, _inputs, _run_with_capture, assert_layer_property,
)
from tests.tiny_models import tiny_model


@pytest.mark.parametrize("chunk", [256, 3], ids=["one-chunk", "chunks-of-3"])
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "leftpad3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("cache_type", ["dynamic", "static"])
def test_selection_layer_is_dense_where_selected(arch, attn, padded, cache_type, chunk, monkeypatch):
    monkeypatch.setattr(orthorank.layer, "QUERY_CHUNK", chunk)
    model = tiny_model(arch, attn)
    ids, mask, position_ids = _inputs(padded)
    orthorank.patch(model, layers=SELECTION_LAYERS, keep_ratio=KEEP, keep_recent=RECENT, selector="orthogonal")
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


@pytest.mark.parametrize("k,chunk,sizes", [(8, 3, [2, 3, 3]), (9, 3, [3, 3, 3]), (2, 3, [2]), (256, 256, [256]),
                                           (683, 256, [171, 256, 256])])
def test_query_chunks_cover_the_queries_once_remainder_first(k, chunk, sizes):
    chunks = query_chunks(k, chunk)
    assert [c.stop - c.start for c in chunks] == sizes
    assert torch.equal(torch.cat([torch.arange(k)[c] for c in chunks]), torch.arange(k))


@pytest.mark.parametrize("source_batch", [1, 3])
def test_row_gather_and_scatter_match_elementwise_gather_and_scatter(source_batch):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(source_batch, 10, 4, generator=g)
    index = torch.stack([torch.randperm(10, generator=g)[:5] for _ in range(3)])  # distinct within a row
    expected = t.expand(3, -1, -1).gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
    assert torch.equal(gather_rows(t, index), expected)
    if source_batch == 3:
        rows = torch.randn(3, 5, 4, generator=g)
        before = t.clone()
        out = scatter_rows(t, index, rows)
        assert torch.equal(out, t.scatter(1, index.unsqueeze(-1).expand(-1, -1, 4), rows))
        assert torch.equal(t, before)  # the input is left as it is
        assert torch.equal(scatter_rows(t.transpose(0, 1).contiguous().transpose(0, 1), index, rows), out)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("options,recent", [({}, DEFAULT_KEEP_RECENT), ({"keep_recent": 0}, 0), ({"keep_recent": 1}, 1),
                                            ({"keep_recent": 3}, 3), ({"keep_recent": 50}, 50)])
def test_keep_recent_selects_the_latest_tokens_then_by_score(options, recent, padded):
    model = tiny_model()
    ids, mask, position_ids = _inputs(padded)
    orthorank.patch(model, layers=[2], keep_ratio=KEEP, **options, selector="orthogonal")
    captured = _run_with_capture(model, ids, mask, position_ids, DynamicCache(config=model.config))
    got = captured[2]
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    selected = _expected_selection(model.model.layers[2].input_layernorm(got["x"]), real, recent=recent)
    assert torch.equal((got["out"] != got["x"]).any(-1), selected)


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "leftpad3"])
def test_keep_min_is_a_floor_of_the_updated_tokens(padded):
    """``keep_min=10``: rows of 20 and 13 real tokens update 10 (the ratio alone: 8 and 6), a row of
    7 all its tokens, sink included; the updated ones equal the dense layer's output."""
    model = tiny_model()
    ids, mask, position_ids = _inputs(padded)
    orthorank.patch(model, layers=[2], keep_ratio=KEEP, keep_recent=RECENT, keep_min=10, selector="orthogonal")
    got = _run_with_capture(model, ids, mask, position_ids, DynamicCache(config=model.config))[2]
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    changed = (got["out"] != got["x"]).any(-1)
    expected = _expected_selection(model.model.layers[2].input_layernorm(got["x"]), real, keep_min=10)
    assert torch.equal(changed, expected)
    assert changed.sum(-1).tolist() == ([10, 10, 7] if padded else [10])
    dense = _dense_layer(model, 2, got["x"], got["kwargs"], DynamicCache(config=model.config))
    torch.testing.assert_close(got["out"][changed], dense[changed], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("selector", ["orthogonal", "attention"])
def test_a_prompt_within_keep_min_runs_the_dense_model(selector):
    model = tiny_model()
    short = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    long = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense_short, dense_long = model(input_ids=short).logits, model(input_ids=long).logits
        orthorank.patch(model, layers=[1, 2, 3], keep_ratio=KEEP, keep_min=12, selector=selector)
        patched_short, patched_long = model(input_ids=short).logits, model(input_ids=long).logits
    torch.testing.assert_close(patched_short, dense_short, atol=2e-5, rtol=1e-4)
    assert (patched_long - dense_long).abs().max() > 1e-3, "40 tokens: above the floor, the ratio's 16 are updated"
    assert [(s.tokens, s.updated) for s in orthorank.layer_stats(model).values()] == [(52, 28)] * 3


@pytest.mark.parametrize("bad", [-1, 2.0, True, "8"])
def test_keep_min_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="keep_min must be an int >= 0"):
        orthorank.patch(tiny_model(), layers=[2], keep_min=bad)


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
    orthorank.patch(model, layers=[2], keep_ratio=0.25, selector="orthogonal")
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
