"""``evaluate``: lm-eval-harness tasks on an already-loaded (patched or dense) model."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..patch import get_plan
from .adapter import masked_hflm

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'orthorank[eval]'"


def require_lm_eval() -> Any:
    """Import ``lm_eval`` (an optional dependency), or raise an ImportError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM needs transformers/accelerate too)
    except ImportError as err:
        raise ImportError(f"orthorank.eval needs lm-eval-harness: {INSTALL_HINT} ({err})") from err
    return lm_eval


@dataclass
class EvalOptions:
    """What to run and how; validated on construction.

    Attributes:
        tasks: lm-eval task or group names (``"a,b"`` is split on commas).
        batch_size: rows per forward, a positive int.
        limit: documents per task (an int >= 1), a fraction of them (a float in (0, 1)), or all.
        include_path: a folder (or several) of extra task YAMLs, as lm-eval's ``--include_path``.
        num_fewshot: few-shot examples per prompt (``None``: each task's default).
        max_length: the longest row in tokens (``None``: from the model config).
        bootstrap_iters: bootstrap resamples for standard errors (0: none).
        log_samples: keep per-document outputs in the result (``"samples"``).
    """

    tasks: Sequence[str] | str
    batch_size: int = 1
    limit: int | float | None = None
    include_path: str | Path | Sequence[str | Path] | None = None
    num_fewshot: int | None = None
    max_length: int | None = None
    bootstrap_iters: int = 100_000
    log_samples: bool = False

    def __post_init__(self) -> None:
        tasks = self.tasks.split(",") if isinstance(self.tasks, str) else self.tasks
        if not isinstance(tasks, Sequence) or not all(isinstance(t, str) for t in tasks):
            raise TypeError("tasks must be a list of task names or a comma-separated string")
        self.tasks = [t.strip() for t in tasks if t.strip()]
        if not self.tasks:
            raise ValueError("tasks must name at least one lm-eval task or group")
        _check_positive_int("batch_size", self.batch_size)
        if self.limit is not None:
            if isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)):
                raise TypeError(f"limit must be an int >= 1, a float in (0, 1) or None, got {self.limit!r}")
            if not (self.limit >= 1 if isinstance(self.limit, int) else 0 < self.limit < 1):
                raise ValueError(f"limit must be an int >= 1, a float in (0, 1) or None, got {self.limit!r}")
        if self.include_path is not None:
            paths = [self.include_path] if isinstance(self.include_path, (str, Path)) else list(self.include_path)
            for path in paths:
                if not Path(path).is_dir():
                    raise ValueError(f"include_path {str(path)!r} is not a folder of task YAMLs")
            self.include_path = [str(Path(p).resolve()) for p in paths]
        if self.num_fewshot is not None:
            _check_positive_int("num_fewshot", self.num_fewshot, allow_zero=True)
        if self.max_length is not None:
            _check_positive_int("max_length", self.max_length)
        _check_positive_int("bootstrap_iters", self.bootstrap_iters, allow_zero=True)


def _check_positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def make_task_manager(tasks: Sequence[str], include_path: Any = None) -> Any:
    """An lm-eval ``TaskManager``: ``include_path`` alone when it holds every task, else also lm-eval's tasks."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
    return TaskManager(include_path=include_path)


def lm_eval_model(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 1, max_length: int | None = None
) -> Any:
    """The lm-eval model object (``MaskedHFLM``, :func:`orthorank.eval.adapter.masked_hflm`) for a loaded model.

    Pass it to ``lm_eval.simple_evaluate(model=...)`` to use any other lm-eval option.
    """
    require_lm_eval()
    _check_positive_int("batch_size", batch_size)
    return masked_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str] | str,
    *,
    batch_size: int = 1,
    limit: int | float | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 100_000,
    log_samples: bool = False,
    task_manager: Any = None,
) -> dict[str, Any]:
    """Run lm-eval-harness tasks on ``model`` as it is now (patched or dense).

    Every log-likelihood row is computed as if it were alone, whatever the batch (see
    :mod:`orthorank.eval.adapter`), so results do not depend on ``batch_size``.

    Args: see :class:`EvalOptions`; also ``task_manager``, an ``lm_eval.tasks.TaskManager`` to
    reuse (it overrides ``include_path``). By default, tasks found in ``include_path`` are loaded
    from there alone, without indexing lm-eval's own tasks (about a minute on a slow machine).

    Returns:
        lm-eval's results object (``result["results"][task][metric]``, plus ``"groups"``,
        ``"configs"``, ``"n-samples"``, ...) with ``"plan"``: the installed
        :class:`orthorank.Plan` as a dict, or ``None`` for a dense model.

    Raises:
        ImportError: lm-eval is not installed.
        ValueError / TypeError: bad options.
    """
    opts = EvalOptions(tasks, batch_size, limit, include_path, num_fewshot, max_length, bootstrap_iters, log_samples)
    lm_eval = require_lm_eval()
    lm = lm_eval_model(model, tokenizer, batch_size=opts.batch_size, max_length=opts.max_length)
    manager = task_manager if task_manager is not None else make_task_manager(opts.tasks, opts.include_path)
    plan = get_plan(model)
    logger.info("orthorank.eval: tasks %s on %s", opts.tasks, plan if plan is not None else "the dense model")
    result = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(opts.tasks),
        num_fewshot=opts.num_fewshot,
        limit=opts.limit,
        bootstrap_iters=opts.bootstrap_iters,
        log_samples=opts.log_samples,
        task_manager=manager,
    )
    if result is None:  # not rank 0 in a distributed run
        return {}
    result = dict(result)
    result["plan"] = None if plan is None else plan.to_dict()
    return result


def to_json(result: dict[str, Any]) -> str:
    """``result`` as JSON text (numpy scalars and other non-JSON values converted as lm-eval does)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(result, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
