"""Layer plans: which layers select tokens, how many they keep, and the plan's sparsity.

A plan gives every decoder layer a keep ratio: ``1.0`` runs the layer densely, a value in (0, 1)
makes it a selection layer that updates that fraction of each row's tokens, and ``0.0`` removes
the layer (the identity; used by layer-pruning baselines). Sparsity follows the OrthoRank paper:
the fraction of per-layer token updates skipped compared with the dense model,
``mean(1 - keep_ratio)`` over layers, so that it is comparable with layer pruning.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .config import DEFAULT_KEEP_RATIO, SELECTORS, check_choice, check_fraction
from .flops import flops_fraction

logger = logging.getLogger(__name__)

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """Per-layer keep ratios plus how tokens are ranked.

    Attributes:
        keep_ratios: one entry per decoder layer, each in [0, 1].
        selector: one of :data:`orthorank.config.SELECTORS`.
        model_type: ``config.model_type`` the plan was made for (checked when patching), or None.
        method: how the plan was made (``default``, ``layers``, ``calibrated``, ``sleb`` ...).
        meta: free-form JSON-serialisable details (calibration cost, data, ...).
    """

    keep_ratios: tuple[float, ...]
    selector: str = "orthogonal"
    model_type: str | None = None
    method: str = "layers"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    FORMAT: ClassVar[str] = "orthorank-plan"

    def __post_init__(self) -> None:
        if isinstance(self.keep_ratios, (str, bytes)) or not hasattr(self.keep_ratios, "__iter__"):
            raise TypeError("keep_ratios must be a sequence of floats, one per decoder layer")
        ratios = tuple(check_fraction(f"keep_ratios[{i}]", r) for i, r in enumerate(self.keep_ratios))
        if not ratios:
            raise ValueError("keep_ratios must have one entry per decoder layer; got an empty sequence")
        object.__setattr__(self, "keep_ratios", ratios)
        check_choice("selector", self.selector, SELECTORS)

    # --- views ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.keep_ratios)

    @property
    def selection_layers(self) -> list[int]:
        """Layers that run on a subset of tokens."""
        return [i for i, r in enumerate(self.keep_ratios) if 0.0 < r < 1.0]

    @property
    def removed_layers(self) -> list[int]:
        """Layers replaced by the identity (keep ratio 0)."""
        return [i for i, r in enumerate(self.keep_ratios) if r == 0.0]

    @property
    def sparsity(self) -> float:
        """Fraction of per-layer token updates skipped, ``mean(1 - keep_ratio)``."""
        return sum(1.0 - r for r in self.keep_ratios) / self.num_layers

    @property
    def is_dense(self) -> bool:
        return all(r == 1.0 for r in self.keep_ratios)

    @property
    def expected_ppl_increase(self) -> float | None:
        """Relative perplexity increase on the calibration text, ``exp(final_loss - dense_loss) - 1``.

        From ``meta["dense_loss"]`` and ``meta["final_loss"]`` (recorded by calibrated plans);
        ``None`` when the plan does not record them (e.g. plans made from ``layers``).
        """
        dense, final = self.meta.get("dense_loss"), self.meta.get("final_loss")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (dense, final)):
            return None
        return math.expm1(final - dense)

    def flops_fraction(self, config: Any, seq_len: int, *, include_head: bool = True) -> float:
        """Estimated share of a dense forward's FLOPs that this plan skips (see :func:`flops_fraction`)."""
        return flops_fraction(self, config, seq_len, include_head=include_head)

    def check_model(self, num_layers: int, model_type: str | None) -> None:
        """Raise a ValueError if this plan was made for a model of another shape or type."""
        if num_layers != self.num_layers:
            raise ValueError(
                f"this plan has {self.num_layers} layers but the model has {num_layers}; "
                "make a plan for this model (orthorank.calibrate or orthorank.default_plan)"
            )
        if self.model_type is not None and model_type is not None and self.model_type != model_type:
            raise ValueError(f"this plan was made for model_type={self.model_type!r}, the model is {model_type!r}")

    # --- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "version": PLAN_FORMAT_VERSION,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "selector": self.selector,
            "method": self.method,
            "keep_ratios": list(self.keep_ratios),
            "sparsity": round(self.sparsity, 6),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ValueError(f"not an orthorank plan (expected 'format': {cls.FORMAT!r})")
        if data.get("version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"unsupported plan version {data.get('version')!r}; this release reads {PLAN_FORMAT_VERSION}")
        ratios = data.get("keep_ratios")
        if not isinstance(ratios, list) or len(ratios) != data.get("num_layers"):
            raise ValueError("plan's keep_ratios must be a list with num_layers entries")
        return cls(
            keep_ratios=tuple(ratios),
            selector=data.get("selector", "orthogonal"),
            model_type=data.get("model_type"),
            method=data.get("method", "layers"),
            meta=dict(data.get("meta") or {}),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, model: Any = None) -> "Plan":
        """Read a plan saved by :meth:`save`; with ``model``, also check it fits that model.

        Raises:
            ValueError: not a plan (not JSON, or JSON that is not a valid plan; the message names
                the file), an unsupported version, or (with ``model``) a plan made for another
                number of layers or model type.
        """
        text = Path(path).read_bytes()
        try:
            plan = cls.from_dict(json.loads(text))
        except (ValueError, TypeError) as exc:  # json and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path} is not a valid orthorank plan file: {exc}") from exc
        if model is not None:
            config = getattr(model, "config", model)
            plan.check_model(int(config.num_hidden_layers), getattr(config, "model_type", None))
        return plan

    def __str__(self) -> str:
        sel = ", ".join(f"{i}:{self.keep_ratios[i]:.3g}" for i in self.selection_layers) or "none"
        removed = ", ".join(map(str, self.removed_layers)) or "none"
        flops = self.meta.get("flops_saved")
        flops_text = f"; est. FLOPs saved {100 * flops:.1f}% at {self.meta.get('flops_seq_len')} tokens" if flops else ""
        return (
            f"Plan({self.method}, {self.selector}, {self.num_layers} layers, sparsity {self.sparsity:.3f}; "
            f"selection layers (layer:keep) {sel}; removed layers {removed}{flops_text})"
        )


def layers_plan(
    num_layers: int,
    layers: list[int] | tuple[int, ...],
    keep_ratio: float = DEFAULT_KEEP_RATIO,
    *,
    selector: str = "orthogonal",
    model_type: str | None = None,
    method: str = "layers",
) -> Plan:
    """A plan with ``keep_ratio`` on the given layers and dense layers elsewhere."""
    keep_ratio = check_fraction("keep_ratio", keep_ratio)
    chosen = list(layers)
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers:
            raise ValueError(f"layers must be ints in [0, {num_layers - 1}]; got {i!r}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must not repeat; got {chosen}")
    ratios = [1.0] * num_layers
    for i in chosen:
        ratios[i] = keep_ratio
    return Plan(tuple(ratios), selector=selector, model_type=model_type, method=method)


def layers_for_sparsity(num_layers: int, sparsity: float, keep_ratio: float) -> int:
    """How many selection layers at ``keep_ratio`` give the closest sparsity to ``sparsity``."""
    if keep_ratio >= 1.0:
        raise ValueError("keep_ratio must be < 1 to reach a sparsity > 0")
    return round(sparsity * num_layers / (1.0 - keep_ratio))


def default_plan(
    num_layers: int,
    sparsity: float,
    keep_ratio: float = DEFAULT_KEEP_RATIO,
    *,
    selector: str = "orthogonal",
    model_type: str | None = None,
) -> Plan:
    """The data-free plan: a contiguous block of selection layers centred in the middle of the model.

    The number of selection layers is ``round(sparsity * L / (1 - keep_ratio))``; they are layers
    ``(L - n) // 2 .. (L - n) // 2 + n - 1``. Measured on SmolLM2-135M (wiki text, README): the
    middle of the network is where skipping token updates costs least, while a block just below
    the last layer (where tokens are closest to the sink) is catastrophic for perplexity, since a
    bypassed token then misses the layers that shape its own next-token prediction.
    """
    sparsity = check_fraction("sparsity", sparsity, high_open=True)
    keep_ratio = check_fraction("keep_ratio", keep_ratio, high_open=True)
    n = layers_for_sparsity(num_layers, sparsity, keep_ratio)
    available = max(num_layers - 2, 0)
    if n > available:
        best = available * (1.0 - keep_ratio) / num_layers
        raise ValueError(
            f"sparsity {sparsity} needs {n} selection layers at keep_ratio {keep_ratio:.3g}, but only "
            f"{available} of {num_layers} layers may select (not the first or last); use sparsity <= "
            f"{math.floor(best * 1000) / 1000} or a lower keep_ratio"
        )
    start = (num_layers - n) // 2
    layers = list(range(start, start + n))
    plan = layers_plan(num_layers, layers, keep_ratio, selector=selector, model_type=model_type, method="default")
    return plan
