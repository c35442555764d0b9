"""Query-aware selectors (``attention``, ``orthogonal+attention``) and the generation objective's windows.

The selection property holds for every selector (``out == where(selected, dense_layer(x), x)``,
cache = dense cache); what changes is which tokens are selected: those the prompt's latest tokens
attend to most in the layer itself.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import orthorank
from orthorank import layer as layer_module
from orthorank.config import tokens_to_keep
from orthorank.objective import generation_windows
from orthorank.scoring import pool_span, rank_fusion, recent_attention

from tests.tiny_models import cache_kwarg, left_padded_batch, tiny_model

KEEP = 0.4
RECENT = 2


def _positions(mask):
    return None if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)


def _capture(model, ids, mask, layer_index):
    got = {}
    layer = model.model.layers[layer_index]

    def pre(mod, args, kwargs):
        got["x"], got["kwargs"] = args[0].clone(), dict(kwargs)

    def post(mod, args, kwargs, out):
        got["out"] = out.clone()

    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post, with_kwargs=True)]
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True, **{cache_kwarg(model): cache})
    finally:
        for h in hooks:
            h.remove()
    return got, cache


def _reference_attention_mass(model, layer_index, x, real, observed):
    """Per row, alone and in float64: attention of the last ``observed`` real non-sink tokens' queries
    (all heads) over that row's real keys (within the sliding window, if any), summed (a plain
    loop: the reference)."""
    window = getattr(model.config, "sliding_window", None) or 10**9
    layer = model.model.layers[layer_index]
    attn = layer.self_attn
    h = layer.input_layernorm(x).double()
    heads, kv_heads, dim = model.config.num_attention_heads, model.config.num_key_value_heads, attn.head_dim
    out = torch.zeros(real.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        cols = real[b].nonzero().flatten()
        n = len(cols)
        hb = h[b, cols]
        pos = torch.arange(n)[None]
        cos, sin = model.model.rotary_emb(hb[None].float(), position_ids=pos)
        q = (hb @ attn.q_proj.weight.double().T).view(n, heads, dim).transpose(0, 1)
        k = (hb @ attn.k_proj.weight.double().T).view(n, kv_heads, dim).transpose(0, 1)
        rot = lambda t: t * cos[0].double() + torch.cat((-t[..., dim // 2:], t[..., : dim // 2]), -1) * sin[0].double()
        q, k = rot(q), rot(k)
        k = k.repeat_interleave(heads // kv_heads, dim=0)
        for t in range(max(1, n - observed), n):
            lo = max(0, t - window + 1)
            w = torch.softmax(torch.einsum("hd,hkd->hk", q[:, t], k[:, lo: t + 1]) * attn.scaling, dim=-1)
            out[b, cols[lo: t + 1]] += w.sum(0)
    return out


def _reference_pool(mass, real, span):
    """Each real column's largest mass within ``span`` columns centred on it, the row's sink (its
    first real column) left out (a plain loop: the reference)."""
    out = mass.clone()
    for b in range(mass.shape[0]):
        row = mass[b].clone()
        row[real[b].nonzero()[0, 0]] = 0.0
        for c in range(mass.shape[1]):
            out[b, c] = row[max(0, c - span // 2): c + span // 2 + 1].max()
    return out


@pytest.mark.parametrize("span", [1, 3], ids=["unpooled", "pooled3"])
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "leftpad3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_attention_selector_keeps_the_property_and_picks_the_most_attended(arch, attn, padded, span, monkeypatch):
    monkeypatch.setattr(layer_module, "OBSERVED_QUERIES", 4)
    monkeypatch.setattr(layer_module, "POOLED_SPAN", span)
    model = tiny_model(arch, attn)
    if padded:
        ids, mask = left_padded_batch([20, 13, 9], 20)
    else:
        ids, mask = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(3)), None
    orthorank.patch(model, layers=[2], keep_ratio=KEEP, selector="attention", keep_recent=RECENT)
    got, cache = _capture(model, ids, mask, 2)
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    dense_cache = DynamicCache(config=model.config)
    layer = model.model.layers[2]
    with torch.no_grad():
        dense = type(layer).forward(layer, got["x"], attention_mask=got["kwargs"]["attention_mask"],
                                    position_ids=got["kwargs"]["position_ids"],
                                    position_embeddings=got["kwargs"]["position_embeddings"],
                                    use_cache=True, **{cache_kwarg(layer): dense_cache})
    changed = (got["out"] != got["x"]).any(-1)
    torch.testing.assert_close(got["out"][changed], dense[changed], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cache.layers[2].keys, dense_cache.layers[2].keys, atol=1e-6, rtol=1e-5)
    mass = _reference_pool(_reference_attention_mass(model, 2, got["x"], real, observed=4), real, span)
    for b in range(ids.shape[0]):
        cols = real[b].nonzero().flatten()
        k = tokens_to_keep(KEEP, len(cols))
        expected = set(cols[-RECENT:].tolist())
        rest = cols[1:-RECENT]
        order = rest[mass[b, rest].argsort(descending=True, stable=True)]
        expected |= set(order[: k - RECENT].tolist())
        assert set(changed[b].nonzero().flatten().tolist()) == expected


def test_recent_attention_matches_a_plain_softmax():
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    cols = torch.tensor([[9, 8, 7], [6, 5, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, 7:] = False
    got = recent_attention(query, key, cols, valid, 0.5, real, window=None)
    want = torch.zeros(2, 10)
    for b in range(2):
        for h in range(4):
            for j in range(3):
                if not valid[b, j]:
                    continue
                c = int(cols[b, j])
                keys = key[b, h // 2, : c + 1]
                w = torch.softmax((keys @ query[b, h, j]) * 0.5, dim=-1) * real[b, : c + 1]
                w = w / w.sum()
                want[b, : c + 1] += w
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    windowed = recent_attention(query, key, cols, valid, 0.5, None, window=2)
    assert windowed[0, :6].sum() == 0 and windowed[0, 6:].sum() > 0, "query 7 with a window of 2 sees keys 6 and 7"


def test_pool_span_takes_the_largest_neighbour_and_leaves_out_the_sink():
    mass = torch.tensor([[9.0, 0.1, 0.2, 5.0, 0.3, 0.0, 0.4], [0.0, 0.0, 8.0, 0.5, 0.1, 0.2, 1.0]])
    sink = torch.tensor([0, 2])
    got = pool_span(mass, sink, 3)
    torch.testing.assert_close(got[0], torch.tensor([0.1, 0.2, 5.0, 5.0, 5.0, 0.4, 0.4]))
    torch.testing.assert_close(got[1], torch.tensor([0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(pool_span(mass, None, 3)[1], torch.tensor([0.0, 8.0, 8.0, 8.0, 0.5, 1.0, 1.0]))
    assert pool_span(mass, sink, 1) is mass
    with pytest.raises(ValueError, match="odd"):
        pool_span(mass, sink, 4)


def test_rank_fusion_keeps_the_best_of_both_rankings():
    first = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7]])
    second = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1, 0]])
    fused = rank_fusion(first, second)
    top4 = set(fused[0].argsort(stable=True)[:4].tolist())
    assert top4 == {0, 1, 6, 7}
    assert fused[0, 0] < fused[0, 7], "ties go to the first ranking"


@pytest.mark.parametrize("selector", ["attention", "orthogonal+attention"])
def test_query_selectors_keep_padded_rows_equal_to_rows_alone(selector):
    model = tiny_model()
    ids, mask = left_padded_batch([18, 11], 18)
    orthorank.patch(model, layers=[1, 3], keep_ratio=KEEP, selector=selector)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
        for b in range(2):
            row = ids[b, mask[b].bool()][None]
            alone = model(row).logits[0]
            torch.testing.assert_close(batch[b, mask[b].bool()], alone, atol=2e-5, rtol=1e-4)


def test_generation_windows_continue_and_recall():
    docs = torch.arange(4 * 10).view(4, 10)
    ids, prompt = generation_windows(docs, prompt_docs=2, answer=3, seed=1)
    assert ids.shape == (8, prompt + 3) and prompt == 2 * 10 + 7
    for i in range(4):
        cont, rec = ids[i], ids[4 + i]
        assert torch.equal(cont[:prompt], rec[:prompt])
        assert torch.equal(cont[:10], docs[(i + 1) % 4]) and torch.equal(cont[10:20], docs[(i + 2) % 4])
        assert torch.equal(cont[20:prompt], docs[i, :7]) and torch.equal(cont[prompt:], docs[i, 7:])
        first = docs[(i + 1) % 4].tolist()
        span = rec[prompt:].tolist()
        assert any(first[s:s + 3] == span for s in range(8)), "the recall answer is a span of the furthest document"


@pytest.mark.parametrize("kwargs,match", [({"prompt_docs": 0, "answer": 3}, "prompt_docs"),
                                           ({"prompt_docs": 4, "answer": 3}, "prompt_docs"),
                                           ({"prompt_docs": 1, "answer": 10}, "answer")])
def test_generation_windows_reject_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generation_windows(torch.zeros(4, 10, dtype=torch.long), **kwargs)
