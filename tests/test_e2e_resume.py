"""kill -9 of the driver at fixed points of a 6-round Flower + Ray run, then `fedkd run --resume`:
the resumed run's records equal the uninterrupted run's (timings aside)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedkd.checkpoint import KILL_AFTER_ENV, checkpoint_round
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.rundir import resume_hint, run_status
from fedkd.simulation import prepare_run_dir

from fedkd.testing import InProcessGrid, comparable_records
from test_resume import _run, _summary

pytestmark = [pytest.mark.e2e, pytest.mark.process]
ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/experiment/quickstart.yaml")
SIX_ROUNDS = ["data.dataset=digits", "data.num_clients=4", "model.name=mlp", "train.rounds=6",
              "train.lr=0.05", "train.batch_size=50", "method.name=ditto"]


def _fedkd(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedkd.cli", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_round(run_dir: Path, phase: str, server_round: int, proc: subprocess.Popen) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300  # a hang guard, not a speed assertion
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(f'"round": {server_round}, "phase": "{phase}"' in line
                                    for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"round {server_round} {phase} never started: {proc.stderr.read() if proc.stderr else ''}")


def test_kill_9_then_resume_gives_the_uninterrupted_run(tmp_path: Path, ray_address: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    overrides = [*SIX_ROUNDS, f"simulation.ray_address={ray_address}"]
    # the reference: the same run uninterrupted (in-process: same ClientApp, same seeds)
    cfg = load_config(CONFIG, SIX_ROUNDS)
    whole = prepare_run_dir(cfg, tmp_path / "whole")
    _run(cfg, whole, InProcessGrid(2))

    # 1. killed right after the checkpoint of round 3
    after = tmp_path / "after-checkpoint"
    proc = _fedkd("run", CONFIG, *overrides, "--quiet", "--run-dir", str(after),
                  env={KILL_AFTER_ENV: "3"})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert run_status(after) == "incomplete" and checkpoint_round(after) == 3
    assert "last checkpoint round 3; resume with: fedkd run --resume" in resume_hint(after)

    # 2. killed in the middle of round 5 (its train records partly written)
    mid = tmp_path / "mid-round"
    proc = _fedkd("run", CONFIG, *overrides, "--quiet", "--run-dir", str(mid))
    _wait_for_round(mid, "train", 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert run_status(mid) == "incomplete"

    # --run-dir on an unfinished run is refused with one line naming --resume
    assert main(["run", CONFIG, *overrides, "--run-dir", str(mid)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and len(err.strip().splitlines()) == 1

    for run_dir in (after, mid):  # a new driver; in this process (no interpreter to start)
        assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0, capsys.readouterr().err
        assert comparable_records(run_dir) == comparable_records(whole)
        assert _summary(run_dir) == _summary(whole)
        assert run_status(run_dir) == "complete"
        assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
