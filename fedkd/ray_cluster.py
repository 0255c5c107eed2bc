"""Keep one local Ray cluster warm across several runs (a sweep, a test session).

`run_simulation` starts Ray and shuts it down on every call (~3-6 s each way on 2
cores). A cluster started with `ray start --head` outlives the runs; each run
joins it through `simulation.ray_address` and only disconnects at its end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_cli() -> str:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else "ray"


@contextmanager
def warm_ray(enabled: bool = True, num_cpus: int | None = None) -> Iterator[str | None]:
    """Start a local head node, yield its address, stop it afterwards (None when disabled)."""
    if not enabled:
        yield None
        return
    port = _free_port()
    cmd = [_ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus or os.cpu_count() or 1}", "--include-dashboard=false",
           "--disable-usage-stats"]
    subprocess.run(cmd, check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True)
