"""The warm Ray cluster of a sweep never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.e2e

STARTER = """
import sys, time
from fedkd.ray_cluster import warm_ray
with warm_ray(num_cpus=1) as address:
    print(address, flush=True)
    time.sleep(600)
"""


def _cluster_processes(temp_prefix: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_prefix in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_killed_driver_does_not_leave_its_cluster_running() -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout is not None and starter.stdout.readline().strip()  # cluster is up
        children = {p.pid for p in psutil.Process(starter.pid).children(recursive=True)}
        temp_dirs = {part for proc in psutil.process_iter(["cmdline"]) if proc.pid in children
                     for part in proc.info["cmdline"] or () if "fedkd-ray-" in part}
        assert temp_dirs, "no cluster process found under the driver"
        temp_dir = next(iter(temp_dirs)).split("fedkd-ray-")[1].split("/")[0]
        assert _cluster_processes(f"fedkd-ray-{temp_dir}")
        os.kill(starter.pid, signal.SIGKILL)  # no `finally` runs
        starter.wait()
        deadline = time.monotonic() + 30
        while _cluster_processes(f"fedkd-ray-{temp_dir}") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _cluster_processes(f"fedkd-ray-{temp_dir}")
    finally:
        if starter.poll() is None:
            starter.kill()
