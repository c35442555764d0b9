"""Per-layer time profile of a prefill: where a selection layer spends its time vs a dense one.

Forward hooks time every decoder layer and its sub-modules (input norm, q/k/v/o projections,
post-attention norm, MLP) during one ``model(ids, use_cache=True, logits_to_keep=1)``. In a
selection layer the remainder (layer total minus the timed sub-modules) is the attention itself
plus token scoring, gathers and the scatter back; in a dense layer it is the attention and RoPE.
Hooks add a little overhead of their own: compare layers with each other, not with speed rows.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from orthorank import compat
from orthorank.plan import Plan

from .speed import apply

logger = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm", "mlp")


@dataclass
class LayerProfile:
    """Median milliseconds of one layer's parts over the repeats; ``other_ms`` is the rest."""

    layer: int
    keep_ratio: float
    total_ms: float
    parts_ms: dict[str, float] = field(default_factory=dict)
    other_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _modules(layer: nn.Module) -> dict[str, nn.Module]:
    attn = layer.self_attn
    found = {"input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm,
             "mlp": layer.mlp}
    found.update({name: getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
    return found


@torch.inference_mode()
def layer_profile(model: nn.Module, ids: torch.Tensor, plan: Plan | None = None, *, repeats: int = 3) -> list[LayerProfile]:
    """Profile every decoder layer during prefills of ``ids`` ``[batch, context]`` under ``plan``.

    Returns one :class:`LayerProfile` per layer (medians over ``repeats`` after one warm-up).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    layers = compat.decoder_layers(model)
    samples: dict[tuple[int, str], list[float]] = defaultdict(list)
    current: dict[tuple[int, str], float] = defaultdict(float)
    starts: dict[int, float] = {}
    handles = []

    def timed(key: tuple[int, str]) -> tuple[Any, Any]:
        def pre(module: nn.Module, args: Any, kwargs: Any = None) -> None:
            starts[id(module)] = time.perf_counter()

        def post(module: nn.Module, args: Any, *rest: Any) -> None:
            current[key] += time.perf_counter() - starts.pop(id(module), time.perf_counter())

        return pre, post

    for i, layer in enumerate(layers):
        for name, module in [("total", layer), *_modules(layer).items()]:
            pre, post = timed((i, name))
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    apply(model, plan)
    try:
        for round_ in range(repeats + 1):
            current.clear()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            if round_:
                for key, value in current.items():
                    samples[key].append(value * 1e3)
    finally:
        for handle in handles:
            handle.remove()
        apply(model, None)
    ratios = (1.0,) * len(layers) if plan is None else plan.keep_ratios
    profiles = []
    for i in range(len(layers)):
        med = {name: statistics.median(samples[(i, name)]) if samples[(i, name)] else 0.0 for name in ("total", *PARTS)}
        parts = {name: med[name] for name in PARTS}
        profiles.append(LayerProfile(i, ratios[i], med["total"], parts, max(med["total"] - sum(parts.values()), 0.0)))
    return profiles


def profile_table(profiles: list[LayerProfile]) -> str:
    """Markdown table of the profiles (ms)."""
    head = ["layer", "keep", "total", *PARTS, "attention+select"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in profiles:
        cells = [str(p.layer), f"{p.keep_ratio:.3g}", f"{p.total_ms:.2f}"] + [f"{p.parts_ms[n]:.2f}" for n in PARTS]
        lines.append("| " + " | ".join(cells + [f"{p.other_ms:.2f}"]) + " |")
    return "\n".join(lines)
