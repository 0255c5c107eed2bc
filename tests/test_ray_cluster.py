"""The warm Ray cluster of a sweep never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fedkd import ray_cluster
from fedkd.ray_cluster import cluster_processes, descendants, reap_when_orphaned

STARTER = """
import sys, time
import ray
from fedkd.ray_cluster import warm_ray
with warm_ray(num_cpus=1) as address:
    ray.init(address=address)  # a real driver: Ray installs its own SIGTERM handler
    print(address, flush=True)
    time.sleep(600)
"""


def watchdog_of(driver: int) -> psutil.Process:
    """The watchdog `python -m fedkd.ray_cluster DRIVER TEMP_DIR`, found by its command line."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "fedkd.ray_cluster" in cmd and str(driver) in cmd:
            return proc
    raise AssertionError(f"no watchdog for driver {driver}")


@pytest.mark.e2e
@pytest.mark.process
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_driver_does_not_leave_its_cluster_running(sig: signal.Signals) -> None:
    """SIGKILL runs no `finally`. SIGTERM starts the driver's own stop, which Ray's handler cuts
    short; that stop used to end the watchdog first and leave the cluster running. Either way
    the watchdog must stop the cluster."""
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout is not None and starter.stdout.readline().strip()  # cluster is up
        temp_dir = watchdog_of(starter.pid).cmdline()[-1]
        assert len(cluster_processes(temp_dir)) > 1  # the watchdog and the cluster itself
        # Ray's agents and workers: retitled `ray::...`, found only as the raylet's children
        retitled = descendants(cluster_processes(temp_dir))
        assert any(p.name().startswith("ray::") or "ray::" in " ".join(p.cmdline()) for p in retitled)
        os.kill(starter.pid, sig)
        starter.wait()
        deadline = time.monotonic() + 30
        while (cluster_processes(temp_dir) or any(map(_alive, retitled))) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not cluster_processes(temp_dir)
        assert not [p.pid for p in retitled if _alive(p)]  # none outlives the raylet
    finally:
        if starter.poll() is None:
            starter.kill()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stand_in_cluster(temp_dir: str) -> subprocess.Popen:
    """A process whose command line names `temp_dir`, as every process of a real cluster does."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", temp_dir])


def _gone_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # exited and reaped
    return done.pid


@pytest.mark.parametrize("wait_fails", [False, True], ids=["parent-gone", "wait-raises"])
def test_the_watchdog_stops_the_cluster_even_when_its_wait_fails(
    tmp_path, monkeypatch: pytest.MonkeyPatch, wait_fails: bool
) -> None:
    """A parent reaped between two psutil reads made the wait raise, and the watchdog ended
    without stopping the cluster (seen on CI). The stop must run however the wait ends."""
    temp_dir = str(tmp_path / "fedkd-ray-standin")
    cluster = _stand_in_cluster(temp_dir)
    try:
        if wait_fails:
            def vanished(pid: int) -> bool:
                raise psutil.NoSuchProcess(pid)

            monkeypatch.setattr(ray_cluster, "_running", vanished)
            with pytest.raises(psutil.NoSuchProcess):
                reap_when_orphaned(_gone_pid(), temp_dir, poll_s=0.01)
        else:
            reap_when_orphaned(_gone_pid(), temp_dir, poll_s=0.01)
        assert cluster.wait(timeout=10) is not None
        assert not cluster_processes(temp_dir)
    finally:
        if cluster.poll() is None:
            cluster.kill()
