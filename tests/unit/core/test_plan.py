"""Plans: JSON round trip, refusal of bad plans, sparsity and FLOP estimates."""

from __future__ import annotations

import json

import pytest

import orthorank
from orthorank.flops import flops_fraction
from orthorank.plan import PLAN_FORMAT_VERSION, Plan, default_plan, layers_plan

from tests.tiny_models import tiny_model


def test_round_trip_keeps_everything(tmp_path):
    plan = Plan((1.0, 1 / 3, 0.0, 0.5), selector="random", model_type="llama", method="calibrated",
                meta={"seconds": 1.5, "rounds": [{"layer": 1, "loss": 2.0}]})
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "orthorank-plan" and data["version"] == PLAN_FORMAT_VERSION
    assert data["num_layers"] == 4 and data["sparsity"] == pytest.approx((2 / 3 + 1 + 0.5) / 4, abs=1e-6)
    loaded = Plan.load(path)
    assert loaded == plan and loaded.meta == plan.meta and loaded.keep_ratios == plan.keep_ratios


def test_load_for_a_model_with_another_layer_count_fails(tmp_path):
    path = tmp_path / "plan.json"
    layers_plan(8, [2, 3], model_type="llama").save(path)
    assert Plan.load(path, model=tiny_model(layers=8)).selection_layers == [2, 3]
    with pytest.raises(ValueError, match="8 layers but the model has 6"):
        Plan.load(path, model=tiny_model(layers=6))
    with pytest.raises(ValueError, match="model_type='llama'"):
        Plan.load(path, model=tiny_model("mistral", layers=8))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format": "something"}, "not an orthorank plan"),
        ({"version": 99}, "unsupported plan version"),
        ({"num_layers": 5}, "num_layers"),
        ({"keep_ratios": [1.0, 1.5, 1.0, 1.0]}, r"keep_ratios\[1\]"),
        ({"selector": "best"}, "orthogonal"),
    ],
)
def test_bad_plans_refused(tmp_path, change, match):
    data = {**layers_plan(4, [1]).to_dict(), **change}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        Plan.load(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"keep_ratios: [1.0, 0.5]\n",  # YAML, not JSON
        b"\x89PNG\r\n\x1a\n\x00\xff\xfe",  # binary
        b"[1.0, 0.5, 1.0]",  # JSON, not an object
        b'{"format": "orthorank-plan"',  # truncated
    ],
    ids=["empty", "yaml", "binary", "list", "truncated"],
)
def test_a_file_that_is_not_a_plan_is_refused_by_name(tmp_path, content):
    path = tmp_path / "not-a-plan.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"not-a-plan\.json is not a valid orthorank plan file"):
        Plan.load(path)


def test_a_plan_with_values_of_the_wrong_type_is_refused_by_name(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({**layers_plan(4, [1]).to_dict(), "keep_ratios": [1.0, "half", 1.0, 1.0]}))
    with pytest.raises(ValueError, match=r"typo\.json .*number"):
        Plan.load(path)


def test_bad_constructor_arguments_refused():
    with pytest.raises(TypeError, match="sequence"):
        Plan("1.0")
    with pytest.raises(ValueError, match="empty"):
        Plan(())
    with pytest.raises(TypeError, match="number"):
        Plan((1.0, "x"))


def test_views_and_str():
    plan = Plan((1.0, 1 / 3, 0.0, 1.0), meta={"flops_saved": 0.25, "flops_seq_len": 64})
    assert plan.selection_layers == [1] and plan.removed_layers == [2]
    assert plan.sparsity == pytest.approx((2 / 3 + 1) / 4)
    text = str(plan)
    assert "1:0.333" in text and "removed layers 2" in text and "sparsity 0.417" in text and "25.0%" in text


def test_flops_fraction_known_values():
    model = tiny_model(layers=4)  # hidden 64, intermediate 128, 4 heads x 16, 2 kv heads x 16, vocab 97
    seq = 9
    kv = 2 * 2 * 64 * 32
    rest = 2 * 2 * 64 * 64 + 3 * 2 * 64 * 128 + 2 * 2 * 64 * (seq + 1) / 2
    head = 2 * 64 * 97
    dense = 4 * (kv + rest) + head
    assert Plan((1.0,) * 4).flops_fraction(model.config, seq) == 0.0
    assert Plan((0.0,) * 4).flops_fraction(model.config, seq, include_head=False) == pytest.approx(1.0)
    plan = Plan((1.0, 0.25, 0.0, 1.0))
    assert plan.flops_fraction(model, seq) == pytest.approx((0.75 * rest + kv + rest) / dense)
    assert flops_fraction(plan, model.config, seq) == plan.flops_fraction(model.config, seq)
    with pytest.raises(ValueError, match="seq_len"):
        plan.flops_fraction(model.config, 0)
    with pytest.raises(ValueError, match="layers"):
        Plan((1.0,) * 3).flops_fraction(model.config, seq)
    with pytest.raises(TypeError, match="config"):
        plan.flops_fraction(object(), seq)


def test_default_plan_sparsity_and_limits():
    plan = default_plan(30, 0.2)
    assert len(plan.selection_layers) == 9 and plan.sparsity == pytest.approx(0.2)
    assert plan.selection_layers == list(range(10, 19))  # a block centred in the middle
    assert default_plan(12, 0.2).selection_layers == [4, 5, 6, 7]
    assert default_plan(6, 0.44).selection_layers == [1, 2, 3, 4]  # never the first or last layer
    with pytest.raises(ValueError, match="sparsity"):
        default_plan(6, 0.9)


def test_patch_accepts_a_loaded_plan(tmp_path):
    model = tiny_model(layers=6)
    path = tmp_path / "p.json"
    layers_plan(6, [2, 4], 0.5, model_type="llama").save(path)
    orthorank.patch(model, plan=Plan.load(path, model=model))
    assert orthorank.get_plan(model).selection_layers == [2, 4]
    orthorank.unpatch(model)
