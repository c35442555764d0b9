"""Layer-pruning baselines (SLEB, ShortGPT) and the random-selection control."""

from __future__ import annotations

import pytest
import torch

from orthorank.baselines import block_influence, blocks_to_remove, random_control, shortgpt_plan, sleb_plan
from orthorank.plan import Plan, layers_plan

from tests.tiny_models import tiny_model
from tests.tiny_models import CHEAP, cheap_layer_model, sampled_ids


def test_blocks_to_remove_uses_ceil_without_float_error():
    assert blocks_to_remove(30, 0.1) == 3
    assert blocks_to_remove(30, 0.2) == 6
    assert blocks_to_remove(30, 0.25) == 8
    assert blocks_to_remove(6, 0.0) == 0
    with pytest.raises(ValueError, match="sparsity"):
        blocks_to_remove(6, 1.0)


def test_sleb_removes_the_cheapest_block_first():
    model = cheap_layer_model()
    ids = sampled_ids(model)
    plan = sleb_plan(model, ids, 1 / 6, progress=False)
    assert plan.removed_layers == [CHEAP] and plan.selection_layers == []
    assert plan.method == "sleb" and plan.sparsity == pytest.approx(1 / 6)
    assert plan.meta["final_loss"] == pytest.approx(plan.meta["dense_loss"], abs=1e-5)
    two = sleb_plan(model, ids, 0.3, progress=False)
    assert len(two.removed_layers) == 2 and CHEAP in two.removed_layers
    assert not {0, 5} & set(two.removed_layers)


def test_block_influence_is_zero_for_an_identity_block():
    model = cheap_layer_model()
    ids = sampled_ids(model, rows=2, seq=16)
    scores = block_influence(model, ids, batch_size=2)
    assert len(scores) == 6 and scores[CHEAP] == pytest.approx(0.0, abs=1e-6)
    assert all(s > 1e-3 for i, s in enumerate(scores) if i != CHEAP)


def test_shortgpt_removes_lowest_influence_blocks():
    model = cheap_layer_model()
    ids = sampled_ids(model, rows=2, seq=16)
    plan = shortgpt_plan(model, ids, 0.3)
    scores = plan.meta["block_influence"]
    assert len(plan.removed_layers) == 2 and CHEAP in plan.removed_layers
    kept = [s for i, s in enumerate(scores) if i not in plan.removed_layers]
    assert max(scores[i] for i in plan.removed_layers) <= min(kept)
    assert plan.method == "shortgpt" and plan.sparsity == pytest.approx(2 / 6)
    assert shortgpt_plan(model, ids, 0.1, exclude=(CHEAP,)).removed_layers != [CHEAP]


def test_random_control_keeps_layers_and_ratios():
    plan = layers_plan(8, [2, 5], 0.4, model_type="llama", method="calibrated")
    control = random_control(plan)
    assert control.keep_ratios == plan.keep_ratios and control.selector == "random"
    assert control.method == "calibrated+random" and control.meta["control_of"] == "calibrated"
    with pytest.raises(TypeError, match="Plan"):
        random_control([1.0, 0.5])


def test_sleb_refuses_impossible_sparsity():
    model = tiny_model(layers=4)
    with pytest.raises(ValueError, match="blocks"):
        sleb_plan(model, torch.randint(3, 97, (1, 8)), 0.75, progress=False)
