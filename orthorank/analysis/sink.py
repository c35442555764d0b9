"""The sink phenomenon, layer by layer: how tokens line up with the sink after normalization.

For every decoder layer ``l`` a forward hook on ``layer.input_layernorm`` sees the residual stream
entering the layer ``h`` ``[batch, seq, hidden]`` and its normalized form ``norm(h)`` (the input of
q/k/v and of OrthoRank's score). From these it measures

* ``cos(norm(h_i), norm(h_sink))`` for every real, non-sink token (mean, mean of ``|cos|``, quantiles);
* how much the sink's state turns from layer ``l-1`` to ``l``: ``1 - cos(h_sink^l, h_sink^{l-1})``
  (a direction change; this equals the change of ``h / rms(h)``, free of each layer's own norm gain),
  next to the same quantity averaged over the other tokens;
* the overlap of the token sets OrthoRank would select (lowest ``|cos|``, ``keep_ratio`` of a row)
  in consecutive layers, next to the overlap two random selections of the same sizes would have.

The attention share of the sink comes from a separate eager pass (:mod:`.attention`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .inputs import Batch, decoder_layers, iter_progress, make_batches, run_decoder

logger = logging.getLogger(__name__)

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def sink_index(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Column of each row's first real token, ``[batch]``, from a ``[batch, seq]`` 0/1 mask."""
    real = attention_mask.bool()
    if not bool(real.any(dim=1).all()):
        raise ValueError("every row needs at least one real token")
    return real.int().argmax(dim=1)


def candidate_mask(attention_mask: torch.Tensor, sink: torch.Tensor) -> torch.BoolTensor:
    """``[batch, seq]`` True for real tokens other than the row's sink."""
    mask = attention_mask.bool().clone()
    mask[torch.arange(mask.shape[0], device=mask.device), sink] = False
    return mask


def cosine_to_sink(x: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Cosine of every token with its row's sink, ``[batch, seq]`` float32, for ``x`` ``[batch, seq, hidden]``."""
    x = x.float()
    s = x[torch.arange(x.shape[0], device=x.device), sink]
    return torch.nn.functional.cosine_similarity(x, s[:, None, :], dim=-1, eps=1e-12)


def keep_count(keep_ratio: float, n_tokens: torch.Tensor) -> torch.LongTensor:
    """Tokens kept in a row of ``n_tokens`` real tokens: ``ceil(keep_ratio * n)``, at most ``n - 1``."""
    if not isinstance(keep_ratio, (int, float)) or isinstance(keep_ratio, bool) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be a float in (0, 1], got {keep_ratio!r}")
    k = torch.ceil(keep_ratio * n_tokens.double() - 1e-9).long()
    return torch.minimum(k, n_tokens - 1).clamp_min(0)


def select_orthogonal(cos: torch.Tensor, candidates: torch.Tensor, keep_ratio: float) -> torch.BoolTensor:
    """OrthoRank's choice: per row, the ``keep_count`` candidates with the smallest ``|cos|``.

    Args:
        cos: ``[batch, seq]`` cosines to the sink.
        candidates: ``[batch, seq]`` bool, tokens that may be selected (real, not the sink).
        keep_ratio: fraction of the row's real tokens (sink included) to keep.

    Returns:
        ``[batch, seq]`` bool. Ties are broken by position (stable sort).
    """
    n_real = candidates.sum(dim=1) + 1
    k = keep_count(keep_ratio, n_real)
    score = cos.abs().masked_fill(~candidates, math.inf)
    order = score.argsort(dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cos.shape[1], device=cos.device).expand_as(order))
    return candidates & (rank < k[:, None])


def selection_overlap(previous: torch.Tensor, current: torch.Tensor) -> tuple[int, int]:
    """``(|previous ∩ current|, |current|)`` summed over rows, for ``[batch, seq]`` bool selections."""
    return int((previous & current).sum()), int(current.sum())


@dataclass
class SinkProfile:
    """Per-layer sink statistics; lists have one entry per decoder layer, NaN where undefined.

    Attributes:
        num_layers, keep_ratio: model depth and the keep ratio used for ``overlap``.
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

    def __init__(self, num_layers: int, keep_ratio: float) -> None:
        keep_count(keep_ratio, torch.tensor([2]))  # validates keep_ratio
        self.num_layers = num_layers
        self.keep_ratio = float(keep_ratio)
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
        self.candidates = torch.zeros(0, 0, dtype=torch.bool)
        self.prev_h: torch.Tensor | None = None
        self.prev_sel: torch.Tensor | None = None

    def start_batch(self, attention_mask: torch.Tensor) -> None:
        """Begin a batch with a ``[batch, seq]`` mask; layers must then be fed in order."""
        self.sink = sink_index(attention_mask)
        self.candidates = candidate_mask(attention_mask, self.sink)
        self.prev_h = None
        self.prev_sel = None
        self.n_rows += attention_mask.shape[0]
        self.n_tokens += int(self.candidates.sum())
        m = self.candidates.sum(dim=1).double()
        k = keep_count(self.keep_ratio, m.long() + 1).double()
        self.random_hits += float((k * k / m.clamp_min(1)).sum())
        self.random_total += float(k.sum())

    def add_layer(self, layer: int, hidden: torch.Tensor, normed: torch.Tensor) -> None:
        """Feed layer ``layer``'s input ``hidden`` and its normalized form ``normed``, both ``[batch, seq, hidden]``."""
        cand = self.candidates.to(hidden.device)
        sink = self.sink.to(hidden.device)
        cos = cosine_to_sink(normed, sink)
        self.cos_values[layer].append(cos[cand].cpu())
        sel = select_orthogonal(cos, cand, self.keep_ratio)
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
    model: nn.Module, batches: Sequence[Batch], keep_ratio: float, progress: bool = False
) -> SinkAccumulator:
    """Run ``model`` on ``batches`` with hooks on every ``input_layernorm``; hooks are removed afterwards."""
    layers = decoder_layers(model)
    acc = SinkAccumulator(len(layers), keep_ratio)
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
    tokenizer,
    texts: Sequence[str] | torch.Tensor,
    *,
    max_tokens: int = 512,
    keep_ratio: float = 1 / 3,
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
        batch_size: rows per forward pass.
        attention: also measure the sink's attention share (an extra pass with eager attention).
        progress: show tqdm bars.
    """
    from .attention import sink_attention_profile

    batches = make_batches(texts, tokenizer, max_tokens=max_tokens, batch_size=batch_size)
    acc = collect_sink_statistics(model, batches, keep_ratio, progress)
    share = sink_attention_profile(model, batches, progress=progress) if attention else None
    meta = {"model": getattr(getattr(model, "config", None), "_name_or_path", ""), "max_tokens": max_tokens}
    return acc.result(sink_attention=share, meta=meta)
