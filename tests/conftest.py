"""Tiny randomly initialised models built in-process, shared by the tests."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from benchmarks.embedded import DEFAULT_MODEL
from orthorank import selfcalib
from orthorank.plancache import cache_root

VOCAB = 97


def tiny_model(arch: str = "llama", attn: str = "sdpa", layers: int = 6, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 model with 4 query heads / 2 key-value heads, hidden size 64.

    ``mistral`` uses a sliding window of 8; ``qwen2``/``qwen3`` run full attention in layers 0-2
    and a sliding window of 8 in layers 3+ (their per-layer ``layer_types``).
    """
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        common.setdefault("sliding_window", 8)
        model = MistralForCausalLM(MistralConfig(**common))
    elif arch in ("qwen2", "qwen3"):
        common.update(use_sliding_window=True, sliding_window=8, max_window_layers=3, **overrides)
        if arch == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**common))
        else:
            common.setdefault("head_dim", 16)
            model = Qwen3ForCausalLM(Qwen3Config(**common))
        _randomize_attention_extras(model)
    else:
        raise ValueError(arch)
    model.config._attn_implementation = attn
    return model.eval()


def _randomize_attention_extras(model: torch.nn.Module) -> None:
    """Non-trivial q/k/v biases (Qwen2) and q/k norm weights (Qwen3); initialisation makes them 0 / 1."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0.0, 0.5)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:
                    norm.weight.uniform_(0.5, 1.5)


def cache_kwarg(layer: torch.nn.Module) -> str:
    """Name of the cache keyword of a decoder layer's forward in the installed release."""
    params = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def left_padded_batch(lengths: list[int], seq: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[len(lengths), seq]`` with left padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, seq - n :] = 1
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


#: Self-calibration recipe of the tests: short windows, so that patch(sparsity=...) on a tiny
#: model calibrates in well under a second.
TINY_RECIPE = dict(windows=2, window=16)


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path_factory, monkeypatch) -> None:
    """Every test gets its own empty ORTHORANK_CACHE and the tiny self-calibration recipe.

    An embedded model checkpoint already built in the real cache is linked in (read only), so
    tests that load it do not rebuild it.
    """
    built = cache_root() / DEFAULT_MODEL
    root = tmp_path_factory.mktemp("orthorank_cache")
    if (built / "config.json").is_file():
        (root / DEFAULT_MODEL).symlink_to(built, target_is_directory=True)
    monkeypatch.setenv("ORTHORANK_CACHE", str(root))
    monkeypatch.setattr(selfcalib, "RECIPE", selfcalib.Recipe(**TINY_RECIPE))


def tiny_tokenizer():
    """A word-level fast tokenizer over VOCAB ids: "<pad>", "<s>", "</s>", "w3" ... "w96"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
