"""benchmarks.longprompt: the long-prompt task builders (pass key, long-document QA, probes) and the table."""

from __future__ import annotations

import pytest

from benchmarks import embedded
from benchmarks.longprompt import tasks
from benchmarks.longprompt.table import _ppl_text

FILLER = (
    "The river rises in the hills above the town. It flows south through farmland and small villages. "
    "In spring the water is high and fast! Fishermen wait for the summer months. Is the bridge old? "
    "It was built of stone two hundred years ago. Travellers still cross it every day. "
) * 40


@pytest.fixture(scope="module")
def tokenizer():
    folder = embedded.default_model_dir()
    if not (folder / "config.json").is_file():
        pytest.skip("the embedded model is not built (python -m benchmarks.embedded)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def fillers(tokenizer):
    return {"a": tasks.prose_stream(tokenizer, [FILLER]), "b": tasks.prose_stream(tokenizer, [FILLER.upper()])}


@pytest.mark.parametrize("length", [200, 512])
def test_passkey_prompts_have_the_exact_length_and_the_key_once_at_its_depth(tokenizer, fillers, length):
    prompts = tasks.passkey_prompts(tokenizer, fillers, length, 6, seed=3)
    assert len(prompts) == 6 and {p.filler for p in prompts} == {"a", "b"}
    assert len({p.answer for p in prompts}) == 6, "keys differ between prompts"
    for p in prompts:
        assert p.task == "passkey" and p.length == length and p.answer.isdigit() and len(p.answer) == 5
        text = tokenizer.decode(list(p.ids))
        assert text.startswith(tasks.PASSKEY_INTRO.strip()[:20])
        assert text.endswith(tasks.PASSKEY_QUESTION)
        assert text.count(tasks.NEEDLE.format(key=p.answer).strip()) == 1
        assert 0.0 < p.depth < 1.0
        start = text.index("The pass key is " + p.answer)
        assert abs(start / len(text) - p.depth) < 0.15, "the needle sits near its recorded depth"
    again = tasks.passkey_prompts(tokenizer, fillers, length, 6, seed=3)
    assert [p.ids for p in again] == [p.ids for p in prompts], "seeded: the same prompts every call"


def test_qa_prompts_state_three_facts_once_and_ask_one(tokenizer, fillers):
    prompts = tasks.qa_prompts(tokenizer, fillers, 400, 8)
    assert {p.length for p in prompts} == {400}
    for i, p in enumerate(prompts):
        fact, question, choices = tasks.FACTS[i % len(tasks.FACTS)]
        text = tokenizer.decode(list(p.ids))
        assert p.answer in choices
        stated = [c for c in choices if c in text]
        assert len(stated) == 3 and p.answer in stated, "three facts of one kind, the answer among them"
        assert text.count(p.answer) == 1
        asked = text[text.rindex("Question: ") + len("Question: "):]
        person = next(name for name in tasks.NAMES if name in asked)
        assert fact.format(name=person, value=p.answer).strip() in text, "the question asks about a stated fact"


def test_answers_are_read_from_the_generated_text():
    key = tasks.Prompt("passkey", (1, 2), "48213", 0.5, "a")
    assert tasks.is_right(key, " 48213. Remember")
    assert not tasks.is_right(key, " 4821 3") and not tasks.is_right(key, " a key that opens")
    qa = tasks.Prompt("qa", (1, 2), "Dunmore", 0.5, "a")
    assert tasks.is_right(qa, " dunmore.\n") and not tasks.is_right(qa, " the town of Dunmore")


def test_prompt_builders_refuse_what_does_not_fit(tokenizer, fillers):
    with pytest.raises(ValueError, match="too short"):
        tasks.passkey_prompts(tokenizer, fillers, 20, 1)
    with pytest.raises(ValueError, match="fewer than"):
        tasks.passkey_prompts(tokenizer, {"tiny": fillers["a"][:50]}, 512, 1)


def test_probe_lengths_are_log_uniform_within_the_range():
    lengths = tasks.probe_lengths(16, 4096, 400, seed=1)
    assert min(lengths) >= 16 and max(lengths) <= 4096
    low = sum(n < 256 for n in lengths) / len(lengths)
    assert 0.4 < low < 0.6, "half the probes below the geometric middle (256)"
    assert tasks.probe_lengths(16, 4096, 400, seed=1) == lengths


def test_table_writes_huge_perplexities_with_two_significant_digits():
    assert _ppl_text(15.014) == "15.01" and _ppl_text(9999.994) == "9999.99"
    assert _ppl_text(2037832.55) == "2.0e6" and _ppl_text(253949922.24) == "2.5e8"
    assert _ppl_text(3.2e12) == "3.2e12"
