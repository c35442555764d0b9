"""``patch(model, sparsity=s)`` without a plan: shipped plans, the plan cache, self-calibration,
the quality budget and the quality warning. Tiny models; the conftest gives every test its own
ORTHORANK_CACHE and a tiny self-calibration recipe."""

from __future__ import annotations

import dataclasses

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import orthorank
from benchmarks import ship_plans
from orthorank import autoplan, install, plancache, selfcalib, shipped
from orthorank import recipe as recipes
from orthorank import layer as layer_module
from orthorank.fingerprint import model_fingerprint
from orthorank.plan import layers_plan
from orthorank.search import closest_round, plan_at_round
from orthorank.selfcalib import self_generated_ids
from orthorank.shipped import save_shipped_plan

from tests.layer_checks import KEEP, _dense_layer, _inputs, _run_with_capture, assert_layer_property
from tests.tiny_models import TINY_RECIPE, tiny_model, tiny_tokenizer

THIRD = 1 / 3


@pytest.fixture
def calls(monkeypatch) -> list:
    """Records every self-calibration (and still runs it)."""
    made: list = []
    real = selfcalib.auto_calibrate

    def counting(*args, **kwargs):
        made.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(selfcalib, "auto_calibrate", counting)
    return made


@pytest.fixture
def fake_calls(monkeypatch) -> list:
    """Replaces self-calibration by a fixed search result (layers 2 then 3), recording the calls:
    for tests of the cache machinery, which does not depend on how a plan was made."""
    made: list = []

    def fake(model, sparsity, keep_ratio, selector="orthogonal", *, recipe=None, progress=True):
        made.append(sparsity)
        plan = known_search([0.01, 0.02], [2, 3])
        meta = {**plan.meta, "calib_seq_len": 16, "seconds": 0.0, "source": "self-generated"}
        return orthorank.Plan(plan.keep_ratios, selector, plan.model_type, plan.method, meta)

    monkeypatch.setattr(selfcalib, "auto_calibrate", fake)
    return made


@pytest.fixture
def no_calibration(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("auto_calibrate must not run here")

    monkeypatch.setattr(selfcalib, "auto_calibrate", refuse)


@pytest.fixture
def ship_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "shipped"
    monkeypatch.setattr(shipped, "SHIPPED_DIR", folder)
    return folder


def cache_files() -> list[Path]:
    return sorted((Path(os.environ["ORTHORANK_CACHE"]) / "plans").rglob("*.json"))


def known_search(extra_losses: list[float], layers: list[int], n: int = 6, dense: float = 2.0) -> orthorank.Plan:
    """A search result whose rounds are known: round r selects ``layers[r]``, loss ``dense + extra[r]``."""
    ratios = [1.0] * n
    for i in layers:
        ratios[i] = THIRD
    rounds = [{"layer": i, "keep_ratio": THIRD, "loss": dense + d} for i, d in zip(layers, extra_losses)]
    meta = {"dense_loss": dense, "final_loss": dense + extra_losses[-1], "rounds": rounds, "keep_ratio": THIRD}
    return orthorank.Plan(tuple(ratios), model_type="llama", method="calibrated", meta=meta)


# --- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_is_dtype_stable_and_weight_sensitive():
    model = tiny_model(layers=4)
    fp = model_fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(tiny_model(layers=4)) == fp
    assert model_fingerprint(tiny_model(layers=4).to(torch.bfloat16)) == fp
    assert model_fingerprint(tiny_model(layers=4, seed=1)) != fp
    assert model_fingerprint(tiny_model(layers=5)) != model_fingerprint(tiny_model(layers=5, seed=1))
    tuned = tiny_model(layers=4)
    with torch.no_grad():
        for p in tuned.model.layers[2].parameters():
            p.mul_(1.05)
    assert model_fingerprint(tuned) != fp
    orthorank.patch(model, layers=[1, 2])
    assert model_fingerprint(model) == fp


def test_fingerprint_of_offloaded_and_meta_models():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model(layers=4)
    fp = model_fingerprint(model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[1].self_attn.q_proj.weight.is_meta
    assert model_fingerprint(model) == fp
    with torch.device("meta"):
        empty = tiny_model(layers=4)
    with pytest.raises(ValueError, match="meta device"):
        model_fingerprint(empty)


# --- self-generated text -----------------------------------------------------------------------


def test_self_generated_ids_are_seeded_dense_and_leave_the_global_rng_alone():
    model = tiny_model(layers=4)
    state = torch.get_rng_state()
    a = self_generated_ids(model, 3, 12, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert (a[:, 0] == model.config.bos_token_id).all() and a.min() >= 0 and a.max() < model.config.vocab_size
    assert torch.equal(self_generated_ids(model, 3, 12, seed=5, batch_size=2), a)
    assert not torch.equal(self_generated_ids(model, 3, 12, seed=6), a)
    orthorank.patch(model, layers=[1, 2], keep_ratio=0.3)
    assert torch.equal(self_generated_ids(model, 3, 12, seed=5), a)  # sampled densely
    assert orthorank.get_plan(model).selection_layers == [1, 2]  # the patch is back


def test_start_token_falls_back_to_eos_then_refuses():
    model = tiny_model(layers=2, bos_token_id=None)
    model.generation_config.bos_token_id = None
    assert selfcalib.start_token(model) == model.config.eos_token_id == 2
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="bos_token_id or eos_token_id"):
        selfcalib.start_token(model)
    with pytest.raises(ValueError, match="window"):
        self_generated_ids(tiny_model(layers=2), 2, 1)
    with pytest.raises(ValueError, match="temperature"):
        self_generated_ids(tiny_model(layers=2), 2, 8, temperature=0.0)


# --- patch(sparsity=...) resolution -------------------------------------------------------------


def test_calibrates_once_then_a_fresh_copy_reads_the_cache(calls):
    model = tiny_model()
    orthorank.patch(model, sparsity=0.2, progress=False, objective="perplexity")
    plan = orthorank.get_plan(model)
    assert calls == [0.2] and plan.meta["origin"] == "calibrated"
    assert abs(plan.sparsity - 0.2) <= autoplan.step_tolerance(6, THIRD)
    assert plan.meta["source"] == "self-generated" and plan.meta["recipe"] == recipes.RECIPE.to_dict()
    assert plan.meta["calib_windows"] == TINY_RECIPE["windows"] and plan.meta["calib_seq_len"] == TINY_RECIPE["window"]
    assert plan.expected_ppl_increase == pytest.approx(math.expm1(plan.meta["final_loss"] - plan.meta["dense_loss"]))
    fp = model_fingerprint(model)
    path = plancache.plan_path(fp, 0.2, THIRD, "orthogonal", recipes.RECIPE.key())
    assert path.is_file() and path.is_relative_to(Path(os.environ["ORTHORANK_CACHE"]) / "plans")
    again = orthorank.patch(tiny_model(), sparsity=0.2, objective="perplexity")
    assert calls == [0.2] and orthorank.get_plan(again) == plan and orthorank.get_plan(again).meta["origin"] == "cache"
    orthorank.patch(tiny_model(), objective="perplexity")  # the default sparsity is 0.2
    assert calls == [0.2] and orthorank.get_plan(again) == plan
    lower = orthorank.patch(tiny_model(), sparsity=(1 - THIRD) / 6, objective="perplexity")  # a round of the cached search
    assert calls == [0.2] and orthorank.get_plan(lower) == plan_at_round(plan, 1)
    orthorank.patch(tiny_model(), sparsity=0.2, keep_ratio=0.5, objective="perplexity")  # another request: calibrates
    assert calls == [0.2, 0.2]


def test_sparsity_zero_installs_nothing_and_never_calibrates(no_calibration):
    model = tiny_model()
    orthorank.patch(model, sparsity=0.0, objective="perplexity")
    assert orthorank.get_plan(model).is_dense and not cache_files()


def test_cache_false_neither_reads_nor_writes(fake_calls):
    calls = fake_calls
    orthorank.patch(tiny_model(), sparsity=0.2, cache=False, progress=False, objective="perplexity")
    assert calls == [0.2] and not cache_files()
    orthorank.patch(tiny_model(), sparsity=0.2, progress=False, objective="perplexity")
    assert calls == [0.2, 0.2] and len(cache_files()) == 1
    orthorank.patch(tiny_model(), sparsity=0.2, cache=False, progress=False, objective="perplexity")
    assert calls == [0.2, 0.2, 0.2]


def test_a_changed_recipe_does_not_reuse_old_plans(fake_calls, monkeypatch):
    calls = fake_calls
    orthorank.patch(tiny_model(), sparsity=0.2, progress=False, objective="perplexity")
    monkeypatch.setattr(recipes, "RECIPE", recipes.Recipe(**{**TINY_RECIPE, "seed": 1}))
    orthorank.patch(tiny_model(), sparsity=0.2, progress=False, objective="perplexity")
    assert calls == [0.2, 0.2] and len(cache_files()) == 2


BAD_FILES = {
    "not-json": "{ this is not json",
    "binary": b"\xff\xfe\x00garbage",
    "foreign-format": json.dumps({"format": "something-else", "keep_ratios": [1.0] * 6}),
    "other-fingerprint": "OTHER_FP",
    "wrong-layers": "WRONG_LAYERS",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_cache_file_is_ignored_with_a_warning_and_rebuilt(kind, fake_calls, caplog):
    calls = fake_calls
    model = tiny_model()
    fp = model_fingerprint(model)
    key = recipes.RECIPE.key()
    path = plancache.plan_path(fp, 0.2, THIRD, "orthogonal", key)
    request = plancache.request_dict(0.2, THIRD, "orthogonal", key)
    path.parent.mkdir(parents=True)
    content = BAD_FILES[kind]
    good = layers_plan(6, [2, 3], THIRD, model_type="llama", method="calibrated")
    if content == "OTHER_FP":
        content = json.dumps({**good.to_dict(), "fingerprint": "0" * 16, "request": request})
    elif content == "WRONG_LAYERS":
        content = json.dumps({**layers_plan(8, [2, 3]).to_dict(), "fingerprint": fp, "request": request})
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level("WARNING", logger="orthorank"):
        orthorank.patch(model, sparsity=0.2, progress=False, objective="perplexity")
    assert calls == [0.2]
    assert any("ignoring the cached plan" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    rebuilt = plancache.read_plan(path, fp, 6, "llama", request)
    assert rebuilt == orthorank.get_plan(model)


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ORTHORANK_CACHE", str(tmp_path))
    assert plancache.cache_root() == tmp_path
    assert plancache.cache_root(tmp_path / "x") == tmp_path / "x"


def test_unwritable_cache_warns_and_still_patches(fake_calls, monkeypatch, tmp_path, caplog):
    calls = fake_calls
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ORTHORANK_CACHE", str(blocker))
    with caplog.at_level("WARNING", logger="orthorank"):
        model = orthorank.patch(tiny_model(), sparsity=0.2, progress=False, objective="perplexity")
    assert calls == [0.2] and orthorank.get_plan(model).selection_layers
    assert any("could not cache the plan" in r.getMessage() for r in caplog.records)


_WRITER = textwrap.dedent(
    """
    import torch
    torch.set_num_threads(1)
    from tests.tiny_models import TINY_RECIPE, tiny_model
    import orthorank
    from orthorank import plancache
    from orthorank import recipe as recipes
    from orthorank.fingerprint import model_fingerprint
    recipes.RECIPE = recipes.Recipe(**TINY_RECIPE)
    model = tiny_model()
    orthorank.patch(model, sparsity=0.2, progress=False, objective="perplexity")
    plan = orthorank.get_plan(model)
    fp = model_fingerprint(model)
    key = recipes.RECIPE.key()
    path = plancache.plan_path(fp, 0.2, 1 / 3, "orthogonal", key)
    request = plancache.request_dict(0.2, 1 / 3, "orthogonal", key)
    for i in range(150):
        meta = {{**plan.meta, "writer": {writer}, "i": i, "padding": "x" * (1000 * (i % 7))}}
        assert plancache.write_plan(path, orthorank.Plan(plan.keep_ratios, plan.selector, plan.model_type, plan.method, meta), fp, request)
    print(path)
    """
)


def test_two_processes_calibrating_at_once_leave_a_valid_file():
    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER.format(writer=w)], env=env, cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    path = Path(outs[0][0].strip().splitlines()[-1])
    assert Path(outs[1][0].strip().splitlines()[-1]) == path
    model = tiny_model()
    fp = model_fingerprint(model)
    request = plancache.request_dict(0.2, THIRD, "orthogonal", recipes.RECIPE.key())
    plan = plancache.read_plan(path, fp, 6, "llama", request)
    assert plan is not None and plan.meta["i"] == 149 and plan.meta["writer"] in (0, 1)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


# --- shipped plans --------------------------------------------------------------------------------


def test_shipped_plan_is_used_without_calibration(ship_dir, no_calibration):
    model = tiny_model()
    search = known_search([0.01, 0.05, 0.1], [2, 3, 4])
    written = save_shipped_plan(search, model, description="tiny", directory=ship_dir)
    assert written == ship_dir / f"{model_fingerprint(model)}.json"
    data = json.loads(written.read_text())
    assert data["format"] == "orthorank-shipped-plans" and data["plans"][0]["sparsity"] == round(search.sparsity, 4)
    fresh = tiny_model().to(torch.bfloat16)  # same checkpoint, another dtype: same fingerprint
    orthorank.patch(fresh, sparsity=search.sparsity, objective="perplexity")
    assert orthorank.get_plan(fresh) == search and orthorank.get_plan(fresh).meta["origin"] == "shipped"
    orthorank.patch(fresh, sparsity=0.2, objective="perplexity")  # between rounds 1 and 2 of the shipped search: its closest round
    assert orthorank.get_plan(fresh) == plan_at_round(search, 2) and not cache_files()
    with pytest.raises(AssertionError, match="must not run"):  # another keep ratio is not served
        orthorank.patch(fresh, sparsity=0.2, keep_ratio=0.5, objective="perplexity")


def test_shipped_plan_comes_before_the_cache_and_bad_shipped_files_are_skipped(ship_dir, fake_calls, caplog):
    calls = fake_calls
    model = tiny_model()
    orthorank.patch(model, sparsity=0.2, progress=False, objective="perplexity")
    assert calls == [0.2]
    search = known_search([0.01, 0.05], [4, 1])
    save_shipped_plan(search, model, directory=ship_dir)
    orthorank.patch(model, sparsity=0.2, objective="perplexity")
    assert orthorank.get_plan(model) == search and calls == [0.2]
    (ship_dir / f"{model_fingerprint(model)}.json").write_text('{"format": "orthorank-shipped-plans"')
    with caplog.at_level("WARNING", logger="orthorank"):
        orthorank.patch(model, sparsity=0.2, objective="perplexity")
    assert orthorank.get_plan(model).meta["origin"] == "cache" and calls == [0.2]
    assert any("ignoring the shipped plans" in r.getMessage() for r in caplog.records)


def test_save_shipped_plan_replaces_the_same_request_and_checks_the_model(ship_dir):
    model = tiny_model()
    save_shipped_plan(known_search([0.01, 0.05], [2, 3]), model, directory=ship_dir)
    save_shipped_plan(known_search([0.02, 0.03], [4, 1]), model, directory=ship_dir)
    save_shipped_plan(known_search([0.02], [4]), model, directory=ship_dir)
    entries = shipped.read_entries(model_fingerprint(model), 6, "llama")
    assert [e["plan"].selection_layers for e in entries] == [[4], [1, 4]]
    with pytest.raises(ValueError, match="8 layers"):
        save_shipped_plan(layers_plan(8, [2]), model, directory=ship_dir)
    with pytest.raises(ValueError, match="keep ratio"):
        save_shipped_plan(orthorank.Plan((1.0, 0.0, 1.0, 1.0, 1.0, 1.0)), model, directory=ship_dir)


def test_save_shipped_plan_writes_only_into_a_folder_it_is_given(ship_dir):
    with pytest.raises(TypeError, match="directory"):
        save_shipped_plan(known_search([0.01], [2]), tiny_model())  # never into the package by default
    assert not ship_dir.exists()


def test_shipped_cli_writes_entries(tmp_path, ship_dir):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    plan_file = tmp_path / "plan.json"
    known_search([0.01, 0.05], [2, 3]).save(plan_file)
    ship_plans.main([str(plan_file), "--model", str(tmp_path / "model"), "--dir", str(tmp_path / "out")])
    (written,) = (tmp_path / "out").iterdir()
    assert written.name == f"{model_fingerprint(model)}.json"
    assert shipped.read_entries(written.stem, 6, "llama", tmp_path / "out")[0]["plan"].selection_layers == [2, 3]


# --- quality budget and warning ------------------------------------------------------------------


def test_quality_budget_picks_the_highest_round_within_it(ship_dir, no_calibration):
    model = tiny_model()
    search = known_search([0.01, 0.05, 0.2, 0.4], [2, 3, 4, 1])  # the search to 0.444, the cap on 6 layers
    save_shipped_plan(search, model, directory=ship_dir)
    for budget, rounds in ((0.005, 0), (0.011, 1), (0.06, 2), (math.expm1(0.2) + 1e-9, 3), (0.5, 4), (3.0, 4)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a budget never warns
            orthorank.patch(model, max_ppl_increase=budget, objective="perplexity")
        assert orthorank.get_plan(model) == plan_at_round(search, rounds), budget
        increase = orthorank.get_plan(model).expected_ppl_increase
        assert increase <= budget + 1e-9
    assert orthorank.get_plan(model).sparsity == pytest.approx(4 * (2 / 3) / 6)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"max_ppl_increase": 0}, ValueError, "> 0"),
        ({"max_ppl_increase": -0.1}, ValueError, "> 0"),
        ({"max_ppl_increase": float("inf")}, ValueError, "finite"),
        ({"max_ppl_increase": float("nan")}, ValueError, "finite"),
        ({"max_ppl_increase": "0.1"}, TypeError, "number"),
        ({"max_ppl_increase": True}, TypeError, "number"),
        ({"max_ppl_increase": 0.1, "sparsity": 0.2}, ValueError, "one of"),
        ({"max_ppl_increase": 0.1, "layers": [1]}, ValueError, "one of"),
        ({"sparsity": 0.2, "cache": "no"}, TypeError, "cache"),
    ],
)
def test_bad_budget_and_cache_arguments(kwargs, error, words, no_calibration):
    model = tiny_model()
    with pytest.raises(error) as info:
        orthorank.patch(model, **kwargs, objective="perplexity")
    assert words in str(info.value)
    assert not orthorank.is_patched(model)


def test_large_expected_increase_warns_and_names_a_sparsity(ship_dir, no_calibration):
    model = tiny_model()
    search = known_search([0.01, 0.05, 0.2, 0.4], [2, 3, 4, 1])
    assert search.expected_ppl_increase == pytest.approx(math.expm1(0.4))
    with pytest.warns(UserWarning, match=r"about 49%.*sparsity 0\.333 stays under 25%") as record:
        orthorank.patch(model, plan=search)
    assert record[0].filename == __file__  # points at the caller
    save_shipped_plan(search, model, directory=ship_dir)
    with pytest.warns(UserWarning, match=r"sparsity 0\.333 stays under 25%"):
        orthorank.patch(model, sparsity=0.44, objective="perplexity")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        orthorank.patch(model, sparsity=0.33, objective="perplexity")  # round 3: +22%
        orthorank.patch(model, plan=plan_at_round(search, 3))
        orthorank.patch(model, layers=[1, 2, 3, 4])  # no calibration loss known: nothing to say
    assert orthorank.get_plan(model).expected_ppl_increase is None
    with pytest.warns(UserWarning, match="no sparsity of its search stays under 25%"):
        orthorank.patch(model, plan=known_search([0.3, 0.4], [2, 3]))


def test_expected_ppl_increase_of_plans():
    assert layers_plan(6, [2]).expected_ppl_increase is None
    plan = orthorank.Plan((1.0,) * 4, meta={"dense_loss": 2.0, "final_loss": 2.1})
    assert plan.expected_ppl_increase == pytest.approx(math.exp(0.1) - 1)
    assert orthorank.Plan((1.0,) * 4, meta={"dense_loss": "?", "final_loss": 2.1}).expected_ppl_increase is None


# --- the resolved plan is a real patch ------------------------------------------------------------


def test_calibrating_a_patched_model_measures_the_dense_model(calls):
    reference = orthorank.patch(tiny_model(), sparsity=0.2, cache=False, progress=False, objective="perplexity")
    model = orthorank.patch(tiny_model(), layers=[1, 2, 3, 4], keep_ratio=0.1)
    orthorank.patch(model, sparsity=0.2, cache=False, progress=False, objective="perplexity")
    assert orthorank.get_plan(model) == orthorank.get_plan(reference) and len(calls) == 2


def test_resolved_plan_keeps_the_selection_layer_property():
    model = tiny_model()
    orthorank.patch(model, sparsity=0.2, keep_ratio=KEEP, progress=False, objective="perplexity")
    plan = orthorank.get_plan(model)
    assert plan.selection_layers and plan.meta["origin"] == "calibrated"
    from transformers import DynamicCache

    ids, mask, position_ids = _inputs(padded=True)
    cache = DynamicCache(config=model.config)
    captured = _run_with_capture(model, ids, mask, position_ids, cache)
    for i, got in captured.items():
        dense_cache = DynamicCache(config=model.config)
        dense = _dense_layer(model, i, got["x"], got["kwargs"], dense_cache)
        assert_layer_property(model, i, got, dense, cache, dense_cache, plan.selection_layers, mask.bool(), recent=1)


# --- the generation objective (the default) -----------------------------------------------------


def test_default_objective_calibrates_on_generation_windows_with_the_attention_selector():
    model = tiny_model()
    orthorank.patch(model, sparsity=0.2, progress=False)
    plan = orthorank.get_plan(model)
    recipe = recipes.GENERATION_RECIPE
    assert plan.selector == "attention" and plan.meta["objective"] == "generation"
    assert plan.meta["recipe"] == recipe.to_dict() and plan.meta["origin"] == "calibrated"
    # the search scored answers after a prompt: windows of prompt_docs whole documents, half a third, the answer
    assert plan.meta["calib_windows"] == 2 * recipe.rows
    assert plan.meta["calib_seq_len"] == (recipe.prompt_docs + 1) * recipe.window
    # it grew from the end of the model, the last layer included
    assert plan.meta["deepest"] == recipe.deepest == 4 and plan.meta["exclude"] == [0]
    assert plan.meta["levels"] == [1.0, 0.333333, 0.083333], "a selection layer may step down to 1/12"
    assert install.handle(model).options.keep_recent == 32
    fp = model_fingerprint(model)
    path = plancache.plan_path(fp, 0.2, THIRD, "attention", autoplan.search_key(recipe, "attention"))
    assert path.is_file(), "the generation plan is cached under its own recipe key"
    again = orthorank.patch(tiny_model(), sparsity=0.2)
    assert orthorank.get_plan(again).meta["origin"] == "cache" and orthorank.get_plan(again) == plan
    other = orthorank.patch(tiny_model(), sparsity=0.2, objective="perplexity", progress=False)
    assert orthorank.get_plan(other).selector == "orthogonal" and install.handle(other).options.keep_recent == 1
    assert orthorank.get_plan(other).meta["objective"] == "perplexity"


def test_a_recipe_low_keep_ratio_adds_a_level_below_the_keep_ratio():
    recipe = recipes.Recipe(low_keep_ratio=0.1)
    assert recipe.levels(0.5) == (1.0, 0.5, 0.1)
    assert dataclasses.replace(recipe, removal=True).levels(0.5) == (1.0, 0.5, 0.1, 0.0)
    assert recipe.levels(0.1) == (1.0, 0.1) and recipe.levels(0.05) == (1.0, 0.05)  # not below the keep ratio
    assert recipes.Recipe().levels(0.5) == (1.0, 0.5)
    assert recipe.key() != recipes.Recipe().key(), "plans of another level set are searched again"
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="low_keep_ratio must be in"):
            recipes.Recipe(low_keep_ratio=bad)


def test_the_cache_key_changes_with_the_query_aware_ranking(monkeypatch):
    recipe = recipes.GENERATION_RECIPE
    assert autoplan.search_key(recipe, "orthogonal") == recipe.key()
    pooled = autoplan.search_key(recipe, "attention")
    monkeypatch.setattr(layer_module, "POOLED_SPAN", 1)
    unpooled = autoplan.search_key(recipe, "attention")
    assert unpooled == recipe.key() and pooled != unpooled, "plans searched under another ranking are not reused"


def test_quality_report_names_the_objective_metric():
    generation = orthorank.Plan((1.0, THIRD, 1.0), meta={"objective": "generation", "dense_loss": 1.0, "final_loss": 1.5})
    with pytest.warns(UserWarning, match="perplexity of answers generated after a prompt"):
        autoplan.report_quality(generation)
    scoring = orthorank.Plan((1.0, THIRD, 1.0), meta={"dense_loss": 1.0, "final_loss": 1.5})
    with pytest.warns(UserWarning, match="perplexity of every token of a text"):
        autoplan.report_quality(scoring)


@pytest.mark.parametrize("bad", ["chat", None, 1])
def test_patch_rejects_an_unknown_objective(bad):
    with pytest.raises(ValueError, match="objective must be one of 'generation', 'perplexity'"):
        orthorank.patch(tiny_model(), sparsity=0.2, objective=bad)


def test_embedded_model_ships_generation_and_perplexity_plans():
    """The package's shipped files: a generation search (attention selector, to sparsity 0.4) and the
    paper's searches, for both layouts of the embedded model."""
    for fp, model_type in (("75862926133233e0", "llama"), ("5977e48f0d1f4a14", "mistral")):
        entries = shipped.read_entries(fp, 30, model_type)
        kinds = {(e["objective"], e["selector"]) for e in entries}
        assert kinds == {("generation", "attention"), ("perplexity", "orthogonal")}
        generation = [e for e in entries if e["objective"] == "generation"]
        assert len(generation) == 1 and generation[0]["sparsity"] == 0.4
        plan = generation[0]["plan"]
        assert plan.meta["recipe"] == recipes.Recipe(objective="generation", windows=8, window=128, prompt_docs=2,
                                                     answer=64, rows=4, exclude=(0,), deepest=4,
                                                     low_keep_ratio=1 / 12).to_dict()
        at_02 = closest_round(plan, 0.2)
        assert at_02.sparsity == pytest.approx(0.2, abs=0.005)
        assert min(at_02.selection_layers) >= 20  # grown from the end
        assert sorted(set(at_02.keep_ratios)) == pytest.approx([1 / 12, 1 / 3, 1.0], abs=1e-4)  # both levels
