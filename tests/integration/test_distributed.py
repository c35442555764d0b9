"""Tensor parallelism: a patched model loaded with ``from_pretrained(..., tp_plan="auto")`` under
torch.distributed gives the single-process patched model's outputs.

Two CPU processes (gloo, rendezvous through a file in ``tmp_path``, sockets on the loopback
interface) load a tiny Llama and a tiny Qwen3 checkpoint with transformers' tensor-parallel plan:
q/k/v and gate/up projections are column-parallel (each rank computes its own heads / MLP
columns), o_proj and down_proj row-parallel (partial sums, then an all-reduce), so the hidden
states between layers are replicated. The selective layer projects with the module it is given
and splits heads with ``head_dim`` and ``-1``, so each rank runs its local heads; the selection
scores read the replicated normed hidden states, so every rank selects the same tokens (checked
from the tokens each layer changes, gathered from both ranks).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import orthorank

from tests.tiny_models import left_padded_batch, tiny_model

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

WORLD = 2
ARCHS = ("llama", "qwen3")
LAYERS = [1, 2, 3, 4]
KEEP = 0.34
NEW_TOKENS = 5
#: TP sums each row-parallel projection (o_proj, down_proj) from two partial products with an
#: all-reduce instead of one matmul: float32 rounding changes at ~1e-7 relative per layer. The
#: dense model under TP differs from the single process by 2.1e-7 (Llama) / 2.4e-7 (Qwen3) here
#: (logits up to ~0.7); 1e-5 leaves room for other BLAS kernels while staying far below the patch's own
#: effect on the logits (asserted > 1e-2 below), so a rank that selected other tokens would fail.
TOLERANCE = 1e-5


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows of 24, 17 and 9 real tokens (the padded-selection path)."""
    return left_padded_batch([24, 17, 9], 24, seed=5)


def _changed_tokens(model: torch.nn.Module) -> tuple[dict[int, list[torch.Tensor]], list]:
    """Forward hooks recording, per patched layer, which tokens the layer changed ``[batch, seq]``."""
    changed: dict[int, list[torch.Tensor]] = {i: [] for i in LAYERS}

    def hook(i):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            changed[i].append((out != x).any(-1))
        return record

    layers = model.model.layers
    return changed, [layers[i].register_forward_hook(hook(i), with_kwargs=True) for i in LAYERS]


def _run(model: torch.nn.Module) -> dict:
    """Dense logits, patched logits, the tokens each patched layer changed, greedy generations."""
    ids, mask = _inputs()
    gen = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        # keep_min=0: spawned ranks do not get the tests' fixture, and rows of 9-24 tokens are under the default floor
        orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, keep_min=0)
        changed, hooks = _changed_tokens(model)
        patched = model(ids, attention_mask=mask).logits
        for h in hooks:
            h.remove()
        generated = model.generate(ids, **gen)
        orthorank.patch(model, layers=LAYERS, keep_ratio=KEEP, keep_min=0, decode="bypass")
        generated_bypass = model.generate(ids, **gen)
    stats = {i: s.selective_calls for i, s in orthorank.layer_stats(model).items()}
    orthorank.unpatch(model)
    return dict(
        dense=dense, patched=patched, changed={i: c[0] for i, c in changed.items()},
        generated=generated, generated_bypass=generated_bypass, stats=stats,
    )


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in names if n.startswith("lo")), None)


def _worker(rank: int, folder: str) -> None:
    """One rank: load each checkpoint tensor-parallel, run, save its results to ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    store = Path(folder) / "rendezvous"
    dist.init_process_group("gloo", init_method=store.as_uri(), rank=rank, world_size=WORLD)
    try:
        for arch in ARCHS:
            model = AutoModelForCausalLM.from_pretrained(
                Path(folder) / arch, tp_plan="auto", attn_implementation="sdpa", dtype=torch.float32
            ).eval()
            sharded = model.model.layers[1].self_attn.q_proj.weight  # a DTensor or a local shard, by release
            result = _run(model)
            result["local_q_rows"] = sharded.to_local().shape[0] if hasattr(sharded, "to_local") else sharded.shape[0]
            torch.save(result, Path(folder) / f"{arch}.rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory) -> dict:
    """Results of both ranks and of the single process, per architecture."""
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("tp")
    single = {}
    for arch in ARCHS:
        model = tiny_model(arch)
        model.save_pretrained(folder / arch)
        single[arch] = _run(model)
    loopback = _loopback_interface()
    previous = os.environ.get("GLOO_SOCKET_IFNAME")
    if loopback is not None:  # keep gloo's sockets on 127.0.0.1
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    try:
        mp.start_processes(_worker, args=(str(folder),), nprocs=WORLD, join=True, start_method="spawn")
    finally:
        if loopback is not None:
            if previous is None:
                del os.environ["GLOO_SOCKET_IFNAME"]
            else:
                os.environ["GLOO_SOCKET_IFNAME"] = previous
    ranks = {arch: [torch.load(folder / f"{arch}.rank{r}.pt") for r in range(WORLD)] for arch in ARCHS}
    return {"single": single, "ranks": ranks}


@pytest.mark.parametrize("arch", ARCHS)
def test_model_is_really_tensor_parallel(tensor_parallel, arch):
    for rank in tensor_parallel["ranks"][arch]:
        assert rank["local_q_rows"] == 64 // WORLD  # each rank holds half of the query heads


@pytest.mark.parametrize("arch", ARCHS)
def test_all_ranks_select_the_same_tokens_as_one_process(tensor_parallel, arch):
    single = tensor_parallel["single"][arch]
    for rank in tensor_parallel["ranks"][arch]:
        assert rank["stats"] == single["stats"] and all(n > 0 for n in rank["stats"].values())
        for i in LAYERS:
            assert 0 < int(single["changed"][i].sum()) < single["changed"][i].numel()
            assert torch.equal(rank["changed"][i], single["changed"][i]), f"layer {i}"


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_parallel_patched_logits_equal_single_process(tensor_parallel, arch):
    single = tensor_parallel["single"][arch]
    ranks = tensor_parallel["ranks"][arch]
    assert (single["patched"] - single["dense"]).abs().max() > 1e-2  # the patch changes the output
    for rank in ranks:
        torch.testing.assert_close(rank["dense"], single["dense"], rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(rank["patched"], single["patched"], rtol=0, atol=TOLERANCE)
    assert torch.equal(ranks[0]["patched"], ranks[1]["patched"])  # the outputs are replicated


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_parallel_greedy_generate_equals_single_process(tensor_parallel, arch):
    single = tensor_parallel["single"][arch]
    for rank in tensor_parallel["ranks"][arch]:
        assert torch.equal(rank["generated"], single["generated"])
        assert torch.equal(rank["generated_bypass"], single["generated_bypass"])
