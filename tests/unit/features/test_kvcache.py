"""Tests of orthorank.kvcache: eviction on hand-made inputs, exactness against references."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import orthorank
from orthorank.kvcache import POLICIES, BudgetCache, BudgetConfig, BudgetLayer, separator_ids
from orthorank.kvcache.policies import attention_hits, eviction_count, page_priority, select_keep
from tests.tiny_models import CACHE_KW
from tests.tiny_models import tiny_model as shared_tiny_model

VOCAB = 96


def kv(cache: object) -> dict[str, object]:
    """The cache keyword of the installed release's model forward / generate (``cache`` or ``past_key_values``)."""
    return {CACHE_KW: cache}


def tiny_model(arch: str = "llama", attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """Two layers, no sliding window, larger initial weights (attention patterns that matter)."""
    extra = {"sliding_window": None} if arch == "mistral" else {}
    return shared_tiny_model(
        arch, attn, layers=2, seed=seed, vocab_size=VOCAB, intermediate_size=96,
        max_position_embeddings=256, initializer_range=0.2, pad_token_id=None, **extra,
    )


def ids(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def one_hot_keys(n: int, dim: int = 8) -> torch.Tensor:
    """``[1, 1, n, dim]`` keys ``10 * e_(i % dim)``."""
    keys = torch.zeros(1, 1, n, dim)
    keys[0, 0, torch.arange(n), torch.arange(n) % dim] = 10.0
    return keys


# ------------------------------------------------------------------------------------- configuration
def test_config_validation_names_allowed_values() -> None:
    with pytest.raises(ValueError, match="milestone.*attention.*sink_window.*separators.*full"):
        BudgetConfig(policy="lru")
    with pytest.raises(ValueError, match="always-kept"):
        BudgetConfig(policy="milestone", budget=20, n_sink=4, window=32)
    with pytest.raises(ValueError, match="only for 'full'"):
        BudgetConfig(policy="sink_window", budget=None)
    with pytest.raises(ValueError, match="top_fraction"):
        BudgetConfig(top_fraction=0.0)
    with pytest.raises(ValueError, match="head_reduce"):
        BudgetConfig(head_reduce="sum")
    with pytest.raises(ValueError, match="page_size"):
        BudgetConfig(page_size=0)
    assert BudgetConfig(policy="full", budget=None).evicts is False
    assert set(POLICIES) == {"milestone", "attention", "sink_window", "separators", "full"}


def test_separators_need_ids_and_reject_them_elsewhere() -> None:
    config = tiny_model().config
    with pytest.raises(ValueError, match="exactly one"):
        BudgetCache(config, 64, "separators")
    with pytest.raises(ValueError, match="only apply"):
        BudgetCache(config, 64, "sink_window", separator_ids=[1])


# ------------------------------------------------------------------------------------- kernels
def test_select_keep_evicts_lowest_priority_oldest_first() -> None:
    prio = torch.tensor([[5, 2, 2, 9], [1, 2, 3, 4]])
    # row 0: evict the two 2s (columns 1, 2); row 1: evict the two oldest (columns 0, 1)
    assert select_keep(prio, 2).tolist() == [[0, 3], [2, 3]]
    assert select_keep(prio, 0).tolist() == [[0, 1, 2, 3]] * 2
    with pytest.raises(ValueError, match="evictable"):
        select_keep(prio, 5)


def test_protected_tokens_are_the_first_and_last_stored() -> None:
    layer = _layer("milestone", 8, n_sink=2, window=3, protect_prompt=True)
    keys = one_hot_keys(20)
    layer.update(keys[:, :, :4], keys[:, :, :4].clone())
    assert layer.protected_counts() == (4, 0)  # prompt 4 tokens fills the head
    for t in range(4, 20):
        _decode(layer, keys[:, :, t : t + 1], torch.zeros(1, 1, 1, 8))
    assert layer.protected_counts() == (4, 3)
    assert layer.positions[0, :4].tolist() == [0, 1, 2, 3] and layer.positions[0, -3:].tolist() == [17, 18, 19]


def test_page_priority_and_eviction_count() -> None:
    pos = torch.tensor([[0, 1, 4, 5, 6, 7, 9]])
    prio = torch.tensor([[3, 0, 8, 1, 2, 2, 4]])
    assert page_priority(prio, pos, 4).tolist() == [[3, 3, 8, 8, 8, 8, 4]]
    assert page_priority(prio, pos, 1) is prio
    assert eviction_count(stored=10, budget=8, n_protected=2, page_size=1) == 2
    assert eviction_count(stored=10, budget=8, n_protected=2, page_size=4) == 4
    assert eviction_count(stored=10, budget=8, n_protected=7, page_size=4) == 3
    assert eviction_count(stored=8, budget=8, n_protected=0, page_size=4) == 0


def test_attention_hits_top_share_with_gqa_and_causality() -> None:
    keys = one_hot_keys(6)  # [1, 1, 6, 8]
    query = torch.zeros(1, 2, 2, 8)  # 2 query heads sharing one key head, 2 new tokens (keys 4 and 5)
    query[0, :, 0, 2] = 10.0  # first new token looks at key 2
    query[0, :, 1, 5] = 10.0  # second one at key 5 (itself)
    hits = attention_hits(query, keys, scaling=1.0, top_fraction=0.2)
    # first row sees 5 keys -> ceil(0.2 * 5) = 1 hit; second row sees 6 -> 2 hits: key 5, then the runner-up
    assert hits[0, 0].nonzero().flatten().tolist() == [2]
    assert hits[0, 1, 5] and int(hits[0, 1].sum()) == 2
    assert not hits[0, 0, 5]  # causal: the first new token cannot see the second


def _layer(policy: str, budget: int, **kw: object) -> BudgetLayer:
    return BudgetLayer(BudgetConfig(policy=policy, budget=budget, **kw))


def _decode(layer: BudgetLayer, key: torch.Tensor, query: torch.Tensor | None = None, sep: bool = False) -> None:
    layer.update(key, key.clone(), query=query, scaling=1.0, separators=torch.tensor([[sep]]))


def test_milestone_layer_keeps_exactly_the_refreshed_tokens() -> None:
    layer = _layer("milestone", 6, n_sink=1, window=2, top_fraction=0.1, protect_prompt=False)
    keys = one_hot_keys(8)
    layer.update(keys[:, :, :6], keys[:, :, :6].clone())  # prompt: positions 0..5, priorities 0..5
    assert layer.positions.tolist() == [[0, 1, 2, 3, 4, 5]]
    q = torch.zeros(1, 1, 1, 8)
    q[..., 2] = 10.0  # step at position 6 attends to token 2 -> its timestamp becomes 6
    _decode(layer, keys[:, :, 6:7], q)
    # stored 7 > 6: protected {0} (sink) and {5, 6} (window); candidates 1(1) 2(6) 3(3) 4(4) -> evict 1
    assert layer.positions.tolist() == [[0, 2, 3, 4, 5, 6]]
    assert layer.priorities.tolist() == [[0, 6, 3, 4, 5, 6]]
    q = torch.zeros(1, 1, 1, 8)
    q[..., 3] = 10.0  # step at position 7 attends to token 3
    _decode(layer, keys[:, :, 7:8], q)
    # protected {0}, {6, 7}; candidates 2(6) 3(7) 4(4) 5(5) -> evict 4
    assert layer.positions.tolist() == [[0, 2, 3, 5, 6, 7]]
    assert layer.get_seq_length() == 8 and layer.stored_length == 6
    assert layer.get_mask_sizes(1) == (7, 2)  # 8 seen, 6 stored: keys numbered from 2
    assert layer.evicted == 2


def test_milestone_protects_the_prompt_and_validates_it() -> None:
    layer = _layer("milestone", 6, n_sink=1, window=2, protect_prompt=True)
    keys = one_hot_keys(8)
    layer.update(keys[:, :, :4], keys[:, :, :4].clone())
    for t in range(4, 8):
        _decode(layer, keys[:, :, t : t + 1], torch.zeros(1, 1, 1, 8))
    assert layer.positions.tolist() == [[0, 1, 2, 3, 6, 7]]  # prompt 0..3 + window 6, 7
    too_long = _layer("milestone", 6, n_sink=1, window=2, protect_prompt=True)
    with pytest.raises(ValueError, match="protected prompt"):
        too_long.update(keys[:, :, :5], keys[:, :, :5].clone())


def test_sink_window_and_separators_layers() -> None:
    keys = one_hot_keys(12)
    sink = _layer("sink_window", 6, n_sink=2, window=0)
    sink.update(keys[:, :, :3], keys[:, :, :3].clone())
    for t in range(3, 12):
        _decode(sink, keys[:, :, t : t + 1])
    assert sink.positions.tolist() == [[0, 1, 8, 9, 10, 11]]
    seps = _layer("separators", 6, n_sink=1, window=2)
    seps.update(keys[:, :, :3], keys[:, :, :3].clone(), separators=torch.tensor([[False, True, False]]))
    for t in range(3, 12):
        _decode(seps, keys[:, :, t : t + 1], sep=t in (4, 7))
    # sink 0, separators 1, 4, 7 (outrank every ordinary token), recent window 10, 11
    assert seps.positions.tolist() == [[0, 1, 4, 7, 10, 11]]


def test_pages_are_evicted_whole() -> None:
    layer = _layer("sink_window", 8, n_sink=1, window=1, page_size=4)
    keys = one_hot_keys(12)
    layer.update(keys[:, :, :8], keys[:, :, :8].clone())
    _decode(layer, keys[:, :, 8:9])
    # overflow 1 -> 4 tokens: the oldest page minus the protected sink (1, 2, 3) and the next page's first (4)
    assert layer.positions.tolist() == [[0, 5, 6, 7, 8]]
    for t in range(9, 12):
        _decode(layer, keys[:, :, t : t + 1])
    assert layer.positions.tolist() == [[0, 5, 6, 7, 8, 9, 10, 11]]  # back at the budget, no eviction yet


# ------------------------------------------------------------------------------------- on models
@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("policy", POLICIES)
def test_unlimited_budget_equals_dynamic_cache_in_generate(arch: str, policy: str) -> None:
    model = tiny_model(arch)
    prompt = ids(7)
    ref = model.generate(
        prompt, max_new_tokens=16, do_sample=False, **kv(DynamicCache(config=model.config)),
        output_logits=True, return_dict_in_generate=True,
    )
    extra = {"separator_ids": [1, 2, 3]} if policy == "separators" else {}
    budget = None if policy == "full" else 64
    cache = BudgetCache(model, budget=budget, policy=policy, **extra)
    out = model.generate(
        prompt, max_new_tokens=16, do_sample=False, **kv(cache), output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cache.stats()["evicted"] == 0 and cache.get_seq_length() == 7 + 15


def test_beam_search_reorders_the_extra_state() -> None:
    model = tiny_model()
    prompt = ids(6)
    beams = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    ref = model.generate(prompt, **beams, **kv(DynamicCache(config=model.config)))
    out = model.generate(prompt, **beams, **kv(BudgetCache(model, 64, "milestone")))
    assert torch.equal(out, ref)
    small = BudgetCache(model, 12, "milestone", n_sink=2, window=4)
    model.generate(prompt, max_new_tokens=16, num_beams=3, do_sample=False, **kv(small))
    positions = small.layers[0].positions
    assert positions.shape == (3, 12) and bool((positions.diff(dim=1) > 0).all())
    assert positions[:, :6].tolist() == [list(range(6))] * 3  # the protected prompt, in every beam


def streaming_mask(length: int, prompt: int, budget: int, n_sink: int, chunk: int) -> torch.Tensor:
    """``[1, 1, L, L]`` bool: what a sink_window cache lets each query see when the text after the
    prompt is fed ``chunk`` tokens at a time (the prompt itself is plain causal)."""
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    chunk_start = prompt + (q - prompt).div(chunk, rounding_mode="floor") * chunk
    stored_before = k >= chunk_start - (budget - n_sink)  # the cache holds the sink and these
    seen = (k <= q) & ((k < n_sink) | stored_before | (q < prompt))
    return seen[None, None]


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_evicted_cache_equals_full_attention_with_the_same_mask(attn: str, chunk: int) -> None:
    """Known answer after eviction: RoPE positions stay absolute and the mask matches the stored keys."""
    model = tiny_model("llama", attn)
    seq, prompt, budget, n_sink = ids(40), 6, 12, 2
    cache = BudgetCache(model, budget=budget, policy="sink_window", n_sink=n_sink, window=0)
    logits = [model(seq[:, :prompt], **kv(cache)).logits]
    for t in range(prompt, seq.shape[1], chunk):
        logits.append(model(seq[:, t : t + chunk], **kv(cache)).logits)
    got = torch.cat(logits, dim=1)
    mask = streaming_mask(seq.shape[1], prompt, budget, n_sink, chunk)
    if attn == "eager":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    want = model(seq, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert cache.layers[0].stored_length == budget and cache.get_seq_length() == seq.shape[1]
    # negative control: numbering new tokens by the STORED length (a naive cache) gives other logits
    naive = BudgetCache(model, budget=budget, policy="sink_window", n_sink=n_sink, window=0)
    model(seq[:, :prompt], **kv(naive))
    for t in range(prompt, seq.shape[1], chunk):
        x = seq[:, t : t + chunk]
        compressed = naive.layers[0].stored_length + torch.arange(x.shape[1])[None]
        last = model(x, **kv(naive), position_ids=compressed).logits
    assert not torch.allclose(last, got[:, -last.shape[1] :], atol=1e-3)


def test_new_token_rope_position_is_absolute_after_eviction() -> None:
    model = tiny_model()
    seen: list[torch.Tensor] = []
    handle = model.model.rotary_emb.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    cache = BudgetCache(model, budget=16, policy="milestone", n_sink=2, window=4)
    model.generate(ids(5), max_new_tokens=40, do_sample=False, **kv(cache))
    handle.remove()
    assert cache.layers[0].stored_length == 16 and cache.get_seq_length() == 5 + 39
    assert seen[0].tolist() == [[0, 1, 2, 3, 4]]
    assert [int(p[0, -1]) for p in seen[1:]] == list(range(5, 44))
    assert cache.get_mask_sizes(1, 0) == (17, 44 - 16)


def test_milestone_refresh_matches_eager_attention_weights() -> None:
    """The cache's recomputed scores equal the model's own attention weights of the step."""
    model = tiny_model("llama", "eager")
    seq = ids(13)
    cache = BudgetCache(
        model, budget=100, policy="milestone", n_sink=1, window=1, top_fraction=0.25, protect_prompt=False
    )
    model(seq[:, :12], **kv(cache))
    out = model(seq[:, 12:], **kv(cache), output_attentions=True)
    for layer_idx, weights in enumerate(out.attentions):  # [1, H, 1, 13]
        score = weights[0, :, 0].mean(0)
        top = set(score.topk(4).indices.tolist())  # ceil(0.25 * 13) = 4
        prio = cache.layers[layer_idx].priorities[0].tolist()
        refreshed = {i for i, p in enumerate(prio) if p == 12}
        assert refreshed == top | {12}


def test_batch_rows_evict_independently() -> None:
    model = tiny_model()
    seq = ids(30, batch=2, seed=3)
    caches = [
        BudgetCache(model, budget=10, policy="milestone", n_sink=1, window=2, protect_prompt=False) for _ in range(3)
    ]
    outs = []
    for cache, rows in zip(caches, (seq, seq[:1], seq[1:])):
        logits = [model(rows[:, :4], **kv(cache)).logits]
        for t in range(4, rows.shape[1]):
            logits.append(model(rows[:, t : t + 1], **kv(cache)).logits)
        outs.append(torch.cat(logits, 1))
    torch.testing.assert_close(outs[0], torch.cat(outs[1:], 0), rtol=1e-4, atol=1e-5)
    for layer_idx in range(2):
        both = caches[0].layers[layer_idx].positions
        rows = [caches[i].layers[layer_idx].positions[0].tolist() for i in (1, 2)]
        assert both.tolist() == rows
    assert caches[0].layers[0].stored_length == 10


def test_padded_batch_raises_clearly() -> None:
    model = tiny_model()
    cache = BudgetCache(model, budget=16, policy="sink_window", n_sink=2, window=2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="padded batches"):
        model.generate(ids(6, batch=2), attention_mask=mask, max_new_tokens=3, do_sample=False, **kv(cache))


def test_hooks_required_attached_and_removable() -> None:
    model = tiny_model()
    cache = BudgetCache(model.config, budget=16, policy="milestone", n_sink=2, window=2)
    model(ids(4), **kv(cache))
    with pytest.raises(RuntimeError, match="attach"):
        model(ids(1), **kv(cache))
    attn = model.model.layers[0].self_attn
    before = (len(model._forward_pre_hooks), len(attn._forward_pre_hooks), len(attn.q_proj._forward_hooks))
    with BudgetCache(model, budget=16, policy="milestone", n_sink=2, window=2) as other:
        assert other.attached and len(attn._forward_pre_hooks) == before[1] + 1
    assert not other.attached
    assert (len(model._forward_pre_hooks), len(attn._forward_pre_hooks), len(attn.q_proj._forward_hooks)) == before
    seps = BudgetCache(model.config, budget=16, policy="separators", separator_ids=[1], n_sink=2, window=2)
    with pytest.raises(RuntimeError, match="token ids"):
        model(ids(4), **kv(seps))


def test_separator_ids_from_tokenizer() -> None:
    class FakeTokenizer:
        vocab = ["a", ".", " ,", "\n", "b.", " ?!", "", " "]

        def __len__(self) -> int:
            return len(self.vocab)

        def decode(self, token_ids: list[int]) -> str:
            return self.vocab[token_ids[0]]

    assert separator_ids(FakeTokenizer()) == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="punctuation"):
        separator_ids(FakeTokenizer(), chars=["a"])


def test_composes_with_orthorank_patch() -> None:
    """OrthoRank prefill + budgeted decode: unlimited budget equals the patched model's own cache."""
    model = tiny_model()
    orthorank.patch(model, layers=[1])
    try:
        prompt = ids(12)
        ref = model.generate(prompt, max_new_tokens=12, do_sample=False, **kv(DynamicCache(config=model.config)))
        cache = BudgetCache(model, budget=64, policy="milestone", n_sink=2, window=4)
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, **kv(cache))
        assert torch.equal(out, ref)
        small = BudgetCache(model, budget=16, policy="milestone", n_sink=2, window=4)
        model.generate(prompt, max_new_tokens=20, do_sample=False, **kv(small))
        stats = small.stats()
        assert stats["stored"] == 16 and stats["seen"] == 31 and stats["unscored_updates"] == 0
    finally:
        orthorank.unpatch(model)


# ------------------------------------------------------------------------------------- attention (TOVA) policy
def test_attention_layer_evicts_the_least_attended_down_to_the_headroom() -> None:
    layer = _layer("attention", 6, n_sink=1, window=1, headroom=2)
    keys = one_hot_keys(12)
    layer.update(keys[:, :, :6], keys[:, :, :6].clone())
    assert not layer.needs_query(0) and layer.needs_query(1)  # 6 stored + 1 new > 6
    q = torch.zeros(1, 1, 1, 8)
    q[..., 2] = q[..., 3] = 10.0  # the query at position 6 attends to keys 2 and 3
    _decode(layer, keys[:, :, 6:7], q)
    # 7 > 6: evict down to 6 - 2 = 4; sink {0} and window {6} stay; 1, 4, 5 are the least attended
    assert layer.positions.tolist() == [[0, 2, 3, 6]] and layer.evicted == 3
    for t in (7, 8):  # back under the budget: no eviction, no query needed
        assert not layer.needs_query(1)
        _decode(layer, keys[:, :, t : t + 1])
    assert layer.positions.tolist() == [[0, 2, 3, 6, 7, 8]] and layer.unscored_updates == 0
    _decode(layer, keys[:, :, 9:10])  # evicting without a query: oldest first, counted as unscored
    assert layer.positions.tolist() == [[0, 7, 8, 9]] and layer.unscored_updates == 1


def test_headroom_and_budget_validation() -> None:
    with pytest.raises(ValueError, match="headroom"):
        BudgetConfig(policy="attention", budget=40, n_sink=4, window=32, headroom=8)
    with pytest.raises(ValueError, match="headroom"):
        BudgetConfig(policy="attention", budget=64, headroom=-1)
    assert eviction_count(stored=11, budget=10, n_protected=2, page_size=1, headroom=3) == 4
    assert eviction_count(stored=10, budget=10, n_protected=2, page_size=1, headroom=3) == 0


@pytest.mark.parametrize("headroom", [0, 3])
def test_attention_policy_evicts_by_the_models_own_attention_weights(headroom: int) -> None:
    """The evicted tokens are the least attended (mean over heads) by the step's query, per layer."""
    model = tiny_model("llama", "eager")
    seq = ids(13)
    cache = BudgetCache(model, budget=12, policy="attention", n_sink=1, window=2, headroom=headroom)
    model(seq[:, :12], **kv(cache))
    out = model(seq[:, 12:], **kv(cache), output_attentions=True)
    for layer_idx, weights in enumerate(out.attentions):  # [1, H, 1, 13]
        score = weights[0, :, 0].mean(0)[1:11]  # candidates: not the sink (0), not the window (11, 12)
        evicted = set((score.argsort()[: 1 + headroom] + 1).tolist())
        kept = set(cache.layers[layer_idx].positions[0].tolist())
        assert kept == set(range(13)) - evicted and len(kept) == 12 - headroom


def test_two_caches_on_one_model_are_independent() -> None:
    """Caches attached to the same model and stepped alternately equal each one run alone."""
    model = tiny_model()
    seq = ids(40)
    configs = [dict(policy="milestone", protect_prompt=False), dict(policy="attention", headroom=2)]

    def decode(caches: list[BudgetCache]) -> list[torch.Tensor]:
        outs = [[model(seq[:, :4], **kv(c)).logits] for c in caches]
        for t in range(4, seq.shape[1]):
            for c, out in zip(caches, outs):
                out.append(model(seq[:, t : t + 1], **kv(c)).logits)
        return [torch.cat(o, 1) for o in outs]

    alone = [decode([BudgetCache(model, budget=12, n_sink=1, window=2, **cfg)])[0] for cfg in configs]
    together = [BudgetCache(model, budget=12, n_sink=1, window=2, **cfg) for cfg in configs]
    for got, want in zip(decode(together), alone):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [c.stats()["unscored_updates"] for c in together] == [0, 0]
    assert not torch.equal(together[0].layers[0].positions, together[1].layers[0].positions)


def test_sink_window_with_headroom_equals_kvpress_streaming_decoding_press() -> None:
    """The benchmark's protocol against kvpress: same peak, same schedule, same logits.

    One compression only (at step 16, position 23; the text ends before the next): kvpress keeps the
    tokens in ``topk`` order, which scrambles the storage order on ties, and StreamingLLMPress then
    prunes by storage index, so later compressions no longer drop the oldest tokens.
    """
    kvpress = pytest.importorskip("kvpress")
    model = tiny_model()
    seq, prompt, budget, interval = ids(27), 8, 24, 4  # (budget - prompt) % interval == 0: same schedule
    press = kvpress.DecodingPress(
        base_press=kvpress.StreamingLLMPress(n_sink=2), compression_interval=interval, target_size=budget - interval
    )
    ours = BudgetCache(model, budget=budget - 1, policy="sink_window", n_sink=2, window=0, headroom=interval - 1)
    theirs = DynamicCache()

    def decode(cache: object) -> torch.Tensor:
        out = [model(seq[:, :prompt], **kv(cache)).logits]
        for t in range(prompt, seq.shape[1]):
            extra = {"cache_position": torch.tensor([t])} if CACHE_KW == "past_key_values" else {}
            out.append(model(seq[:, t : t + 1], **kv(cache), position_ids=torch.tensor([[t]]), **extra).logits)
        return torch.cat(out, 1)

    with press(model):
        theirs_logits = decode(theirs)
    ours_logits = decode(ours)
    logits = {"ours": ours_logits, "kvpress": theirs_logits}
    torch.testing.assert_close(logits["ours"], logits["kvpress"], rtol=1e-5, atol=1e-5)
    assert ours.layers[0].stored_length == theirs.layers[0].keys.shape[-2] == budget - 1  # 20 after step 16, + 3
    assert ours.layers[0].evicted == interval
