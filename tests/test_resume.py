"""Checkpoints and resume, in-process: a run cut after round k's checkpoint, or in the middle of
round k+1, and continued from its checkpoint gives exactly the uninterrupted run's records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedkd import checkpoint as ckpt
from fedkd.config import ConfigError, load_config
from fedkd.recorder import Recorder
from fedkd.report import write_outputs
from fedkd.rundir import RunDirError, check_unused, resume_config, run_status
from fedkd.simulation import prepare_run_dir
from fedkd.testing import TIMING_FIELDS, InProcessGrid, comparable_records, run_in_process

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.num_clients=4", "model.name=mlp", "train.rounds=3", "train.lr=0.05",
         "train.batch_size=50"]


class Cut(Exception):
    """Stands in for the driver being killed."""


class CuttingGrid(InProcessGrid):
    """Raises `Cut` when the run sends its `after`-th message (0: never)."""

    def __init__(self, num_nodes: int, after: int = 0) -> None:
        super().__init__(num_nodes)
        self.after = after

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if self.after and len(self.sent) + len(messages) >= self.after:
            delivered = self.after - len(self.sent) - 1
            super().push_messages(messages[:delivered])  # some clients did train (state written)
            raise Cut()
        return super().push_messages(messages)


def _cfg(*overrides: str, config: str = "quickstart.yaml"):  # type: ignore[no-untyped-def]
    return load_config(ROOT / "configs/experiment" / config, [*SMALL, *overrides])


def _run(cfg, run_dir: Path, grid: InProcessGrid, resume: bool = False) -> None:  # type: ignore[no-untyped-def]
    run_in_process(cfg, run_dir, grid, resume)


def _summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in TIMING_FIELDS}


def _clients(run_dir: Path) -> list[dict]:
    with open(run_dir / "clients.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in csv.DictReader(f)]


def _interrupted(cfg, tmp_path: Path, *, after_checkpoint: int = 0,  # type: ignore[no-untyped-def]
                 at_message: int = 0) -> Path:
    """A run cut right after the checkpoint of round `after_checkpoint`, or when it sends its
    `at_message`-th message."""
    run_dir = prepare_run_dir(cfg, tmp_path / "cut")
    real_write = ckpt.write_checkpoint

    def write_then_cut(run_dir, server_round, *args, **kwargs):  # type: ignore[no-untyped-def]
        path = real_write(run_dir, server_round, *args, **kwargs)
        if server_round == after_checkpoint:
            raise Cut()
        return path

    import fedkd.strategies.resumable as resumable
    resumable.write_checkpoint = write_then_cut
    try:
        with pytest.raises(Cut):
            _run(cfg, run_dir, CuttingGrid(2, after=at_message))
    finally:
        resumable.write_checkpoint = real_write
    return run_dir


def _interrupted_then_resumed(cfg, tmp_path: Path, **cut: int) -> Path:  # type: ignore[no-untyped-def]
    run_dir = _interrupted(cfg, tmp_path, **cut)
    _run(cfg, run_dir, InProcessGrid(2), resume=True)
    return run_dir


CASES = {
    "fedavg": [],
    "ditto (client state)": ["method.name=ditto"],
    "fedadam (server state)": ["strategy.name=fedadam", "strategy.eta=0.01"],
    "fedavgm (server momentum)": ["strategy.name=fedavgm", "strategy.server_momentum=0.9"],
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_resume_after_a_checkpoint_and_mid_round_is_exact(tmp_path: Path, overrides: list[str]) -> None:
    cfg = _cfg(*overrides)
    whole = prepare_run_dir(cfg, tmp_path / "whole")
    _run(cfg, whole, InProcessGrid(2))
    after_ckpt = _interrupted_then_resumed(cfg, tmp_path / "a", after_checkpoint=1)
    # 2 nodes x (train + evaluate) per round: message 10 is round 3's train, second node
    mid_round = _interrupted_then_resumed(cfg, tmp_path / "b", at_message=10)
    for resumed, after in ((after_ckpt, 1), (mid_round, 2)):
        assert comparable_records(resumed) == comparable_records(whole)
        assert _summary(resumed) == _summary(whole)
        assert _clients(resumed) == _clients(whole)
        assert run_status(resumed) == "complete"
        # the wall time spans both segments: at least every recorded round's time
        summary = json.loads((resumed / "summary.json").read_text())
        rounds = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
        assert summary["resumed_after_rounds"] == [after]
        assert summary["wall_seconds"] >= sum(r["seconds"] for r in rounds if r["phase"] == "round")
        assert f"(resumed after round {after})" in (resumed / "report.md").read_text()
    assert json.loads((whole / "summary.json").read_text())["resumed_after_rounds"] == []


def test_resume_of_a_staged_centralized_method_is_exact(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs/experiment/kd-mnist5k.yaml",
                      ["method.teacher_epochs=2", "method.student_epochs=2", "train.rounds=4",
                       "evaluation.every=1", "train.batch_size=200"])
    whole = prepare_run_dir(cfg, tmp_path / "whole")
    _run(cfg, whole, InProcessGrid(1))
    # cut right after the teacher stage's last checkpoint, and inside the student stage
    for resumed in (_interrupted_then_resumed(cfg, tmp_path / "a", after_checkpoint=2),
                    _interrupted_then_resumed(cfg, tmp_path / "b", at_message=6)):
        assert comparable_records(resumed) == comparable_records(whole)
        assert _summary(resumed) == _summary(whole)


def test_checkpoint_keeps_the_previous_one_until_the_new_one_is_complete(tmp_path: Path) -> None:
    cfg = _cfg("train.rounds=2")
    run_dir = prepare_run_dir(cfg, tmp_path / "run")
    _run(cfg, run_dir, InProcessGrid(2))
    assert ckpt.checkpoint_round(run_dir) == 2
    # a swap cut short: the new folder never got its index, the old one was already moved aside
    (run_dir / ckpt.CURRENT).rename(run_dir / ckpt.PREVIOUS)
    (run_dir / ckpt.CURRENT).mkdir()
    assert ckpt.checkpoint_round(run_dir) == 2
    assert (run_dir / ckpt.PREVIOUS / "global.safetensors").is_file()


def test_a_run_directory_holding_a_run_is_refused_and_resume_names_it(tmp_path: Path) -> None:
    cfg = _cfg("train.rounds=2")
    run_dir = prepare_run_dir(cfg, tmp_path / "run")  # status "running", no process: killed
    with pytest.raises(RunDirError, match="unfinished run.*fedkd run --resume"):
        check_unused(run_dir)
    _run(cfg, run_dir, InProcessGrid(2))
    with pytest.raises(RunDirError, match="finished run"):
        prepare_run_dir(cfg, run_dir)


def test_resume_may_extend_rounds_and_refuses_any_other_change(tmp_path: Path) -> None:
    cfg = _cfg("train.rounds=2")
    run_dir = prepare_run_dir(cfg, tmp_path / "run")
    assert resume_config(run_dir, ["train.rounds=5"]).train.rounds == 5
    with pytest.raises(ConfigError, match=r"train.lr=0.1: a resumed run keeps its config \(was 0.05\)"):
        resume_config(run_dir, ["train.lr=0.1"])


def test_extending_a_finished_run_continues_from_its_last_round(tmp_path: Path) -> None:
    short = _cfg("train.rounds=2")
    run_dir = prepare_run_dir(short, tmp_path / "run")
    _run(short, run_dir, InProcessGrid(2))
    longer = resume_config(run_dir, ["train.rounds=3"])
    _run(longer, run_dir, InProcessGrid(2), resume=True)
    rounds = [r["round"] for r in comparable_records(run_dir) if r["phase"] == "train"]
    assert sorted(set(rounds)) == [1, 2, 3] and rounds.count(1) == 4  # round 1 never repeated


def test_strategy_state_round_trips_through_safetensors(tmp_path: Path) -> None:
    import numpy as np
    from flwr.serverapp.strategy import FedAdam

    strategy = FedAdam()
    strategy.m_t = {"w": np.arange(3, dtype=np.float32)}
    strategy.v_t = {"w": np.full(3, 2.0, dtype=np.float32)}
    arrays, entry = ckpt.strategy_state(strategy)
    fresh = FedAdam()
    ckpt.restore_strategy_state(fresh, arrays, entry)
    assert np.array_equal(fresh.m_t["w"], strategy.m_t["w"])
    assert np.array_equal(fresh.v_t["w"], strategy.v_t["w"])


def test_report_of_an_unfinished_run_says_how_to_resume(tmp_path: Path) -> None:
    cfg = _cfg("train.rounds=3")
    run_dir = _interrupted(cfg, tmp_path, after_checkpoint=1)
    (run_dir / "run.json").write_text(
        (run_dir / "run.json").read_text().replace('"failed"', '"running"'))  # as after kill -9
    summary = write_outputs(run_dir)
    assert summary["status"] == "incomplete"
    assert summary["resume"] == f"last checkpoint round 1; resume with: fedkd run --resume {run_dir}"
    assert f"Incomplete run: {summary['resume']}" in (run_dir / "report.md").read_text()


def test_metrics_stay_strict_json_when_a_value_is_not_finite(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    recorder.client(1, "train", 0, {"num-examples": 3, "loss": float("nan"), "accuracy": 0.5}, None)
    recorder.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["loss"] is None and record["non_finite"] == ["loss"]


def test_a_run_in_which_every_client_failed_ends_failed(tmp_path: Path) -> None:
    cfg = _cfg("train.rounds=2", "faults.clients=[0,1,2,3]")
    run_dir = run_in_process(cfg, tmp_path / "run", InProcessGrid(2))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed"
    assert info["status_reason"] == "no client update was accepted in any round"
    assert not (run_dir / "model").exists()  # no trained model to keep


def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path) -> None:
    cfg = _cfg(f"experiment.output_dir={tmp_path}")
    first, second = prepare_run_dir(cfg), prepare_run_dir(cfg)
    assert first != second and first.parent == second.parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])
