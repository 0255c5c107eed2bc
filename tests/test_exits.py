"""Clean exits of `fedkd run` (issue 19, item 6): Ctrl-C and SIGTERM mid-run, and a machine too small.

Each run is a real `fedkd` process in its own session, signalled as a terminal does (the whole
process group): it must write its report, print one line naming the run directory, exit
128+signal without a traceback and leave no process of its session behind (Ray's included).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedkd.config import ConfigError
from fedkd.engine import check_capacity

ROOT = Path(__file__).resolve().parents[1]
FEDKD = [sys.executable, "-m", "fedkd.cli"]
QUICKSTART = str(ROOT / "configs/experiment/quickstart.yaml")
SMALL = ["train.rounds=50", "data.num_clients=4", "model.name=mlp"]


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("FEDKD_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    return subprocess.Popen([*FEDKD, "run", QUICKSTART, *overrides, "--quiet", "--run-dir",
                             str(run_dir)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_round(proc: subprocess.Popen, run_dir: Path, timeout: float = 300) -> None:
    """Until metrics.jsonl holds a record of round 1 (generous: Ray starts on a busy machine)."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and any(json.loads(line).get("round") == 1
                                    for line in metrics.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no round 1 within {timeout} s")


def session_processes(sid: int) -> list[str]:
    """Live processes of session `sid` (Ray's gcs_server, raylet, workers would be there)."""
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                found.append(f"{proc.pid} {proc.info['name']}")
        except (OSError, psutil.Error):
            continue
    return found


def assert_session_ends(sid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left behind: {left}"


@pytest.mark.e2e
@pytest.mark.process
# both signals take the same handler (fedkd.engine.exit_on_signals); SIGINT is selectable with -m slow
@pytest.mark.parametrize("signum, code, word", [
    pytest.param(signal.SIGINT, 130, "interrupted", marks=pytest.mark.slow),
    (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_run_writes_the_report_and_exits_cleanly(tmp_path: Path, signum: int,
                                                            code: int, word: str) -> None:
    run_dir = tmp_path / "run"
    proc = start(run_dir, *SMALL)
    try:
        wait_for_round(proc, run_dir)
        os.killpg(proc.pid, signum)  # as a terminal sends Ctrl-C: to the whole group
        out, err = proc.communicate(timeout=90)  # hang guard (the watchdog ends it at 45 s)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        assert_session_ends(proc.pid)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Traceback" not in out, err
    named = [line for line in err.splitlines() if str(run_dir) in line]
    assert len(named) == 1 and named[0].startswith(f"{word}: run directory {run_dir}"), err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert (run_dir / "report.md").is_file() and (run_dir / "summary.json").is_file()


@pytest.fixture(scope="module")
def too_many_cpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path, float]:
    """`simulation.client_cpus` above the machine's CPUs: one run, read by the tests below."""
    tmp = tmp_path_factory.mktemp("cpus")
    cpus = (os.cpu_count() or 1) + 2
    started = time.monotonic()
    proc = start(tmp / "run", "train.rounds=2", f"simulation.client_cpus={cpus}",
                 f"experiment.output_dir={tmp / 'runs'}")
    out, err = proc.communicate(timeout=120)  # hang guard (it used to wait for simulation.timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), tmp, started


def test_client_cpus_beyond_the_machine_is_a_one_line_config_error(too_many_cpus) -> None:
    result, _, _ = too_many_cpus
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: simulation.client_cpus=") and "CPUs" in result.stderr


def test_client_cpus_beyond_the_machine_leaves_no_run_directory(too_many_cpus) -> None:
    _, tmp, _ = too_many_cpus
    assert not (tmp / "run").exists() and not list(tmp.glob("runs/*"))


def test_capacity_check_names_the_key_value_and_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # judge a local Ray, not a joined one
    local = {"init_args": {"address": "local", "num_cpus": 2, "num_gpus": 0}}
    check_capacity({**local, "client_resources": {"num_cpus": 2, "num_gpus": 0.0}})
    with pytest.raises(ConfigError, match=r"simulation.client_cpus=3.0: at most 2, the CPUs"):
        check_capacity({**local, "client_resources": {"num_cpus": 3, "num_gpus": 0.0}})
    with pytest.raises(ConfigError, match=r"simulation.client_gpus=0.5: .*no GPU"):
        check_capacity({**local, "client_resources": {"num_cpus": 1, "num_gpus": 0.5}})
