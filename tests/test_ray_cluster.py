"""The warm Ray cluster of a sweep never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fedkd.ray_cluster import cluster_processes

pytestmark = pytest.mark.e2e

STARTER = """
import sys, time
from fedkd.ray_cluster import warm_ray
with warm_ray(num_cpus=1) as address:
    print(address, flush=True)
    time.sleep(600)
"""


def test_a_killed_driver_does_not_leave_its_cluster_running() -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout is not None and starter.stdout.readline().strip()  # cluster is up
        # the watchdog is the driver's child: `python -m fedkd.ray_cluster PID TEMP_DIR`
        watchdog = next(p for p in psutil.Process(starter.pid).children(recursive=True)
                        if "fedkd.ray_cluster" in p.cmdline())
        temp_dir = watchdog.cmdline()[-1]
        assert len(cluster_processes(temp_dir)) > 1  # the watchdog and the cluster itself
        os.kill(starter.pid, signal.SIGKILL)  # no `finally` runs
        starter.wait()
        deadline = time.monotonic() + 30
        while cluster_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not cluster_processes(temp_dir)
    finally:
        if starter.poll() is None:
            starter.kill()
