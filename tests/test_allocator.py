"""fedkd's glibc settings: two arenas, and a dynamic mmap threshold (a fixed one mmapped every
activation tensor of every batch: a page-fault storm, ~1.9x slower rounds; bench/scale.md)."""

from __future__ import annotations

import os

import pytest

from fedkd.runtime import tame_malloc


def test_tame_malloc_bounds_arenas_and_leaves_the_mmap_threshold_dynamic(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    tame_malloc()  # exports what the processes it starts (a local Ray's workers) inherit
    assert os.environ["MALLOC_ARENA_MAX"] == "2"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ and "MALLOC_TRIM_THRESHOLD_" not in os.environ
