"""Installing a plan on one model instance, reversibly, and reading what is installed.

Nothing global changes: the selected layers get a per-instance forward, and the base model gets a
forward pre-hook that reads the attention mask and the cache once per forward (padding, sinks,
whether the pass starts the sequence) for all selection layers. Parameters, buffers, the
state_dict, the config and ``save_pretrained`` output are untouched.

:func:`install` and :func:`uninstall` take a plan already chosen and checked; choosing one is the
job of :func:`orthorank.patch`. Tools that evaluate many plans use :func:`plan_installed`, and
tools that need the dense model for a while (self-calibration sampling its own text) use
:func:`running_dense`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import compat
from .config import PatchOptions
from .hooks import AttentionRoute
from .layer import DenseForward, RemovedForward, SelectiveForward
from .plan import Plan
from .state import STATE_KWARG, ForwardContext, ForwardState, LayerStats

logger = logging.getLogger(__name__)

_HANDLE = "_orthorank_patch"


@dataclass
class PatchHandle:
    """What :func:`install` installed on a model (kept on the base model instance)."""

    plan: Plan
    options: PatchOptions
    context: ForwardContext
    forwards: dict[int, SelectiveForward | RemovedForward] = field(default_factory=dict)
    hook: Any = None
    #: the dense layers' forwards that drop the state keyword (when there are selection layers)
    relays: dict[int, DenseForward] = field(default_factory=dict)


def _read_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardState | None:
    """Build the per-forward state from the base model's call arguments."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        return None
    batch, seq = ref.shape[0], ref.shape[1]
    cache = compat.find_cache(kwargs)
    if cache is not None and (seq == 1 or compat.past_length(cache) > 0):
        return ForwardState(batch, seq, "continue")
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is None:
        return ForwardState(batch, seq, "select", n_max=seq)
    real = _real_tokens(mask, batch, seq)
    if real is None:
        logger.warning("orthorank: this attention mask cannot be read; selection layers run densely")
        return ForwardState(batch, seq, "dense")
    if bool(real.all()):
        return ForwardState(batch, seq, "select", n_max=seq)
    n_real = real.sum(dim=1)
    sink = real.int().argmax(dim=1)
    last = seq - 1 - real.flip(1).int().argmax(dim=1)
    return ForwardState(batch, seq, "select", real, n_real, int(n_real.max()), sink, last)


def _real_tokens(mask: Any, batch: int, seq: int) -> torch.Tensor | None:
    """``[batch, seq]`` bool of real tokens from a 2-D padding mask or a 4-D attention mask.

    A 4-D mask (``[batch, 1, seq, kv]``, as ``generate`` builds for static caches) marks a token
    as real when it may attend to itself (its diagonal entry), which padding tokens may not.
    """
    mask = compat.mask_tensor(mask)
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2 and mask.shape == (batch, seq):
        return mask.bool()
    if mask.dim() == 4 and mask.shape[0] in (1, batch) and mask.shape[2] == seq and mask.shape[3] >= seq:
        diag = mask[:, 0, :, :seq].diagonal(dim1=-2, dim2=-1).expand(batch, -1)
        return diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    return None


def install(model: nn.Module, new_plan: Plan, options: PatchOptions, spec: compat.ArchSpec) -> None:
    """Replace any plan installed on ``model`` by ``new_plan`` (already checked against the model)."""
    if handle(model) is not None:
        logger.info("orthorank: replacing the previous patch")
        uninstall(model)

    base = compat.base_model(model)
    new = PatchHandle(plan=new_plan, options=options, context=ForwardContext())
    for i, layer in enumerate(compat.decoder_layers(model)):
        ratio = new_plan.keep_ratios[i]
        if ratio == 1.0:
            continue
        if ratio == 0.0:
            forward: SelectiveForward | RemovedForward = RemovedForward(layer)
        else:
            forward = SelectiveForward(
                layer, ratio, new_plan.selector, options.decode, options.keep_recent, new.context, spec,
                seed=options.seed + i, keep_min=options.keep_min,
            )
        forward.original = compat.install_forward(layer, forward)
        if isinstance(forward, SelectiveForward):
            forward.route = AttentionRoute(layer.self_attn)
        new.forwards[i] = forward
    if new_plan.selection_layers:
        for i, layer in enumerate(compat.decoder_layers(model)):
            if new_plan.keep_ratios[i] == 1.0:
                relay = DenseForward(layer)
                relay.original = compat.install_forward(layer, relay)
                new.relays[i] = relay
        new.hook = base.register_forward_pre_hook(_state_hook, with_kwargs=True)
    setattr(base, _HANDLE, new)


def _state_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Pre-hook: the state of this forward travels with the call itself, as a keyword argument
    that the base model hands every decoder layer. Nothing is stored, so concurrent and nested
    forwards cannot see each other's state and none outlives its forward.

    torch registers a ``with_kwargs`` hook in two steps; a forward that another thread runs while
    the patch is being installed may call it as ``hook(module, args)``: that forward gets no state
    (its selection layers run densely) instead of an error."""
    if kwargs is None:
        return None
    return args, {**kwargs, STATE_KWARG: _read_inputs(args, kwargs)}


def handle(model: nn.Module) -> PatchHandle | None:
    """What is installed on ``model`` (``None`` if nothing is)."""
    return getattr(compat.base_model(model), _HANDLE, None)


def uninstall(model: nn.Module) -> nn.Module:
    """Restore the dense model exactly (a no-op on a model with nothing installed)."""
    base = compat.base_model(model)
    installed: PatchHandle | None = getattr(base, _HANDLE, None)
    if installed is None:
        return model
    layers = compat.decoder_layers(model)
    for i in installed.relays:
        compat.restore_forward(layers[i])
    for i, forward in installed.forwards.items():
        compat.restore_forward(layers[i])
        if getattr(forward, "route", None) is not None:
            forward.route.remove()
    if installed.hook is not None:
        installed.hook.remove()
    delattr(base, _HANDLE)
    return model


def restore(model: nn.Module, previous: PatchHandle | None) -> None:
    """Put back what ``model`` had before: dense, or the plan and options of ``previous``."""
    uninstall(model)
    if previous is not None:
        install(model, previous.plan, previous.options, compat.arch_spec(model))


def forward_context(model: nn.Module) -> ForwardContext | None:
    """Where ``model``'s selection layers called outside a model forward find their state
    (``None`` if not patched).

    Tools that call the decoder layers themselves (e.g. calibration reusing hidden states) describe
    their inputs with ``with context.use(state): ...``; it holds in the calling thread / task only.
    """
    installed = handle(model)
    return None if installed is None else installed.context


def is_patched(model: nn.Module) -> bool:
    """Whether a plan is installed on ``model`` (by :func:`orthorank.patch`)."""
    return handle(model) is not None


def get_plan(model: nn.Module) -> Plan | None:
    """The plan installed on ``model`` (``None`` if it is not patched)."""
    installed = handle(model)
    return None if installed is None else installed.plan


def layer_stats(model: nn.Module) -> dict[int, LayerStats]:
    """Per patched layer: selective passes, other passes, tokens seen and tokens updated."""
    installed = handle(model)
    return {} if installed is None else {i: f.stats for i, f in installed.forwards.items()}


@contextlib.contextmanager
def plan_installed(model: nn.Module, plan: Plan) -> Iterator[nn.Module]:
    """``plan`` installed inside the block, for tools that evaluate many plans (calibration,
    tables): the default options (:class:`PatchOptions`: no ``keep_min`` floor, so windows shorter
    than ``keep_min / keep_ratio`` are measured with the bare keep ratio), nothing logged or
    warned. On exit the model returns to what it was before: dense, or its previous plan."""
    previous = handle(model)
    plan.check_model(len(compat.decoder_layers(model)), compat.unwrap(model).config.model_type)
    install(model, plan, PatchOptions(), compat.arch_spec(model))
    try:
        yield model
    finally:
        restore(model, previous)


@contextlib.contextmanager
def running_dense(model: nn.Module) -> Iterator[nn.Module]:
    """The dense model inside the block, whatever is installed on ``model``; on exit its previous
    plan (if any) is installed again with the same options."""
    previous = handle(model)
    uninstall(model)
    try:
        yield model
    finally:
        restore(model, previous)
