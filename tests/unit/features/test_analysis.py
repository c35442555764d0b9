"""Tests for orthorank.analysis on tiny models and hand-made tensors (known answers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import orthorank
from tests.tiny_models import left_padded_batch
from tests.tiny_models import tiny_model as shared_tiny_model
from orthorank import analysis
from orthorank.analysis import attention, inputs, saturation, sink
from orthorank.analysis.__main__ import main as cli_main
from orthorank.config import tokens_to_keep, tokens_to_keep_per_row
from orthorank.scoring import sink_cosine

HIDDEN = 8
VOCAB = 16
LAYERS = 3


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    extra = {"sliding_window": None} if arch == "mistral" else {}
    return shared_tiny_model(
        arch, "sdpa", layers=LAYERS, seed=seed, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=16,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=64,
        tie_word_embeddings=False, **extra,
    )


def make_identity_layers(model: torch.nn.Module) -> None:
    """Every layer adds nothing to the residual; all queries are zero (uniform attention)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.q_proj.weight.zero_()


def planar_embeddings(model: torch.nn.Module, angles: list[float]) -> None:
    """Token 0 = 2·e0 (the sink); token i = cos(a_i)·e0 + sin(a_i)·e1."""
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[0, 0] = 2.0
        for i, a in enumerate(angles, start=1):
            emb[i, 0], emb[i, 1] = math.cos(a), math.sin(a)


class NumberTokenizer:
    """Stub tokenizer: "3 5 7" -> [3, 5, 7]."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [int(w) for w in text.split()]}


# ---------------------------------------------------------------- batching


def test_make_batches_right_pads_longest_first() -> None:
    batches = inputs.make_batches(["1 2", "3 4 5 6", "7", "8 9 10"], NumberTokenizer(), max_tokens=3, batch_size=2)
    # "7" (one token, no room for anything besides a sink) is dropped; "3 4 5 6" is cut to 3 tokens
    assert [b.input_ids.tolist() for b in batches] == [[[3, 4, 5], [8, 9, 10]], [[1, 2]]]
    assert [b.attention_mask.tolist() for b in batches] == [[[1, 1, 1], [1, 1, 1]], [[1, 1]]]
    mixed = inputs.make_batches(["1 2 3", "4 5"], NumberTokenizer(), batch_size=2)[0]
    assert mixed.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert mixed.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    ids = torch.arange(12).view(3, 4)
    assert [b.input_ids.shape[0] for b in inputs.make_batches(ids, batch_size=2)] == [2, 1]
    with pytest.raises(ValueError, match="max_tokens"):
        inputs.make_batches(["1 2"], NumberTokenizer(), max_tokens=1)


# ---------------------------------------------------------------- pure sink functions


def test_sink_index_and_candidates_with_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    s = inputs.sink_index(mask)
    assert s.tolist() == [2, 0]
    assert inputs.candidate_mask(mask, s).tolist() == [[False, False, False, True], [False, True, True, False]]
    with pytest.raises(ValueError):
        inputs.sink_index(torch.tensor([[0, 0]]))


def test_cosine_to_sink_known_values() -> None:
    x = torch.tensor([[[2.0, 0.0], [0.0, 5.0], [1.0, 1.0], [-3.0, 0.0]]])
    cos = sink_cosine(x, torch.tensor([0]))
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0.0, 2**-0.5, -1.0]]))


def test_keep_count_rounding_and_bad_ratio() -> None:
    assert tokens_to_keep_per_row(1 / 3, torch.tensor([6, 2, 7, 1])).tolist() == [2, 1, 3, 0]
    assert tokens_to_keep_per_row(1.0, torch.tensor([5])).tolist() == [4]
    for bad in (0.0, 1.5, -0.1, "0.3"):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            sink.SinkAccumulator(num_layers=2, keep_ratio=bad)


def with_cosines(cos: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, 2]`` vectors whose cosine to column 0 (the sink, ``e0``) is ``cos`` (column 0 itself: 1)."""
    angle = torch.arccos(cos.clamp(-1.0, 1.0))
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def test_select_tokens_picks_smallest_abs_cos_per_row() -> None:
    cos = torch.tensor([[1.0, 0.9, -0.1, 0.5, 0.05, -0.8], [1.0, 0.0, -0.7, 0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    sel = sink.select_tokens(with_cosines(cos), mask, 1 / 3, keep_recent=0)
    # row 0: 6 tokens -> keep 2: |-0.1| and |0.05|; row 1: 4 real tokens -> keep 2, padding never picked
    assert sel.nonzero().tolist() == [[0, 2], [0, 4], [1, 1], [1, 3]]
    # keep_recent=1: each row's last real token first, then the smallest |cos|
    sel = sink.select_tokens(with_cosines(cos), mask, 1 / 3, keep_recent=1)
    assert sel.nonzero().tolist() == [[0, 4], [0, 5], [1, 1], [1, 3]]


def test_selection_overlap_counts() -> None:
    prev = torch.tensor([[True, True, False, False]])
    cur = torch.tensor([[False, True, True, False]])
    assert sink.selection_overlap(prev, cur) == (1, 2)


@pytest.mark.parametrize("keep_recent", [0, 3])
def test_select_tokens_is_what_a_patched_selection_layer_updates(keep_recent: int) -> None:
    model = shared_tiny_model(layers=4)
    orthorank.patch(model, layers=[2], keep_ratio=0.4, keep_recent=keep_recent, selector="orthogonal")
    ids, mask = left_padded_batch([16, 9], 16)
    seen: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        seen["x"], seen["out"] = args[0].clone(), out.clone()

    handle = model.model.layers[2].register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        normed = model.model.layers[2].input_layernorm(seen["x"])
    handle.remove()
    updated = (seen["out"] != seen["x"]).any(-1)
    assert torch.equal(sink.select_tokens(normed, mask, 0.4, keep_recent), updated)


def test_sink_attention_weights_known_values() -> None:
    w = torch.zeros(2, 2, 3, 3)
    w[0, 0, :, 0], w[0, 1, :, 0] = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([1.0, 0.3, 0.4])
    w[1, :, :, 1] = 0.25
    share = attention.sink_attention_weights(w, torch.tensor([0, 1]))
    torch.testing.assert_close(share, torch.tensor([[1.0, 0.4, 0.3], [0.25, 0.25, 0.25]]))


# ---------------------------------------------------------------- sink_profile on tiny models


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_tokens_orthogonal_to_sink_give_zero_cosine(arch: str) -> None:
    model = tiny_model(arch)
    make_identity_layers(model)
    planar_embeddings(model, [math.pi / 2] * 5)  # every token along e1, the sink along e0
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 5, 4, 3, 2, 1]])
    prof = analysis.sink_profile(model, None, ids, keep_ratio=0.5)
    assert prof.num_layers == LAYERS and prof.n_rows == 2 and prof.n_tokens == 10
    assert max(abs(v) for v in prof.abs_cos_mean) < 1e-6
    assert all(abs(v) < 1e-6 for q in prof.cos_quantiles.values() for v in q)
    assert math.isnan(prof.sink_change[0]) and max(prof.sink_change[1:]) < 1e-6
    assert max(prof.token_change[1:]) < 1e-6
    assert prof.overlap[1:] == [1.0, 1.0]  # identity layers select the same tokens
    # uniform causal attention: query q gives 1/(q+1) to the sink; mean over q = 1..5
    expected = sum(1 / (q + 1) for q in range(1, 6)) / 5
    assert prof.sink_attention == pytest.approx([expected] * LAYERS, abs=1e-6)
    assert model.config._attn_implementation == "sdpa"
    assert all(not layer.input_layernorm._forward_hooks for layer in model.model.layers)
    assert all(not layer.self_attn._forward_hooks for layer in model.model.layers)


def test_cosine_is_read_after_each_layers_input_norm() -> None:
    model = tiny_model()
    make_identity_layers(model)
    angles = [0.3, 1.0, 2.0]
    planar_embeddings(model, angles)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[1] = 3.0  # stretches e1 in layer 1 only
    prof = analysis.sink_profile(model, None, torch.tensor([[0, 1, 2, 3]]), attention=False)
    raw = [math.cos(a) for a in angles]
    stretched = [math.cos(a) / math.hypot(math.cos(a), 3 * math.sin(a)) for a in angles]
    for layer, values in ((0, raw), (1, stretched), (2, raw)):
        assert prof.cos_mean[layer] == pytest.approx(sum(values) / 3, abs=1e-5)
        assert prof.abs_cos_mean[layer] == pytest.approx(sum(map(abs, values)) / 3, abs=1e-5)
    assert prof.sink_attention is None


def test_padded_batch_matches_rows_one_by_one() -> None:
    model = tiny_model(seed=3)
    texts = ["1 2 3 4 5 6 7", "9 8 7", "4 4 5 11 12"]
    tok = NumberTokenizer()
    together = analysis.sink_profile(model, tok, texts, batch_size=3).to_dict()
    alone = analysis.sink_profile(model, tok, texts, batch_size=1).to_dict()
    assert together["n_tokens"] == alone["n_tokens"] == 6 + 2 + 4
    for key in ("cos_mean", "abs_cos_mean", "sink_change", "token_change", "overlap", "sink_attention"):
        assert together[key] == pytest.approx(alone[key], abs=1e-5, nan_ok=True), key
    json.dumps(together)  # NaN became None: valid JSON
    assert together["sink_change"][0] is None


def test_random_overlap_baseline_is_k_over_candidates() -> None:
    acc = sink.SinkAccumulator(num_layers=2, keep_ratio=1 / 3)
    acc.start_batch(torch.ones(1, 7, dtype=torch.long))  # 6 candidates, keep ceil(7/3) = 3
    assert acc.random_hits / acc.random_total == pytest.approx(3 / 6)


def test_bad_inputs_raise() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="keep_ratio"):
        analysis.sink_profile(model, None, torch.tensor([[0, 1, 2]]), keep_ratio=0.0)
    with pytest.raises(TypeError):
        analysis.sink_profile(model, NumberTokenizer(), "1 2 3")
    with pytest.raises(ValueError, match="batch_size"):
        analysis.sink_profile(model, NumberTokenizer(), ["1 2 3"], batch_size=0)
    with pytest.raises(ValueError, match="tokenizer"):
        analysis.sink_profile(model, None, ["1 2 3"])
    with pytest.raises(ValueError, match="top_k"):
        analysis.saturation_profile(model, None, torch.tensor([[0, 1, 2]]), top_k=0)
    with pytest.raises(TypeError, match="model.model.layers"):
        analysis.sink_profile(torch.nn.Linear(2, 2), None, torch.tensor([[0, 1, 2]]))


# ---------------------------------------------------------------- saturation


def test_saturation_layers_hand_made_trajectory() -> None:
    # [layers=4, tokens=2, k=2]
    topk = torch.tensor(
        [
            [[5, 1], [9, 8]],
            [[7, 2], [9, 8]],
            [[7, 3], [4, 8]],
            [[7, 3], [9, 8]],
        ]
    )
    sat = analysis.saturation_layers(topk)
    assert sat.tolist() == [[1, 2], [3, 0]]
    assert analysis.ordered_fractions(sat) == [0.5]
    assert analysis.rank_order_tau(sat) == 0.0
    assert analysis.early_exit_speedup(sat[:, 0], 4) == pytest.approx(4 * 2 / (2 + 4))


def test_saturation_from_logits_ranks_in_order() -> None:
    # one token, vocab 4, layers 3: top-1 is token 2 from layer 0, top-2 becomes token 0 at layer 2
    logits = torch.tensor(
        [
            [[0.0, 1.0, 9.0, 2.0]],
            [[1.0, 0.0, 9.0, 3.0]],
            [[5.0, 0.0, 9.0, 3.0]],
        ]
    )
    sat = analysis.saturation_layers_from_logits(logits, 2)
    assert sat.tolist() == [[0, 2]]
    prof = analysis.summarize_saturation(sat, num_layers=3)
    assert prof.histogram == [[1, 0, 0], [0, 0, 1]]
    assert prof.fully_ordered_fraction == 1.0 and prof.rank_tau == 1.0
    assert prof.early_exit_speedup == pytest.approx(3.0)
    with pytest.raises(ValueError, match="k must be"):
        analysis.saturation_layers_from_logits(logits, 5)


def test_identity_model_saturates_at_first_layer() -> None:
    model = tiny_model()
    make_identity_layers(model)
    prof = analysis.saturation_profile(model, None, torch.tensor([[0, 3, 5, 7, 9]]), top_k=3)
    assert prof.n_tokens == 4
    assert prof.mean_layer == [0.0, 0.0, 0.0]
    assert prof.early_exit_speedup == pytest.approx(LAYERS)
    assert prof.final_lens_agreement == 1.0


def test_lens_matches_manual_logit_lens() -> None:
    model = tiny_model(seed=7)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    batches = inputs.make_batches(ids, batch_size=2)
    sat, agreement = saturation.collect_saturation(model, batches, top_k=3)
    assert agreement == 1.0
    assert all(not layer._forward_hooks for layer in model.model.layers)  # our hooks are gone
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    per_layer = [model.lm_head(model.model.norm(h)) for h in out.hidden_states[1:LAYERS]] + [out.logits]
    logits = torch.stack(per_layer)[:, :, 1:].reshape(LAYERS, -1, VOCAB)  # drop the sinks
    assert torch.equal(sat, analysis.saturation_layers_from_logits(logits, 3))


# ---------------------------------------------------------------- plots and CLI


def test_plots_write_png(tmp_path: Path) -> None:
    model = tiny_model()
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    sp = analysis.sink_profile(model, None, ids)
    sat = analysis.saturation_profile(model, None, ids, top_k=2)
    cases = ((analysis.plot_sink_profile, sp, "s.png"), (analysis.plot_saturation_profile, sat, "t.png"))
    for fig_fn, prof, name in cases:
        fig = fig_fn(prof, tmp_path / "figs" / name)
        assert len(fig.axes) >= 2
        assert (tmp_path / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_figures_and_summary(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat ran far away home red big small".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\n\nthe dog ran far away home\n\na big red cat\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--text", str(text), "--out", str(out)]
    args += ["--max-tokens", "5", "--top-k", "2", "-q"]
    assert cli_main(args) == 0
    assert (out / "sink_profile.png").is_file() and (out / "saturation.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sink"]["n_rows"] == 3 and summary["sink"]["n_tokens"] == 4 + 4 + 3
    assert summary["saturation"]["top_k"] == 2 and summary["saturation"]["num_layers"] == LAYERS
    with pytest.raises(SystemExit):
        cli_main(["--keep-ratio", "2", "--out", str(out)])


@pytest.mark.parametrize("keep_min", [0, 1, 3, 64])
def test_keep_count_with_a_floor_per_row_matches_the_scalar_count(keep_min) -> None:
    n = torch.tensor([0, 1, 2, 3, 5, 9, 10, 200, 400])
    expected = [v if v <= keep_min else 0 if v <= 1 else min(v - 1, max(keep_min, -(-v // 3))) for v in n.tolist()]
    assert tokens_to_keep_per_row(1 / 3, n, keep_min).tolist() == expected
    assert [tokens_to_keep(1 / 3, v, keep_min) for v in n.tolist()] == expected
