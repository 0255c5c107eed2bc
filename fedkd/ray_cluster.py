"""Keep one local Ray cluster warm across several runs (a sweep, a test session).

`run_simulation` starts Ray and shuts it down on every call (~3-6 s each way on 2
cores). A cluster started with `ray start --head` outlives the runs; each run
joins it through `simulation.ray_address` and only disconnects at its end. The
cluster gets its own temp dir, so stopping it ends exactly its processes
(`ray stop` would end every Ray cluster on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

WATCHDOG = "fedkd.ray_cluster"
START_ATTEMPTS = 3  # `ray start` of one node of `local_cluster`  # the watchdog runs as `python -m fedkd.ray_cluster PID TEMP_DIR`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_cli() -> str:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else "ray"


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes (other than this one) whose command line names `temp_dir`."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(temp_dir in part for part in proc.info["cmdline"] or ()):
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return procs


def descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Every process below `procs` not in it: Ray retitles its agents and workers (`ray::...`), so
    their command lines no longer name the temp dir, and they outlive a raylet that is stopped
    alone. Read them while their parents still run: an orphan is reparented and not found again."""
    seen, found = {p.pid for p in procs}, []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for child in proc.children(recursive=True):
                if child.pid not in seen and child.pid != os.getpid():
                    seen.add(child.pid)
                    found.append(child)
    return found


def _stop(temp_dir: str, keep_watchdog: bool = False) -> None:
    """End the processes of the cluster that lives under `temp_dir`, its watchdog last.

    A sweep's own stop runs from a driver that may be killed mid-way (Ray's SIGTERM handler ends
    the process a moment after ours starts unwinding), so the watchdog, which ignores SIGTERM,
    must still be there to finish the job: it is killed only once the cluster is gone.
    """
    procs = cluster_processes(temp_dir)
    watchdogs = [p for p in procs if WATCHDOG in p.info["cmdline"]]  # read by cluster_processes
    cluster = [p for p in procs if p not in watchdogs]
    cluster += descendants(cluster)
    for proc in cluster:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(cluster, timeout=5)
    for proc in alive + ([] if keep_watchdog else watchdogs):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@contextmanager
def warm_ray(enabled: bool = True, num_cpus: int | None = None) -> Iterator[str | None]:
    """Start a local head node, yield its address, stop it afterwards (None when disabled)."""
    if not enabled:
        yield None
        return
    temp_dir = tempfile.mkdtemp(prefix="fedkd-ray-")
    port = _free_port()
    # Worker ports 0 = chosen by the OS, and a free client-server port: Ray's defaults (10002..,
    # 10001) are the same for every cluster, so two sweeps on one machine crashed each other's
    # workers ("Failed to add any wildcard listeners ... 0.0.0.0:10002").
    cmd = [_ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus or os.cpu_count() or 1}",
           "--min-worker-port=0", "--max-worker-port=0", f"--ray-client-server-port={_free_port()}",
           "--include-dashboard=false", "--disable-usage-stats"]
    # a driver that dies without unwinding (SIGKILL, a Ray abort) would leave the cluster running
    subprocess.Popen([sys.executable, "-m", WATCHDOG, str(os.getpid()), temp_dir],
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        subprocess.run(cmd, check=True, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(temp_dir)  # the watchdog too: its command line names temp_dir
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_ports() -> list[str]:
    """Ports that two nodes on one machine must not share (Ray's defaults are fixed numbers)."""
    return ["--min-worker-port=0", "--max-worker-port=0",
            f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}"]


@dataclass
class LocalCluster:
    address: str  # the head's, for `simulation.ray_address`
    temp_dirs: list[str]  # one per node, the head's first


@contextmanager
def local_cluster(cpus_per_node: list[int], env: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    """A Ray cluster of several nodes on this machine (a head, then one worker node per further
    entry), each with its own temp dir; yields the head's address and stops exactly these nodes.

    For tests and benchmarks of multi-node runs: the nodes share nothing but the head's address
    (fedkd's client state never touches a worker node's disk, see `fedkd.state`). `env` is added
    to the environment the nodes (and so their workers) start with."""
    temp_dirs = [tempfile.mkdtemp(prefix=f"fedkd-ray{i}-") for i in range(len(cpus_per_node))]
    port = _free_port()
    address = f"127.0.0.1:{port}"
    node_env = {**os.environ, **(env or {})}
    node_env.pop("RAY_ADDRESS", None)
    for temp_dir in temp_dirs:  # each node's processes are ended if this process dies unwinding
        subprocess.Popen([sys.executable, "-m", WATCHDOG, str(os.getpid()), temp_dir],
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for i, (cpus, temp_dir) in enumerate(zip(cpus_per_node, temp_dirs)):
            where = (["--head", f"--port={port}", f"--ray-client-server-port={_free_port()}",
                      "--include-dashboard=false", "--no-monitor"] if i == 0 else [f"--address={address}"])
            cmd = [_ray_cli(), "start", *where, "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                   f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats",
                   "--include-log-monitor=false", *_node_ports()]
            for attempt in range(START_ATTEMPTS):  # a loaded machine: the raylet misses Ray's 30 s
                done = subprocess.run(cmd, capture_output=True, text=True, env=node_env)
                if done.returncode == 0:
                    break
                _stop(temp_dir, keep_watchdog=True)  # what the failed start left, then again
            else:
                raise RuntimeError(f"ray start (node {i}) failed {START_ATTEMPTS} times: "
                                   f"{done.stderr.strip()[-2000:]}")
        yield LocalCluster(address, temp_dirs)
    finally:
        for temp_dir in reversed(temp_dirs):  # worker nodes first, the head last
            _stop(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether `pid` still runs; a zombie (killed, not yet reaped) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # also when it is reaped between the lookup and the status read
        return False


def reap_when_orphaned(parent: int, temp_dir: str, poll_s: float = 1.0) -> None:
    """Watchdog: stop the cluster under `temp_dir` once process `parent` is gone.

    The stop sits in `finally`: an error in the wait must not end the watchdog alone. (A parent
    reaped between `pid_exists` and `status()` once raised NoSuchProcess here, and CI saw the
    cluster outlive its killed driver.)
    """
    try:
        while _running(parent):
            time.sleep(poll_s)
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # see `_stop`: only SIGKILL ends the watchdog
    reap_when_orphaned(int(sys.argv[1]), sys.argv[2])
