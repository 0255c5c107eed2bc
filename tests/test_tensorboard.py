"""logging.tensorboard: the recorder's records come back out of TensorBoard's event files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedkd.config import load_config, to_yaml
from fedkd.recorder import Recorder
from fedkd.report import summarize

pytest.importorskip("tensorboard", reason="pip install 'fedkd[tensorboard]' (the dev extra has it)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _record_run(run_dir: Path, rounds: range, fail: tuple[int, int] | None = None) -> None:
    recorder = Recorder(run_dir)
    for rnd in rounds:
        for pid, n in ((0, 10), (1, 30)):
            if fail == (rnd, pid):
                recorder.client(rnd, "train", pid, None, "client 1 (round 2, train):\nTraceback ...\nValueError: x")
                continue
            recorder.client(rnd, "train", pid, {"num-examples": n, "loss": 1.0 / rnd, "bytes-sent": 1000,
                                                "bytes-received": 2000}, None)
        for pid, n in ((0, 10), (1, 30)):
            accuracy = 0.5 + 0.1 * pid + 0.01 * rnd
            recorder.client(rnd, "evaluate", pid, {"num-examples": n, "loss": 0.5, "accuracy": accuracy,
                                                   "bytes-received": 2000}, None)
        recorder.central(rnd, 0.4, 0.6 + 0.01 * rnd, 1000)
        recorder.round_time(rnd, 2.0 + rnd)
    recorder.close()


def test_events_read_back(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(None, ["logging.tensorboard=true"])))
    _record_run(tmp_path, range(1, 4), fail=(2, 1))
    scalars = _scalars(tmp_path / "tensorboard")
    summary = summarize(tmp_path)
    headline = dict(scalars["round/accuracy"])
    assert sorted(headline) == [1, 2, 3]
    assert headline[3] == pytest.approx(summary["accuracy"])  # the headline's own definition
    assert dict(scalars["round/accuracy_std"])[3] == pytest.approx(summary["accuracy_std"])
    assert dict(scalars["round/failures"]) == {1: 0, 2: 1, 3: 0}
    assert dict(scalars["round/seconds"]) == {1: 3.0, 2: 4.0, 3: 5.0}
    assert dict(scalars["central/accuracy"])[2] == pytest.approx(0.62)
    assert dict(scalars["client_00001/evaluate_accuracy"]) == pytest.approx({1: 0.61, 2: 0.62, 3: 0.63})
    assert dict(scalars["client_00001/evaluate_examples"]) == {1: 30, 2: 30, 3: 30}
    assert dict(scalars["client_00000/train_bytes_sent"]) == {1: 1000, 2: 1000, 3: 1000}
    assert dict(scalars["client_00001/train_loss"]) == pytest.approx({1: 1.0, 3: 1 / 3})  # round 2 failed


def test_off_by_default_and_resume_rewrites_redone_rounds(tmp_path: Path) -> None:
    off = tmp_path / "off"
    off.mkdir()
    (off / "config.yaml").write_text(to_yaml(load_config(None, [])))
    _record_run(off, range(1, 2))
    assert not (off / "tensorboard").exists()

    run = tmp_path / "on"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config(None, ["logging.tensorboard=true"])))
    _record_run(run, range(1, 4))
    # a resume from the round-2 checkpoint: metrics.jsonl cut back to round 2, round 3 redone
    lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["round"] <= 2]
    (run / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    _record_run(run, range(3, 5))
    steps = [step for step, _ in _scalars(run / "tensorboard")["round/accuracy"]]
    assert steps == [1, 2, 3, 4]  # round 3 once, not twice


def test_a_failing_sink_is_dropped_and_the_run_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Broken:
        closed = False

        def record(self, record: dict) -> None:
            raise OSError("disk full")

        def close(self) -> None:
            Broken.closed = True

    recorder = Recorder(tmp_path, sinks=[Broken()])
    recorder.round_time(1, 1.0)
    recorder.round_time(2, 1.0)
    recorder.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert "warning: Broken stopped: disk full" in capsys.readouterr().err
