"""benchmarks.suite: task construction, metrics on stand-in models, helpers, settings, reports."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import orthorank
from benchmarks.suite import flops, quality, speed, tasks
from benchmarks.suite.__main__ import parser, settings_from_args
from benchmarks.suite.memory import peak_bytes
from benchmarks.suite.methods import PlanCache, check_methods, model_key
from benchmarks.suite.profile import PARTS, layer_profile, profile_table
from benchmarks.suite.report import BenchResults, QualityRow, summary_table
from benchmarks.suite.runner import measure_quality
from benchmarks.suite.settings import BenchSettings, SpeedSettings, torch_dtype
from orthorank.plan import Plan, default_plan, layers_plan

from tests.tiny_models import VOCAB, tiny_model, tiny_tokenizer


class CharTokenizer:
    """One token per character (id = code point): exact, easy to reason about."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids)


# --- cloze -------------------------------------------------------------------------------------


def test_cloze_item_takes_the_last_word_without_punctuation():
    text = "one two three four five six seven eight nine ten eleven twelve the capital is Paris."
    item = tasks.cloze_item(text, min_context_words=5)
    assert item == tasks.ClozeItem("one two three four five six seven eight nine ten eleven twelve the capital is", "Paris")
    assert tasks.cloze_item('a b c d e f "quoted end".', min_context_words=3).target == "end"
    assert tasks.cloze_item("a b c d e f well-known", min_context_words=3).target == "well-known"


def test_cloze_item_rejects_numbers_short_contexts_and_short_words():
    assert tasks.cloze_item("a b c d e f born in 1990.", min_context_words=3) is None
    assert tasks.cloze_item("too short context here.", min_context_words=20) is None
    assert tasks.cloze_item("a b c d e f g h I.", min_context_words=3, min_target_chars=2) is None
    with pytest.raises(TypeError):
        tasks.cloze_item(3)  # type: ignore[arg-type]


def test_cloze_items_one_per_text_first_usable_paragraph():
    long = " ".join(f"w{i}" for i in range(25))
    texts = [f"short.\n{long} alpha.\n{long} beta.", "1 2 3", f"{long} gamma", f"{long} delta"]
    items = tasks.cloze_items(texts, 2)
    assert [i.target for i in items] == ["alpha", "gamma"]
    assert len(tasks.cloze_items(texts, 10)) == 3
    with pytest.raises(ValueError, match="n_items"):
        tasks.cloze_items(texts, 0)


def test_encode_cloze_puts_target_tokens_last_and_truncates_context_from_the_left():
    tok = CharTokenizer()
    ids, n = tasks.encode_cloze(tok, tasks.ClozeItem("abcdef", "xy"))
    assert tok.decode(ids) == "abcdef xy" and n == 3
    ids, n = tasks.encode_cloze(tok, tasks.ClozeItem("abcdef", "xy"), max_context_tokens=2)
    assert tok.decode(ids) == "ef xy"


class NextIdModel(nn.Module):
    """Stand-in causal LM whose greedy prediction after token t is t + 1."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.base_model = _OneHotNext()
        self.config = SimpleNamespace(pad_token_id=0, eos_token_id=2)

    def get_output_embeddings(self) -> nn.Module:
        return nn.Identity()


class _OneHotNext(nn.Module):
    def forward(self, input_ids, attention_mask=None):
        hidden = nn.functional.one_hot((input_ids + 1) % VOCAB, VOCAB).float()
        return SimpleNamespace(last_hidden_state=hidden)


def test_cloze_accuracy_on_a_model_with_known_predictions():
    tok = tiny_tokenizer()
    ctx = lambda a, b: " ".join(f"w{i}" for i in range(a, b))  # noqa: E731
    items = [
        tasks.ClozeItem(ctx(3, 20), "w20"),  # follows the +1 rule: right
        tasks.ClozeItem(ctx(10, 14), "w14"),  # shorter row (right padding): right
        tasks.ClozeItem(ctx(3, 30), "w50"),  # wrong
        tasks.ClozeItem(ctx(5, 9), "w60"),  # wrong
    ]
    assert quality.cloze_accuracy(NextIdModel(), tok, items, batch_size=3) == pytest.approx(0.5)
    assert quality.cloze_accuracy(NextIdModel(), tok, items[:2], batch_size=1, max_context_tokens=3) == 1.0
    with pytest.raises(ValueError):
        quality.cloze_accuracy(NextIdModel(), tok, [])


# --- perplexity --------------------------------------------------------------------------------


class FixedLogits(nn.Module):
    """Stand-in LM returning uniform logits, or a one-hot on the true next token."""

    def __init__(self, vocab: int, oracle: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.vocab, self.oracle = vocab, oracle

    def forward(self, input_ids, use_cache=False, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.oracle:
            nxt = torch.roll(input_ids, -1, dims=1)
            logits.scatter_(2, nxt.unsqueeze(-1), 100.0)
        return SimpleNamespace(logits=logits)


def test_perplexity_of_known_logits():
    ids = torch.randint(0, 11, (3, 9))
    assert quality.perplexity(FixedLogits(11), ids, batch_size=2) == pytest.approx(11.0, rel=1e-5)
    assert quality.perplexity(FixedLogits(11, oracle=True), ids) == pytest.approx(1.0, abs=1e-4)


# --- generation agreement and passkey ---------------------------------------------------------


def test_token_agreement_counts_positions_and_prefixes():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    other = torch.tensor([[1, 2, 0, 4], [0, 6, 7, 8]])
    share, prefix = tasks.token_agreement(ref, other)
    assert share == pytest.approx(6 / 8)
    assert prefix == pytest.approx((2 / 4 + 0) / 2)
    assert tasks.token_agreement(ref, ref) == (1.0, 1.0)
    with pytest.raises(ValueError):
        tasks.token_agreement(ref, ref[:, :2])


def test_greedy_continuations_shape_and_self_agreement():
    torch.set_num_threads(1)
    model = tiny_model(layers=2)
    prompts = torch.randint(3, VOCAB, (3, 6))
    a = quality.greedy_continuations(model, prompts, 5, batch_size=2)
    b = quality.greedy_continuations(model, prompts, 5, batch_size=3)
    assert a.shape == (3, 5)
    assert tasks.token_agreement(a, b) == (1.0, 1.0)


def test_passkey_prompt_has_exact_length_and_the_key_at_its_depth():
    tok = CharTokenizer()
    shallow = tasks.passkey_item(tok, 2000, "12345", 0.1)
    deep = tasks.passkey_item(tok, 2000, "12345", 0.9)
    for item in (shallow, deep):
        text = tok.decode(item.input_ids)
        assert len(item.input_ids) == 2000
        assert text.startswith(tasks.PASSKEY_INTRO) and text.endswith(tasks.PASSKEY_QUESTION)
        assert text.count("The pass key is 12345.") == 1
    pos = lambda item: tok.decode(item.input_ids).index("12345") / 2000  # noqa: E731
    assert pos(shallow) < 0.25 < 0.75 < pos(deep)
    with pytest.raises(ValueError, match="too short"):
        tasks.passkey_item(tok, 100, "12345", 0.5)
    with pytest.raises(ValueError, match="depth"):
        tasks.passkey_item(tok, 2000, "12345", 1.5)
    with pytest.raises(ValueError, match="digits"):
        tasks.passkey_item(tok, 2000, "12a45", 0.5)


def test_passkey_items_spread_depths_and_keys():
    items = tasks.passkey_items(CharTokenizer(), [600, 900], 3, seed=1)
    assert [i.length for i in items] == [600] * 3 + [900] * 3
    assert [i.depth for i in items[:3]] == pytest.approx([0.1, 0.5, 0.9])
    assert all(len(i.key) == 5 for i in items)
    assert items == tasks.passkey_items(CharTokenizer(), [600, 900], 3, seed=1)


def test_passkey_answer_check():
    assert tasks.passkey_correct(" 71432. Remember", "71432")
    assert tasks.passkey_correct("is 71432 and 5", "71432")
    assert not tasks.passkey_correct(" 7143", "71432")
    assert not tasks.passkey_correct(" 714321", "71432")
    assert not tasks.passkey_correct(" no idea", "71432")


class EchoGenerator(nn.Module):
    """Stand-in whose ``generate`` appends a fixed answer to the prompt."""

    def __init__(self, answer: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.answer = answer
        self.config = SimpleNamespace(pad_token_id=0, eos_token_id=0)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        extra = torch.tensor([[ord(c) for c in self.answer]])
        return torch.cat([input_ids, extra], dim=1)


def test_passkey_results_read_only_the_generated_part():
    tok = CharTokenizer()
    items = [tasks.passkey_item(tok, 600, "11111", 0.5), tasks.passkey_item(tok, 600, "22222", 0.5)]
    assert quality.passkey_results(EchoGenerator(" 22222."), tok, items) == [False, True]


# --- speed helpers, FLOPs, memory --------------------------------------------------------------


def test_median_and_speedup():
    assert speed.median([3.0, 1.0, 2.0]) == 2.0
    assert speed.speedup([2.0, 2.0, 9.0], [1.0, 1.0, 0.5]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        speed.median([])


def test_time_interleaved_alternates_methods_and_drops_warmup():
    order: list[str] = []
    times = speed.time_interleaved({"a": None, "b": None}, lambda name, plan: name, order.append, repeats=2, warmup=1)
    assert order == ["a", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="repeats"):
        speed.time_interleaved({"a": None}, lambda n, p: n, order.append, repeats=0)


def test_prefill_and_decode_timers_run_every_method_and_unpatch():
    torch.set_num_threads(1)
    model = tiny_model(layers=4)
    methods = {"dense": None, "orthorank@0.2": layers_plan(4, [1, 2]), "sleb": Plan((1.0, 0.0, 1.0, 1.0))}
    ids = torch.randint(3, VOCAB, (2, 16))
    for all_logits in (False, True):
        times = speed.time_prefill(model, methods, ids, repeats=2, warmup=0, all_logits=all_logits)
        assert {k: len(v) for k, v in times.items()} == {k: 2 for k in methods}
    steps = speed.time_decode(model, methods, ids, steps=2, repeats=2, warmup=1)
    assert {k: len(v) for k, v in steps.items()} == {k: 2 for k in methods}
    assert all(t > 0 for v in steps.values() for t in v)
    assert not orthorank.is_patched(model)
    peaks = speed.prefill_peak_memory(model, methods, ids)
    assert set(peaks) == set(methods) and all(p > 0 for p in peaks.values())


def test_peak_bytes_counts_live_new_tensors_only():
    weight = torch.ones(1000)

    def work():
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 alive
        del a  # 4000
        c = torch.ones(2000)  # 4000 + 8000 = 12000 alive
        c.add_(weight.sum())  # in place: only the 4-byte sum, freed at once: 12004
        return c[:10] + b[:10]  # views are free, the sum of them is 40 bytes: 12040

    assert peak_bytes(work) == 12040


def test_flop_ideal_speedups():
    config = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             intermediate_size=128, vocab_size=100, num_hidden_layers=4)
    assert flops.ideal_prefill_speedup(config, None, 64) == 1.0
    assert flops.ideal_prefill_speedup(config, Plan((1.0,) * 4), 64) == 1.0
    # removing 2 of 4 layers with a negligible head halves the work
    removed = Plan((1.0, 0.0, 0.0, 1.0))
    assert flops.ideal_prefill_speedup(config, removed, 64, logits_tokens=0) == pytest.approx(2.0)
    # one selection layer keeping 16 of 64 tokens: K/V for all, the rest for 16
    c = flops.LayerCosts.from_config(config)
    dense_layer = 64 * (c.query + c.key_value + c.output + c.mlp) + c.attention_per_key * 64 * 65 / 2
    sel_layer = 64 * c.key_value + 16 * (c.query + c.output + c.mlp) + c.attention_per_key * 64 * 65 / 2 * 16 / 64
    plan = Plan((1.0, 0.25, 1.0, 1.0))
    expected = 4 * dense_layer / (3 * dense_layer + sel_layer)
    assert flops.ideal_prefill_speedup(config, plan, 64, logits_tokens=0) == pytest.approx(expected)
    # a floor of 32 updated tokens: the selection layer updates 32 of 64, not 16
    floored = 64 * c.key_value + 32 * (c.query + c.output + c.mlp) + c.attention_per_key * 64 * 65 / 2 * 32 / 64
    assert flops.prefill_flops(config, plan, 64, 0, keep_min=32) == pytest.approx(3 * dense_layer + floored)
    assert flops.prefill_flops(config, plan, 64, 0, keep_min=64) == pytest.approx(4 * dense_layer)  # the whole row
    # decode: dense policy gains nothing from selection layers; bypass keeps only K/V there
    assert flops.ideal_decode_speedup(config, plan, 100) == 1.0
    assert flops.ideal_decode_speedup(config, plan, 100, decode="bypass") > 1.0
    with pytest.raises(ValueError):
        flops.prefill_flops(config, Plan((1.0,) * 3), 64)


# --- settings, methods, CLI, report ------------------------------------------------------------


def test_settings_validate_names_and_values():
    with pytest.raises(ValueError, match="'dense', 'orthorank', 'sleb', 'shortgpt', 'random'"):
        BenchSettings(methods=("dense", "magic"))
    with pytest.raises(ValueError, match="sparsity"):
        BenchSettings(sparsities=(1.2,))
    with pytest.raises(ValueError, match="dtype"):
        SpeedSettings(dtypes=("float8",))
    with pytest.raises(ValueError, match="preset"):
        BenchSettings.preset_settings("huge")
    assert torch_dtype("bfloat16") is torch.bfloat16
    assert check_methods("dense, sleb") == ("dense", "sleb")
    assert SpeedSettings(methods=("sleb",)).methods == ("dense", "sleb")
    full = BenchSettings.preset_settings("full")
    assert full.quality_dtype == "float32" and max(full.passkey_lengths) == 8192
    assert json.loads(json.dumps(full.to_dict()))["speed"]["batches"] == [1, 8]


def test_cli_flags_override_the_preset():
    args = parser().parse_args("--speed-only --contexts 512,1024 --batch 1,8 --dtype float32,bfloat16 "
                               "--threads 2 --repeats 5 --sparsity 0.2 --out /tmp/x".split())
    s = settings_from_args(args)
    assert not s.quality and s.threads == 2 and s.sparsities == (0.2,) and s.out == "/tmp/x"
    assert s.speed.contexts == (512, 1024) and s.speed.batches == (1, 8) and s.speed.repeats == 5
    assert s.speed.dtypes == ("float32", "bfloat16")
    assert settings_from_args(parser().parse_args(["--quality-only", "--full"])).speed is None
    q = settings_from_args(parser().parse_args("--calib 2x128 --ppl 4x256 --gen 3x16 --cloze 7 --passkey 300,600".split()))
    assert (q.calib_windows, q.calib_window, q.ppl_windows, q.ppl_window) == (2, 128, 4, 256)
    assert (q.gen_prompts, q.gen_tokens, q.cloze_items, q.passkey_lengths) == (3, 16, 7, (300, 600))
    with pytest.raises(SystemExit):
        parser().parse_args(["--ppl", "8by512"])
    with pytest.raises(ValueError):
        settings_from_args(parser().parse_args(["--methods", "dense,bogus"]))


def test_plan_cache_makes_once_and_reloads(tmp_path):
    model = tiny_model(layers=6)
    calib = torch.randint(3, VOCAB, (2, 16))
    cache = PlanCache(tmp_path, None, calib)
    plan = cache.get("orthorank", model, 0.2, calibrated=False)
    assert plan == default_plan(6, 0.2, model_type="llama")
    assert not cache.path("orthorank", 0.2, calibrated=False).exists()  # data-free plans are not cached
    shortgpt = cache.get("shortgpt", model, 0.2)
    path = cache.path("shortgpt", 0.2)
    assert path.is_file() and "c2x16" in path.name and shortgpt.removed_layers
    path.write_text(json.dumps({**shortgpt.to_dict(), "keep_ratios": [0.0] + [1.0] * 5}))
    assert cache.get("shortgpt", model, 0.2).removed_layers == [0]  # read back from the cache
    rand = cache.get("random", model, 0.2, calibrated=False)
    assert rand.selector == "random" and rand.keep_ratios == plan.keep_ratios
    assert cache.get("dense", model, 0.2).is_dense
    with pytest.raises(ValueError, match="method"):
        cache.get("pruning", model, 0.2)
    assert model_key("org/Some Model") == "org_Some_Model"


def _results() -> BenchResults:
    results = BenchResults(meta={"model": "tiny", "threads": 1, "settings": {"quality_dtype": "float32"}})
    for method, s, ppl in (("dense", 0.0, 10.0), ("orthorank", 0.2, 12.0), ("sleb", 0.2, 20.0)):
        results.quality.append(QualityRow(method, s, s, ppl, 0.5, 0.9, 0.5, {"256": 1.0}, 1.0, 0.1))
    for method, s, t in (("dense", 0.0, 1.0), ("orthorank", 0.2, 0.8)):
        for ctx in (256, 512):
            results.speed.append(speed.SpeedRow("prefill", method, s, "float32", 1, ctx, 1, 3, t, 1.0 / t, 1.2))
    return results


def test_report_writes_json_csv_plots_and_summary(tmp_path):
    results = _results()
    written = results.write(tmp_path)
    names = {p.name for p in written}
    assert names == {"results.json", "quality.csv", "speed.csv", "summary.txt", "quality.png", "speedup.png"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["quality"][1]["perplexity"] == 12.0
    assert (tmp_path / "quality.csv").read_text().splitlines()[0].endswith("passkey_256")
    again = BenchResults.load(tmp_path)
    assert again.to_dict() == json.loads(json.dumps(results.to_dict()))
    table = summary_table(results)
    assert "| orthorank | 0.2 (0.200) | 12.00 |" in table
    assert "1.25× (1.20×)" in table
    assert not math.isnan(results.speed[-1].speedup)
    results.profile = {"x": [{"keep_ratio": 1.0, "total_ms": 2.0, "other_ms": 1.0, "parts_ms": {"mlp": 0.5}},
                             {"keep_ratio": 0.5, "total_ms": 1.0, "other_ms": 0.2, "parts_ms": {"mlp": 0.25}}]}
    assert "profile x: dense layers 2.00 ms (mlp 0.50, attention+select 1.00); selection layers 1.00 ms" in summary_table(results)


def test_flop_ideal_agrees_with_plan_flops_fraction_on_full_forwards():
    config = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             intermediate_size=128, vocab_size=100, num_hidden_layers=4)
    for plan in (Plan((1.0, 0.25, 0.0, 1.0)), Plan((1.0, 0.5, 0.5, 1.0))):
        ideal = flops.ideal_prefill_speedup(config, plan, 64, logits_tokens=64)
        assert ideal == pytest.approx(1.0 / (1.0 - plan.flops_fraction(config, 64)))


def test_speed_shapes_respect_the_token_cap():
    sp = SpeedSettings(contexts=(512, 4096), batches=(1, 8), max_tokens=4096)
    assert sp.shapes() == [(1, 512), (1, 4096), (8, 512)]
    assert SpeedSettings(contexts=(512, 4096), batches=(1, 8)).shapes()[-1] == (8, 4096)
    with pytest.raises(ValueError, match="max_tokens"):
        SpeedSettings(contexts=(512,), batches=(8,), max_tokens=100)
    args = parser().parse_args(["--max-tokens", "0"])
    assert settings_from_args(args).speed.max_tokens is None


def test_layer_profile_covers_every_layer_and_part():
    torch.set_num_threads(1)
    model = tiny_model(layers=3)
    profiles = layer_profile(model, torch.randint(3, VOCAB, (1, 12)), layers_plan(3, [1], 0.5), repeats=1)
    assert [p.keep_ratio for p in profiles] == [1.0, 0.5, 1.0]
    assert all(set(p.parts_ms) == set(PARTS) and p.total_ms > 0 for p in profiles)
    assert profiles[1].parts_ms["k_proj"] > 0 and not orthorank.is_patched(model)
    assert profile_table(profiles).count("\n") == 4


# --- faithful metrics: next token after a prefill, chat agreement -------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> {% endif %}")


def test_prefill_next_token_nll_of_known_logits():
    ids = torch.randint(0, 11, (3, 9))
    assert quality.prefill_next_token_nll(FixedLogits(11), ids, 4, batch_size=2) == pytest.approx(math.log(11), rel=1e-5)
    with pytest.raises(ValueError, match="prefixes"):
        quality.prefill_next_token_nll(FixedLogits(11), ids, 0)
    with pytest.raises(ValueError, match="min_prefix"):
        quality.prefill_next_token_nll(FixedLogits(11), ids, 2, min_prefix=9)


def test_prefill_next_token_nll_dense_equals_full_forward_and_never_sees_the_future():
    model = tiny_model(layers=4)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    lengths = quality.prefix_lengths(24, 3, min_prefix=4, seed=5)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    expected = -torch.stack([logp[:, n - 1].gather(1, ids[:, n : n + 1]) for n in lengths]).mean()
    got = quality.prefill_next_token_nll(model, ids, 3, min_prefix=4, seed=5)
    assert got == pytest.approx(float(expected), rel=1e-4)
    # patched: token selection runs on the prefix only, so tokens after the predicted one change nothing
    n = quality.prefix_lengths(24, 1, min_prefix=4, seed=0)[0]
    later = ids.clone()
    later[:, n + 1 :] = torch.randint(3, VOCAB, later[:, n + 1 :].shape)
    with orthorank.patched(model, plan=layers_plan(4, [1, 2], keep_ratio=0.5, model_type="llama")):
        patched = quality.prefill_next_token_nll(model, ids, 1, min_prefix=4)
        assert quality.prefill_next_token_nll(model, later, 1, min_prefix=4) == patched
    assert patched != pytest.approx(quality.prefill_next_token_nll(model, ids, 1, min_prefix=4))


def test_chat_items_check_whole_words_case_insensitively():
    item = tasks.ChatItem("q", ("Paris", "5"))
    assert item.correct("The capital of France is paris.") and item.correct("2 + 3 = 5")
    assert not item.correct("Parisian food") and not item.correct("15 apples")
    assert len(tasks.CHAT_ITEMS) == 16 and all(c.answers for c in tasks.CHAT_ITEMS)


def test_chat_agreement_prefix_share_and_exact_answers():
    ref = [[5, 6, 7, 2], [8, 9]]
    assert tasks.chat_agreement(ref, ref) == (1.0, 1.0)
    assert tasks.chat_agreement(ref, [[5, 6, 0, 2], [8, 9, 4]]) == (pytest.approx((2 / 4 + 1) / 2), 0.0)
    assert tasks.chat_agreement(ref, [[5, 6, 7, 2], [3]]) == (pytest.approx(0.5), 0.5)
    with pytest.raises(ValueError):
        tasks.chat_agreement(ref, ref[:1])


def test_chat_prompt_uses_the_template_and_needs_one():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="chat template"):
        tasks.chat_prompt_ids(tok, "w5 w6")
    tok.chat_template = CHAT_TEMPLATE
    assert tasks.chat_prompt_ids(tok, "w5 w6") == [1, 5, 6, 2, 1]


def test_chat_answers_are_greedy_and_agree_with_themselves():
    model = tiny_model(layers=4)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    questions = ["w5 w6 w7", "w10 w11"]
    a = quality.chat_answers(model, tok, questions, new_tokens=6)
    assert [len(x) <= 6 for x in a] == [True, True]
    one_by_one = quality.chat_answers(model, tok, questions, new_tokens=6, batch_size=1)  # no padding
    assert tasks.chat_agreement(one_by_one, a) == (1.0, 1.0)
    with torch.inference_mode():
        first = model(input_ids=torch.tensor([tasks.chat_prompt_ids(tok, questions[0])])).logits[0, -1].argmax()
    assert a[0][0] == int(first)


def test_measure_quality_reports_the_faithful_metrics_beside_perplexity(tmp_path):
    model = tiny_model(layers=6)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (60,), generator=g)) + " end." for _ in range(12)]
    calib = torch.randint(3, VOCAB, (2, 32), generator=g)
    settings = BenchSettings(methods=("dense", "sleb"), sparsities=(0.2,), ppl_windows=2, ppl_window=32, cloze_items=2,
                             cloze_context=16, gen_prompts=2, gen_prompt_len=8, gen_tokens=4, passkey_lengths=(64,),
                             passkey_trials=1, next_token_prefixes=3, chat_questions=3, chat_tokens=5, speed=None)
    rows = measure_quality(model, tok, settings, PlanCache(tmp_path, "tiny", calib), texts)
    dense, sleb = rows
    assert (dense.chat_prefix, dense.chat_exact) == (1.0, 1.0)
    assert dense.next_token_ppl == pytest.approx(math.exp(dense.next_token_nll))
    assert sleb.next_token_nll != dense.next_token_nll and 0.0 <= sleb.chat_prefix <= 1.0
    assert sleb.chat_correct is not None
    assert "next-token ppl" in summary_table(BenchResults(meta={}, quality=rows))
