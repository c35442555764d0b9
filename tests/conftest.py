"""Fixtures every test gets: two torch threads, and its own plan cache and self-calibration recipes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.embedded import DEFAULT_MODEL
from orthorank import selfcalib
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
    monkeypatch.setattr(selfcalib, "RECIPE", selfcalib.Recipe(**TINY_RECIPE))
    monkeypatch.setattr(selfcalib, "GENERATION_RECIPE", dataclasses.replace(selfcalib.GENERATION_RECIPE, **TINY_GENERATION_RECIPE))
