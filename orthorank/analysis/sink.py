"""The sink phenomenon, layer by layer: how tokens line up with the sink after normalization.

For every decoder layer ``l`` a forward hook on ``layer.input_layernorm`` sees the residual stream
entering the layer ``h`` ``[batch, seq, hidden]`` and its normalized form ``norm(h)`` (the input of
q/k/v and of OrthoRank's score). From these it measures

* ``cos(norm(h_i), norm(h_sink))`` for every real, non-sink token (mean, mean of ``|cos|``, quantiles);
* how much the sink's state turns from layer ``l-1`` to ``l``: ``1 - cos(h_sink^l, h_sink^{l-1})``
  (a direction change; this equals the change of ``h / rms(h)``, free of each layer's own norm gain),
  next to the same quantity averaged over the other tokens;
* the overlap of the token sets a selection layer would update in consecutive layers (the
  library's own choice: :mod:`orthorank.scoring`, ``keep_ratio`` of a row, the latest
  ``keep_recent`` tokens first), next to the overlap two random selections of the same sizes would
  have.

The cosine is :func:`orthorank.scoring.sink_cosine`, the quantity OrthoRank ranks tokens by (its
absolute value). The attention share of the sink comes from a separate eager pass
(:mod:`.attention`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import DEFAULT_KEEP_RECENT, tokens_to_keep_per_row
from ..scoring import prefer_recent, select_padded, sink_cosine, token_scores
from .attention import sink_attention_profile
from .inputs import Batch, candidate_mask, decoder_layers, iter_progress, make_batches, run_decoder, sink_index

logger = logging.getLogger(__name__)

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def check_keep_ratio(keep_ratio: object) -> float:
    """``keep_ratio`` as a float in (0, 1], else a ValueError."""
    if not isinstance(keep_ratio, (int, float)) or isinstance(keep_ratio, bool) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be a float in (0, 1], got {keep_ratio!r}")
    return float(keep_ratio)


def check_keep_recent(keep_recent: object) -> int:
    """``keep_recent`` as an int >= 0, else a ValueError."""
    if isinstance(keep_recent, bool) or not isinstance(keep_recent, int) or keep_recent < 0:
        raise ValueError(f"keep_recent must be an int >= 0 (tokens), got {keep_recent!r}")
    return keep_recent


def select_tokens(
    normed: torch.Tensor, attention_mask: torch.Tensor, keep_ratio: float, keep_recent: int = DEFAULT_KEEP_RECENT
) -> torch.BoolTensor:
    """The tokens a selection layer with input ``normed`` would update, as ``orthorank.patch`` selects them.

    Args:
        normed: the layer's normalized input ``[batch, seq, hidden]``.
        attention_mask: ``[batch, seq]`` 0/1, 1 for real tokens (padding on either side).
        keep_ratio: fraction of a row's real tokens (sink included) the layer updates.
        keep_recent: each row's latest tokens updated first (``0``: by score alone).

    Returns:
        ``[batch, seq]`` bool: per row, ``tokens_to_keep(keep_ratio, n_real)`` real tokens other
        than the sink, the latest ``keep_recent`` first, then the smallest ``|cos|`` to the sink
        (ties to the earlier position).
    """
    real = attention_mask.to(normed.device).bool()
    sink = sink_index(real)
    last = real.shape[1] - 1 - real.flip(1).int().argmax(dim=1)
    scores = token_scores(normed, sink, "orthogonal")
    prefer_recent(scores, last + 1, keep_recent, sink)
    n_real = real.sum(dim=1)
    keep = tokens_to_keep_per_row(keep_ratio, n_real)
    chosen = torch.zeros_like(real)
    k = int(keep.max())
    if k == 0:
        return chosen
    selection = select_padded(scores, real, sink, keep, k, n_real)
    return chosen.scatter_(1, selection.index, selection.valid)


def selection_overlap(previous: torch.Tensor, current: torch.Tensor) -> tuple[int, int]:
    """``(|previous ∩ current|, |current|)`` summed over rows, for ``[batch, seq]`` bool selections."""
    return int((previous & current).sum()), int(current.sum())


@dataclass
class SinkProfile:
    """Per-layer sink statistics; lists have one entry per decoder layer, NaN where undefined.

    Attributes:
        num_layers, keep_ratio, keep_recent: model depth and the selection used for ``overlap``.
        n_rows, n_tokens: rows analysed and their real non-sink tokens (the statistics' population).
        cos_mean, abs_cos_mean: mean of ``cos`` and of ``|cos|`` to the sink at each layer's input norm.
        cos_quantiles: ``{"0.1": [...], "0.25": [...], ...}`` quantiles of ``cos`` per layer.
        sink_change: mean over rows of ``1 - cos(h_sink^l, h_sink^(l-1))`` (NaN at layer 0).
        token_change: the same for the other tokens, mean over tokens (NaN at layer 0).
        overlap: ``|S_l ∩ S_(l-1)| / |S_l|`` over all rows, ``S_l`` the tokens selected at layer ``l``.
        random_overlap: the expected ``overlap`` of independent uniform selections of the same sizes.
        sink_attention: mean attention weight on the sink over heads and real non-sink queries.
        meta: free-form description (model name, settings).
    """

    num_layers: int
    keep_ratio: float
    keep_recent: int
    n_rows: int
    n_tokens: int
    cos_mean: list[float]
    abs_cos_mean: list[float]
    cos_quantiles: dict[str, list[float]]
    sink_change: list[float]
    token_change: list[float]
    overlap: list[float]
    random_overlap: float
    sink_attention: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes ``None``)."""
        return _nan_to_none(asdict(self))


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


class SinkAccumulator:
    """Collects the statistics of :class:`SinkProfile` layer by layer, batch by batch."""

    def __init__(self, num_layers: int, keep_ratio: float, keep_recent: int = DEFAULT_KEEP_RECENT) -> None:
        self.num_layers = num_layers
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.keep_recent = check_keep_recent(keep_recent)
        self.cos_values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.sink_change = torch.zeros(num_layers, dtype=torch.float64)
        self.token_change = torch.zeros(num_layers, dtype=torch.float64)
        self.overlap_hits = torch.zeros(num_layers, dtype=torch.float64)
        self.overlap_total = torch.zeros(num_layers, dtype=torch.float64)
        self.n_rows = 0
        self.n_tokens = 0
        self.random_hits = 0.0
        self.random_total = 0.0
        self.sink = torch.zeros(0, dtype=torch.long)
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.candidates = torch.zeros(0, 0, dtype=torch.bool)
        self.prev_h: torch.Tensor | None = None
        self.prev_sel: torch.Tensor | None = None

    def start_batch(self, attention_mask: torch.Tensor) -> None:
        """Begin a batch with a ``[batch, seq]`` mask; layers must then be fed in order."""
        self.mask = attention_mask
        self.sink = sink_index(attention_mask)
        self.candidates = candidate_mask(attention_mask, self.sink)
        self.prev_h = None
        self.prev_sel = None
        self.n_rows += attention_mask.shape[0]
        self.n_tokens += int(self.candidates.sum())
        m = self.candidates.sum(dim=1).double()
        k = tokens_to_keep_per_row(self.keep_ratio, m.long() + 1).double()
        self.random_hits += float((k * k / m.clamp_min(1)).sum())
        self.random_total += float(k.sum())

    def add_layer(self, layer: int, hidden: torch.Tensor, normed: torch.Tensor) -> None:
        """Feed layer ``layer``'s input ``hidden`` and its normalized form ``normed``, both ``[batch, seq, hidden]``."""
        cand = self.candidates.to(hidden.device)
        sink = self.sink.to(hidden.device)
        cos = sink_cosine(normed, sink)
        self.cos_values[layer].append(cos[cand].cpu())
        sel = select_tokens(normed, self.mask, self.keep_ratio, self.keep_recent)
        h = hidden.float()
        if self.prev_h is not None:
            turn = torch.nn.functional.cosine_similarity(h, self.prev_h, dim=-1, eps=1e-12)  # [batch, seq]
            rows = torch.arange(h.shape[0], device=h.device)
            self.sink_change[layer] += float((1.0 - turn[rows, sink]).sum())
            self.token_change[layer] += float((1.0 - turn[cand]).sum())
            hits, total = selection_overlap(self.prev_sel, sel)
            self.overlap_hits[layer] += hits
            self.overlap_total[layer] += total
        self.prev_h, self.prev_sel = h, sel

    def result(self, sink_attention: list[float] | None = None, meta: dict[str, Any] | None = None) -> SinkProfile:
        """The finished profile."""
        if self.n_tokens == 0:
            raise ValueError("no token besides the sinks was analysed")
        nan = float("nan")
        cos_mean, abs_mean, quants = [], [], {str(q): [] for q in QUANTILES}
        for values in self.cos_values:
            v = torch.cat(values)
            cos_mean.append(float(v.mean()))
            abs_mean.append(float(v.abs().mean()))
            qs = torch.quantile(v, torch.tensor(QUANTILES, dtype=v.dtype))
            for q, value in zip(QUANTILES, qs.tolist()):
                quants[str(q)].append(value)
        sink_change = [nan] + (self.sink_change[1:] / self.n_rows).tolist()
        token_change = [nan] + (self.token_change[1:] / self.n_tokens).tolist()
        overlap = [nan] + [
            float(h / t) if t > 0 else nan for h, t in zip(self.overlap_hits[1:], self.overlap_total[1:])
        ]
        return SinkProfile(
            num_layers=self.num_layers,
            keep_ratio=self.keep_ratio,
            keep_recent=self.keep_recent,
            n_rows=self.n_rows,
            n_tokens=self.n_tokens,
            cos_mean=cos_mean,
            abs_cos_mean=abs_mean,
            cos_quantiles=quants,
            sink_change=sink_change,
            token_change=token_change,
            overlap=overlap,
            random_overlap=self.random_hits / self.random_total if self.random_total else nan,
            sink_attention=sink_attention,
            meta=dict(meta or {}),
        )


@torch.no_grad()
def collect_sink_statistics(
    model: nn.Module, batches: Sequence[Batch], keep_ratio: float, progress: bool = False,
    keep_recent: int = DEFAULT_KEEP_RECENT,
) -> SinkAccumulator:
    """Run ``model`` on ``batches`` with hooks on every ``input_layernorm``; hooks are removed afterwards."""
    layers = decoder_layers(model)
    acc = SinkAccumulator(len(layers), keep_ratio, keep_recent)
    handles = []
    for idx, layer in enumerate(layers):
        norm = getattr(layer, "input_layernorm", None)
        if norm is None:
            raise TypeError(f"decoder layer {idx} has no input_layernorm")

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, idx: int = idx) -> None:
            acc.add_layer(idx, args[0], output)

        handles.append(norm.register_forward_hook(hook))
    try:
        for batch in iter_progress(batches, "sink profile", progress):
            acc.start_batch(batch.attention_mask)
            run_decoder(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return acc


def sink_profile(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | torch.Tensor,
    *,
    max_tokens: int = 512,
    keep_ratio: float = 1 / 3,
    keep_recent: int = DEFAULT_KEEP_RECENT,
    batch_size: int = 4,
    attention: bool = True,
    progress: bool = False,
) -> SinkProfile:
    """Measure the sink phenomenon on ``model``.

    Args:
        model: a Llama-style causal LM (``model.model.layers[i].input_layernorm``).
        tokenizer: its tokenizer (unused when ``texts`` is a token tensor).
        texts: texts (one row each, first ``max_tokens`` tokens) or a LongTensor ``[n, seq]``.
        max_tokens: longest row taken from a text.
        keep_ratio: fraction of a row's tokens a selection keeps, for the overlap statistic.
        keep_recent: each row's latest tokens a selection updates first (as ``orthorank.patch``'s
            ``keep_recent``; ``0``: by score alone), for the overlap statistic.
        batch_size: rows per forward pass.
        attention: also measure the sink's attention share (an extra pass with eager attention).
        progress: show tqdm bars.
    """
    batches = make_batches(texts, tokenizer, max_tokens=max_tokens, batch_size=batch_size)
    acc = collect_sink_statistics(model, batches, keep_ratio, progress, keep_recent)
    share = sink_attention_profile(model, batches, progress=progress) if attention else None
    meta = {"model": getattr(getattr(model, "config", None), "_name_or_path", ""), "max_tokens": max_tokens}
    return acc.result(sink_attention=share, meta=meta)
