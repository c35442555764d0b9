"""Everything that depends on the installed transformers release or on an architecture's layout.

The rest of the package talks to transformers only through this module: which architectures are
supported, where the decoder layers live, how a layer's forward is replaced (also under
accelerate's hooks), how keys/values are written to a cache and which attention kernel runs.
"""

from __future__ import annotations

import inspect
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
import transformers
from packaging.version import Version

logger = logging.getLogger(__name__)

TRANSFORMERS_VERSION: str = transformers.__version__

#: The transformers releases orthorank is tested with (the oldest and the newest in CI).
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
OLDEST_TESTED = "5.0.0"


def check_transformers_version(version: str) -> None:
    """Refuse releases before 5.0.0 (untested: CI covers the oldest and the newest 5.x release);
    warn on a major release newer than the tested range."""
    if Version(version) < Version("5.0.0"):
        raise ImportError(
            f"orthorank needs transformers{SUPPORTED_TRANSFORMERS} (CI tests {OLDEST_TESTED} and the newest 5.x), "
            f"found {version}. Upgrade with: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )
    if Version(version).major >= 6:
        warnings.warn(
            f"orthorank is tested with transformers{SUPPORTED_TRANSFORMERS}, found {version}; "
            "patched models may fail or differ from the dense model",
            stacklevel=3,
        )


#: Features that need a newer release than the oldest supported one: feature -> (release, why).
NEEDS_RELEASE: dict[str, tuple[str, str]] = {
    "building the embedded model from its GGUF file": (
        "5.6.0",
        "older releases convert the GGUF tokenizer into a CodeLlama tokenizer that prepends a BOS token "
        "and adds 5 tokens SmolLM2 does not have (the weights are identical)",
    ),
}


def require_release(feature: str, version: str | None = None) -> None:
    """Refuse ``feature`` (a key of :data:`NEEDS_RELEASE`) on an older transformers release, with
    an ``ImportError`` naming the release it needs; ``version`` defaults to the installed one."""
    minimum, why = NEEDS_RELEASE[feature]
    version = TRANSFORMERS_VERSION if version is None else version
    if Version(version) < Version(minimum):
        raise ImportError(
            f"orthorank: {feature} needs transformers>={minimum}, found {version} ({why}). "
            f"Upgrade with: pip install 'transformers>={minimum},<6'"
        )


def _cache_update_style(version: str) -> str:
    """How the attention of this release writes K/V: ``cache.update(k, v, layer_idx, ...)`` with
    ``cache_kwargs`` (``{"sin", "cos", "cache_position"}``, up to 5.3), with nothing more (5.4 to
    5.23, caches count positions themselves), or with ``kwargs=`` the layer's kwargs (5.24 on)."""
    release = Version(version).release
    if release < (5, 4):
        return "cache_kwargs"
    if release < (5, 24):
        return "plain"
    return "layer_kwargs"


check_transformers_version(TRANSFORMERS_VERSION)
CACHE_UPDATE: str = _cache_update_style(TRANSFORMERS_VERSION)


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture's decoder layer is laid out.

    Attributes:
        qk_norm: the attention normalises q and k per head (``q_norm``/``k_norm``) before RoPE.
    """

    qk_norm: bool = False


#: Supported ``config.model_type`` values. An architecture with the Llama decoder shape
#: (input norm -> attention with q/k/v/o projections and RoPE -> residual -> post-attention norm
#: -> MLP -> residual) is added with one line here.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "mistral": ArchSpec(),
    "qwen2": ArchSpec(),  # q/k/v projections with bias: nn.Linear applies it
    "qwen3": ArchSpec(qk_norm=True),
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(ARCHITECTURES))


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a wrapper that exposes it by ``get_base_model()``: PEFT's
    ``PeftModel`` (LoRA: the adapted ``...ForCausalLM``, whose projections are LoRA modules).
    Duck-typed, so peft is never imported; any other model is returned as it is."""
    for _ in range(4):  # a wrapper of a wrapper at most a few deep
        get = getattr(type(model), "get_base_model", None)
        if not callable(get):
            return model
        inner = model.get_base_model()
        if inner is model or not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def base_model(model: nn.Module) -> nn.Module:
    """The module that owns ``layers`` (``LlamaModel`` inside ``LlamaForCausalLM``, also inside a
    PEFT ``PeftModel``)."""
    model = unwrap(model)
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    raise TypeError(f"{type(model).__name__} has no decoder layers at .layers or .model.layers")


def arch_spec(model: nn.Module) -> ArchSpec:
    """Return the spec of ``model``'s architecture or refuse it by name."""
    config = getattr(unwrap(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise TypeError(
            f"orthorank does not support {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers the model's forward loop runs, in order."""
    base = base_model(model)
    return list(base.layers[: base.config.num_hidden_layers])


# --- replacing a layer's forward on one instance ---------------------------------------------

_ORIGINAL = "_orthorank_original_forward"


def _forward_slot(layer: nn.Module) -> str:
    # accelerate's hooks replace ``forward`` by a wrapper that calls ``_old_forward``; replacing
    # ``_old_forward`` keeps its device moves / offload loading around our forward.
    return "_old_forward" if hasattr(layer, "_hf_hook") and hasattr(layer, "_old_forward") else "forward"


def install_forward(layer: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``forward`` this instance's forward and return the one it replaces.

    The class, the parameters and the state_dict stay untouched. On a layer under accelerate's
    hooks (``dispatch_model``, ``cpu_offload``, ``device_map=...``) the hook's wrapper stays outer:
    inputs are moved and offloaded weights loaded before ``forward`` runs.
    """
    slot = _forward_slot(layer)
    had_own = slot in layer.__dict__
    previous = getattr(layer, slot)
    setattr(layer, _ORIGINAL, (slot, had_own, previous, forward))
    setattr(layer, slot, forward)
    return previous


def restore_forward(layer: nn.Module) -> None:
    """Undo :func:`install_forward`, also when accelerate hooks were added or removed since.

    ``add_hook_to_module`` moves the instance's forward to ``_old_forward``;
    ``remove_hook_from_module`` moves ``_old_forward`` back to ``forward``. The installed forward is
    looked for in both slots and replaced by the forward it had replaced.
    """
    slot, had_own, previous, installed = layer.__dict__.pop(_ORIGINAL)
    where = next((s for s in ("forward", "_old_forward") if layer.__dict__.get(s) is installed), None)
    if where is None:
        logger.warning("orthorank: the forward of %s was replaced after patching; left as it is", type(layer).__name__)
        return
    class_forward = getattr(previous, "__func__", None) is type(layer).forward and getattr(previous, "__self__", None) is layer
    if where == slot and not had_own:
        del layer.__dict__[slot]
    elif where == "forward" and class_forward:
        del layer.__dict__["forward"]
    else:
        setattr(layer, where, previous)


# --- transformers' own hooks ------------------------------------------------------------------

_CAPTURE_MODULE = "transformers.utils.output_capturing"


def is_idle_output_hook(hook: Callable[..., Any]) -> bool:
    """Whether ``hook`` is transformers' output-capturing forward hook while no capture runs.

    transformers registers it on attention modules (and decoder layers) at the first call with
    ``output_attentions``/``output_hidden_states`` and leaves it there; outside such a call it
    returns at once, so a selection layer need not run its attention module's hooks for it.
    """
    if getattr(hook, "__module__", None) != _CAPTURE_MODULE or "output_capturing_hook" not in getattr(
        hook, "__qualname__", ""
    ):
        return False
    collector = getattr(sys.modules.get(_CAPTURE_MODULE), "_active_collector", None)
    return collector is not None and not collector.get()  # None, or {} in a call that captures nothing


# --- per-forward inputs of the base model ----------------------------------------------------

CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values")


def find_cache(kwargs: dict[str, Any]) -> Any:
    """The cache object of a base-model or layer call (its keyword changed across releases)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def model_cache_kwarg(model: nn.Module) -> str:
    """Name of the cache keyword of ``model``'s forward (``cache`` from 5.24, ``past_key_values`` before)."""
    params = inspect.signature(type(model).forward).parameters
    return next((name for name in CACHE_KWARGS if name in params), CACHE_KWARGS[-1])


def mask_tensor(mask: Any) -> Any:
    """The attention mask a base model was called with, as one tensor when it is a mapping.

    ``generate`` with a static cache hands models with sliding-window layers (Qwen2/Qwen3 with
    ``layer_types``) a dict of prebuilt 4-D masks per layer type; the full-attention one tells
    which tokens are real. Anything else is returned as it is.
    """
    if isinstance(mask, dict):
        for name in ("full_attention", *mask):
            if isinstance(mask.get(name), torch.Tensor):
                return mask[name]
        return None
    return mask


def mask_query_length(query: int | torch.Tensor) -> int:
    """The number of new queries from what ``CacheLayerMixin.get_mask_sizes`` receives: the
    ``cache_position`` tensor (up to 5.3) or the query length (5.4 on)."""
    return int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)


def past_length(cache: Any) -> int:
    """Tokens already in ``cache`` (0 for ``None``); one host sync for caches that keep a tensor."""
    if cache is None:
        return 0
    n = cache.get_seq_length()
    return int(n)


def prefill_layer_kwargs(config: Any, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> dict[str, Any]:
    """The mask (and, up to 5.3, ``cache_position``) a base model hands its decoder layers for a
    pass over ``inputs_embeds`` ``[batch, seq, hidden]`` that starts the sequence, without padding
    or cache. The mask function's keywords changed across releases (``input_embeds`` in 5.0/5.1,
    ``inputs_embeds`` later; ``cache_position`` + ``past_key_values`` up to 5.3, ``cache`` later).
    """
    from transformers import masking_utils

    if getattr(config, "sliding_window", None) is not None:
        function = masking_utils.create_sliding_window_causal_mask
    else:
        function = masking_utils.create_causal_mask
    params = inspect.signature(function).parameters
    embeds_name = "inputs_embeds" if "inputs_embeds" in params else "input_embeds"
    cache_name = "cache" if "cache" in params else "past_key_values"
    kwargs: dict[str, Any] = {
        "config": config, embeds_name: inputs_embeds, "attention_mask": None, "position_ids": position_ids,
        cache_name: None,
    }
    extra: dict[str, Any] = {}
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        if CACHE_UPDATE == "cache_kwargs":  # the layers read it too (5.4 on: only the mask function)
            extra["cache_position"] = kwargs["cache_position"]
    return {"attention_mask": function(**kwargs), **extra}


def gguf_dequantize_kwargs() -> dict[str, Any]:
    """``from_pretrained`` keywords that load a GGUF file as dequantized float weights.

    Releases with ``GgufConfig`` (5.17 on) need ``quantization_config=GgufConfig(dequantize=True)``;
    older ones always dequantize GGUF files on load and have no such keyword.
    """
    gguf_config = getattr(transformers, "GgufConfig", None)
    return {} if gguf_config is None else {"quantization_config": gguf_config(dequantize=True)}


# --- attention internals ---------------------------------------------------------------------


def attention_function(attn: nn.Module) -> tuple[Callable[..., Any], bool]:
    """The kernel that runs a subset of queries against all keys with an explicit mask.

    Returns ``(function, wants_float_mask)``. ``eager`` uses the model's own eager function (an
    additive float mask); every other backend uses transformers' sdpa function with a boolean
    mask, because flash-attention style kernels cannot express "these queries, those positions".
    """
    impl = getattr(attn.config, "_attn_implementation", None) or "eager"
    if impl == "eager":
        module = sys.modules[type(attn).__module__]
        return module.eager_attention_forward, True
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward, False


def sum_over_head_shards(attn: nn.Module, local_heads: int, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks of a tensor-parallel model whose ranks each run
    ``local_heads`` of the attention's heads (an all-reduce); ``t`` itself when one process runs
    them all. Scores computed from every head then agree on every rank."""
    if local_heads >= int(attn.config.num_attention_heads):
        return t
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def sliding_window(attn: nn.Module) -> int | None:
    """The sliding window of this attention module, or ``None`` for full causal attention."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    config = attn.config
    if getattr(config, "model_type", None) == "mistral":
        return getattr(config, "sliding_window", None)
    return None


def update_cache(
    cache: Any, key: torch.Tensor, value: torch.Tensor, layer_idx: int, layer_kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``key``/``value`` ``[batch, kv_heads, seq, head_dim]`` through the model's own cache,
    with the arguments the installed release's attention passes (see :data:`CACHE_UPDATE`).

    Returns the full keys/values of the layer (past and new), as the model's attention sees them.
    """
    if CACHE_UPDATE == "cache_kwargs":
        cos, sin = layer_kwargs.get("position_embeddings") or (None, None)
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": layer_kwargs.get("cache_position")}
        return cache.update(key, value, layer_idx, cache_kwargs)
    if CACHE_UPDATE == "layer_kwargs":
        named = ("position_embeddings", "attention_mask", *CACHE_KWARGS)  # the attention's own parameters
        return cache.update(key, value, layer_idx, kwargs={k: v for k, v in layer_kwargs.items() if k not in named})
    return cache.update(key, value, layer_idx)
