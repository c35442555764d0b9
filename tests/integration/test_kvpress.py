"""kvpress presses on a patched model: the same compressed cache as on the dense model.

kvpress compresses the cache in a forward hook on each layer's attention module; a selection
layer runs that hook with the dense layer's arguments (see :mod:`orthorank.hooks`). So, layer by
layer, a selection layer under a press equals ``where(selected, dense_layer(x), x)`` with the dense
layer under the same press, and leaves the same compressed cache. kvpress pins ``transformers<5.3``:
these tests run where it is installed and are skipped elsewhere.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import DynamicCache

import orthorank

from tests.layer_checks import KEEP, _layer_keys, _run_with_capture, assert_layer_property
from tests.tiny_models import cache_kwarg, tiny_model, tiny_tokenizer

kvpress = pytest.importorskip("kvpress")

SEQ = 40
LAYERS = [2, 4]

PRESSES = {
    "knorm": lambda: kvpress.KnormPress(compression_ratio=0.5),
    "streaming_llm": lambda: kvpress.StreamingLLMPress(compression_ratio=0.5, n_sink=2),
    "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=0.5, window_size=8),
    "tova": lambda: kvpress.TOVAPress(compression_ratio=0.5),
}


def _ids(seq: int = SEQ, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 97, (1, seq), generator=torch.Generator().manual_seed(seed))


def _stored(cache) -> list[int]:
    return [layer.keys.shape[-2] for layer in cache.layers]


def _dense_layer_under_press(model, i, x, kwargs, press):
    """Layer ``i`` run densely on ``x`` with the captured kwargs, a fresh cache, under ``press``."""
    layer = model.model.layers[i]
    cache = DynamicCache(config=model.config)
    kwargs = {**kwargs, cache_kwarg(layer): cache}
    with press(model), torch.no_grad():
        out = type(layer).forward(layer, x, **kwargs)
    return out, cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(PRESSES))
def test_prefill_press_compresses_selection_layers_as_dense_ones(name, attn):
    model = tiny_model(attn=attn)
    ids = _ids()
    position_ids = torch.arange(SEQ)[None]
    dense_cache = DynamicCache(config=model.config)
    with PRESSES[name]()(model), torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(model.model.layers[0]): dense_cache})

    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    press = PRESSES[name]()
    cache = DynamicCache(config=model.config)
    with press(model):
        captured = _run_with_capture(model, ids, None, position_ids, cache)
    assert _stored(cache) == _stored(dense_cache) == [SEQ // 2] * len(model.model.layers)
    for i in range(LAYERS[0] + 1):  # up to the first selection layer the inputs equal the dense model's
        for ours, theirs in zip(_layer_keys(cache, i), _layer_keys(dense_cache, i)):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)

    real = torch.ones(ids.shape, dtype=torch.bool)
    for i, got in captured.items():  # layer by layer, against the dense layer under the same press
        dense, dense_layer_cache = _dense_layer_under_press(model, i, got["x"], got["kwargs"], press)
        assert_layer_property(model, i, got, dense, cache, dense_layer_cache, LAYERS, real)


def _generate(model, press, prompt, new_tokens=8):
    cache = DynamicCache(config=model.config)
    with press(model):
        out = model.generate(
            prompt, max_new_tokens=new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True,
            **{cache_kwarg(model.model.layers[0]): cache},
        )
    return out.sequences, torch.stack(out.scores), _stored(cache)


@pytest.mark.parametrize("name", ["knorm", "snapkv", "adakv"])
def test_generation_under_a_press_equals_dense_when_the_last_layer_selects(name):
    """With only the last layer selecting (``keep_recent`` puts the last token first), every next-token prediction comes from
    dense computation over caches equal to the dense model's, prefill compression included."""
    make = PRESSES.get(name, lambda: kvpress.AdaKVPress(kvpress.KnormPress(compression_ratio=0.5)))
    prompt = _ids()
    dense_seq, dense_scores, dense_stored = _generate(tiny_model(), make(), prompt)
    model = tiny_model()  # a fresh instance: presses keep state on the attention modules
    orthorank.patch(model, layers=[5], keep_ratio=KEEP, selector="orthogonal")
    seq, scores, stored = _generate(model, make(), prompt)
    assert orthorank.layer_stats(model)[5].selective_calls == 1
    assert stored == dense_stored
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(scores, dense_scores, atol=2e-5, rtol=1e-4)


def _decoding_press():
    return kvpress.DecodingPress(base_press=kvpress.KnormPress(), compression_interval=3, target_size=12)


@pytest.mark.parametrize("decode", ["dense", "bypass"])
def test_decoding_press_compresses_selection_layers_as_dense_ones(decode):
    model = tiny_model()
    prompt = _ids(seq=16)
    dense_seq, dense_scores, dense_stored = _generate(model, _decoding_press(), prompt, new_tokens=10)
    assert max(dense_stored) < 16 + 10, "the press must have compressed"
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, decode=decode, selector="orthogonal")
    _, _, stored = _generate(model, _decoding_press(), prompt, new_tokens=10)
    assert stored == dense_stored
    orthorank.patch(model, layers=[5], keep_ratio=KEEP, decode=decode, selector="orthogonal")
    seq, scores, stored = _generate(model, _decoding_press(), prompt, new_tokens=10)
    assert stored == dense_stored
    if decode == "dense":
        assert torch.equal(seq, dense_seq)
        torch.testing.assert_close(scores, dense_scores, atol=2e-5, rtol=1e-4)


def test_observed_attention_press_is_refused_with_a_named_warning(caplog):
    """ObservedAttentionPress scores keys by the attention weights of every query, which a
    selection layer does not compute: it does not compose, and the patch says so by name."""
    model = tiny_model(attn="eager")
    press = kvpress.ObservedAttentionPress(compression_ratio=0.5)
    with press(model), torch.no_grad():  # works on the dense model
        model(_ids(), use_cache=True, **{cache_kwarg(model.model.layers[0]): DynamicCache(config=model.config)})
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    with caplog.at_level(logging.WARNING, logger="orthorank.hooks"), press(model), torch.no_grad():
        with pytest.raises(AssertionError, match="eager"):
            model(_ids(), use_cache=True, **{cache_kwarg(model.model.layers[0]): DynamicCache(config=model.config)})
    assert any("ObservedAttentionPress" in r.getMessage() and "no attention weights" in r.getMessage()
               for r in caplog.records)


def test_head_wise_press_state_does_not_leak_into_the_next_prompt():
    """Head-wise presses (AdaKV) leave ``masked_key_indices`` on each attention module; kvpress's
    attention wrapper clears it when a prefill starts. A selection layer's prefill does not call
    that wrapper, so it clears it itself: a later generation without a press is not masked."""
    prompt, other = _ids(), _ids(seed=7)
    model = tiny_model()
    orthorank.patch(model, layers=[5], keep_ratio=KEEP, selector="orthogonal")
    _generate(model, kvpress.AdaKVPress(kvpress.KnormPress(compression_ratio=0.5)), prompt)
    assert model.model.layers[5].self_attn.masked_key_indices is not None
    seq, scores, _ = _generate(model, _NoPress(), other)
    fresh = tiny_model()
    orthorank.patch(fresh, layers=[5], keep_ratio=KEEP, selector="orthogonal")
    ref_seq, ref_scores, _ = _generate(fresh, _NoPress(), other)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=1e-5)


class _NoPress:
    def __call__(self, model):
        import contextlib

        return contextlib.nullcontext()


def test_kvpress_pipeline_on_a_patched_model():
    """kvpress's own pipeline (prefill of the context under the press through ``model.model``, then
    the question and a greedy answer token by token): the same compressed cache per layer as the
    dense model, and the same answer when only the last layer selects."""
    from transformers import pipeline

    context = " ".join(f"w{3 + (7 * i) % 90}" for i in range(SEQ))
    question = "w5 w9 w11"

    def answer(model):
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tiny_tokenizer())
        cache = DynamicCache(config=model.config)
        out = pipe(context, question=question, press=kvpress.KnormPress(compression_ratio=0.5), cache=cache,
                   max_new_tokens=6)
        return out["answer"], _stored(cache)

    dense_answer, dense_stored = answer(tiny_model())
    assert dense_answer and max(dense_stored) < SEQ
    model = tiny_model()
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    assert answer(model)[1] == dense_stored
    orthorank.patch(model, layers=[5], keep_ratio=KEEP, selector="orthogonal")
    assert answer(model) == (dense_answer, dense_stored)
    assert orthorank.layer_stats(model)[5].selective_calls == 1
