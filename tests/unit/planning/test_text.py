"""orthorank.text: token windows cut from documents, documents read from files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orthorank import text


class CharTokenizer:
    """Stub tokenizer: one token per character (its code point)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        self.calls.append(text)
        return {"input_ids": [ord(c) for c in text]}


# ---------------------------------------------------------------- token_windows


def test_token_windows_concatenates_with_blank_line_and_cuts() -> None:
    tok = CharTokenizer()
    out = text.token_windows(tok, ["abc", "de", "fghij"], window=4)
    stream = [ord(c) for c in "abc\n\nde\n\nfghij"]  # 14 tokens -> 3 windows of 4
    assert out.dtype == torch.long
    assert out.tolist() == [stream[0:4], stream[4:8], stream[8:12]]


def test_token_windows_n_windows_stops_reading_early() -> None:
    tok = CharTokenizer()
    out = text.token_windows(tok, ["aaaa", "bbbb", "cccc", "dddd"], window=3, n_windows=2)
    assert out.shape == (2, 3)
    assert out[1].tolist() == [ord("a"), ord("\n"), ord("\n")]
    assert len(tok.calls) == 2  # "aaaa" + "\n\nbbbb" already give 10 >= 6 tokens


def test_token_windows_not_enough_text() -> None:
    with pytest.raises(ValueError, match="not enough text"):
        text.token_windows(CharTokenizer(), ["abc"], window=4)
    with pytest.raises(ValueError, match="not enough text"):
        text.token_windows(CharTokenizer(), ["abcdefgh"], window=4, n_windows=3)


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"window": 2.5}, {"window": 4, "n_windows": 0}])
def test_token_windows_bad_sizes(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        text.token_windows(CharTokenizer(), ["abcdefgh"], **kwargs)


def test_token_windows_rejects_single_string() -> None:
    with pytest.raises(TypeError):
        text.token_windows(CharTokenizer(), "abcdefgh", window=2)


# ---------------------------------------------------------------- read_texts


def test_read_texts_txt_paragraphs(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("First para\nline two.\n\n  \nSecond.\n \t\nThird\n", encoding="utf-8")
    assert text.read_texts(p) == ["First para\nline two.", "Second.", "Third"]


def test_read_texts_json_and_jsonl(tmp_path: Path) -> None:
    pj = tmp_path / "a.json"
    pj.write_text(json.dumps(["one", {"text": "two"}, "  "]), encoding="utf-8")
    assert text.read_texts(pj) == ["one", "two"]
    pl = tmp_path / "a.jsonl"
    pl.write_text('"one"\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert text.read_texts(pl) == ["one", "two"]


def test_read_texts_bad_input(tmp_path: Path) -> None:
    bad_suffix = tmp_path / "a.csv"
    bad_suffix.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.txt"):
        text.read_texts(bad_suffix)
    not_list = tmp_path / "b.json"
    not_list.write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(ValueError, match="list"):
        text.read_texts(not_list)
    bad_item = tmp_path / "c.json"
    bad_item.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="text"):
        text.read_texts(bad_item)
