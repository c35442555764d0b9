"""Dataset loader of the local tasks: reads ``data/<data_file>`` next to this file, from any cwd.

The task YAMLs name it as ``custom_dataset: !function wiki_data.load``; lm-eval resolves
``!function`` relative to the YAML's folder and calls it with the task's ``dataset_kwargs`` (and
its ``metadata``). ``dataset_path: json`` with ``data_files`` would resolve a relative path against
the current directory instead. The rows are built in memory: nothing is written to a cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DATA = Path(__file__).resolve().parent / "data"


def load(data_file: str, split: str = "test", only_task: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``{split: Dataset}`` of the JSONL file ``data/<data_file>`` (with ``only_task``, its rows whose
    ``"task"`` is that)."""
    path = DATA / data_file
    with path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if only_task is not None:
        rows = [row for row in rows if row.get("task") == only_task]
        if not rows:
            raise ValueError(f"{path} has no rows of task {only_task!r}")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
