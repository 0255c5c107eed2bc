"""Shared fixtures: the offline data dir, and one warm Ray cluster per test session for e2e runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("FEDKD_DATA_DIR", str(SHARED_DATA))

needs_shared_data = pytest.mark.skipif(
    not Path(os.environ.get("FEDKD_DATA_DIR", "data")).joinpath("pfllib-mnist-dir0.1").is_dir(),
    reason="benchmark data dir (FEDKD_DATA_DIR) not present")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tests use tiny models: one thread avoids start-up cost and fighting other jobs; restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_address() -> str:
    """Start Ray once and let every e2e simulation join it (saves ~5 s per run)."""
    from fedkd.ray_cluster import warm_ray

    with warm_ray() as address:
        yield address
