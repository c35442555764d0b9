"""Turning texts into padded batches, and finding the parts of a decoder model the analyses hook.

Rows are right-padded: every real token keeps its natural position (0, 1, 2, ...), the first
column is each row's sink, and a causal model never lets a real token see padding. The decoder
layers, the base model and its final norm are found as :func:`orthorank.patch` finds them
(:mod:`orthorank.compat`, also inside a PEFT model).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import compat
from ..config import check_positive_int

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """One padded batch.

    Attributes:
        input_ids: ``[batch, seq]`` token ids (padding columns hold the pad id).
        attention_mask: ``[batch, seq]`` long, 1 for real tokens, 0 for padding.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor


def encode_texts(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Tokenize each text (no special tokens) and keep its first ``max_tokens`` tokens.

    Texts that give fewer than two tokens (a sink and nothing else) are dropped.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    rows = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must contain strings, got {type(text).__name__}")
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_tokens]
        if len(ids) >= 2:
            rows.append(ids)
    if not rows:
        raise ValueError("no text gives at least two tokens")
    return rows


def make_batches(
    inputs: Sequence[str] | torch.Tensor,
    tokenizer=None,
    *,
    max_tokens: int = 512,
    batch_size: int = 4,
) -> list[Batch]:
    """Build right-padded batches from texts or from a token tensor.

    Args:
        inputs: a sequence of texts (one row each, truncated to ``max_tokens``) or a LongTensor
            ``[n, seq]`` of token rows used as they are (no padding).
        tokenizer: needed for texts; its ``pad_token_id`` (else 0) fills padding.
        max_tokens: longest row kept from a text.
        batch_size: rows per batch.

    Returns:
        Batches ``[<=batch_size, seq]``. Texts are grouped longest first, so that rows of similar
        length share a batch and little padding is computed; a token tensor keeps its order.
    """
    check_positive_int("batch_size", batch_size)
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 2 or inputs.dtype != torch.long or inputs.shape[1] < 2:
            raise ValueError("a token tensor must be a LongTensor [n, seq] with seq >= 2")
        return [
            Batch(chunk, torch.ones_like(chunk)) for chunk in inputs.split(batch_size, dim=0)
        ]
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to analyse texts")
    rows = sorted(encode_texts(tokenizer, inputs, max_tokens), key=len, reverse=True)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        batches.append(Batch(ids, mask))
    return batches


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Llama-style causal LM, in the order its forward runs them."""
    try:
        layers = compat.decoder_layers(model)
    except TypeError as err:
        raise TypeError(
            f"{type(model).__name__} is not a supported decoder model: expected model.model.layers "
            "(Llama, Mistral and similar architectures)"
        ) from err
    if not layers:
        raise TypeError(f"{type(model).__name__} has no decoder layers")
    return layers


def final_norm_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The final normalization (``model.model.norm``) and the unembedding (``lm_head``)."""
    decoder_layers(model)
    norm = getattr(compat.base_model(model), "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or head is None:
        raise TypeError(f"{type(model).__name__} has no model.model.norm / output embeddings for the logit lens")
    return norm, head


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


def iter_progress(items: Sequence[Any], desc: str, enabled: bool) -> Iterator[Any]:
    """``items`` wrapped in a tqdm bar when ``enabled``."""
    if not enabled:
        return iter(items)
    return iter(tqdm(items, desc=desc, unit="batch"))


def run_decoder(model: nn.Module, batch: Batch) -> None:
    """Run the decoder stack only (``model.model``): the hooks see every layer, no logits are computed."""
    device = model_device(model)
    compat.base_model(model)(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        use_cache=False,
    )


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device
