"""Layer-pruning baselines and controls, as plans in the same format as OrthoRank's.

* :func:`sleb_plan`: SLEB (Song et al., 2024, arXiv 2402.09025): greedy removal of whole decoder
  blocks, each round removing the block whose removal raises the calibration loss least; the first
  and last blocks are kept; a removed block is the identity.
* :func:`shortgpt_plan`: ShortGPT (Men et al., 2024, arXiv 2403.03853): remove the blocks with the
  lowest Block Influence, ``BI_i = 1 - mean_t cos(h_in[t], h_out[t])`` measured in one dense pass.
* :func:`random_control`: the same layers and keep ratios as a plan, tokens chosen at random.

Both pruning baselines remove ``ceil(L * sparsity)`` blocks (SLEB's rule), so ``plan.sparsity``
is the removed fraction, at least the requested sparsity.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from .config import check_fraction
from .plan import Plan
from .runner import LossRunner
from .search import SearchConfig, removal_search

logger = logging.getLogger(__name__)

__all__ = ["blocks_to_remove", "block_influence", "random_control", "shortgpt_plan", "sleb_plan"]


def blocks_to_remove(num_layers: int, sparsity: float) -> int:
    """``ceil(num_layers * sparsity)``, robust to float error (``30 * 0.1`` is 3.0000000000000004)."""
    sparsity = check_fraction("sparsity", sparsity, high_open=True)
    return math.ceil(num_layers * sparsity - 1e-6)


def sleb_plan(
    model: nn.Module,
    calib_ids: torch.Tensor,
    sparsity: float,
    *,
    exclude: Sequence[int] = (0, -1),
    batch_size: int = 1,
    progress: bool = True,
) -> Plan:
    """SLEB: greedily remove ``ceil(L * sparsity)`` blocks by calibration loss.

    Args:
        calib_ids: LongTensor ``[n, seq]`` of calibration windows.
        exclude: blocks never removed (default the first and the last).

    Returns:
        A plan with keep ratio 0.0 on the removed blocks, ``method="sleb"``.
    """
    runner = LossRunner(model, calib_ids, batch_size=batch_size)
    count = blocks_to_remove(runner.num_layers, sparsity)
    eligible = SearchConfig(0.0, exclude=tuple(exclude)).eligible(runner.num_layers)
    if count > len(eligible):
        raise ValueError(f"cannot remove {count} blocks: only {len(eligible)} are eligible")
    plan = removal_search(runner, count, exclude=exclude, method="sleb", progress=progress)
    return _with_flops(plan, model, calib_ids.shape[1])


@torch.inference_mode()
def block_influence(model: nn.Module, calib_ids: torch.Tensor, *, batch_size: int = 1) -> list[float]:
    """``[L]`` Block Influence of every decoder block: ``1 - mean cos(input, output)`` over all tokens."""
    runner = LossRunner(model, calib_ids, batch_size=batch_size)
    record = runner.record(Plan((1.0,) * runner.num_layers, model_type=runner.model_type))
    sums = torch.zeros(runner.num_layers, dtype=torch.float64)
    count = 0
    for c, inputs in enumerate(record.inputs):
        last = runner.layers[-1](inputs[-1], **runner._kwargs[c])
        states = [*inputs, last]
        for i in range(runner.num_layers):
            cos = nn.functional.cosine_similarity(states[i].float(), states[i + 1].float(), dim=-1)
            sums[i] += float(cos.sum())
        count += inputs[0].shape[0] * inputs[0].shape[1]
    return [1.0 - float(s) / count for s in sums]


def shortgpt_plan(
    model: nn.Module,
    calib_ids: torch.Tensor,
    sparsity: float,
    *,
    exclude: Sequence[int] = (),
    batch_size: int = 1,
) -> Plan:
    """ShortGPT: remove the ``ceil(L * sparsity)`` blocks of lowest Block Influence.

    Args:
        calib_ids: LongTensor ``[n, seq]`` of calibration windows.
        exclude: blocks never removed (none by default, as in ShortGPT).
    """
    started = time.perf_counter()
    scores = block_influence(model, calib_ids, batch_size=batch_size)
    num_layers = len(scores)
    count = blocks_to_remove(num_layers, sparsity)
    excluded = {i % num_layers for i in exclude}
    order = sorted((i for i in range(num_layers) if i not in excluded), key=lambda i: (scores[i], i))
    if count > len(order):
        raise ValueError(f"cannot remove {count} blocks: only {len(order)} are eligible")
    ratios = [1.0] * num_layers
    for i in order[:count]:
        ratios[i] = 0.0
    meta = {
        "block_influence": [round(s, 6) for s in scores],
        "calib_windows": calib_ids.shape[0],
        "calib_seq_len": calib_ids.shape[1],
        "calib_tokens": calib_ids.numel(),
        "forward_passes": 1.0,
        "seconds": round(time.perf_counter() - started, 1),
    }
    plan = Plan(tuple(ratios), model_type=model.config.model_type, method="shortgpt", meta=meta)
    return _with_flops(plan, model, calib_ids.shape[1])


def random_control(plan: Plan) -> Plan:
    """``plan`` with ``selector="random"``: same layers and keep ratios, tokens chosen at random."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an orthorank.Plan, got {type(plan).__name__}")
    meta = {"control_of": plan.method, **{k: v for k, v in plan.meta.items() if k.startswith("flops")}}
    return dataclasses.replace(plan, selector="random", method=f"{plan.method}+random", meta=meta)


def _with_flops(plan: Plan, model: nn.Module, seq_len: int) -> Plan:
    plan.meta.update(flops_saved=round(plan.flops_fraction(model.config, seq_len), 4), flops_seq_len=seq_len)
    return plan
