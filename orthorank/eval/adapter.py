"""An lm-eval-harness ``HFLM`` whose log-likelihood batches carry their padding mask.

lm-eval's ``HFLM._loglikelihood_tokens`` right-pads the rows of a batch with token id 0 and calls
``model(input_ids)`` without an attention mask. A dense causal model is unaffected (no real token
attends to the trailing pads), but a patched model ranks every position of the row, pads included:
pads take selection slots and each row's result depends on what it was batched with.

:class:`MaskedHFLM` (``HFLM`` with :class:`PaddingMask`) changes the smallest thing: ``_model_call`` passes
``attention_mask`` for those batches, so each row is computed as if it were alone. The pad id 0 can
also be a real token, so a row's length is not read from trailing zeros alone: the requests of each
``_loglikelihood_tokens`` call are known, and a padded row's length is the one for which its prefix
is one of the requested rows (requests that differ only by trailing zeros, which would make that
ambiguous, are scored in separate calls). ``loglikelihood_rolling`` goes through the same method;
``generate_until`` already passes a (left-padding) mask to ``generate``.

lm-eval is an optional dependency: importing this module does not import it; :func:`masked_hflm`
(or reading ``MaskedHFLM`` from this module or from :mod:`orthorank.eval`) does, once.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

PAD_ID = 0  # the value lm_eval.models.utils_hf.pad_and_concat pads with

Request = tuple[Any, list[int], list[int]]  # (cache key, context tokens, continuation tokens)


def _strip_pads(row: tuple[int, ...]) -> tuple[int, ...]:
    end = len(row)
    while end > 0 and row[end - 1] == PAD_ID:
        end -= 1
    return row[:end]


def unambiguous_groups(rows: list[tuple[int, ...]]) -> list[list[int]]:
    """Split row indices into groups in which no row is another row followed by pad ids.

    Rows equal after removing trailing pad ids but of different lengths go to different groups
    (the shortest length first), so within a group a padded row has exactly one reading.
    """
    lengths_by_key: dict[tuple[int, ...], list[int]] = {}
    for row in rows:
        lengths = lengths_by_key.setdefault(_strip_pads(row), [])
        if len(row) not in lengths:
            lengths.append(len(row))
    groups: list[list[int]] = []
    for index, row in enumerate(rows):
        rank = sorted(lengths_by_key[_strip_pads(row)]).index(len(row))
        while len(groups) <= rank:
            groups.append([])
        groups[rank].append(index)
    return groups


class PaddingMask:
    """Mixed into lm-eval's ``HFLM`` (:func:`masked_hflm`): the model gets the padding mask of
    every right-padded log-likelihood batch. Batches without padding and encoder-decoder models
    are passed through to ``HFLM`` unchanged."""

    backend: str
    max_length: int
    device: torch.device
    mixed_precision_dtype: torch.dtype | None
    model: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rows: frozenset[tuple[int, ...]] | None = None
        self._row_lens: frozenset[int] = frozenset()

    def _input_row(self, request: Request) -> tuple[int, ...]:
        """The token row HFLM builds for a causal request (left-truncated, last token dropped)."""
        _, context, continuation = request
        return tuple((context + continuation)[-(self.max_length + 1) :][:-1])

    def _loglikelihood_tokens(  # type: ignore[override]
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal" or not requests:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        rows = [self._input_row(r) for r in requests]
        groups = unambiguous_groups(rows)
        if len(groups) > 1:
            logger.info("orthorank.eval: rows that differ only by trailing pad ids; scoring in %d passes", len(groups))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for group in groups:
            self._rows = frozenset(rows[i] for i in group)
            self._row_lens = frozenset(map(len, self._rows))
            try:
                scored = super()._loglikelihood_tokens(
                    [requests[i] for i in group], disable_tqdm=disable_tqdm, override_bs=override_bs
                )
            finally:
                self._rows = None
            for i, result in zip(group, scored, strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def row_lengths(self, inps: torch.Tensor) -> torch.Tensor:
        """Real length of each right-padded row of ``inps`` ``[batch, seq]`` -> ``[batch]``.

        Raises:
            RuntimeError: a row is none of the requested rows (lm-eval built it another way).
        """
        known = self._rows or frozenset()
        lengths = []
        for row in map(tuple, inps.tolist()):
            stripped = len(_strip_pads(row))
            found = [n for n in self._row_lens if stripped <= n <= len(row) and row[:n] in known]
            if len(found) != 1:
                raise RuntimeError(
                    "orthorank.eval: cannot tell the real length of a padded lm-eval batch row "
                    f"({len(found)} readings); this lm-eval release builds batches differently"
                )
            lengths.append(found[0])
        return torch.tensor(lengths, device=inps.device)

    def _model_call(
        self,
        inps: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``; right-padded log-likelihood batches get their mask."""
        if self._rows is None or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        lengths = self.row_lengths(inps)
        if bool((lengths == inps.shape[1]).all()):
            return super()._model_call(inps)
        mask = (torch.arange(inps.shape[1], device=inps.device) < lengths[:, None]).long()
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(input_ids=inps, attention_mask=mask).logits


@functools.cache
def masked_hflm() -> type:
    """``MaskedHFLM``: lm-eval's ``HFLM`` with :class:`PaddingMask` (imports lm-eval).

    Construct it as ``HFLM``: ``MaskedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)``
    for an already-loaded (patched or dense) model, or with a model name.
    """
    from lm_eval.models.huggingface import HFLM  # optional dependency

    return type("MaskedHFLM", (PaddingMask, HFLM), {"__module__": __name__, "__doc__": masked_hflm.__doc__})


def __getattr__(name: str) -> Any:
    if name == "MaskedHFLM":
        return masked_hflm()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
