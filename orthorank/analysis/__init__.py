"""See inside a model: the sink phenomenon OrthoRank relies on, and ordered top-k saturation.

* :func:`sink_profile` — per layer: cosine of normalized tokens to the sink, the sink's state
  change, the attention share of the sink, overlap of OrthoRank selections between layers (the
  selection of :func:`orthorank.patch`: :func:`select_tokens`).
* :func:`saturation_profile` — logit-lens saturation layer of the top-1..top-k predictions and the
  best speed-up of an exact top-1 early exit.
* :func:`plot_sink_profile`, :func:`plot_saturation_profile` — the figures.
* ``python -m orthorank.analysis`` — all of it from the command line (figures + JSON summary).
"""

from .attention import sink_attention_profile, sink_attention_weights
from .plots import plot_saturation_profile, plot_sink_profile
from .saturation import (
    SaturationProfile,
    early_exit_speedup,
    ordered_fractions,
    rank_order_tau,
    saturation_layers,
    saturation_layers_from_logits,
    saturation_profile,
    summarize_saturation,
)
from .sink import SinkProfile, select_tokens, sink_profile

__all__ = [
    "SaturationProfile",
    "SinkProfile",
    "early_exit_speedup",
    "ordered_fractions",
    "plot_saturation_profile",
    "plot_sink_profile",
    "rank_order_tau",
    "saturation_layers",
    "saturation_layers_from_logits",
    "saturation_profile",
    "select_tokens",
    "sink_attention_profile",
    "sink_attention_weights",
    "sink_profile",
    "summarize_saturation",
]
