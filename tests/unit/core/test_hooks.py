"""Hooks on a selection layer's attention and MLP modules (the contract of :mod:`orthorank.hooks`).

A selection layer calls its attention module (with every hook) with the arguments a dense layer
passes; the module's output holds the attention output at the selected tokens and zeros at the
bypassed ones. With hooks that change the attention's input and output, a selection layer still
equals ``where(selected, dense_layer(x), x)``, the dense layer running the same hooks.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from transformers import DynamicCache

import orthorank
from orthorank import hooks

from tests.tiny_models import tiny_model
from tests.layer_checks import KEEP, RECENT, _dense_layer, _expected_selection, _layer_keys, _run_with_capture

LAYERS = [1, 3]


class Recorder:
    """A pre-hook and a forward hook (both with kwargs) on every attention module."""

    def __init__(self, model, steer: float = 0.0, scale: float = 1.0) -> None:
        torch.manual_seed(5)
        self.vector = steer * torch.randn(model.config.hidden_size)
        self.scale = scale
        self.calls: dict[int, list[tuple]] = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            self.handles.append(attn.register_forward_pre_hook(self.pre, with_kwargs=True))
            self.handles.append(attn.register_forward_hook(self.post, with_kwargs=True))

    def pre(self, module, args, kwargs):
        kwargs["hidden_states"] = kwargs["hidden_states"] + self.vector
        return args, kwargs

    def post(self, module, args, kwargs, output):
        self.calls.setdefault(module.layer_idx, []).append(
            (tuple(kwargs["hidden_states"].shape), "position_embeddings" in kwargs, output[0].clone())
        )
        return (output[0] * self.scale, *output[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hooks_that_change_input_and_output_keep_the_layer_property(attn):
    model = tiny_model(attn=attn)
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, keep_recent=RECENT, selector="orthogonal")
    recorder = Recorder(model, steer=0.5, scale=0.5)
    cache = DynamicCache(config=model.config)
    captured = _run_with_capture(model, ids, None, torch.arange(20)[None], cache)
    real = torch.ones(ids.shape, dtype=torch.bool)
    for i, got in captured.items():
        assert len(recorder.calls[i]) == 1, f"layer {i}: the attention hooks ran {len(recorder.calls[i])} times"
        shape, has_rope, attn_out = recorder.calls[i][0]
        assert shape == (1, 20, 64) and has_rope
        dense_cache = DynamicCache(config=model.config)
        dense = _dense_layer(model, i, got["x"], got["kwargs"], dense_cache)
        x, out = got["x"], got["out"]
        if i in LAYERS:
            layer = model.model.layers[i]
            # the selector reads the attention's input as the pre-hook leaves it
            selected = _expected_selection(layer.input_layernorm(x) + recorder.vector, real)
            torch.testing.assert_close(out[selected], dense[selected], atol=2e-5, rtol=1e-4)
            assert torch.equal(out[~selected], x[~selected])
            assert torch.equal(attn_out[~selected], torch.zeros_like(attn_out[~selected]))
            assert attn_out[selected].abs().amin(dim=-1).gt(0).all()
        else:
            torch.testing.assert_close(out, dense, atol=0, rtol=0)
        for ours, theirs in zip(_layer_keys(cache, i), _layer_keys(dense_cache, i)):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    recorder.remove()


@pytest.mark.parametrize("decode", ["dense", "bypass"])
def test_attention_hooks_fire_once_per_layer_and_step_in_generate(decode):
    model = tiny_model()
    prompt = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    dense_rec = Recorder(model)
    model.generate(prompt, max_new_tokens=5, do_sample=False)
    dense_rec.remove()
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, decode=decode, selector="orthogonal")
    rec = Recorder(model)
    model.generate(prompt, max_new_tokens=5, do_sample=False)
    rec.remove()
    for i in range(len(model.model.layers)):
        assert [c[0] for c in rec.calls[i]] == [c[0] for c in dense_rec.calls[i]]
        assert [c[0][1] for c in rec.calls[i]] == [12, 1, 1, 1, 1]
    for i in LAYERS:
        steps = [c[2] for c in rec.calls[i][1:]]
        if decode == "bypass":  # no attention for a bypassed token: zeros
            assert all(torch.equal(s, torch.zeros_like(s)) for s in steps)
        else:
            assert all(s.abs().sum() > 0 for s in steps)


def test_mlp_hooks_see_the_selected_tokens():
    model = tiny_model()
    shapes: dict[int, list] = {}
    handles = [
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: shapes.setdefault(i, []).append(tuple(a[0].shape)))
        for i, layer in enumerate(model.model.layers)
    ]
    orthorank.patch(model, layers=LAYERS, keep_ratio=0.5, selector="orthogonal")
    with torch.no_grad():
        model(torch.randint(3, 97, (2, 20)))
    for h in handles:
        h.remove()
    assert {i: s[0] for i, s in shapes.items()} == {
        i: (2, 10, 64) if i in LAYERS else (2, 20, 64) for i in range(len(model.model.layers))
    }


def test_global_hooks_and_plain_hooks_fire_in_selection_layers():
    model = tiny_model()
    attn_modules = {layer.self_attn: i for i, layer in enumerate(model.model.layers)}
    seen: list[int] = []
    pre_seen: list[int] = []

    def global_hook(module, args, output):
        if module in attn_modules:
            seen.append(attn_modules[module])

    handles = [torch.nn.modules.module.register_module_forward_hook(global_hook)]
    always: list[int] = []
    handles += [a.register_forward_pre_hook(lambda m, args: pre_seen.append(m.layer_idx)) for a in attn_modules]
    handles += [a.register_forward_hook(lambda m, args, out: always.append(m.layer_idx), always_call=True)
                for a in attn_modules]
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    try:
        with torch.no_grad():
            model(torch.randint(3, 97, (1, 16)))
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == sorted(pre_seen) == sorted(always) == list(range(len(model.model.layers)))


def test_no_hooks_skip_the_module_call(monkeypatch):
    model = tiny_model()
    ids = torch.randint(3, 97, (1, 16))
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    with torch.no_grad():
        ref = model(ids).logits

    def refuse(*args, **kwargs):
        raise AssertionError("the attention module must not be called when it has no hooks")

    monkeypatch.setattr(hooks.AttentionRoute, "call", refuse)
    assert not hooks.has_hooks(model.model.layers[LAYERS[0]].self_attn)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_idle_output_capturing_hooks_of_transformers_skip_the_module_call(monkeypatch):
    """transformers leaves its output-capturing hooks on the attention modules after a call with
    ``output_attentions``; later plain calls must not pay for them. While they capture, the
    selection layers' attention modules run them (their weights are None: not recorded)."""
    model = tiny_model(attn="eager")
    ids = torch.randint(3, 97, (1, 16))
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    calls = []
    original = hooks.AttentionRoute.call
    monkeypatch.setattr(hooks.AttentionRoute, "call", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        out = model(ids, output_attentions=True)
        if not model.model.layers[LAYERS[0]].self_attn._forward_hooks:
            pytest.skip(f"transformers {transformers.__version__} captures attentions without module hooks")
        assert len(calls) == len(LAYERS)
        assert len(out.attentions) == len(model.model.layers) - len(LAYERS)
        calls.clear()
        model(ids)
    assert calls == []


def test_unpatch_restores_attention_forward_and_hooks_stay():
    model = tiny_model()
    ids = torch.randint(3, 97, (1, 16))
    handle = model.model.layers[1].self_attn.register_forward_hook(lambda m, a, o: None)
    with torch.no_grad():
        dense = model(ids).logits
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    assert isinstance(model.model.layers[1].self_attn.__dict__["forward"], hooks.AttentionRoute)
    orthorank.unpatch(model)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    assert model.model.layers[1].self_attn._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    handle.remove()


def test_hook_that_changes_the_token_count_is_refused():
    model = tiny_model()
    orthorank.patch(model, layers=[1], keep_ratio=KEEP, selector="orthogonal")
    model.model.layers[1].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: (args, {**kwargs, "hidden_states": kwargs["hidden_states"][:, :-1]}), with_kwargs=True
    )
    with pytest.raises(ValueError, match=r"layers\[1\].self_attn changed its input's shape"):
        model(torch.randint(3, 97, (1, 16)))


def test_eager_forward_hooks_are_told_there_are_no_attention_weights(caplog):
    model = tiny_model(attn="eager")
    weights = []

    def wants_weights(module, args, output):
        weights.append(output[1])

    model.model.layers[1].self_attn.register_forward_hook(wants_weights)
    orthorank.patch(model, layers=[1], keep_ratio=KEEP, selector="orthogonal")
    with caplog.at_level(logging.WARNING, logger="orthorank.hooks"), torch.no_grad():
        model(torch.randint(3, 97, (1, 16)))
        model(torch.randint(3, 97, (1, 16)))
    warned = [r.getMessage() for r in caplog.records if "no attention weights" in r.getMessage()]
    assert len(warned) == 1 and "wants_weights" in warned[0] and "layers[1]" in warned[0]
    assert weights == [None, None]
