"""Tiny randomly initialised models and tokenizers built in-process, shared by the tests."""

from __future__ import annotations

import inspect

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    PreTrainedTokenizerFast,
    Qwen3ForCausalLM,
)

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


#: The cache keyword of the installed release's model forward / generate (``cache`` or ``past_key_values``).
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


#: Self-calibration recipe of the tests: short windows, so that patch(sparsity=...) on a tiny
#: model calibrates in well under a second.
TINY_RECIPE = dict(windows=2, window=16)
#: The sizes the tests give the ``generation`` recipe (its search settings stay the library's).
TINY_GENERATION_RECIPE = dict(windows=4, window=16, prompt_docs=2, answer=4, rows=2)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over VOCAB ids: "<pad>", "<s>", "</s>", "w3" ... "w96"."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


CHEAP = 3  # the layer made near-identity


def cheap_layer_model(layers: int = 6, arch: str = "llama") -> torch.nn.Module:
    """A model with large enough weights that every layer matters, except layer CHEAP whose
    attention and MLP outputs are zero (so skipping it, or any of its tokens, changes nothing)."""
    model = tiny_model(arch, layers=layers, initializer_range=0.2)
    with torch.no_grad():
        model.model.layers[CHEAP].self_attn.o_proj.weight.zero_()
        model.model.layers[CHEAP].mlp.down_proj.weight.zero_()
    return model


def sampled_ids(model: torch.nn.Module, rows: int = 4, seq: int = 32) -> torch.Tensor:
    """Text the model itself finds likely: any change to the model raises its loss on it."""
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(
            torch.full((rows, 1), 5), do_sample=True, top_k=0, max_new_tokens=seq - 1, min_new_tokens=seq - 1,
            pad_token_id=0,
        )
