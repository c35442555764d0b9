"""Documents from files and fixed-length token windows cut from them (calibration, analysis)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .config import check_positive_int

logger = logging.getLogger(__name__)

_TEXT_SUFFIXES = (".txt", ".json", ".jsonl")


def _text_item(item: Any, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise ValueError(f"{where}: expected a string or an object with a 'text' string, got {type(item).__name__}")


def read_texts(path: str | Path) -> list[str]:
    """Read documents from a file.

    * ``.txt``: paragraphs separated by blank lines, one document each.
    * ``.json``: a list of strings or of objects ``{"text": ...}``.
    * ``.jsonl``: one JSON string or ``{"text": ...}`` object per line.

    Empty documents are dropped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _TEXT_SUFFIXES:
        raise ValueError(f"unsupported text file {path.name!r}: suffix must be one of {_TEXT_SUFFIXES}")
    content = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        texts = re.split(r"\n[ \t]*\n", content)
    elif suffix == ".json":
        data = json.loads(content)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list, got {type(data).__name__}")
        texts = [_text_item(item, str(path)) for item in data]
    else:
        texts = [
            _text_item(json.loads(line), f"{path}:{lineno}")
            for lineno, line in enumerate(content.splitlines(), 1)
            if line.strip()
        ]
    return [t.strip() for t in texts if t.strip()]


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    window: int = 1024,
    n_windows: int | None = None,
) -> torch.LongTensor:
    """Concatenate tokenized documents and cut the stream into non-overlapping windows.

    Documents are joined with ``"\\n\\n"`` and tokenized without special tokens (no BOS is added;
    the first token of each window is its attention sink). The tail that does not fill a window is
    dropped. Texts are consumed lazily, only as far as needed.

    Args:
        tokenizer: a HuggingFace tokenizer (anything callable returning ``{"input_ids": [...]}``).
        texts: documents.
        window: tokens per window.
        n_windows: number of windows; ``None`` for as many as the text fills.

    Returns:
        LongTensor ``[n_windows, window]``.

    Raises:
        ValueError: bad sizes, or not enough text for ``n_windows`` (or for a single window).
    """
    check_positive_int("window", window)
    if n_windows is not None and (isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1):
        raise ValueError(f"n_windows must be a positive int or None, got {n_windows!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings (documents), not a single string: pass [text]")
    needed = None if n_windows is None else window * n_windows
    ids: list[int] = []
    first = True
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must contain strings, got {type(text).__name__}")
        piece = text if first else "\n\n" + text
        first = False
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if needed is not None and len(ids) >= needed:
            break
    available = len(ids) // window
    if available == 0 or (n_windows is not None and available < n_windows):
        want = n_windows if n_windows is not None else 1
        raise ValueError(
            f"not enough text: {len(ids)} tokens make {available} window(s) of {window}, need {want}; "
            "give more text, or fewer or shorter windows"
        )
    count = available if n_windows is None else n_windows
    return torch.tensor(ids[: count * window], dtype=torch.long).view(count, window)
