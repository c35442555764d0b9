"""Calibration loss of a plan, reusing the hidden states before the first layer a candidate changes.

A search compares many plans that differ from a common parent plan in one layer ``i``. Under every
such candidate, layers ``0 .. i-1`` behave as in the parent, so their outputs are recorded once
(:meth:`LossRunner.record`) and each candidate runs only layers ``i .. L-1`` and the LM head.
The selective layers of :func:`orthorank.patch` are active, with its default options (e.g.
``keep_recent``): the loss is the real one.

With ``prompt=p`` the loss is the one generation sees: the first ``p`` tokens of each window are
the prompt (a prefill through the plan's selective layers) and the rest is the answer, scored
teacher-forced as decode steps under the ``dense`` decode policy run it (every layer updates it,
over the prompt's keys and values as the selective prefill wrote them). Only the answer's tokens
count. Full-window loss instead scores every token as a prefill token, including the two thirds a
selection layer skips, whose own predictions generation never reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import compat
from .install import forward_context, plan_installed
from .state import ForwardState
from .metrics import check_batch_size, check_ids, head_nll
from .plan import Plan

logger = logging.getLogger(__name__)


@dataclass
class RunCost:
    """Work done by a :class:`LossRunner`: decoder-layer calls and their full-forward equivalent."""

    layer_calls: int = 0
    head_calls: int = 0
    num_layers: int = 1
    rows: int = 1

    @property
    def forward_passes(self) -> float:
        """Layer calls over all windows, divided by ``num_layers * rows`` (one dense forward = 1)."""
        return self.layer_calls / (self.num_layers * self.rows)


@dataclass
class Recording:
    """Inputs of every decoder layer under one plan: ``inputs[chunk][layer]`` ``[batch, seq, hidden]``."""

    plan: Plan
    loss: float
    inputs: list[list[torch.Tensor]] = field(default_factory=list)


class LossRunner:
    """Mean next-token NLL of ``model`` under plans, on fixed windows ``ids`` ``[n, seq]``.

    ``prompt``: score only the tokens after the first ``prompt`` of each window, as generated
    tokens (see the module docstring); ``None`` scores all ``seq - 1`` predictions of a prefill.
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, *, batch_size: int = 1, prompt: int | None = None) -> None:
        compat.arch_spec(model)
        self.model = model
        self.ids = check_ids(ids)
        self.batch_size = check_batch_size(batch_size)
        seq = self.ids.shape[1]
        if prompt is not None and (isinstance(prompt, bool) or not isinstance(prompt, int) or not 1 <= prompt < seq):
            raise ValueError(f"prompt must be None or an int in [1, {seq - 1}] (tokens before the scored answer), got {prompt!r}")
        self.prompt = prompt
        self.base = compat.base_model(model)
        self.layers = compat.decoder_layers(model)
        self.num_layers = len(self.layers)
        self.model_type = model.config.model_type
        self.device = next(model.parameters()).device
        self.cost = RunCost(num_layers=self.num_layers, rows=self.ids.shape[0])
        self._chunks = [c.to(self.device) for c in self.ids.split(self.batch_size)]
        self._kwargs = [self._layer_kwargs(c) for c in self._chunks]
        self._tokens = self.ids.shape[0] * (seq - 1 if prompt is None else seq - prompt)

    @torch.inference_mode()
    def _layer_kwargs(self, chunk: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments the base model's forward hands each decoder layer for ``chunk``."""
        embeds = self.base.embed_tokens(chunk)
        position_ids = torch.arange(chunk.shape[1], device=self.device).unsqueeze(0)
        return {
            **compat.prefill_layer_kwargs(self.model.config, embeds, position_ids),
            "position_ids": position_ids,
            "position_embeddings": self.base.rotary_emb(embeds, position_ids=position_ids),
            "use_cache": False,
        }

    def _check(self, plan: Plan) -> None:
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be an orthorank.Plan, got {type(plan).__name__}")
        plan.check_model(self.num_layers, self.model_type)

    @torch.inference_mode()
    def _run(self, plan: Plan, start: int, parent: Recording | None, record: bool) -> Recording:
        self._check(plan)
        out = Recording(plan=plan, loss=0.0)
        total = 0.0
        with plan_installed(self.model, plan):
            context = forward_context(self.model)
            for c, chunk in enumerate(self._chunks):
                kwargs = self._kwargs[c]
                h = parent.inputs[c][start] if parent is not None else self.base.embed_tokens(chunk)
                state = ForwardState(chunk.shape[0], chunk.shape[1], "select", n_max=chunk.shape[1], prompt=self.prompt)
                saved = list(parent.inputs[c][:start]) if parent is not None else []
                with context.use(state):
                    for i in range(start, self.num_layers):
                        if record:
                            saved.append(h)
                        h = self.layers[i](h, **kwargs)
                        self.cost.layer_calls += chunk.shape[0]
                if record:
                    out.inputs.append(saved)
                first = 0 if self.prompt is None else self.prompt - 1
                total += float(head_nll(self.model, h[:, first:], chunk[:, first:]).sum())
                self.cost.head_calls += chunk.shape[0]
        out.loss = total / self._tokens
        return out

    def record(self, plan: Plan) -> Recording:
        """Loss of ``plan`` and the input of every layer under it (a full forward)."""
        return self._run(plan, 0, None, record=True)

    def loss(self, plan: Plan, parent: Recording | None = None) -> float:
        """Mean NLL of ``plan``; with ``parent``, layers before the first one whose keep ratio
        differs from ``parent.plan`` are not run again."""
        if parent is None:
            return self._run(plan, 0, None, record=False).loss
        self._check(parent.plan)
        changed = [i for i, (a, b) in enumerate(zip(plan.keep_ratios, parent.plan.keep_ratios)) if a != b]
        if plan.selector != parent.plan.selector:
            changed = [0]
        if not changed:
            return parent.loss
        return self._run(plan, changed[0], parent, record=False).loss
