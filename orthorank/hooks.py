"""Hooks other libraries register on a selection layer's attention module, run as in a dense layer.

A selection layer computes q/k/v/o itself and never calls ``self_attn.forward``, so hooks that
libraries place on the attention module (kvpress presses compress the cache in a forward hook;
BudgetCache's ``milestone`` arms itself in a forward pre-hook; steering and probing hooks) would
silently not run. When the attention module has hooks, the selection layer calls the module
itself (``module(hidden_states=x, **layer_kwargs)``, the call a dense layer makes), so that torch
runs every hook as it always does: global and module pre-hooks (their changes to the inputs are
used), forward hooks with or without kwargs, ``always_call``, backward hooks. Only the module's
forward is replaced for that one call, by the selective computation: :class:`AttentionRoute` is
the module's instance forward while patched, the module's own forward except inside such a call
(a thread-local slot, so concurrent forwards of other threads are not affected).

What a hook sees in a selective pass:
    kwargs: the dense layer's (``hidden_states`` = the normalised input of ALL tokens
        ``[batch, seq, hidden]``, ``position_embeddings``, ``attention_mask``, the cache, ...).
    output: ``(attn_output, None)``; ``attn_output`` ``[batch, seq, hidden]`` holds the attention
        output (after ``o_proj``) at the selected tokens and zeros at the bypassed ones (the layer
        leaves them unchanged). Attention weights are not computed for every query: ``None``.
    A hook's replacement output is used at the selected tokens; at bypassed tokens it is dropped.

Without hooks none of this runs: one check of the module's hook dicts per layer call
(transformers' own output-capturing hooks, left on the modules after a call with
``output_attentions``/``output_hidden_states``, count only while they capture).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from . import compat
from .attend import gather_rows, scatter_rows
from .scoring import Selection

#: ``run(x, kwargs)`` of a selection layer: writes K/V, selects, and returns the selection and the
#: selected tokens' attention output ``[batch, k, hidden]`` (``(None, None)``: nothing selected).
SelectiveRun = Callable[[torch.Tensor, dict[str, Any]], tuple[Selection | None, torch.Tensor | None]]

logger = logging.getLogger(__name__)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs any hook that does something (the test torch's
    ``Module._call_impl`` makes, less transformers' output-capturing hooks while idle)."""
    if (
        module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    ):
        return True
    forward_hooks = module._forward_hooks
    return bool(forward_hooks) and not all(compat.is_idle_output_hook(h) for h in forward_hooks.values())


def hook_owners(module: nn.Module) -> list[str]:
    """Who registered the forward (pre-)hooks of ``module``: the class of a bound method's owner
    (e.g. ``kvpress.presses.knorm_press.KnormPress``) or the function's qualified name."""
    names = []
    for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        owner = getattr(hook, "__self__", None)
        where = type(owner) if owner is not None else hook
        names.append(f"{getattr(where, '__module__', '?')}.{getattr(where, '__qualname__', repr(where))}")
    return names


#: Per-sequence state libraries keep on an attention module and reset in the attention function
#: when a prefill starts (queries = keys), which a selection layer's prefill does not call:
#: kvpress's head-wise presses (AdaKV, ...) mask ``masked_key_indices`` in decode steps.
PREFILL_RESET: tuple[str, ...] = ("masked_key_indices",)


def reset_prefill_state(attn: nn.Module) -> None:
    """Clear :data:`PREFILL_RESET` on ``attn`` as the attention function of a dense prefill does."""
    for name in PREFILL_RESET:
        if attn.__dict__.get(name) is not None:
            setattr(attn, name, None)


class AttentionRoute:
    """Instance forward of a selection layer's attention module (installed by :func:`orthorank.patch`).

    Outside :meth:`call` it is the module's own forward (dense layers, decode steps, direct calls).
    """

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self._local = threading.local()
        self._warned_weights = False
        self.original: Callable[..., Any] = compat.install_forward(attn, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        run = getattr(self._local, "run", None)
        if run is None:
            return self.original(*args, **kwargs)
        self._local.run = None
        return run(*args, **kwargs)

    def call(self, run: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """``attn(**kwargs)`` with every hook of the module, ``run`` standing in for its forward."""
        self._local.run = run
        try:
            return self.attn(**kwargs)
        finally:
            self._local.run = None

    def run(
        self, x: torch.Tensor, kwargs: dict[str, Any], run: SelectiveRun
    ) -> tuple[Selection | None, torch.Tensor | None]:
        """``run`` called as the attention module's forward on ``x`` ``[batch, seq, hidden]`` (the
        normalised input) and the layer's ``kwargs``, so that the module's hooks run as in a dense
        layer. Returns the selection and the attention output at the selected tokens
        ``[batch, k, hidden]`` as the forward hooks leave it."""
        self._warn_no_weights()
        chosen_box: list[Selection | None] = []

        def forward(*args: Any, **kw: Any) -> tuple[torch.Tensor, None]:
            if len(args) > 1:
                raise TypeError("orthorank: a hook passed the attention positional arguments besides hidden_states")
            hs = args[0] if args else kw.pop("hidden_states")
            if hs.shape != x.shape:
                raise ValueError(
                    f"orthorank: a hook on layers[{self.attn.layer_idx}].self_attn changed its input's shape "
                    f"from {tuple(x.shape)} to {tuple(hs.shape)}; selection layers need the same tokens"
                )
            chosen, out = run(hs, kw)
            chosen_box.append(chosen)
            if chosen is None:
                return hs.new_zeros(hs.shape), None
            if chosen.valid is not None:
                out = out * chosen.valid.unsqueeze(-1)
            return scatter_rows(out.new_zeros((*hs.shape[:2], out.shape[-1])), chosen.index, out), None

        result = self.call(forward, {"hidden_states": x, **kwargs})
        chosen = chosen_box[0] if chosen_box else None
        if chosen is None:
            return None, None
        full = result[0]
        return chosen, gather_rows(full, chosen.index)

    def _warn_no_weights(self) -> None:
        """Under eager attention a dense layer hands its forward hooks the attention weights; a
        selection layer cannot (it attends the selected queries only). Said once per layer."""
        if self._warned_weights or not self.attn._forward_hooks or not compat.attention_function(self.attn)[1]:
            return
        self._warned_weights = True
        logger.warning(
            "orthorank: hooks on layers[%d].self_attn (%s) get no attention weights in this selection layer "
            "(output[1] is None); hooks that need them (e.g. kvpress ObservedAttentionPress) do not compose",
            self.attn.layer_idx, ", ".join(hook_owners(self.attn)),
        )

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle of a patched model
        return {**self.__dict__, "_local": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def remove(self) -> None:
        """Give the module its forward back."""
        compat.restore_forward(self.attn)
