"""Ordered top-k saturation seen through the logit lens (Lioubashevski et al., arXiv 2410.20210).

The logit lens reads a prediction out of every layer: the hidden state after layer ``l`` goes
through the model's final norm and unembedding. For each token position and each rank ``r``
(top-1, top-2, ...) the *saturation layer* is the first layer from which the rank-``r`` token
equals the final layer's rank-``r`` token in every later layer. "Ordered saturation" means the
top-1 settles first, then the top-2, and so on.

An exact early exit at top-1 saturation could stop a token after ``saturation + 1`` layers; the
ratio ``layers / mean(saturation + 1)`` bounds its speed-up (an oracle exit, ignoring the keys and
values that later tokens would still need from deeper layers).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..config import check_positive_int
from .inputs import (
    Batch, candidate_mask, decoder_layers, final_norm_and_head, iter_progress, make_batches, model_device, sink_index,
)

logger = logging.getLogger(__name__)


def saturation_layers(topk: torch.Tensor) -> torch.LongTensor:
    """Saturation layer of every token and rank.

    Args:
        topk: ``[layers, tokens, k]`` token ids ranked by each layer's lens (rank 0 = top-1).

    Returns:
        ``[tokens, k]``: for rank ``r``, the first layer ``l`` such that ``topk[l', :, r]`` equals
        ``topk[-1, :, r]`` for every ``l' >= l`` (always ``<= layers - 1``).
    """
    if topk.dim() != 3:
        raise ValueError(f"topk must be [layers, tokens, k], got shape {tuple(topk.shape)}")
    same = topk == topk[-1:]  # [layers, tokens, k]
    settled_tail = same.flip(0).long().cumprod(dim=0).sum(dim=0)  # trailing layers that agree
    return topk.shape[0] - settled_tail


def saturation_layers_from_logits(logits: torch.Tensor, k: int) -> torch.LongTensor:
    """:func:`saturation_layers` of ``logits`` ``[layers, tokens, vocab]`` for the top ``k`` ranks."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [layers, tokens, vocab], got shape {tuple(logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be an int in [1, {logits.shape[-1]}], got {k!r}")
    return saturation_layers(logits.topk(k, dim=-1).indices)


def ordered_fractions(sat: torch.Tensor) -> list[float]:
    """For each rank ``r``: fraction of tokens whose rank ``r`` saturates no later than rank ``r+1``."""
    return [float((sat[:, r] <= sat[:, r + 1]).double().mean()) for r in range(sat.shape[1] - 1)]


def rank_order_tau(sat: torch.Tensor) -> float:
    """Mean over tokens of Kendall's tau-a between rank and saturation layer, ``sat`` ``[tokens, k]``.

    +1: every token saturates its ranks strictly in order; 0: no order; -1: reversed.
    """
    k = sat.shape[1]
    if k < 2:
        raise ValueError("rank order needs k >= 2")
    i, j = torch.triu_indices(k, k, offset=1)
    signs = torch.sign(sat[:, j] - sat[:, i]).double()  # [tokens, pairs]
    return float(signs.mean())


def early_exit_speedup(top1_saturation: torch.Tensor, num_layers: int) -> float:
    """Best speed-up, in layer evaluations, of exiting each token right after its top-1 saturates."""
    return float(num_layers * top1_saturation.numel() / (top1_saturation.double() + 1).sum())


@torch.no_grad()
def lens_topk(hidden: torch.Tensor, norm: nn.Module, head: nn.Module, k: int) -> torch.LongTensor:
    """Top-``k`` token ids of the logit lens, ``[batch, seq, k]``, for ``hidden`` ``[batch, seq, hidden]``.

    Rows are projected one at a time so only ``[seq, vocab]`` logits exist at once.
    """
    return torch.stack([head(norm(row[None]))[0].topk(k, dim=-1).indices for row in hidden])


@dataclass
class SaturationProfile:
    """Saturation statistics; per-rank lists have ``top_k`` entries (rank 1 first)."""

    num_layers: int
    top_k: int
    n_rows: int
    n_tokens: int
    mean_layer: list[float]
    median_layer: list[float]
    histogram: list[list[int]]
    ordered_fraction: list[float]
    fully_ordered_fraction: float
    rank_tau: float
    early_exit_speedup: float
    final_lens_agreement: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def summarize_saturation(
    sat: torch.Tensor, num_layers: int, n_rows: int = 0, final_lens_agreement: float = 1.0
) -> SaturationProfile:
    """Build a :class:`SaturationProfile` from saturation layers ``[tokens, k]``."""
    if sat.dim() != 2 or sat.shape[0] == 0:
        raise ValueError("saturation layers must be a non-empty [tokens, k] tensor")
    k = sat.shape[1]
    steps = sat[:, 1:] >= sat[:, :-1]
    return SaturationProfile(
        num_layers=num_layers,
        top_k=k,
        n_rows=n_rows,
        n_tokens=sat.shape[0],
        mean_layer=sat.double().mean(dim=0).tolist(),
        median_layer=sat.double().median(dim=0).values.tolist(),
        histogram=[torch.bincount(sat[:, r], minlength=num_layers).tolist() for r in range(k)],
        ordered_fraction=ordered_fractions(sat),
        fully_ordered_fraction=float(steps.all(dim=1).double().mean()) if k > 1 else 1.0,
        rank_tau=rank_order_tau(sat) if k > 1 else 0.0,
        early_exit_speedup=early_exit_speedup(sat[:, 0], num_layers),
        final_lens_agreement=final_lens_agreement,
    )


@torch.no_grad()
def collect_saturation(
    model: nn.Module, batches: Sequence[Batch], top_k: int, progress: bool = False
) -> tuple[torch.LongTensor, float]:
    """Saturation layers ``[tokens, top_k]`` of all real non-sink tokens, and the fraction of them
    whose last-layer lens top-1 equals the model's own top-1 (a check of the lens; expected 1.0)."""
    check_positive_int("top_k", top_k)
    layers = decoder_layers(model)
    norm, head = final_norm_and_head(model)
    if top_k > head.weight.shape[0]:
        raise ValueError(f"top_k must be at most the vocabulary size {head.weight.shape[0]}")
    per_layer: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    for idx, layer in enumerate(layers):

        def hook(module: nn.Module, args: tuple, output: Any, idx: int = idx) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            per_layer[idx] = lens_topk(hidden, norm, head, top_k).cpu()

        handles.append(layer.register_forward_hook(hook))
    device = model_device(model)
    results, agree, total = [], 0, 0
    try:
        for batch in iter_progress(batches, "saturation", progress):
            logits = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                use_cache=False,
            ).logits
            cand = candidate_mask(batch.attention_mask, sink_index(batch.attention_mask))
            traj = torch.stack(per_layer)[:, cand]  # [layers, tokens, k]
            results.append(saturation_layers(traj))
            agree += int((traj[-1, :, 0] == logits.argmax(dim=-1).cpu()[cand]).sum())
            total += traj.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    if total == 0:
        raise ValueError("no token besides the sinks was analysed")
    return torch.cat(results), agree / total


def saturation_profile(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str] | torch.Tensor,
    *,
    max_tokens: int = 512,
    top_k: int = 5,
    batch_size: int = 4,
    progress: bool = False,
) -> SaturationProfile:
    """Measure ordered top-k saturation with the logit lens on ``model``.

    Args:
        model: a Llama-style causal LM (``model.model.layers``, ``model.model.norm``, ``lm_head``).
        tokenizer: its tokenizer (unused when ``texts`` is a token tensor).
        texts: texts (one row each, first ``max_tokens`` tokens) or a LongTensor ``[n, seq]``.
        top_k: number of ranks followed.
        batch_size: rows per forward pass.
        progress: show a tqdm bar.
    """
    batches = make_batches(texts, tokenizer, max_tokens=max_tokens, batch_size=batch_size)
    sat, agreement = collect_saturation(model, batches, top_k, progress)
    n_rows = sum(b.input_ids.shape[0] for b in batches)
    profile = summarize_saturation(sat, len(decoder_layers(model)), n_rows, agreement)
    profile.meta = {"model": getattr(getattr(model, "config", None), "_name_or_path", ""), "max_tokens": max_tokens}
    return profile
