"""What a patched model's forward tells its selection layers, and their counters.

The base model's pre-hook (:mod:`orthorank.install`) reads the inputs of each forward once into a
:class:`ForwardState` and hands it to every decoder layer; tools that call the layers directly set
it with a :class:`ForwardContext`. Each selection layer counts its passes in :class:`LayerStats`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardState:
    """What a patched model's forward tells its selection layers (computed once per forward).

    Attributes:
        batch, seq: shape of the hidden states this state belongs to.
        mode: ``select`` (a pass that starts the sequence: select tokens), ``continue`` (the pass
            continues a cache: decode policy), or ``dense`` (inputs the selector cannot read).
        real: ``[batch, seq]`` bool, True for real tokens; ``None`` when there is no padding.
        n_real: ``[batch]`` real tokens per row (``None`` without padding).
        n_max: the largest row's real-token count (host int).
        sink: ``[batch]`` column of each row's first real token (``None``: column 0).
        last: ``[batch]`` column of each row's last real token (``None``: column ``seq - 1``).
        prompt: rows without padding only: columns ``prompt ..`` are generated tokens, teacher-forced.
            The layer selects among columns ``0 .. prompt-1`` exactly as in a prefill of those
            ``prompt`` tokens and updates every later column, as decode steps under the ``dense``
            decode policy do (``None``: the whole pass is a prefill). Calibration losses that match
            generation (:class:`orthorank.runner.LossRunner` with ``prompt``) use it.
    """

    batch: int
    seq: int
    mode: str
    real: torch.Tensor | None = None
    n_real: torch.Tensor | None = None
    n_max: int = 0
    sink: torch.Tensor | None = None
    last: torch.Tensor | None = None
    prompt: int | None = None

    def matches(self, hidden_states: torch.Tensor) -> bool:
        return hidden_states.shape[0] == self.batch and hidden_states.shape[1] == self.seq

    def to(self, device: torch.device) -> "ForwardState":
        """This state with its tensors on ``device`` (itself when they are there already)."""
        if self.real is None or self.real.device == device:
            return self
        return ForwardState(
            self.batch, self.seq, self.mode, self.real.to(device), self.n_real.to(device), self.n_max,
            self.sink.to(device), self.last.to(device), self.prompt,
        )


#: Keyword argument under which the base model's pre-hook hands each decoder layer the state of
#: its forward (the base model passes its extra keyword arguments on to every decoder layer).
STATE_KWARG = "orthorank_state"


class ForwardContext:
    """The state for selection layers called outside a model forward (tools driving the layers).

    A model forward hands its state to the layers in the call itself (:data:`STATE_KWARG`). A tool
    that calls the decoder layers directly sets the state with :meth:`use`; it lives in a
    :class:`contextvars.ContextVar`, i.e. per thread and per asyncio task, never shared by
    concurrent callers.
    """

    def __init__(self) -> None:
        self._state: contextvars.ContextVar[ForwardState | None] = contextvars.ContextVar(
            f"orthorank_forward_state_{id(self):x}", default=None
        )

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle of a patched model
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    @property
    def state(self) -> ForwardState | None:
        """The state set in this thread / task (``None`` when none is)."""
        return self._state.get()

    @state.setter
    def state(self, value: ForwardState | None) -> None:
        self._state.set(value)

    @contextlib.contextmanager
    def use(self, state: ForwardState | None) -> Iterator[None]:
        """``with context.use(state):`` layers called in the block (this thread / task) see ``state``."""
        token = self._state.set(state)
        try:
            yield
        finally:
            self._state.reset(token)


@dataclass
class LayerStats:
    """Counters of one selection layer (from tensor shapes: no device sync).

    ``tokens`` counts token positions that entered selective passes, ``updated`` the slots that
    ran attention + MLP (for padded batches this includes discarded padding slots).

    The counters are diagnostics, never read by the computation, and updated without a lock (a
    lock here would cost every call and break ``torch.compile`` graphs): exact when forwards run
    one at a time; under concurrent forwards in several threads an increment may be lost.
    """

    selective_calls: int = 0
    other_calls: int = 0
    tokens: int = 0
    updated: int = 0
