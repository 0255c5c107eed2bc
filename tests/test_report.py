"""fedkd.report on a tiny synthetic run directory with hand-computed numbers."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from fedkd.recorder import Recorder
from fedkd.report import (client_table, read_metrics, summarize, write_outputs)
from fedkd.sweep import sweep_table

NUM_EXAMPLES = {0: 10, 1: 30, 2: 60}
# round -> accuracy per partition. Weighted best is round 2 (0.77) but unweighted best is
# round 1 (0.80), and the last round (3) is neither: catches weighting and "best != last" bugs.
ACC = {1: [0.95, 0.95, 0.5], 2: [0.5, 0.6, 0.9], 3: [0.9, 0.5, 0.8]}
TRACEBACK = ('Traceback (most recent call last):\n  File "client.py", line 3, in fit\n'
             "    raise RuntimeError('CUDA out of memory')\nRuntimeError: CUDA out of memory\n")


def _rec(rnd: int, phase: str, pid: int, acc: float | None, status: str = "ok", **kw) -> dict:
    rec = {"round": rnd, "phase": phase, "partition_id": pid, "status": status,
           "num_examples": NUM_EXAMPLES[pid], "loss": None if acc is None else 1 - acc, "accuracy": acc,
           "seconds": 1.0 if phase == "train" else 0.5, "bytes_received": 200 if phase == "train" else 20,
           "bytes_sent": 100 if phase == "train" else 50, "worker_pid": 1234, "error": None}
    return rec | kw


def make_run(path: Path, name: str = "tiny", acc: dict[int, list[float]] = ACC, extra: list[dict] = (),
             run_json: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        f"experiment:\n  name: {name}\n  seed: 7\nmethod:\n  name: fedkd\nstrategy:\n  name: fedavg\n"
        "data:\n  dataset: mnist5k\n  num_clients: 3\ntrain:\n  rounds: 3\n")
    (path / "partition.json").write_text(json.dumps({"num_classes": 3, "clients": [
        {"partition_id": 0, "train": [8, 1, 1], "test": [5, 3, 2]},
        {"partition_id": 1, "train": [1, 20, 9], "test": [10, 10, 10]},
        {"partition_id": 2, "train": [30, 30, 0], "test": [20, 20, 20]}]}))
    lines = []
    for rnd in (1, 2, 3):
        for pid in range(3):
            if (rnd, pid) == (2, 1):
                lines.append(_rec(rnd, "train", pid, None, "failed", error=TRACEBACK, seconds=0.25,
                                  bytes_sent=0, bytes_received=0))
            else:
                lines.append(_rec(rnd, "train", pid, 0.99))
        lines += [_rec(rnd, "evaluate", pid, acc[rnd][pid]) for pid in range(3)]
        lines.append({"round": rnd, "phase": "central", "loss": 0.5, "accuracy": 0.6 + 0.05 * rnd,
                      "num_examples": 1000})
        lines.append({"round": rnd, "phase": "round", "seconds": {1: 10.0, 2: 4.0, 3: 6.0}[rnd]})
    text = "".join(json.dumps(r) + "\n" for r in [*lines, *extra])
    (path / "metrics.jsonl").write_text(text + '{"round": 4, "phase": "train", "partition_id": 0, "sta')
    if run_json:
        (path / "run.json").write_text(json.dumps({"evaluated_model": "personalized",
                                                   "evaluated_when": "after local training",
                                                   "wall_seconds": 21.0, "status": "interrupted"}))
    return path


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run_a")


def test_truncated_line_ignored(run: Path) -> None:
    assert len(read_metrics(run / "metrics.jsonl")) == 3 * (3 + 3 + 2)


def test_headline_and_spread(run: Path) -> None:
    s = summarize(run)
    assert s["last_round"] == 3 and s["rounds_completed"] == 3
    assert s["accuracy"] == pytest.approx((0.9 * 10 + 0.5 * 30 + 0.8 * 60) / 100)  # 0.72
    assert s["accuracy_unweighted"] == pytest.approx(2.2 / 3)
    mean = 2.2 / 3
    assert s["accuracy_std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in ACC[3]) / 3))
    assert s["accuracy_worst10"] == pytest.approx(0.5)  # ceil(0.1 * 3) = 1 client
    assert s["accuracy"] != pytest.approx(s["accuracy_unweighted"])
    assert (s["best_round"], s["best_accuracy"]) == (2, pytest.approx(0.77))
    assert s["central_accuracy"] == pytest.approx(0.75)
    assert s["seconds_per_round"] == pytest.approx(5.0)  # median of rounds 2..: (4, 6)
    assert [p["round"] for p in s["per_round"]] == [1, 2, 3]
    assert s["per_round"][0]["accuracy"] == pytest.approx(0.68)
    assert (s["per_round"][2]["min"], s["per_round"][2]["max"], s["per_round"][2]["clients"]) == (0.5, 0.9, 3)
    assert (s["experiment"], s["method"], s["strategy"], s["dataset"], s["seed"], s["num_clients"]) == \
        ("tiny", "fedkd", "fedavg", "mnist5k", 7, 3)
    assert (s["evaluated_model"], s["status"], s["wall_seconds"]) == ("personalized", "interrupted", 21.0)


def test_machine_load_marks_a_run_whose_rounds_shared_the_machine() -> None:
    from fedkd.report import machine_load

    def rounds(*loads: float) -> list[dict]:
        return [{"round": i + 1, "phase": "round", "seconds": 1.0, "load": x, "cpus": 2}
                for i, x in enumerate(loads)]
    # round 1 (start-up) is left out of the median, as for s/round; the run's own 2 actors: ~2-3
    assert machine_load(rounds(9.0, 2.4, 2.9, 2.6)) == {"median_load": 2.6, "cpus": 2, "loaded": False,
                                                        "timing": 1, "probe_ms": None}  # rounds recorded before the basis
    assert machine_load(rounds(0.5, 3.4, 4.1, 2.2))["loaded"] is True  # median 3.4 > 2 + 1
    assert machine_load(rounds(3.5)) == {"median_load": 3.5, "cpus": 2, "loaded": True, "timing": 1,
                                       "probe_ms": None}  # one round
    assert machine_load([{"round": 2, "phase": "round", "seconds": 1.0}]) is None  # recorded before loads


def test_timing_basis_is_recorded_with_each_round_and_read_back(tmp_path: Path) -> None:
    """s/round figures compare only within one timing basis: a round records the current one,
    older rounds (none recorded) read as basis 1, and a run resumed under a newer basis counts
    as the basis of most of its rounds 2..R."""
    from fedkd.recorder import TIMING_BASIS, Recorder
    from fedkd.report import machine_load, timing_basis

    recorder = Recorder(tmp_path)
    recorder.round_time(1, 2.0)
    recorder.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["timing"] == TIMING_BASIS >= 2 and record["probe_ms"] > 0
    resumed = [{"round": r, "phase": "round", "seconds": 1.0, "load": 2.0, "cpus": 2,
                **({"timing": 2} if r > 3 else {})} for r in range(1, 7)]  # rounds 4-6 after the resume
    assert timing_basis({"machine_load": machine_load(resumed)}) == 2  # 2..6: three of five on basis 2
    assert timing_basis({"machine_load": machine_load(resumed[:4])}) == 1
    assert timing_basis({}) == 1  # a summary without loads: the oldest basis


def test_report_says_when_a_runs_rounds_shared_the_machine(tmp_path: Path) -> None:
    busy = [{"round": r, "phase": "round", "seconds": 5.0, "load": 4.2, "cpus": 2} for r in (2, 3)]
    run = make_run(tmp_path / "busy", extra=busy)
    write_outputs(run)
    assert json.loads((run / "summary.json").read_text())["machine_load"] == \
        {"median_load": 4.2, "cpus": 2, "loaded": True, "timing": 1, "probe_ms": None}
    assert "machine load 4.2 on 2 CPUs (loaded: other work shared the machine; not a timing figure)" \
        in " ".join((run / "report.md").read_text().split())  # the list item wraps


def test_failures(run: Path) -> None:
    s = summarize(run)
    assert s["failures"] == 1
    assert s["failed_clients"] == [{"round": 2, "phase": "train", "partition_id": 1,
                                    "error": "RuntimeError: CUDA out of memory"}]


def test_failed_evaluate_excluded_but_counted(tmp_path: Path) -> None:
    bad = _rec(3, "evaluate", 1, 0.0, "failed", error="ValueError: boom")
    s = summarize(make_run(tmp_path / "r", extra=[bad], run_json=False))
    assert s["accuracy"] == pytest.approx(0.72) and s["failures"] == 2
    assert s["failed_clients"][-1]["error"] == "ValueError: boom"
    assert s["evaluated_model"] is None and s["status"].startswith("unknown")


def test_outputs(run: Path) -> None:
    s = write_outputs(run)
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(s))
    rows = list(csv.DictReader((run / "clients.csv").open()))
    assert [r["partition_id"] for r in rows] == ["0", "1", "2"]
    r1 = rows[1]
    assert (r1["num_train"], r1["num_test"], float(r1["accuracy"]), r1["last_evaluated_round"]) == \
        ("30", "30", 0.5, "3")
    assert (r1["rounds_trained"], r1["failures"], float(r1["train_seconds"])) == ("2", "1", 2.25)
    assert (r1["bytes_sent"], r1["bytes_received"]) == ("350", "460")
    assert float(r1["loss"]) == pytest.approx(0.5)
    md = (run / "report.md").read_text()
    for needle in ("last-round accuracy (example-weighted)", "best-of-evaluations", "personalized",
                   "after local training", "RuntimeError: CUDA out of memory", "accuracy_rounds.png"):
        assert needle in md
    for png in ("accuracy_rounds.png", "client_accuracy.png", "label_distribution.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    page = (run / "report.html").read_text()
    assert "data:image/png;base64," in page and "best-of-evaluations" in page
    assert all(src.startswith("data:") for src in re.findall(r"src=['\"]([^'\"]*)", page))
    assert "<link" not in page and "http" not in page
    assert write_outputs(run) == s  # idempotent re-render


def test_client_table(run: Path) -> None:
    table = client_table(run)
    assert table.row_count == 3
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "acc" in text and "0.500" in text and "0.900" in text


def test_sweep_table(run: Path) -> None:
    base = summarize(run)
    rows = [{"run": "A", **base, "seed": 0, "accuracy": 0.7}, {"run": "A", **base, "seed": 1, "accuracy": 0.8},
            {"run": "B", **base, "seed": 0, "accuracy": 0.5}]
    md = sweep_table(rows)
    line_a = next(ln for ln in md.splitlines() if ln.startswith("| A "))
    assert "0.7500 ± 0.0707" in line_a and line_a.rstrip().endswith("| 2 |")
    line_b = next(ln for ln in md.splitlines() if ln.startswith("| B "))
    assert "0.5000" in line_b and "±" not in line_b.split("|")[2] and line_b.rstrip().endswith("| 1 |")
    assert "last-round accuracy" in md and "Method-reported" not in md and "per client architecture" not in md


def test_sweep_table_names_the_score_and_lists_method_reported_metrics(run: Path) -> None:
    base = {**summarize(run), "score": "auroc"}
    rows = [{"run": "A", **base, "seed": s, "extra_metrics": {"student_auroc": v}} for s, v in ((0, 0.6), (1, 0.8))]
    md = sweep_table(rows)
    assert "last-round auroc (example-weighted)" in md
    assert next(ln for ln in md.splitlines() if ln.startswith("| student_auroc ")).startswith(
        "| student_auroc | 0.7000 ± 0.1414 |")


def test_per_architecture_headline_for_heterogeneous_runs(run: Path) -> None:
    assert summarize(run)["per_model"] == {}  # one architecture (or none recorded): no breakdown
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "client_models": ["cnn", "mlp", "cnn"]}))
    per_model = summarize(run)["per_model"]
    assert list(per_model) == ["cnn", "mlp"]
    assert per_model["cnn"]["accuracy"] == pytest.approx((0.9 * 10 + 0.8 * 60) / 70)
    assert per_model["cnn"]["accuracy_unweighted"] == pytest.approx(0.85)
    assert (per_model["cnn"]["clients"], per_model["mlp"]["clients"]) == (2, 1)
    assert per_model["mlp"]["accuracy"] == pytest.approx(0.5)
    write_outputs(run)
    md = (run / "report.md").read_text()
    assert "## By architecture (round 3)" in md and "| mlp | 1 | 0.5000 |" in md


def test_sweep_table_gives_the_per_architecture_headline_over_seeds(run: Path) -> None:
    base = summarize(run)
    rows = [{"run": "mh", **base, "seed": s, "per_model": {"cnn": {"accuracy": a}, "mlp": {"accuracy": 0.9}}}
            for s, a in ((0, 0.7), (1, 0.8))] + [{"run": "fedavg", **base, "seed": 0}]
    md = sweep_table(rows)
    assert "per client architecture" in md
    assert "| architecture | mh |" in md  # runs without a breakdown get no column
    assert "| cnn | 0.7500 ± 0.0707 |" in md and "| mlp | 0.9000 ± 0.0000 |" in md


def test_before_after_pairs_become_their_mean_difference_over_clients_and_rounds(tmp_path: Path) -> None:
    """PSE's excitation diagnostic (pse.md §c.4b): every PSE row reports the mean over clients
    and rounds of post − pre excitation accuracy; a failed or unpaired record does not count.
    The records are the recorder's, from the metric names a PSE client sends."""
    recorder = Recorder(tmp_path / "recorded")
    sent = [(4, 0, {"pre-excitation-accuracy": 0.50, "post-excitation-accuracy": 0.40,
                    "pre-excitation-local-accuracy": 0.6, "post-excitation-local-accuracy": 0.6}, None),
            (4, 1, {"pre-excitation-accuracy": 0.70, "post-excitation-accuracy": 0.75}, None),
            (5, 2, {"pre-excitation-accuracy": 0.20}, None),  # no post: unpaired
            (5, 0, {"pre-excitation-accuracy": 0.0, "post-excitation-accuracy": 1.0}, "failed")]
    for rnd, pid, metrics, error in sent:
        recorder.client(rnd, "train", pid, {"num-examples": 10, "accuracy": 0.9, **metrics}, error)
    recorder.close()
    extra = read_metrics(tmp_path / "recorded" / "metrics.jsonl")
    s = summarize(make_run(tmp_path / "pse", extra=extra))
    assert s["extra_metrics"]["post_minus_pre_excitation_accuracy"] == pytest.approx((-0.10 + 0.05) / 2)
    assert s["extra_metrics"]["post_minus_pre_excitation_local_accuracy"] == pytest.approx(0.0)
    md = sweep_table([{"run": "pse", **s}])
    assert "| post_minus_pre_excitation_accuracy | -0.0250 |" in md


def test_timings_compare_on_the_same_basis_and_a_machine_of_the_same_speed() -> None:
    from fedkd.report import comparable_timings

    def run(basis: int | None = 2, probe: float | None = 1.0) -> dict:
        return {"machine_load": {"median_load": 2.0, "cpus": 2, "loaded": False, "timing": basis,
                                 "probe_ms": probe}}
    assert comparable_timings(run(probe=1.0), run(probe=1.2))  # within 1.25x
    assert not comparable_timings(run(probe=1.0), run(probe=2.6))  # another session's slower machine
    assert not comparable_timings(run(basis=1, probe=None), run())  # the old allocator setting
    assert comparable_timings(run(basis=1, probe=None), run(basis=None, probe=None))  # both before the probe
    assert comparable_timings({}, run(basis=1, probe=None))  # no loads recorded at all: basis 1
    assert not comparable_timings(run(probe=None), run(probe=1.0))
