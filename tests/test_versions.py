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
from orthorank import compat

from conftest import cache_kwarg, tiny_model


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
