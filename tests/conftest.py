"""Fixtures every test gets: two torch threads, its own plan cache and self-calibration recipes,
and no floor of updated tokens by default (tiny test prompts are shorter than it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from benchmarks.embedded import DEFAULT_MODEL
from orthorank import config
from orthorank import recipe as recipes
from orthorank.plancache import cache_root
from tests.tiny_models import TINY_GENERATION_RECIPE, TINY_RECIPE


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path_factory, monkeypatch) -> None:
    """Every test gets its own empty ORTHORANK_CACHE and the tiny self-calibration recipe.

    An embedded model checkpoint already built in the real cache is linked in (read only), so
    tests that load it do not rebuild it.
    """
    built = cache_root() / DEFAULT_MODEL
    root = tmp_path_factory.mktemp("orthorank_cache")
    if (built / "config.json").is_file():
        (root / DEFAULT_MODEL).symlink_to(built, target_is_directory=True)
    monkeypatch.setenv("ORTHORANK_CACHE", str(root))
    monkeypatch.setattr(recipes, "RECIPE", recipes.Recipe(**TINY_RECIPE))
    monkeypatch.setattr(recipes, "GENERATION_RECIPE", dataclasses.replace(recipes.GENERATION_RECIPE, **TINY_GENERATION_RECIPE))


@pytest.fixture(autouse=True, scope="session")
def _no_keep_min() -> Iterator[None]:
    """``patch`` without a ``keep_min`` floor unless a test asks for one: the tiny models' prompts
    (8-48 tokens) are shorter than :data:`orthorank.config.DEFAULT_KEEP_MIN`, under which every
    token would be updated and the selection would go untested. Session-wide, so that module
    fixtures get it too. Tests of the floor pass ``keep_min`` or read :data:`REAL_OBJECTIVE_DEFAULTS`."""
    with pytest.MonkeyPatch.context() as mp:
        for objective, (selector, recent, _) in REAL_OBJECTIVE_DEFAULTS.items():
            mp.setitem(config.OBJECTIVE_DEFAULTS, objective, (selector, recent, 0))
        yield


#: The library's objective defaults, as imported (before :func:`_no_keep_min`).
REAL_OBJECTIVE_DEFAULTS: dict[str, tuple[str, int, int]] = dict(config.OBJECTIVE_DEFAULTS)
