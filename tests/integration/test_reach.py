"""Where orthorank is proven to work beyond the core tests.

- Qwen2 (q/k/v biases) and Qwen3 (q/k norms before RoPE), with sliding-window layers: the very
  same equivalence tests as Llama/Mistral.
- accelerate: models under ``cpu_offload`` / ``disk_offload`` / ``dispatch_model`` hooks and
  ``from_pretrained(device_map=...)`` with weights offloaded to cpu and disk give exactly the
  in-memory patched model's outputs; sparsity 0 and ``unpatch`` give the dense model.
- float16 / bfloat16: the selection-layer property holds in the model's dtype within a stated
  tolerance, the cache equals the dense layer's, outputs are finite.
- ``torch.compile`` of a patched model runs and gives the eager patched model's outputs.
"""

from __future__ import annotations

import os

import pytest
import torch
from accelerate import cpu_offload, disk_offload, dispatch_model
from accelerate.hooks import remove_hook_from_module
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

import orthorank
from orthorank import compat
from orthorank.config import tokens_to_keep
from orthorank.layer import SelectiveForward
from orthorank.scoring import sink_cosine

from tests.tiny_models import cache_kwarg, left_padded_batch, tiny_model

QWEN = ["qwen2", "qwen3"]
LAYERS = [1, 3, 4]
KEEP = 0.4


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


# --- the selection-layer property, for any architecture and dtype -----------------------------


def _inputs(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if padded:
        return left_padded_batch([20, 13, 7], 20)
    return torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(3)), None


def _capture(model, ids, mask, cache):
    """Run ``model`` once; every decoder layer's input, call kwargs and output, and the logits."""
    captured: dict[int, dict] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: captured.__setitem__(i, {"x": a[0].clone(), "kwargs": dict(k)}), with_kwargs=True
        ))
        hooks.append(layer.register_forward_hook(
            lambda m, a, k, o, i=i: captured[i].__setitem__("out", o.clone()), with_kwargs=True
        ))
    position_ids = None if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)
    try:
        with torch.no_grad():
            logits = model(
                ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{cache_kwarg(model): cache}
            ).logits
    finally:
        for h in hooks:
            h.remove()
    return captured, logits


def assert_dense_where_selected(model, ids, mask, make_cache, atol, rtol):
    """In every selection layer ``out == where(selected, dense_layer(x), x)``, the selected tokens
    are ``tokens_to_keep`` real non-sink tokens per row, and the cache equals the dense layer's;
    other layers are the dense layers exactly. Returns the logits."""
    cache = make_cache()
    captured, logits = _capture(model, ids, mask, cache)
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    selection_layers = orthorank.get_plan(model).selection_layers
    for i, got in captured.items():
        layer = model.model.layers[i]
        dense_cache = make_cache()
        with torch.no_grad():
            dense = type(layer).forward(layer, got["x"], **{**got["kwargs"], "use_cache": True, cache_kwarg(layer): dense_cache})
        x, out = got["x"], got["out"]
        if i in selection_layers:
            changed = (out != x).any(-1)
            for b in range(ids.shape[0]):
                sink = real[b].nonzero()[0, 0]
                assert not changed[b, sink], "the sink is never selected"
                assert not (changed[b] & ~real[b]).any(), "padding is never selected"
                assert int(changed[b].sum()) == tokens_to_keep(KEEP, int(real[b].sum()))
            torch.testing.assert_close(out[changed], dense[changed], atol=atol, rtol=rtol)
        else:
            torch.testing.assert_close(out, dense, atol=0, rtol=0)
        ours, theirs = cache.layers[i], dense_cache.layers[i]
        torch.testing.assert_close(ours.keys, theirs.keys, atol=atol, rtol=rtol)
        torch.testing.assert_close(ours.values, theirs.values, atol=atol, rtol=rtol)
    return logits


def _cache_factory(model, cache_type: str):
    if cache_type == "dynamic":
        return lambda: DynamicCache(config=model.config)
    return lambda: StaticCache(config=model.config, max_cache_len=32)


# --- Qwen2 / Qwen3 ---------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "leftpad3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", QWEN)
@pytest.mark.parametrize("cache_type", ["dynamic", "static"])
def test_qwen_selection_layer_is_dense_where_selected(arch, attn, padded, cache_type):
    model = tiny_model(arch, attn)
    ids, mask = _inputs(padded)
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    assert_dense_where_selected(model, ids, mask, _cache_factory(model, cache_type), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", QWEN)
def test_qwen_padded_rows_equal_rows_alone(arch, attn):
    model = tiny_model(arch, attn)
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    lengths = [18, 11, 5]
    ids, mask = left_padded_batch(lengths, 18)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    for row, n in enumerate(lengths):
        alone = _logits(model, ids[row : row + 1, 18 - n :])
        torch.testing.assert_close(batch[row, 18 - n :], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", QWEN)
def test_qwen_sparsity_zero_and_unpatch_give_dense_logits(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 97, (2, 24))
    dense = _logits(model, ids)
    orthorank.patch(model, sparsity=0.0)
    assert torch.equal(_logits(model, ids), dense)
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    assert not torch.allclose(_logits(model, ids), dense)
    orthorank.unpatch(model)
    assert torch.equal(_logits(model, ids), dense)


@pytest.mark.parametrize("arch", QWEN)
def test_qwen_static_cache_generate_matches_dynamic(arch):
    model = tiny_model(arch)
    orthorank.patch(model, layers=LAYERS, keep_ratio=0.3, selector="orthogonal")
    ids, mask = left_padded_batch([14, 9], 14)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert dynamic.shape == (2, 20)
    assert torch.equal(dynamic, static)


def test_qwen3_norms_and_qwen2_biases_take_part():
    """The tiny Qwen models really exercise what differs from Llama."""
    qwen2, qwen3 = tiny_model("qwen2"), tiny_model("qwen3")
    assert qwen2.model.layers[1].self_attn.k_proj.bias.abs().sum() > 0
    assert not torch.all(qwen3.model.layers[1].self_attn.k_norm.weight == 1)
    assert compat.arch_spec(qwen3).qk_norm and not compat.arch_spec(qwen2).qk_norm
    assert [compat.sliding_window(layer.self_attn) for layer in qwen2.model.layers] == [None] * 3 + [8] * 3


@pytest.mark.parametrize("model_type", ["gemma", "phi3", "qwen2_moe"])
def test_same_shaped_but_unregistered_architectures_are_refused_by_name(model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        model_type, vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(TypeError, match=rf"{type(model).__name__} \(model_type='{model_type}'\).*llama, mistral, qwen2, qwen3"):
        orthorank.patch(model, layers=[1], selector="orthogonal")
    assert not orthorank.is_patched(model)


# --- accelerate ------------------------------------------------------------------------------


def _device_map(model, offloaded: dict[int, str]) -> dict[str, str]:
    """Everything on cpu except the decoder layers in ``offloaded`` (index -> "cpu"/"disk")."""
    names = [name for name, _ in model.named_children()]
    base = [f"model.{name}" for name, _ in model.model.named_children() if name != "layers"]
    layers = {f"model.layers.{i}": offloaded.get(i, "cpu") for i in range(len(model.model.layers))}
    return {**{n: "cpu" for n in names if n != "model"}, **{n: "cpu" for n in base}, **layers}


def _reference(arch: str, attn: str = "sdpa"):
    """The in-memory patched model and the inputs the accelerate tests run."""
    model = tiny_model(arch, attn)
    ids, mask = left_padded_batch([20, 13, 7], 20)
    dense = _logits(model, ids, mask)
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    return ids, mask, dense, _logits(model, ids, mask)


def _check_offloaded(model, ids, mask, dense, patched):
    """Patched == in-memory patched; sparsity 0 and unpatch == dense; hooks stay in place."""
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    assert torch.equal(_logits(model, ids, mask), patched)
    stats = orthorank.layer_stats(model)
    assert sorted(stats) == LAYERS and all(s.selective_calls == 1 for s in stats.values())
    orthorank.patch(model, sparsity=0.0)
    assert torch.equal(_logits(model, ids, mask), dense)
    orthorank.unpatch(model)
    assert torch.equal(_logits(model, ids, mask), dense)
    for layer in model.model.layers:
        assert not isinstance(layer.__dict__.get("_old_forward"), SelectiveForward)
        assert not isinstance(layer.__dict__.get("forward"), SelectiveForward)


HOOKS = ["cpu_offload", "disk_offload", "dispatch_cpu", "dispatch_disk"]


@pytest.mark.parametrize(
    ("arch", "how"),
    [("llama", how) for how in HOOKS] + [("qwen3", how) for how in HOOKS]
    + [("mistral", "dispatch_disk"), ("qwen2", "dispatch_disk")],
)
def test_accelerate_hooks_give_the_in_memory_result(arch, how, tmp_path):
    ids, mask, dense, patched = _reference(arch)
    model = tiny_model(arch)
    if how == "cpu_offload":
        cpu_offload(model, execution_device=torch.device("cpu"))
    elif how == "disk_offload":
        disk_offload(model, str(tmp_path), execution_device=torch.device("cpu"))
    else:
        offloaded = {1: "disk", 4: "disk", 5: "disk"} if how == "dispatch_disk" else {}
        model = dispatch_model(
            model, _device_map(model, offloaded), main_device="cpu", offload_dir=str(tmp_path), force_hooks=True
        )
        assert hasattr(model.model.layers[1], "_hf_hook")
    if how != "dispatch_cpu":
        assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    _check_offloaded(model, ids, mask, dense, patched)


@pytest.mark.parametrize("device_map", ["explicit", "auto"])
def test_from_pretrained_with_device_map_and_offload(device_map, tmp_path):
    ids, mask, dense, patched = _reference("llama")
    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    if device_map == "explicit":
        kwargs = dict(device_map=_device_map(tiny_model("llama"), {0: "disk", 1: "disk", 3: "disk"}))
    else:  # too little cpu memory for everything: accelerate offloads the rest to disk
        kwargs = dict(device_map="auto", max_memory={"cpu": 700_000})
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", offload_folder=tmp_path / "offload", attn_implementation="sdpa", dtype=torch.float32, **kwargs
    )
    assert "disk" in model.hf_device_map.values()
    _check_offloaded(model, ids, mask, dense, patched)
    # and generation through the hooks
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    reference = tiny_model("llama")
    orthorank.patch(reference, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_hooks_added_or_removed_after_patching(tmp_path):
    """Patch, then dispatch (hooks wrap the patched forward), then unpatch: the dense model."""
    ids, mask, dense, patched = _reference("llama")
    model = tiny_model("llama")
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    model = dispatch_model(model, _device_map(model, {1: "disk", 2: "disk"}), main_device="cpu", offload_dir=str(tmp_path))
    assert torch.equal(_logits(model, ids, mask), patched)
    orthorank.unpatch(model)
    assert torch.equal(_logits(model, ids, mask), dense)
    assert not any(isinstance(layer._old_forward, SelectiveForward) for layer in model.model.layers[1:3])

    model = tiny_model("llama")
    dispatch = dispatch_model(model, _device_map(model, {}), main_device="cpu", force_hooks=True)
    orthorank.patch(dispatch, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    remove_hook_from_module(dispatch, recurse=True)
    assert torch.equal(_logits(dispatch, ids, mask), patched)
    orthorank.unpatch(dispatch)
    for layer in dispatch.model.layers:  # (accelerate leaves the bound class forward on the instance)
        assert layer.forward.__func__ is type(layer).forward
    assert torch.equal(_logits(dispatch, ids, mask), dense)


# --- half precision --------------------------------------------------------------------------

#: Tolerance of a selected token's output against the dense layer's, in the model's dtype
#: (torch.testing's defaults for the dtype with a larger atol; measured on CPU: bit-identical).
HALF_TOLERANCE = {torch.float16: dict(atol=1e-3, rtol=1e-3), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_selection_layer_is_dense_where_selected(dtype, arch, attn, padded=True):
    # larger weights than the default init, so that layer updates are not lost in the residual
    model = tiny_model(arch, attn, initializer_range=0.3).to(dtype)
    ids, mask = _inputs(padded)
    dense_logits = _logits(model, ids, mask)
    orthorank.patch(model, sparsity=0.0)
    assert torch.equal(_logits(model, ids, mask), dense_logits)
    orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, selector="orthogonal")
    logits = assert_dense_where_selected(
        model, ids, mask, lambda: DynamicCache(config=model.config), **HALF_TOLERANCE[dtype]
    )
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    assert logits.dtype == dtype and torch.isfinite(logits[real]).all()


def test_scores_are_float32_for_half_inputs():
    x = torch.randn(2, 16, 64, dtype=torch.float16) * 200  # squares overflow float16
    cos = sink_cosine(x, None)
    assert cos.dtype == torch.float32 and torch.isfinite(cos).all()
    torch.testing.assert_close(cos, torch.nn.functional.cosine_similarity(x.float(), x[:, :1].float(), dim=-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_generate_with_static_cache(dtype):
    model = tiny_model("llama").to(dtype)
    orthorank.patch(model, layers=LAYERS, keep_ratio=0.3, selector="orthogonal")
    ids, mask = left_padded_batch([14, 9], 14)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kwargs, output_scores=True, return_dict_in_generate=True)
    assert all(torch.isfinite(s).all() for s in out.scores)
    assert torch.equal(out.sequences, model.generate(ids, cache_implementation="static", **kwargs))


# --- torch.compile ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not os.environ.get("ORTHORANK_TEST_INDUCTOR"),
                reason="inductor compilation takes ~30 s of CPU: run with ORTHORANK_TEST_INDUCTOR=1 (CI does)",
            ),
        ),
    ],
)
def test_torch_compile_of_a_patched_model(backend):
    torch._dynamo.reset()
    model = tiny_model("llama", layers=4)
    orthorank.patch(model, layers=[1, 2], keep_ratio=KEEP, selector="orthogonal")
    ids, mask = left_padded_batch([20, 13, 7], 20)
    eager = _logits(model, ids, mask)
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(_logits(compiled, ids, mask), eager, atol=1e-5, rtol=1e-5)
    unpadded = ids[:1]
    torch.testing.assert_close(_logits(compiled, unpadded), _logits(model, unpadded), atol=1e-5, rtol=1e-5)
    assert all(s.selective_calls == 4 for s in orthorank.layer_stats(model).values())
