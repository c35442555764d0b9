"""Argument types shared by the command-line tools (``python -m orthorank.eval``, ``.analysis``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from .config import check_fraction

#: ``--dtype`` choices of the command-line tools.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def positive_int(text: str) -> int:
    """An int >= 1, else an ``argparse`` error saying so."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def fraction(*, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argument type for a number in [0, 1] (ends excluded on request), checked as the library checks it."""

    def parse(text: str) -> float:
        try:
            return check_fraction("the value", float(text), low_open=low_open, high_open=high_open)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse
