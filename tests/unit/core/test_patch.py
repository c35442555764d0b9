"""The public patch API: reversibility, generate/pipeline, caches, padding, bad input."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, pipeline

import orthorank
from orthorank import autoplan, config
from orthorank.config import DEFAULT_KEEP_MIN, PatchOptions
from orthorank.install import handle, running_dense
from orthorank.layer import SelectiveForward
from orthorank.plan import layers_plan

from tests.conftest import REAL_OBJECTIVE_DEFAULTS
from tests.tiny_models import cache_kwarg, left_padded_batch, tiny_model, tiny_tokenizer


def _logits(model, ids, mask=None, position_ids=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=position_ids).logits


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_sparsity_zero_and_unpatch_give_dense_logits(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 97, (2, 24))
    dense = _logits(model, ids)
    orthorank.patch(model, sparsity=0.0)
    assert orthorank.is_patched(model) and orthorank.get_plan(model).is_dense
    assert torch.equal(_logits(model, ids), dense)
    orthorank.patch(model, layers=[1, 2, 3], keep_ratio=0.3)
    assert not torch.allclose(_logits(model, ids), dense)
    orthorank.unpatch(model)
    assert not orthorank.is_patched(model)
    assert torch.equal(_logits(model, ids), dense)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_padded_rows_equal_rows_alone(arch, attn):
    model = tiny_model(arch, attn)
    orthorank.patch(model, layers=[1, 2, 4], keep_ratio=0.4)
    lengths = [18, 11, 5]
    ids, mask = left_padded_batch(lengths, 18)
    batch = _logits(model, ids, mask, (mask.cumsum(-1) - 1).clamp_min(0))
    for row, n in enumerate(lengths):
        alone = _logits(model, ids[row : row + 1, 18 - n :])
        torch.testing.assert_close(batch[row, 18 - n :], alone[0], atol=1e-4, rtol=1e-4)


def test_patching_twice_replaces_and_context_manager_restores():
    model = tiny_model()
    ids = torch.randint(3, 97, (1, 30))
    orthorank.patch(model, layers=[1, 2])
    first = _logits(model, ids)
    orthorank.patch(model, layers=[3], keep_ratio=0.5)
    assert orthorank.get_plan(model).selection_layers == [3]
    assert set(orthorank.layer_stats(model)) == {3}
    assert not isinstance(model.model.layers[1].__dict__.get("forward"), SelectiveForward)
    with orthorank.patched(model, sparsity=0.0):
        assert orthorank.get_plan(model).is_dense
    assert orthorank.get_plan(model).selection_layers == [3]
    orthorank.patch(model, layers=[1, 2])
    assert torch.equal(_logits(model, ids), first)
    orthorank.unpatch(model)
    dense = _logits(model, ids)
    with orthorank.patched(model, layers=[2]) as m:
        assert m is model and orthorank.is_patched(model)
    assert not orthorank.is_patched(model)
    assert torch.equal(_logits(model, ids), dense)


def test_sparsity_gives_a_self_calibrated_plan_at_that_sparsity():
    model = tiny_model()
    orthorank.patch(model, sparsity=0.2, progress=False)
    plan = orthorank.get_plan(model)
    assert plan.method == "calibrated" and plan.meta["source"] == "self-generated"
    # the round of the search closest to 0.2: within half of what one selection layer adds
    assert abs(plan.sparsity - 0.2) <= autoplan.step_tolerance(6, 1 / 3)
    assert all(any(r == pytest.approx(v) for v in (1.0, 1 / 3, 1 / 12)) for r in plan.keep_ratios)
    # the generation search leaves the first layer dense and may use the last one
    assert plan.selection_layers and 0 not in plan.selection_layers and plan.meta["exclude"] == [0]
    orthorank.patch(model)  # the default sparsity is 0.2: the same plan, now from the cache
    assert orthorank.get_plan(model) == plan and orthorank.get_plan(model).meta["origin"] == "cache"


def test_generate_greedy_sample_beam_and_pipeline():
    model = tiny_model()
    tok = tiny_tokenizer()
    ids, mask = left_padded_batch([12, 7], 12)
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    orthorank.patch(model, layers=[1, 2, 3], keep_ratio=0.3)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert greedy.shape == dense.shape == (2, 18)
    # every row equals the same row generated alone
    for row, n in enumerate([12, 7]):
        alone = model.generate(ids[row : row + 1, 12 - n :], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(alone[0], greedy[row, 12 - n :])
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (2, 18)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert beams.shape == (2, 17)
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    out = generator(["w5 w6 w7 w8 w9 w10", "w11 w12 w13"], max_new_tokens=4, do_sample=False)
    assert len(out) == 2 and all(o[0]["generated_text"].startswith(p) for o, p in zip(out, ["w5", "w11"]))
    stats = orthorank.layer_stats(model)
    assert all(s.selective_calls > 0 and s.other_calls > 0 for s in stats.values())


def test_static_cache_generate_matches_dynamic():
    model = tiny_model()
    orthorank.patch(model, layers=[1, 2, 3], keep_ratio=0.3)
    ids, mask = left_padded_batch([14, 9], 14)
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    static = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static"
    )
    assert torch.equal(dynamic, static)


def test_bypass_decode_policy_writes_keys_and_skips_the_layer():
    model = tiny_model()
    ids = torch.randint(3, 97, (1, 16))
    orthorank.patch(model, layers=[2], keep_ratio=0.5, decode="bypass")
    cache = DynamicCache(config=model.config)
    seen = []
    layer = model.model.layers[2]
    hook = layer.register_forward_hook(lambda m, a, k, o: seen.append(torch.equal(o, a[0])), with_kwargs=True)
    with torch.no_grad():
        out = model(ids, use_cache=True, **{cache_kwarg(model): cache})
        step = out.logits[:, -1:].argmax(-1)
        model(step, use_cache=True, **{cache_kwarg(model): cache})
    hook.remove()
    assert seen == [False, True]
    assert all(cache.layers[i].keys.shape[2] == 17 for i in range(6))


def test_patch_leaves_weights_state_dict_config_and_saved_files_untouched(tmp_path: Path):
    model = tiny_model()
    keys = list(model.state_dict())
    model.save_pretrained(tmp_path / "dense")  # (saving itself fills in config.architectures/dtype)
    config = model.config.to_dict()
    orthorank.patch(model, layers=[1, 4], keep_ratio=0.5)
    assert list(model.state_dict()) == keys
    assert model.config.to_dict() == config
    model.save_pretrained(tmp_path / "patched")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert filecmp.cmp(tmp_path / "dense" / name, tmp_path / "patched" / name, shallow=False), name
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in model.model.layers)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"sparsity": 1.5}, ValueError, "[0, 1)"),
        ({"sparsity": -0.1}, ValueError, "[0, 1)"),
        ({"sparsity": "0.2"}, TypeError, "number"),
        ({"sparsity": 0.9}, ValueError, "sparsity <="),
        ({"layers": [1], "keep_ratio": 0.0}, ValueError, "(0, 1)"),
        ({"layers": [1], "keep_ratio": 1.0}, ValueError, "(0, 1)"),
        ({"layers": [6]}, ValueError, "[0, 5]"),
        ({"layers": [1, 1]}, ValueError, "repeat"),
        ({"layers": 3}, TypeError, "sequence"),
        ({"sparsity": 0.2, "layers": [1]}, ValueError, "one of"),
        ({"layers": [1], "selector": "best"}, ValueError, "'orthogonal'"),
        ({"layers": [1], "decode": "sparse"}, ValueError, "'dense', 'bypass'"),
        ({"plan": layers_plan(12, [3])}, ValueError, "12 layers"),
        ({"plan": [1.0] * 6}, TypeError, "Plan"),
        ({"plan": "my-plan.json"}, TypeError, "orthorank.Plan.load(path, model=model)"),
    ],
)
def test_bad_input_raises_clearly(kwargs, error, words):
    model = tiny_model()
    with pytest.raises(error, match=None) as info:
        orthorank.patch(model, **kwargs)
    assert words in str(info.value)
    assert not orthorank.is_patched(model)


def test_unsupported_architecture_is_refused_by_name():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="GPT2LMHeadModel.*llama, mistral"):
        orthorank.patch(model, sparsity=0.2)


def test_random_selector_is_seeded():
    model = tiny_model()
    ids = torch.randint(3, 97, (2, 30))
    runs = []
    for seed in (0, 0, 1):
        orthorank.patch(model, layers=[1, 2, 3], keep_ratio=0.3, selector="random", seed=seed, keep_recent=0)
        runs.append(_logits(model, ids))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def _outcome(model, kwargs):
    """``("ok", logits)`` or ``("error", type, message)`` of one forward."""
    try:
        with torch.no_grad():
            return ("ok", model(**kwargs).logits)
    except Exception as exc:  # noqa: BLE001 - the outcome itself is compared
        return ("error", type(exc), str(exc))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "inputs",
    [
        dict(input_ids=torch.zeros(2, 0, dtype=torch.long)),
        dict(input_ids=torch.zeros(2, 0, dtype=torch.long), attention_mask=torch.zeros(2, 0, dtype=torch.long)),
        dict(inputs_embeds=torch.zeros(2, 0, 64)),
        dict(input_ids=torch.zeros(0, 5, dtype=torch.long), attention_mask=torch.ones(0, 5, dtype=torch.long)),
        dict(input_ids=torch.zeros(1, 0, dtype=torch.long), use_cache=True),
    ],
    ids=["ids", "ids+mask", "embeds", "empty-batch", "cache"],
)
def test_zero_length_input_behaves_as_the_dense_model(attn, inputs):
    """An empty input gives the dense model's outcome: the same error (type and message) or output."""
    dense = _outcome(tiny_model(attn=attn), inputs)
    model = orthorank.patch(tiny_model(attn=attn), layers=[0, 1, 2], keep_ratio=0.4)  # layer 0 selects first
    patched = _outcome(model, inputs)
    assert dense[0] == patched[0]
    if dense[0] == "ok":
        assert torch.equal(dense[1], patched[1])
    else:
        assert dense[1:] == patched[1:]


def test_running_dense_lifts_the_patch_for_a_while():
    model = tiny_model()
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        orthorank.patch(model, layers=[1, 2], keep_ratio=0.4, keep_recent=0, decode="bypass")
        patched = model(input_ids=ids).logits
        plan = orthorank.get_plan(model)
        with running_dense(model):
            assert not orthorank.is_patched(model)
            torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=0, atol=0)
        assert orthorank.get_plan(model) == plan
        assert handle(model).options == PatchOptions(decode="bypass", keep_recent=0)
        torch.testing.assert_close(model(input_ids=ids).logits, patched, rtol=0, atol=0)
    orthorank.unpatch(model)
    with running_dense(model):  # a dense model stays dense
        assert not orthorank.is_patched(model)
    assert not orthorank.is_patched(model)


def test_the_top_level_api_is_small():
    assert sorted(orthorank.__all__) == [
        "BudgetCache", "Plan", "__version__", "calibrate", "get_plan", "is_patched", "layer_stats", "patch",
        "patched", "supported_model_types", "unpatch",
    ]
    assert all(hasattr(orthorank, name) for name in orthorank.__all__)
    assert not hasattr(orthorank, "PatchOptions")



@pytest.mark.parametrize("objective,kwargs,expected", [
    ("generation", {}, DEFAULT_KEEP_MIN), ("perplexity", {}, 0), ("generation", {"keep_min": 5}, 5),
    ("perplexity", {"keep_min": 7}, 7),
])
def test_keep_min_defaults_to_the_objectives(objective, kwargs, expected, monkeypatch):
    for name, defaults in REAL_OBJECTIVE_DEFAULTS.items():  # the library's, not the tests' (no floor)
        monkeypatch.setitem(config.OBJECTIVE_DEFAULTS, name, defaults)
    model = tiny_model()
    orthorank.patch(model, layers=[1, 2], objective=objective, **kwargs)
    assert handle(model).options.keep_min == expected
    assert all(f.keep_min == expected for f in handle(model).forwards.values())
    assert REAL_OBJECTIVE_DEFAULTS["generation"][2] == DEFAULT_KEEP_MIN > 0
