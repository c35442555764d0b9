"""Perplexity of a causal language model on fixed-length token windows."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from . import compat
from .config import check_positive_int

logger = logging.getLogger(__name__)


def check_ids(ids: object, name: str = "ids") -> torch.Tensor:
    """Return ``ids`` if it is an integer tensor ``[n, seq]`` with ``seq >= 2``, else raise."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor [n_windows, seq], got {type(ids).__name__}")
    if ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"{name} must have shape [n_windows >= 1, seq >= 2], got {tuple(ids.shape)}")
    return ids.long()


def check_batch_size(batch_size: object) -> int:
    return check_positive_int("batch_size", batch_size)


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each row, in float32.

    Args:
        logits: ``[batch, seq, vocab]``; position ``t`` predicts ``ids[:, t + 1]``.
        ids: ``[batch, seq]``.

    Returns:
        ``[batch]`` sums over the ``seq - 1`` predicted tokens.
    """
    pred = logits[:, :-1].float()
    target = ids[:, 1:].to(pred.device)
    nll = nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(target.shape).sum(dim=1)


def head_nll(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[batch]`` summed NLL from the last hidden states ``[batch, seq, hidden]`` (before the final norm).

    Applies the model's final norm and output embedding row by row to keep the logits small.
    """
    base = compat.base_model(model)
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embedding (a causal LM head is needed)")
    out = []
    for row in range(hidden.shape[0]):
        logits = head(base.norm(hidden[row : row + 1]))
        out.append(token_nll(logits, ids[row : row + 1]))
    return torch.cat(out)


@torch.inference_mode()
def mean_nll(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 1, progress: bool = False) -> float:
    """Token-level mean next-token NLL over all windows of ``ids`` ``[n, seq]`` (each window alone).

    Every window is a separate sequence starting at position 0 (its first token is the sink); the
    mean is over the ``n * (seq - 1)`` predicted tokens. Works on patched and dense models alike.
    """
    ids = check_ids(ids)
    batch_size = check_batch_size(batch_size)
    device = next(model.parameters()).device
    total = 0.0
    starts = range(0, ids.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        chunk = ids[start : start + batch_size].to(device)
        logits = model(input_ids=chunk, use_cache=False).logits
        total += float(token_nll(logits, chunk).sum())
    return total / (ids.shape[0] * (ids.shape[1] - 1))


def perplexity(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 1, progress: bool = False) -> float:
    """``exp`` of :func:`mean_nll`: perplexity of ``model`` on windows ``ids`` ``[n, seq]``."""
    return math.exp(mean_nll(model, ids, batch_size=batch_size, progress=progress))
