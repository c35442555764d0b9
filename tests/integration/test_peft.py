"""PEFT (LoRA) models: patch/unpatch accept a ``PeftModel`` and the selection layers run the adapters.

Reference: merging a LoRA adapter into the weights gives the same function, so a patched PEFT
model must equal the merged model patched with the same plan.
"""

from __future__ import annotations

import copy
import filecmp
from pathlib import Path

import pytest
import torch

import orthorank
from orthorank import analysis, compat

from tests.layer_checks import _dense_layer, _run_with_capture, assert_layer_property
from tests.tiny_models import tiny_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = [1, 3]
KEEP = 0.5


def _lora(seed: int = 0, **overrides) -> "peft.LoraConfig":
    """Randomly initialised adapters (``init_lora_weights=False``: B is not zero, so they matter)."""
    torch.manual_seed(seed)
    options = dict(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False, target_modules=TARGETS)
    options.update(overrides)
    return peft.LoraConfig(**options)


def _peft_model(arch: str = "llama", task_type: str | None = "CAUSAL_LM") -> torch.nn.Module:
    model = peft.get_peft_model(tiny_model(arch), _lora(task_type=task_type))
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(seed: int = 0, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None], ids=["PeftModelForCausalLM", "PeftModel"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_patched_peft_equals_merged_then_patched(arch, task_type):
    model = _peft_model(arch, task_type)
    ids = _ids()
    dense = _logits(model, ids)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not isinstance(merged, type(model))
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP)  # the default, query-aware selector
    orthorank.patch(merged, layers=LAYERS, keep_ratio=KEEP)
    assert orthorank.is_patched(model) and orthorank.get_plan(model).selection_layers == LAYERS
    ours = _logits(model, ids)
    torch.testing.assert_close(ours, _logits(merged, ids), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ours, dense, atol=1e-3), "the patch must change something"
    assert torch.equal(_logits(model, ids), ours), "lora_dropout must be off in eval mode"
    stats = orthorank.layer_stats(model)
    assert set(stats) == set(LAYERS) and all(s.selective_calls == 2 for s in stats.values())
    orthorank.unpatch(model)
    assert not orthorank.is_patched(model)
    assert torch.equal(_logits(model, ids), dense)


def test_peft_selection_layer_is_the_adapted_dense_layer_where_selected():
    """Layer by layer: ``out == where(selected, adapted_dense_layer(x), x)``, same cache."""
    from transformers import DynamicCache

    model = _peft_model()
    inner = model.get_base_model()
    ids = _ids(batch=1, seq=20)
    orthorank.patch(model, layers=LAYERS, keep_ratio=0.4, selector="orthogonal")
    cache = DynamicCache(config=inner.config)
    captured = _run_with_capture(inner, ids, None, torch.arange(20)[None], cache)
    real = torch.ones(ids.shape, dtype=torch.bool)
    for i, got in captured.items():
        dense_cache = DynamicCache(config=inner.config)
        dense = _dense_layer(inner, i, got["x"], got["kwargs"], dense_cache)
        assert_layer_property(inner, i, got, dense, cache, dense_cache, LAYERS, real)


def test_adapters_run_in_selection_layers():
    """The adapted projections are what the selection layers call (not the bare base weights)."""
    model = _peft_model()
    layer = compat.decoder_layers(model)[LAYERS[0]]
    assert type(layer.self_attn.q_proj).__module__.startswith("peft.")
    calls = []
    handles = [
        getattr(layer.self_attn, name).register_forward_hook(lambda m, a, o, name=name: calls.append(name))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    handles += [getattr(layer.mlp, name).register_forward_hook(lambda m, a, o, name=name: calls.append(name))
                for name in ("gate_proj", "up_proj", "down_proj")]
    with orthorank.patched(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal"):
        _logits(model, _ids())
    for h in handles:
        h.remove()
    assert sorted(calls) == sorted(["k_proj", "v_proj", "q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_disable_adapter_equals_patched_base_model():
    base = tiny_model()
    model = peft.get_peft_model(copy.deepcopy(base), _lora()).eval()
    ids = _ids()
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    orthorank.patch(base, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    with model.disable_adapter():
        without = _logits(model, ids)
    torch.testing.assert_close(without, _logits(base, ids), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(_logits(model, ids), without, atol=1e-3)


def test_two_adapters_and_set_adapter():
    model = _peft_model()
    model.add_adapter("second", _lora(seed=1))
    model.eval()  # peft makes the new adapter's modules (its lora_dropout) in training mode
    assert not any(m.training for m in model.modules())
    ids = _ids()
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    first = _logits(model, ids)
    model.set_adapter("second")
    second = _logits(model, ids)
    assert not torch.allclose(first, second, atol=1e-3)
    # the same as switching on the unpatched model and patching afterwards
    orthorank.unpatch(model)
    model.set_adapter("default")
    model.set_adapter("second")
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    assert torch.equal(_logits(model, ids), second)
    merged = copy.deepcopy(model)
    orthorank.unpatch(merged)
    merged = merged.merge_and_unload(adapter_names=["second"])
    orthorank.patch(merged, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    torch.testing.assert_close(second, _logits(merged, ids), atol=2e-5, rtol=1e-4)


def test_patch_before_wrapping_and_merge_and_unload_after_patching():
    """Patching then wrapping works; ``merge_and_unload()`` of a patched PEFT model returns the
    base model with the adapters merged, still patched with the same plan."""
    plain = tiny_model()
    orthorank.patch(plain, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    wrapped = peft.get_peft_model(plain, _lora()).eval()
    assert orthorank.is_patched(wrapped)
    reference = _peft_model()
    orthorank.patch(reference, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    ids = _ids()
    ours = _logits(wrapped, ids)
    torch.testing.assert_close(ours, _logits(reference, ids), atol=0, rtol=0)

    merged = wrapped.merge_and_unload()
    assert orthorank.is_patched(merged) and orthorank.get_plan(merged).selection_layers == LAYERS
    torch.testing.assert_close(_logits(merged, ids), ours, atol=2e-5, rtol=1e-4)
    orthorank.unpatch(merged)
    assert all("forward" not in layer.__dict__ for layer in merged.model.layers)


def test_generate_matches_merged_model():
    model = _peft_model()
    merged = copy.deepcopy(model).merge_and_unload()
    prompt = _ids(batch=1, seq=16)
    for m in (model, merged):
        orthorank.patch(m, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    out = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 24)
    assert torch.equal(out, merged.generate(prompt, max_new_tokens=8, do_sample=False))


def test_save_pretrained_adapter_files_identical(tmp_path: Path):
    model = _peft_model()
    model.save_pretrained(tmp_path / "dense")
    with orthorank.patched(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal"):
        model.save_pretrained(tmp_path / "patched")
    names = sorted(p.name for p in (tmp_path / "dense").iterdir())
    assert "adapter_model.safetensors" in names
    assert names == sorted(p.name for p in (tmp_path / "patched").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "dense", tmp_path / "patched", names, shallow=False)
    assert mismatch == [] and errors == [] and match == names


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None], ids=["PeftModelForCausalLM", "PeftModel"])
def test_analysis_sees_the_adapted_layers(task_type):
    """orthorank.analysis finds the decoder layers inside a PEFT model as patch does: its profile
    is the merged model's."""
    model = _peft_model("llama", task_type)
    merged = copy.deepcopy(model).merge_and_unload()
    ids = _ids()
    ours = analysis.sink_profile(model, None, ids, attention=False).to_dict()
    reference = analysis.sink_profile(merged, None, ids, attention=False).to_dict()
    for key in ("cos_mean", "abs_cos_mean", "sink_change", "token_change", "overlap"):
        assert ours[key] == pytest.approx(reference[key], abs=1e-4, nan_ok=True), key
