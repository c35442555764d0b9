"""Calibrated plans: the loss runner, the greedy search, and bad input."""

from __future__ import annotations

import pytest
import torch

import orthorank
from orthorank import compat
from orthorank.baselines import sleb_plan
from orthorank.calibration import calibrate
from orthorank.metrics import mean_nll
from orthorank.runner import LossRunner
from orthorank.search import SearchConfig, closest_round, plan_at_round, search_plan
from orthorank.text import token_windows

from tests.tiny_models import CHEAP, cheap_layer_model, sampled_ids, tiny_model, tiny_tokenizer

@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_runner_loss_matches_patched_model_with_and_without_reuse(arch):
    model = tiny_model(arch, layers=6)
    ids = torch.randint(3, 97, (3, 20), generator=torch.Generator().manual_seed(0))
    runner = LossRunner(model, ids, batch_size=2)
    dense = runner.record(orthorank.Plan((1.0,) * 6))
    assert dense.loss == pytest.approx(mean_nll(model, ids), rel=1e-6)
    plan = orthorank.Plan((1.0, 1.0, 1 / 3, 0.0, 0.5, 1.0))
    with orthorank.patched(model, plan=plan):
        expected = mean_nll(model, ids)
    assert runner.loss(plan) == pytest.approx(expected, rel=1e-6)
    before = runner.cost.layer_calls
    assert runner.loss(plan, dense) == pytest.approx(expected, rel=1e-6)
    assert runner.cost.layer_calls - before == 3 * 4  # layers 2..5 only, 3 windows
    assert not orthorank.is_patched(model)


def _generation_nll(model: torch.nn.Module, ids: torch.Tensor, prompt: int) -> float:
    """Mean NLL of ``ids[:, prompt:]`` as generate sees it: a prefill of the first ``prompt``
    tokens, then the rest fed as one more pass over the cache (teacher-forced decode steps)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            row = row[None]
            first = model(input_ids=row[:, :prompt], use_cache=True)
            cache = {compat.model_cache_kwarg(model): first.past_key_values}
            rest = model(input_ids=row[:, prompt:], use_cache=True, **cache)
            logits = torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], dim=1)
            total += float(torch.nn.functional.cross_entropy(logits[0].float(), row[0, prompt:], reduction="sum"))
            count += row.shape[1] - prompt
    return total / count


@pytest.mark.parametrize("selector", ["orthogonal", "attention"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("prompt", [1, 7, 19])
def test_runner_generation_loss_matches_prefill_then_decode(arch, prompt, selector):
    model = tiny_model(arch, layers=6, initializer_range=0.2)
    ids = torch.randint(3, 97, (3, 20), generator=torch.Generator().manual_seed(0))
    runner = LossRunner(model, ids, batch_size=2, prompt=prompt)
    plan = orthorank.Plan((1.0, 1 / 3, 1.0, 0.0, 0.5, 1.0), selector=selector)
    with orthorank.patched(model, plan=plan):
        expected = _generation_nll(model, ids, prompt)
    dense = runner.record(orthorank.Plan((1.0,) * 6))
    assert dense.loss == pytest.approx(_generation_nll(model, ids, prompt), rel=1e-5)
    assert runner.loss(plan) == pytest.approx(expected, rel=1e-5)
    assert runner.loss(plan, dense) == pytest.approx(expected, rel=1e-5)
    if prompt > 2:  # a prompt long enough to skip tokens: the loss differs from the full-window one
        assert runner.loss(plan) != pytest.approx(LossRunner(model, ids).loss(plan), rel=1e-3)


@pytest.mark.parametrize("prompt", [0, 20, 2.5, True])
def test_runner_rejects_a_bad_prompt(prompt):
    with pytest.raises(ValueError, match="prompt must be None or an int in"):
        LossRunner(tiny_model(layers=2), torch.ones(2, 20, dtype=torch.long), prompt=prompt)


def test_search_picks_the_cheapest_layer_and_is_deterministic():
    model = cheap_layer_model()
    ids = sampled_ids(model)
    plan = calibrate(model, None, ids, sparsity=(2 / 3) / 6, levels=(1.0, 1 / 3), jumps=False, progress=False)
    assert plan.selection_layers == [CHEAP]
    assert plan.sparsity == pytest.approx((2 / 3) / 6)
    assert plan.meta["final_loss"] == pytest.approx(plan.meta["dense_loss"], abs=1e-5)
    assert plan.method == "calibrated" and plan.model_type == "llama"
    assert plan.meta["calib_tokens"] == ids.numel() and plan.meta["forward_passes"] > 1
    assert plan.meta["seconds"] >= 0 and 0 < plan.meta["flops_saved"] < plan.sparsity
    again = calibrate(model, None, ids, sparsity=(2 / 3) / 6, levels=(1.0, 1 / 3), progress=False, batch_size=3)
    assert again.keep_ratios == plan.keep_ratios


def test_hybrid_search_removes_the_cheapest_layer():
    model = cheap_layer_model()
    ids = sampled_ids(model)
    plan = calibrate(model, None, ids, sparsity=1 / 6, progress=False)  # default: hybrid levels with jumps
    assert plan.removed_layers == [CHEAP] and plan.selection_layers == []
    assert plan.meta["levels"] == [1.0, 0.333333, 0.0] and plan.meta["jumps"] and plan.meta["shortlist"] == 10


def test_search_respects_exclusions_and_rounds_to_the_closest_sparsity():
    model = cheap_layer_model()
    ids = sampled_ids(model, rows=2, seq=16)
    plan = calibrate(model, None, ids, sparsity=0.25, exclude=(0, CHEAP, -1), levels=(1.0, 1 / 3), progress=False)
    # 0.25 * 6 / (2/3) = 2.25 -> 2 selection layers, never 0, CHEAP or 5
    assert len(plan.selection_layers) == 2 and not {0, CHEAP, 5} & set(plan.selection_layers)
    assert sorted(r["layer"] for r in plan.meta["rounds"]) == plan.selection_layers


def test_calibrate_on_texts_with_a_tokenizer():
    model = cheap_layer_model()
    texts = [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(40)) for i in range(3)]
    plan = calibrate(model, tiny_tokenizer(), texts, sparsity=0.1, window=16, n_windows=4, progress=False)
    assert plan.meta["calib_windows"] == 4 and plan.meta["calib_seq_len"] == 16
    assert plan.sparsity == pytest.approx(0.1, abs=1 / 18)  # the closest the default levels reach


def test_calibrate_refuses_one_string_for_a_list_of_documents():
    text = " ".join(f"w{3 + j % 90}" for j in range(400))  # enough for 4 windows of 16 if it were read as one
    with pytest.raises(TypeError, match=r"not a single string: pass \[text\]"):
        calibrate(tiny_model(layers=4), tiny_tokenizer(), text, sparsity=0.2, window=16, n_windows=4, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": 0.2, "levels": (0.5, 0.2)}, ValueError, "levels"),
        ({"sparsity": 0.2, "levels": (1.0, 0.5, 0.7)}, ValueError, "levels"),
        ({"sparsity": 0.2, "selector": "best"}, ValueError, "orthogonal"),
        ({"sparsity": 0.2, "exclude": (0, 9)}, ValueError, "exclude"),
        ({"sparsity": 0.2, "exclude": ("first",)}, TypeError, "exclude"),
        ({"sparsity": 0.2, "batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_input_refused(kwargs, error, match):
    model = tiny_model(layers=4)
    ids = torch.randint(3, 97, (1, 8))
    with pytest.raises(error, match=match):
        calibrate(model, None, ids, progress=False, **kwargs)


def test_texts_without_tokenizer_refused():
    with pytest.raises(TypeError, match="tokenizer"):
        calibrate(tiny_model(layers=2), None, ["some text"], sparsity=0.1, progress=False)


def test_search_config_eligible_layers():
    assert SearchConfig(0.1).eligible(5) == [1, 2, 3]
    assert SearchConfig(0.1, exclude=()).eligible(3) == [0, 1, 2]


def test_prefix_of_a_longer_search_is_the_shorter_search():
    model = cheap_layer_model()
    ids = sampled_ids(model, rows=2, seq=16)
    kwargs = {"levels": (1.0, 1 / 3), "versus_removal": False, "progress": False}
    long = calibrate(model, None, ids, sparsity=3 * (2 / 3) / 6, **kwargs)
    short = calibrate(model, None, ids, sparsity=(2 / 3) / 6, **kwargs)
    assert len(long.selection_layers) == 3
    assert plan_at_round(long, 1).keep_ratios == short.keep_ratios
    assert plan_at_round(long, 3).keep_ratios == long.keep_ratios
    assert plan_at_round(long, 0).is_dense
    assert closest_round(long, 1.4 * (2 / 3) / 6).keep_ratios == short.keep_ratios  # nearest round: 1
    assert closest_round(short, 0.9).keep_ratios == short.keep_ratios  # beyond its last round: the last
    with pytest.raises(ValueError, match="rounds"):
        plan_at_round(long, 4)


def test_shortlist_limits_later_rounds():
    model = cheap_layer_model()
    ids = sampled_ids(model, rows=2, seq=16)
    full = calibrate(model, None, ids, sparsity=2 * (2 / 3) / 6, levels=(1.0, 1 / 3), shortlist=None, progress=False)
    short = calibrate(model, None, ids, sparsity=2 * (2 / 3) / 6, levels=(1.0, 1 / 3), shortlist=1, progress=False)
    assert CHEAP in short.selection_layers and len(short.selection_layers) == 2
    assert short.meta["forward_passes"] < full.meta["forward_passes"]
    with pytest.raises(ValueError, match="shortlist"):
        SearchConfig(0.1, shortlist=0)


def test_deepest_grows_the_plan_from_the_end():
    model = cheap_layer_model()  # 6 layers, layer CHEAP = 3 costs nothing
    runner = LossRunner(model, sampled_ids(model, rows=2, seq=16))
    free = search_plan(runner, SearchConfig(2 * (2 / 3) / 6, exclude=(0,)), progress=False)
    assert free.meta["rounds"][0]["layer"] == CHEAP and free.meta["deepest"] is None
    plan = search_plan(runner, SearchConfig(3 * (2 / 3) / 6, exclude=(0,), deepest=2), progress=False)
    dense = set(range(1, 6))
    for step in plan.meta["rounds"]:  # every round took one of the two deepest layers still dense
        assert step["layer"] in sorted(dense)[-2:]
        dense.remove(step["layer"])
    assert plan.meta["rounds"][0]["layer"] in (4, 5) and plan.meta["deepest"] == 2
    assert len(plan.selection_layers) == 3
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="deepest"):
            SearchConfig(0.1, deepest=bad)


def two_cheap_layers_model() -> torch.nn.Module:
    """Like :func:`cheap_layer_model` with layers 2 and 3 both near-identity."""
    model = cheap_layer_model()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    return model


def test_final_comparison_returns_the_removal_plan_when_its_loss_is_lower():
    model = two_cheap_layers_model()
    ids = sampled_ids(model, rows=2, seq=16)
    # sparsity 1/3: three selection layers (one of them costly) or two removed blocks (both free)
    searched = calibrate(model, None, ids, sparsity=1 / 3, levels=(1.0, 1 / 3), jumps=False,
                         versus_removal=False, progress=False)
    assert len(searched.selection_layers) == 3 and "versus_removal" not in searched.meta
    plan = calibrate(model, None, ids, sparsity=1 / 3, levels=(1.0, 1 / 3), jumps=False, progress=False)
    assert plan.removed_layers == [2, 3] and plan.selection_layers == []
    assert plan.keep_ratios == sleb_plan(model, ids, 1 / 3, progress=False).keep_ratios
    versus = plan.meta["versus_removal"]
    assert versus["chosen"] == "removal" and versus["removal_blocks"] == 2
    assert versus["searched_loss"] == pytest.approx(searched.meta["final_loss"])
    assert versus["removal_loss"] < versus["searched_loss"] and plan.meta["final_loss"] == versus["removal_loss"]
    assert versus["searched_rounds"] == searched.meta["rounds"]
    assert plan.meta["forward_passes"] > searched.meta["forward_passes"]


def test_final_comparison_keeps_the_searched_plan_when_it_is_no_worse():
    model = tiny_model(layers=6, initializer_range=0.2)
    ids = sampled_ids(model, rows=2, seq=16)
    plan = calibrate(model, None, ids, sparsity=1 / 3, progress=False)  # hybrid: removal is among its moves
    versus = plan.meta["versus_removal"]
    assert plan.sparsity == pytest.approx(1 / 3)
    assert plan.meta["final_loss"] == min(versus["searched_loss"], versus["removal_loss"])
    chosen_is_removal = versus["chosen"] == "removal"
    assert chosen_is_removal == (versus["removal_loss"] < versus["searched_loss"])
    # no whole number of blocks is within 0.005 of 2/3 / 6: nothing to compare
    odd = calibrate(model, None, ids, sparsity=(2 / 3) / 6, levels=(1.0, 1 / 3), progress=False)
    assert odd.meta["versus_removal"] is None and len(odd.selection_layers) == 1


def test_search_resumed_from_a_prefix_reaches_the_target_and_keeps_its_rounds():
    model = cheap_layer_model()
    ids = sampled_ids(model, rows=2, seq=16)
    runner = LossRunner(model, ids)
    long = search_plan(runner, SearchConfig(0.5, levels=(1.0, 1 / 3, 0.0), jumps=True), progress=False)
    first = plan_at_round(long, 1)
    resumed = search_plan(runner, SearchConfig(1 / 3, levels=(1.0, 1 / 3, 0.0), jumps=True), progress=False, start=first)
    fresh = search_plan(runner, SearchConfig(1 / 3, levels=(1.0, 1 / 3, 0.0), jumps=True), progress=False)
    assert resumed.meta["rounds"][0] == long.meta["rounds"][0]
    assert resumed.keep_ratios == fresh.keep_ratios and resumed.sparsity == pytest.approx(1 / 3)
    assert resumed.meta["dense_loss"] == long.meta["dense_loss"]
    with pytest.raises(TypeError, match="start"):
        search_plan(runner, SearchConfig(0.25), progress=False, start=orthorank.Plan((1.0,) * 6))


def test_final_comparison_is_judged_on_held_back_windows_of_the_texts():
    model = tiny_model(layers=6, initializer_range=0.2)
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, 97, (60,), generator=g)) for _ in range(4)]
    plan = calibrate(model, tok, texts, sparsity=1 / 3, window=16, n_windows=2, check_windows=3, progress=False)
    versus = plan.meta["versus_removal"]
    assert versus["judged_on"] == "3 held-back windows" and plan.meta["calib_windows"] == 2
    held_back = LossRunner(model, token_windows(tok, texts, 16, 5)[2:])
    assert held_back.loss(plan) == pytest.approx(min(versus["searched_check_loss"], versus["removal_check_loss"]), rel=1e-6)
    assert (versus["chosen"] == "removal") == (versus["removal_check_loss"] < versus["searched_check_loss"])
    ids_plan = calibrate(model, None, token_windows(tok, texts, 16, 2), sparsity=1 / 3, progress=False)
    assert ids_plan.meta["versus_removal"]["judged_on"] == "search windows"
    with pytest.raises(ValueError, match="check_windows"):
        calibrate(model, tok, texts, sparsity=0.2, check_windows=-1, progress=False)
