"""One patched model shared by several threads gives every call its sequential result, exactly.

Threaded servers (thread pools, ``TextIteratorStreamer`` setups) share one model across requests.
Each thread below waits on a barrier before its calls so that the forwards really overlap, runs the
same calls several times, and every result is compared with ``torch.equal`` to the result of the
same call run alone. The dense model is the control: it is exact under threads.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import TextIteratorStreamer

import orthorank
from orthorank.kvcache import BudgetCache
from tests.tiny_models import CACHE_KW
from orthorank.install import forward_context
from tests.tiny_models import VOCAB, tiny_model, tiny_tokenizer

N_THREADS = 4
ROUNDS = 8
SEQ = 20


def padded_batch(lengths: list[int], right: list[bool], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[len(lengths), SEQ]`` ids and mask; row ``r`` is padded on the right if ``right[r]``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), SEQ), generator=g)
    mask = torch.zeros(len(lengths), SEQ, dtype=torch.long)
    for row, (n, r) in enumerate(zip(lengths, right)):
        if r:
            mask[row, :n] = 1
        else:
            mask[row, SEQ - n :] = 1
    ids[mask == 0] = 0
    return ids, mask


#: one batch per thread: same shape [3, SEQ], different padding (left, right, none)
BATCHES = [
    padded_batch([20, 14, 9], [False] * 3, seed=1),
    padded_batch([11, 20, 17], [False] * 3, seed=2),
    padded_batch([6, 20, 13], [True, False, True], seed=3),
    padded_batch([20, 20, 20], [False] * 3, seed=4),
]


def run_threads(jobs: list[Callable[[], Any]], rounds: int = ROUNDS) -> list[list[Any]]:
    """Run ``jobs[i]`` ``rounds`` times in thread ``i``, all threads starting together.

    Returns the results per thread; an exception in a thread is raised here.
    """
    barrier = threading.Barrier(len(jobs))
    results: list[list[Any]] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with torch.inference_mode():
                barrier.wait(timeout=60)
                for _ in range(rounds):
                    results[i].append(jobs[i]())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: races show up in a few rounds
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]
    assert all(len(r) == rounds for r in results)
    return results


def same(a: torch.Tensor | tuple, b: torch.Tensor | tuple) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def count_mismatches(results: list[list[Any]], sequential: list[Any]) -> int:
    return sum(not same(out, want) for outs, want in zip(results, sequential) for out in outs)


def forward_job(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: model(ids, attention_mask=mask).logits


def patched_model() -> torch.nn.Module:
    return orthorank.patch(tiny_model("llama"), layers=[1, 2, 3, 4], keep_ratio=0.34)


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "dense"])
def test_concurrent_forwards_equal_sequential(patched: bool) -> None:
    model = patched_model() if patched else tiny_model("llama")
    with torch.inference_mode():
        sequential = [model(ids, attention_mask=mask).logits for ids, mask in BATCHES]
    results = run_threads([forward_job(model, ids, mask) for ids, mask in BATCHES])
    assert count_mismatches(results, sequential) == 0
    if patched:  # selection really ran (not a dense fallback), in every selection layer
        assert all(s.selective_calls > 0 for s in orthorank.layer_stats(model).values())
        assert not torch.equal(sequential[0], tiny_model("llama")(BATCHES[0][0], attention_mask=BATCHES[0][1]).logits)


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "dense"])
def test_concurrent_generate_equals_sequential(patched: bool) -> None:
    model = patched_model() if patched else tiny_model("llama")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    left = [padded_batch(lengths, [False] * 3, seed=10 + i) for i, lengths in
            enumerate([[20, 14, 9], [11, 20, 17], [6, 20, 13], [20, 20, 20]])]
    sequential = [model.generate(ids, attention_mask=mask, **kwargs) for ids, mask in left]
    jobs = [lambda ids=ids, mask=mask: model.generate(ids, attention_mask=mask, **kwargs) for ids, mask in left]
    results = run_threads(jobs, rounds=3)
    assert count_mismatches(results, sequential) == 0


def test_streamer_generation_in_a_worker_thread_while_the_caller_runs_forwards() -> None:
    """The ``TextIteratorStreamer`` pattern: generate in a thread, forwards in the caller meanwhile."""
    model, tok = patched_model(), tiny_tokenizer()
    ids, mask = padded_batch([20], [False], seed=5)
    other_ids, other_mask = BATCHES[0]
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        want_sequence = model.generate(**kwargs)
        want_logits = model(other_ids, attention_mask=other_mask).logits
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    got: dict[str, torch.Tensor] = {}
    worker = threading.Thread(target=lambda: got.setdefault("seq", model.generate(**kwargs, streamer=streamer)))
    worker.start()
    logits = []
    with torch.inference_mode():
        for _ in streamer:  # a forward of another request for every streamed piece
            logits.append(model(other_ids, attention_mask=other_mask).logits)
    worker.join(timeout=120)
    assert torch.equal(got["seq"], want_sequence)
    assert logits and all(torch.equal(x, want_logits) for x in logits)


def budget_generation(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Greedy generation with an evicting ``milestone`` cache (hooked on ``model`` meanwhile): the
    tokens, and what the cache kept (positions and priorities of every layer)."""
    with BudgetCache(model, budget=16, policy="milestone", n_sink=2, window=4) as cache:
        out = model.generate(prompt, **{CACHE_KW: cache}, max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert cache.stats()["evicted"] > 0 and cache.stats()["unscored_updates"] == 0
    return (out, *(t for layer in cache.layers for t in (layer.positions, layer.priorities)))


def budget_model_and_prompts() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model = tiny_model("llama", layers=2, initializer_range=0.2)
    return model, [torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(s)) for s in (7, 8)]


def test_budget_caches_in_two_threads_give_their_sequential_generations() -> None:
    """Two generations, each with its own evicting ``BudgetCache`` hooked on the same model."""
    model, prompts = budget_model_and_prompts()
    sequential = [budget_generation(model, p) for p in prompts]
    full = model.generate(prompts[0], max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert not torch.equal(full, sequential[0][0])  # eviction changes the text: the policy's scores matter
    results = run_threads([lambda p=p: budget_generation(model, p) for p in prompts], rounds=2)
    assert count_mismatches(results, sequential) == 0


def test_budget_cache_hooks_ignore_a_call_without_kwargs() -> None:
    """torch registers a ``with_kwargs`` pre-hook in two steps; a forward in another thread between
    them calls the hook as ``hook(module, args)``. The cache's hooks must take that as not theirs
    (it raised a TypeError, seen once in the two-thread test above), and the generation of the
    cache's own thread must not change."""
    model, prompts = budget_model_and_prompts()
    want = budget_generation(model, prompts[0])
    with BudgetCache(model, budget=16, policy="milestone", n_sink=2, window=4) as cache:
        modules = [m for m in model.modules() if m._forward_pre_hooks]
        hooks = [(m, h) for m in modules for h in m._forward_pre_hooks.values()]
        assert len(hooks) == 1 + model.config.num_hidden_layers  # the model's and each attention's
        for module, hook in hooks:
            assert hook(module, (prompts[1],)) is None
        out = model.generate(prompts[0], **{CACHE_KW: cache}, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(out, want[0])


def test_a_forward_racing_the_patch_hook_registration_runs_densely() -> None:
    """The same two-step registration for the patch's own pre-hook: a forward that sees the hook
    before its "with kwargs" flag gets no state, so its selection layers run the dense layer."""
    model = tiny_model("llama", layers=4)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        orthorank.patch(model, layers=[1, 2])
        patched = model(ids).logits
        flags = model.model._forward_pre_hooks_with_kwargs
        saved = dict(flags)
        flags.clear()  # as between torch's two registration steps
        try:
            racing = model(ids).logits
        finally:
            flags.update(saved)
    assert not torch.allclose(patched, dense, atol=1e-4)
    torch.testing.assert_close(racing, dense, atol=1e-5, rtol=1e-4)


def test_a_budget_cache_ignores_the_queries_of_a_forward_in_another_thread() -> None:
    """A deterministic interleaving: generation A pauses inside an attention module (its cache is
    waiting for the query of the step) while generation B runs to its end in another thread."""
    model, prompts = budget_model_and_prompts()
    want = budget_generation(model, prompts[0])
    in_a, resume = threading.Event(), threading.Event()
    a_thread: list[int] = []
    calls = [0]

    def pause(module: torch.nn.Module, args: tuple) -> None:
        if a_thread and threading.get_ident() == a_thread[0]:
            calls[0] += 1
            if calls[0] == 12:  # a decode step once the cache evicts
                in_a.set()
                assert resume.wait(timeout=120)

    def run_a() -> None:
        a_thread.append(threading.get_ident())
        try:
            with torch.inference_mode():
                got.append(budget_generation(model, prompts[0]))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            got.append(exc)

    got: list[Any] = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(pause)
    a = threading.Thread(target=run_a)
    a.start()
    try:
        assert in_a.wait(timeout=120)
        with torch.inference_mode():
            budget_generation(model, prompts[1])
    finally:
        resume.set()
        a.join(timeout=120)
        handle.remove()
    assert got and not isinstance(got[0], BaseException), got
    assert same(got[0], want)


def test_a_layer_called_on_its_own_after_a_forward_sees_no_state() -> None:
    """No state outlives its forward, also one that raised inside a layer: a selection layer called
    directly afterwards (hidden states of the same shape) runs as the dense layer."""
    model = patched_model()
    ids, mask = BATCHES[0]
    layer = model.model.layers[2]
    calls: list[tuple] = []

    def fail(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args[0], {k: v for k, v in kwargs.items() if k in ("position_embeddings", "attention_mask")}))
        raise RuntimeError("boom")

    with torch.inference_mode():
        model(ids, attention_mask=mask)
        handle = model.model.layers[3].register_forward_pre_hook(fail, with_kwargs=True)
        with pytest.raises(RuntimeError, match="boom"):
            model(ids, attention_mask=mask)
        handle.remove()
        hidden, kwargs = calls[0]
        want = tiny_model("llama").model.layers[2](hidden, **kwargs)  # the same weights, dense
        assert torch.equal(layer(hidden, **kwargs), want)
        assert forward_context(model).state is None


def test_a_forward_nested_in_a_forward_gets_its_own_state_and_the_outer_one_keeps_its() -> None:
    model = patched_model()
    (outer_ids, outer_mask), (inner_ids, inner_mask) = BATCHES[0], BATCHES[2]
    with torch.inference_mode():
        want_outer = model(outer_ids, attention_mask=outer_mask).logits
        want_inner = model(inner_ids, attention_mask=inner_mask).logits
        inner: list[torch.Tensor] = []

        def nested(module: torch.nn.Module, args: tuple) -> None:  # between selection layers 2 and 3
            handle.remove()
            inner.append(model(inner_ids, attention_mask=inner_mask).logits)

        handle = model.model.layers[3].register_forward_pre_hook(nested)
        got_outer = model(outer_ids, attention_mask=outer_mask).logits
    assert torch.equal(inner[0], want_inner) and torch.equal(got_outer, want_outer)
