"""examples/analysis.ipynb still fits the library: every orthorank call it makes binds to the
current signatures, and the files it reads exist. (Running it needs Jupyter and minutes of CPU;
the functions themselves are tested in test_analysis.py.)"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
NOTEBOOK = ROOT / "examples" / "analysis.ipynb"


def code_cells() -> str:
    """The notebook's code, IPython magics (``%...``) dropped."""
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith("%"))


def test_notebook_calls_bind_to_the_current_api() -> None:
    tree = ast.parse(code_cells())
    imported: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("orthorank", "benchmarks"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule (from benchmarks import embedded)
                    importlib.import_module(f"{node.module}.{alias.name}")
                imported[alias.asname or alias.name] = getattr(module, alias.name)  # AttributeError: gone
    assert imported, "the notebook imports from orthorank"
    calls = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in imported:
            target = imported[func.id]
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in imported:
            target = getattr(imported[func.value.id], func.attr)
        else:
            continue
        if not callable(target):
            continue
        signature = inspect.signature(target)
        signature.bind(*[None] * len(node.args), **{k.arg: None for k in node.keywords if k.arg})
        calls += 1
    assert calls >= 5


def test_notebook_reads_files_that_exist() -> None:
    tree = ast.parse(code_cells())
    read = [node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Image"
            and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value.startswith("benchmarks/")]
    assert read and all((ROOT / path).is_file() for path in read)
