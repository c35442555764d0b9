"""Validated options of a patch: how tokens are scored and what decode steps do."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: How a selection layer ranks tokens. ``orthogonal`` is OrthoRank (smallest |cos| to the sink
#: first); ``least_orthogonal`` is its reverse (an ablation); ``random`` is the control;
#: ``attention`` ranks by the attention the prompt's latest tokens pay each token in the layer
#: itself (query-aware, as LazyLLM / GemFilter rank); ``orthogonal+attention`` interleaves both
#: rankings.
SELECTORS: tuple[str, ...] = ("orthogonal", "least_orthogonal", "random", "attention", "orthogonal+attention")

#: The selectors that rank by the attention of the prompt's latest tokens (query-aware).
QUERY_AWARE_SELECTORS: tuple[str, ...] = ("attention", "orthogonal+attention")

#: What a selection layer does with a forward pass that continues a cache (a decode step, or a
#: chunk after the first): ``dense`` runs the original layer; ``bypass`` writes the new tokens'
#: keys/values and passes their hidden states through unchanged.
DECODE_POLICIES: tuple[str, ...] = ("dense", "bypass")

#: Default fraction of a row's tokens that a selection layer updates (the paper keeps 1/3).
DEFAULT_KEEP_RATIO: float = 1.0 / 3.0

#: Default number of each row's last prompt tokens that every selection layer updates first.
#: The latest tokens of a prompt are the ones generation reads most (the question of a chat turn,
#: the template tokens that open the answer). Chosen by measurement on the embedded
#: SmolLM2-135M-Instruct at sparsity 0.2 (``benchmarks/experiments/keep_recent.py``, docs/results.md): the
#: next-token perplexity right after a prefill falls from 17.3 (last token only) to 14.7 on
#: prompts of 16-96 tokens and from 17.5 to 14.4 on 97-511 tokens (dense 13.6 / 14.2), chat
#: answers agree longer with dense, and full-window perplexity moves by under 2.5%.
DEFAULT_KEEP_RECENT: int = 32

#: Default floor of the tokens a selection layer updates in a row (``keep_min``): at least this
#: many, so prompts under ``keep_min / keep_ratio`` tokens save less, and prompts of ``keep_min``
#: tokens or fewer run the dense layers. A short prompt costs little to prefill, and there a
#: third (or a twelfth) of the tokens is too few: on the embedded SmolLM2-135M-Instruct at
#: sparsity 0.2 the next token after a prefill (96 prefixes of 16-4096 tokens, four prompt seeds)
#: had perplexity x1.047 / 1.052 / 1.012 / 1.020 of dense's with a floor of 64 and x1.025 / 1.039 /
#: 1.002 / 1.017 with 128, pass keys and answers alike (in a layer keeping 1/3, prompts of 384
#: tokens and more are untouched; in one keeping 1/12, of 1536; benchmarks/RESEARCH.md,
#: 2026-11-30 "A floor of updated tokens" and "(late)").
DEFAULT_KEEP_MIN: int = 128

#: What a plan is chosen for. ``generation``: prompts that are prefilled and then generated from
#: (chat, documents, retrieval, loglikelihoods of short continuations): plans searched on the loss
#: of answers after a prefill, half of them recalled from the prompt, with the query-aware
#: ``attention`` selector. ``perplexity``: scoring every token of a text (rolling perplexity):
#: plans searched on whole-window loss with the paper's ``orthogonal`` selector.
OBJECTIVES: tuple[str, ...] = ("generation", "perplexity")

#: Default objective of ``orthorank.patch``.
DEFAULT_OBJECTIVE: str = "generation"

#: The selector, ``keep_recent`` and ``keep_min`` of each objective, used when ``patch`` is not
#: given them. ``perplexity`` keeps only the last token first: on short documents scored token by
#: token (lm-eval rolling perplexity, median 113 tokens) ``keep_recent=32`` cost 24% (README,
#: docs); it has no floor, as the paper's method.
OBJECTIVE_DEFAULTS: dict[str, tuple[str, int, int]] = {
    "generation": ("attention", DEFAULT_KEEP_RECENT, DEFAULT_KEEP_MIN),
    "perplexity": ("orthogonal", 1, 0),
}

#: Default overall sparsity of ``orthorank.patch(model)``.
DEFAULT_SPARSITY: float = 0.2


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_fraction(name: str, value: object, *, low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float in [0, 1] (ends excluded on request) or raise a ValueError/TypeError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    bad = (
        not math.isfinite(value)
        or value < 0.0
        or value > 1.0
        or (low_open and value == 0.0)
        or (high_open and value == 1.0)
    )
    if bad:
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value}")
    return value


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError listing them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value  # type: ignore[return-value]


def tokens_to_keep(keep_ratio: float, n_tokens: int, keep_min: int = 0) -> int:
    """Number of tokens a selection layer updates in a row of ``n_tokens`` real tokens.

    ``max(ceil(keep_ratio * n_tokens), keep_min)``, capped at ``n_tokens - 1`` because the sink
    (the row's first real token) is not selected; a row of at most ``keep_min`` tokens is updated
    whole, sink included (the dense layer). Rounding up means a layer never updates fewer tokens
    than the ratio asks for. A tiny tolerance absorbs float error (``0.1 * 30`` is
    ``3.0000000000000004``).
    """
    if n_tokens <= keep_min:
        return n_tokens
    if n_tokens <= 1:
        return 0
    return min(n_tokens - 1, max(keep_min, math.ceil(keep_ratio * n_tokens - 1e-9)))


def tokens_to_keep_per_row(keep_ratio: float, n_tokens: torch.Tensor, keep_min: int = 0) -> torch.Tensor:
    """:func:`tokens_to_keep` for every row at once: ``n_tokens`` ``[batch]`` -> ``[batch]``."""
    k = torch.ceil(keep_ratio * n_tokens - 1e-9).long().clamp_min(keep_min)
    k = torch.minimum(n_tokens - 1, k).clamp_min(0)
    return torch.where(n_tokens <= keep_min, n_tokens, k)


@dataclass(frozen=True)
class PatchOptions:
    """Options of a patch that do not depend on the layer plan.

    Attributes:
        decode: one of :data:`DECODE_POLICIES`.
        keep_recent: each row's last ``keep_recent`` real tokens are selected before any other
            (within the keep budget, the latest first): the last one's output is the next-token
            prediction that ``generate`` reads. ``0`` ranks every token by its score alone.
        seed: seed of the ``random`` selector (each layer draws from its own generator).
        keep_min: a selection layer updates at least this many tokens of a row, and a row of
            at most ``keep_min`` tokens whole (the dense layer). ``0``: the keep ratio alone.
            The class default is ``0`` (the bare mechanism, as calibration runs it);
            :func:`orthorank.patch` sets :data:`DEFAULT_KEEP_MIN` for the ``generation`` objective.
    """

    decode: str = "dense"
    keep_recent: int = DEFAULT_KEEP_RECENT
    seed: int = 0
    keep_min: int = 0

    def __post_init__(self) -> None:
        check_choice("decode", self.decode, DECODE_POLICIES)
        for name in ("keep_recent", "keep_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (tokens), got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
