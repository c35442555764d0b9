"""A short, stable id of a model's weights and shape, used to find its plans on disk.

:func:`model_fingerprint` hashes the architecture essentials of ``model.config`` and a fixed small
sample of every decoder-layer, embedding and final-norm parameter (evenly spaced elements, at most
:data:`SAMPLES_PER_TENSOR` per tensor). The sample is rounded to bfloat16 before hashing, so the
same checkpoint loaded in float32 or bfloat16 gives the same fingerprint (float16 and quantized
loads are not guaranteed to), while a fine-tune, which changes essentially every weight, gives
another. Nothing is hashed in full: it costs a few milliseconds on a 135M model.

Parameters that accelerate offloaded (on the ``meta`` device, their values in the module hook's
``weights_map``) are read from that map; a parameter whose values cannot be found raises a
ValueError.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from torch import nn

from . import compat

logger = logging.getLogger(__name__)

#: Elements sampled from each parameter tensor.
SAMPLES_PER_TENSOR = 32

#: ``config`` attributes that make up the architecture part of the fingerprint.
CONFIG_KEYS: tuple[str, ...] = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)

_FINGERPRINT_CHARS = 16


def _config_essentials(config: Any) -> dict[str, Any]:
    out = {}
    for key in CONFIG_KEYS:
        value = getattr(config, key, None)
        out[key] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return out


def _offloaded_value(module: nn.Module, name: str) -> torch.Tensor | None:
    """The value of ``module``'s own parameter ``name`` kept by an accelerate offload hook."""
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        return None
    try:
        value = weights[name]
    except (KeyError, AttributeError):
        return None
    return value if isinstance(value, torch.Tensor) and not value.is_meta else None


def _sample(tensor: torch.Tensor) -> bytes:
    """Bytes of ``SAMPLES_PER_TENSOR`` evenly spaced elements of ``tensor`` rounded to bfloat16."""
    flat = tensor.detach().reshape(-1)
    count = min(SAMPLES_PER_TENSOR, flat.numel())
    index = (torch.arange(count, dtype=torch.long) * (flat.numel() - 1)) // max(count - 1, 1)
    index = index.to(flat.device)
    values = flat[index].to(torch.float32).to(torch.bfloat16).cpu()
    return values.view(torch.int16).numpy().tobytes()


def _parameters(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """``(qualified name, values)`` of ``module``'s parameters in a fixed order, offload-aware."""
    out = []
    for mod_name, mod in module.named_modules():
        for name, param in mod.named_parameters(recurse=False):
            full = f"{prefix}.{mod_name}.{name}" if mod_name else f"{prefix}.{name}"
            value = _offloaded_value(mod, name) if param.is_meta else param
            if value is None:
                raise ValueError(
                    f"cannot read parameter {full} (it is on the meta device and no offload hook holds it); "
                    "load the model's weights, or pass plan= or layers= to orthorank.patch"
                )
            out.append((full, value))
    return out


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit id of ``model``'s architecture and weights (see the module docstring).

    Raises:
        TypeError: not a supported decoder-only model (see :func:`orthorank.supported_model_types`).
        ValueError: parameters whose values cannot be read (meta tensors without an offload hook).
    """
    compat.arch_spec(model)
    base = compat.base_model(model)
    digest = hashlib.sha256()
    digest.update(json.dumps(_config_essentials(model.config), sort_keys=True).encode())
    parts: list[tuple[str, torch.Tensor]] = []
    parts += _parameters(base.embed_tokens, "embed")
    for i, layer in enumerate(compat.decoder_layers(model)):
        parts += _parameters(layer, f"layers.{i}")
    norm = getattr(base, "norm", None)
    if isinstance(norm, nn.Module):
        parts += _parameters(norm, "norm")
    for name, value in parts:
        digest.update(f"{name}:{tuple(value.shape)};".encode())
        digest.update(_sample(value))
    return digest.hexdigest()[:_FINGERPRINT_CHARS]
