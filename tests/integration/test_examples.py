"""The scripts in examples/ run end to end, as a user runs them, on a tiny model saved to a folder.

Each script runs in its own process (offline, its own plan cache), with arguments small enough
for seconds; what it prints is checked for the lines it promises. ``lm_eval_tasks.py`` needs the
``eval`` extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import orthorank
from tests.tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("orthorank-cache")
    return {**os.environ, "ORTHORANK_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_example(script: str, *args: str, env: dict[str, str]) -> str:
    """stdout of ``python examples/<script> <args>``; the test fails with its stderr if it fails."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-4000:]}"
    return done.stdout


def test_quickstart(model_dir: Path, env: dict[str, str]) -> None:
    out = run_example("quickstart.py", "--model", str(model_dir), "--context", "200", "--new-tokens", "6",
                      "--dtype", "float32", "--repeats", "2", env=env)
    assert "dense    : " in out and "orthorank: " in out
    assert "prefill of 200 tokens: dense" in out and "medians of 2 interleaved rounds" in out
    assert "Plan(" in out, "the script prints the plan patch installed"


def test_budget_cache(model_dir: Path, env: dict[str, str]) -> None:
    out = run_example("budget_cache.py", "--model", str(model_dir), "--budget", "40", "--new-tokens", "48",
                      "--policy", "sink_window", env=env)
    assert "full cache     : 48 tokens" in out
    assert "budget 40      : 48 tokens" in out and "patch + budget : 48 tokens" in out
    assert "equal to the full cache's" in out


def test_calibrate(model_dir: Path, env: dict[str, str], tmp_path: Path) -> None:
    text = tmp_path / "docs.jsonl"
    text.write_text("\n".join(json.dumps({"text": " ".join(f"w{3 + (7 * d + i) % 90}" for i in range(200))})
                              for d in range(8)) + "\n")
    plan_file = tmp_path / "plan.json"
    out = run_example("calibrate.py", "--model", str(model_dir), "--text", str(text), "--windows", "1",
                      "--window", "64", "--eval-windows", "1", "--out", str(plan_file), env=env)
    assert f"saved to {plan_file}" in out and "perplexity on 1 windows neither search saw: dense" in out
    plan = orthorank.Plan.load(plan_file, model=tiny_model("llama"))
    assert plan.selection_layers or plan.removed_layers, "the saved plan skips work somewhere"


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the eval extra (lm-eval)")
def test_lm_eval_tasks(model_dir: Path, env: dict[str, str]) -> None:
    out = run_example("lm_eval_tasks.py", "--model", str(model_dir), "--limit", "4", "--batch-size", "2", env=env)
    assert "dense | orthorank_wiki_cloze:" in out and "sparsity 0.2 | orthorank_wiki_cloze:" in out
