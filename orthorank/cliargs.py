"""What the command-line tools (``python -m orthorank.eval``, ``.analysis``) share: argument
types, and loading the model their ``--model`` names."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import check_fraction

#: ``--dtype`` choices of the command-line tools.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from err
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1, else an ``argparse`` error saying so."""
    return _int_at_least(text, 1, "a positive int")


def non_negative_int(text: str) -> int:
    """An int >= 0, else an ``argparse`` error saying so."""
    return _int_at_least(text, 0, "an int >= 0")


def fraction(*, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argument type for a number in [0, 1] (ends excluded on request), checked as the library checks it."""

    def parse(text: str) -> float:
        try:
            return check_fraction("the value", float(text), low_open=low_open, high_open=high_open)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


def load_pretrained(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of a Hub id or local folder, the model in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model.eval()
    return model, tokenizer
