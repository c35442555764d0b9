"""Speed of patched models against the dense model, measured in one process, methods interleaved.

Every measurement runs each method once per repeat, in turn (``dense, orthorank, sleb, dense,
...``), so machine noise hits all methods alike; the first ``warmup`` rounds are discarded and
the median of the rest is reported, with the ratio of medians ``dense / method`` as speed-up.

* ``prefill``: time to first token, ``model(ids, use_cache=True, logits_to_keep=1)`` as
  ``generate`` does it (a fresh cache per call).
* ``forward``: a full forward with all logits and no cache (the paper's throughput setting).
* ``decode``: time of one decode step (batch × 1 token) after a prefill of ``context`` tokens,
  under the patch's decode policy; tokens/s = batch / step time.
* peak memory: :func:`benchmarks.suite.memory.peak_bytes` of one prefill (tensors only).

A method is a ``Plan`` (installed with ``orthorank.patch(model, plan=...)``) or ``None`` for the
unpatched model.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from orthorank.patch import patch, unpatch
from orthorank.plan import Plan

from .memory import peak_bytes

logger = logging.getLogger(__name__)

KINDS = ("prefill", "forward", "decode")
Methods = Mapping[str, "Plan | None"]


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(values))


def speedup(reference: Sequence[float], other: Sequence[float]) -> float:
    """``median(reference) / median(other)``: above 1 when ``other`` is faster."""
    other_median = median(other)
    if other_median <= 0:
        raise ValueError("times must be positive")
    return median(reference) / other_median


def apply(model: nn.Module, plan: Plan | None, decode: str = "dense") -> nn.Module:
    """Install ``plan`` on ``model`` (``None``: leave it unpatched)."""
    if plan is None:
        return unpatch(model)
    return patch(model, plan=plan, decode=decode)


def _check_repeats(repeats: int, warmup: int) -> None:
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def time_interleaved(
    methods: Methods,
    setup: Callable[[str, "Plan | None"], Any],
    call: Callable[[Any], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds of ``call(setup(name, plan))`` per method, methods interleaved in every round.

    ``setup`` (untimed) installs the method and prepares the call's input; ``call`` is timed.
    Returns ``repeats`` times per method (warm-up rounds dropped).
    """
    _check_repeats(repeats, warmup)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(warmup + repeats):
        for name, plan in methods.items():
            prepared = setup(name, plan)
            start = time.perf_counter()
            call(prepared)
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


@torch.inference_mode()
def time_prefill(
    model: nn.Module, methods: Methods, ids: torch.Tensor, *, repeats: int = 5, warmup: int = 1, all_logits: bool = False
) -> dict[str, list[float]]:
    """Prefill times per method for ``ids`` ``[batch, context]``.

    ``all_logits=False``: ``use_cache=True, logits_to_keep=1`` (time to first token).
    ``all_logits=True``: full forward, every position's logits, no cache.
    """
    kwargs: dict[str, Any] = {"use_cache": False} if all_logits else {"use_cache": True, "logits_to_keep": 1}

    def setup(name: str, plan: Plan | None) -> None:
        apply(model, plan)

    def call(_: None) -> None:
        model(input_ids=ids, **kwargs)

    try:
        return time_interleaved(methods, setup, call, repeats=repeats, warmup=warmup)
    finally:
        unpatch(model)


def _cache_keyword(model: nn.Module) -> str:
    """The cache keyword of ``model.forward`` (``cache`` in recent releases, else ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def time_decode(
    model: nn.Module,
    methods: Methods,
    ids: torch.Tensor,
    *,
    steps: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    decode: str = "dense",
) -> dict[str, list[float]]:
    """Decode-step times per method: after an untimed prefill of ``ids`` ``[batch, context]``,
    ``steps`` single-token steps are timed; each repeat contributes the median step."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")

    keyword = _cache_keyword(model)

    def setup(name: str, plan: Plan | None) -> tuple[Any, torch.Tensor]:
        apply(model, plan, decode)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return _output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)

    def call(prepared: tuple[Any, torch.Tensor]) -> None:
        cache, token = prepared
        step_times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{keyword: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            step_times.append(time.perf_counter() - start)
        decode_medians.append(median(step_times))

    decode_medians: list[float] = []
    try:
        time_interleaved(methods, setup, call, repeats=repeats, warmup=warmup)
    finally:
        unpatch(model)
    # time_interleaved timed whole calls; report the per-step medians in the same order
    per_method: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for i, value in enumerate(decode_medians):
        if i >= warmup * len(names):
            per_method[names[i % len(names)]].append(value)
    return per_method


@torch.inference_mode()
def prefill_peak_memory(model: nn.Module, methods: Methods, ids: torch.Tensor) -> dict[str, int]:
    """Peak bytes of tensors allocated by one prefill (``logits_to_keep=1``) per method."""
    peaks = {}
    try:
        for name, plan in methods.items():
            apply(model, plan)
            peaks[name] = peak_bytes(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
    finally:
        unpatch(model)
    return peaks


@dataclass
class SpeedRow:
    """One method at one setting: medians, the ratio over ``reference`` and the FLOP ideal."""

    kind: str
    method: str
    sparsity: float
    dtype: str
    batch: int
    context: int
    threads: int
    repeats: int
    median_s: float
    speedup: float
    ideal_speedup: float
    reference: str = "dense"
    tokens_per_s: float | None = None
    peak_mb: float | None = None
    memory_ratio: float | None = None
    times_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
