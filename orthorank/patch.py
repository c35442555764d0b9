"""``patch`` / ``unpatch`` / ``patched``: install OrthoRank on one model instance, reversibly.

Nothing global changes: the selected layers get a per-instance forward, and the base model gets a
forward pre-hook that reads the attention mask and the cache once per forward (padding, sinks,
whether the pass starts the sequence) for all selection layers. Parameters, buffers, the
state_dict, the config and ``save_pretrained`` output are untouched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from . import compat
from .config import DEFAULT_KEEP_RATIO, DEFAULT_KEEP_RECENT, DEFAULT_SPARSITY, PatchOptions, check_fraction
from .hooks import AttentionRoute
from .layer import (
    STATE_KWARG, DenseForward, ForwardContext, ForwardState, LayerStats, RemovedForward, SelectiveForward,
)
from .plan import Plan, layers_plan

logger = logging.getLogger(__name__)

_HANDLE = "_orthorank_patch"


@dataclass
class PatchHandle:
    """What :func:`patch` installed on a model (kept on the base model instance)."""

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


def _make_plan(
    model: nn.Module,
    sparsity: float | None,
    layers: Sequence[int] | None,
    keep_ratio: float,
    plan: Plan | None,
    selector: str,
    max_ppl_increase: float | None = None,
    cache: bool = True,
    progress: bool = True,
) -> Plan:
    num_layers = len(compat.decoder_layers(model))
    model_type = model.config.model_type
    given = [
        name
        for name, v in (("sparsity", sparsity), ("layers", layers), ("plan", plan), ("max_ppl_increase", max_ppl_increase))
        if v is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give one of sparsity, layers, plan or max_ppl_increase; got {', '.join(given)}")
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be True or False, got {cache!r}")
    if plan is not None:
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be an orthorank.Plan, got {type(plan).__name__}")
        plan.check_model(num_layers, model_type)
        return plan
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise TypeError("layers must be a sequence of layer indices, e.g. [12, 15, 18]")
        return layers_plan(num_layers, list(layers), keep_ratio, selector=selector, model_type=model_type)
    from . import autoplan  # imports the calibration machinery, which imports this module

    if max_ppl_increase is not None:
        return autoplan.budget_plan(model, max_ppl_increase, keep_ratio, selector, cache=cache, progress=progress)
    sparsity = DEFAULT_SPARSITY if sparsity is None else check_fraction("sparsity", sparsity, high_open=True)
    if sparsity == 0.0:
        return Plan((1.0,) * num_layers, selector=selector, model_type=model_type, method="dense")
    return autoplan.resolve_plan(model, sparsity, keep_ratio, selector, cache=cache, progress=progress)


def patch(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    layers: Sequence[int] | None = None,
    keep_ratio: float = DEFAULT_KEEP_RATIO,
    plan: Plan | None = None,
    max_ppl_increase: float | None = None,
    selector: str = "orthogonal",
    decode: str = "dense",
    keep_recent: int = DEFAULT_KEEP_RECENT,
    keep_last: bool | None = None,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Install OrthoRank token selection on ``model`` (in place) and return it.

    Give at most one of:
        sparsity: overall fraction of per-layer token updates to skip, in [0, 1) (default 0.2).
            The plan is the one shipped with orthorank for this model, else the one in the plan
            cache, else one calibrated now on text the model generates itself (then cached); see
            :mod:`orthorank.autoplan`. ``0`` installs nothing.
        layers: explicit selection layers, each updating ``keep_ratio`` of the tokens.
        plan: a :class:`orthorank.Plan` (e.g. from :func:`orthorank.calibrate`).
        max_ppl_increase: a quality budget (> 0; 0.1 = +10% perplexity): the highest sparsity
            whose calibration perplexity rose at most that much (found like ``sparsity``).

    Args:
        keep_ratio: fraction of each row's tokens a selection layer updates, in (0, 1).
        selector: ``orthogonal`` (OrthoRank), ``least_orthogonal`` or ``random`` (controls).
        decode: what selection layers do in decode steps: ``dense`` (default) or ``bypass``.
        keep_recent: each row's last ``keep_recent`` tokens are selected first (the latest first),
            within the ``keep_ratio`` slots; the last token's output is the next-token prediction
            ``generate`` reads. ``0``: every token is ranked by the selector alone (the paper).
        keep_last: older switch: ``False`` means ``keep_recent=0``; ``True`` keeps at least the last.
        seed: seed of the ``random`` selector.
        cache: read and write the plan cache (``$ORTHORANK_CACHE/plans``) when calibrating.
        progress: show progress bars when a plan is calibrated.

    A plan that records its calibration loss logs its expected perplexity increase, and one above
    25% warns (``UserWarning``) naming a sparsity that stays under. Patching a patched model
    replaces the previous patch (a calibration still measures the dense model). Undo with
    :func:`unpatch`.
    """
    spec = compat.arch_spec(model)
    keep_ratio = check_fraction("keep_ratio", keep_ratio, low_open=True, high_open=True)
    options = PatchOptions(decode=decode, keep_recent=keep_recent, seed=seed)
    if keep_last is not None:
        if not isinstance(keep_last, bool):
            raise TypeError(f"keep_last must be True, False or None, got {keep_last!r}")
        options = replace(options, keep_recent=max(keep_recent, 1) if keep_last else 0)
    new_plan = _make_plan(model, sparsity, layers, keep_ratio, plan, selector, max_ppl_increase, cache, progress)
    from .autoplan import report_quality

    report_quality(new_plan, warn=max_ppl_increase is None, stacklevel=2)
    _install(model, new_plan, options, spec)
    logger.info("orthorank: %s", new_plan)
    return model


def _install(model: nn.Module, new_plan: Plan, options: PatchOptions, spec: compat.ArchSpec) -> None:
    """Replace any patch on ``model`` by ``new_plan`` (already checked against the model)."""
    if is_patched(model):
        logger.info("orthorank: replacing the previous patch")
        unpatch(model)

    base = compat.base_model(model)
    handle = PatchHandle(plan=new_plan, options=options, context=ForwardContext())
    for i, layer in enumerate(compat.decoder_layers(model)):
        ratio = new_plan.keep_ratios[i]
        if ratio == 1.0:
            continue
        if ratio == 0.0:
            forward: SelectiveForward | RemovedForward = RemovedForward(layer)
        else:
            forward = SelectiveForward(
                layer, ratio, new_plan.selector, options.decode, options.keep_recent, handle.context, spec,
                seed=options.seed + i,
            )
        forward.original = compat.install_forward(layer, forward)
        if isinstance(forward, SelectiveForward):
            forward.route = AttentionRoute(layer.self_attn)
        handle.forwards[i] = forward
    if new_plan.selection_layers:
        for i, layer in enumerate(compat.decoder_layers(model)):
            if new_plan.keep_ratios[i] == 1.0:
                relay = DenseForward(layer)
                relay.original = compat.install_forward(layer, relay)
                handle.relays[i] = relay
        handle.hook = base.register_forward_pre_hook(_state_hook, with_kwargs=True)
    setattr(base, _HANDLE, handle)


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


def _handle(model: nn.Module) -> PatchHandle | None:
    return getattr(compat.base_model(model), _HANDLE, None)


def forward_context(model: nn.Module) -> ForwardContext | None:
    """Where ``model``'s selection layers called outside a model forward find their state
    (``None`` if not patched).

    Tools that call the decoder layers themselves (e.g. calibration reusing hidden states) describe
    their inputs with ``with context.use(state): ...``; it holds in the calling thread / task only.
    """
    handle = _handle(model)
    return None if handle is None else handle.context


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` is installed on ``model``."""
    return _handle(model) is not None


def get_plan(model: nn.Module) -> Plan | None:
    """The plan installed on ``model`` (``None`` if it is not patched)."""
    handle = _handle(model)
    return None if handle is None else handle.plan


def layer_stats(model: nn.Module) -> dict[int, LayerStats]:
    """Per patched layer: selective passes, other passes, tokens seen and tokens updated."""
    handle = _handle(model)
    return {} if handle is None else {i: f.stats for i, f in handle.forwards.items()}


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the dense model exactly (a no-op on a model that is not patched)."""
    base = compat.base_model(model)
    handle: PatchHandle | None = getattr(base, _HANDLE, None)
    if handle is None:
        return model
    layers = compat.decoder_layers(model)
    for i in handle.relays:
        compat.restore_forward(layers[i])
    for i, forward in handle.forwards.items():
        compat.restore_forward(layers[i])
        if getattr(forward, "route", None) is not None:
            forward.route.remove()
    if handle.hook is not None:
        handle.hook.remove()
    delattr(base, _HANDLE)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, sparsity: float | None = None, **kwargs: Any) -> Iterator[nn.Module]:
    """``with orthorank.patched(model, sparsity=0.2): ...`` patches inside the block only.

    On exit the model returns to what it was before: dense, or its previous patch.
    """
    previous = _handle(model)
    patch(model, sparsity, **kwargs)
    try:
        yield model
    finally:
        _restore(model, previous)


@contextlib.contextmanager
def plan_installed(model: nn.Module, plan: Plan) -> Iterator[nn.Module]:
    """``patched(model, plan=plan)`` for tools that evaluate many plans (calibration, tables):
    the plan is installed with the default options and nothing is logged or warned."""
    previous = _handle(model)
    plan.check_model(len(compat.decoder_layers(model)), compat.unwrap(model).config.model_type)
    _install(model, plan, PatchOptions(), compat.arch_spec(model))
    try:
        yield model
    finally:
        _restore(model, previous)


def _restore(model: nn.Module, previous: PatchHandle | None) -> None:
    """Put back what ``model`` had before: dense, or the patch ``previous``."""
    unpatch(model)
    if previous is not None:
        _install(model, previous.plan, previous.options, compat.arch_spec(model))
