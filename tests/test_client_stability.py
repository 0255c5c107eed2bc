"""bench/client_stability.py: per-client accuracy swings between evaluations, by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("client_stability", ROOT / "bench/client_stability.py")
client_stability = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
spec.loader.exec_module(client_stability)  # type: ignore[union-attr]


def write_run(run_dir: Path, curves: dict[int, list[float]], rounds: list[int]) -> None:
    run_dir.mkdir(parents=True)
    lines = [{"round": r, "phase": "evaluate", "partition_id": pid, "status": "ok", "accuracy": acc,
              "num_examples": 10} for pid, accs in curves.items() for r, acc in zip(rounds, accs)]
    lines.append({"round": 20, "phase": "evaluate", "partition_id": 0, "status": "failed", "accuracy": None})
    (run_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    run_dir.with_suffix(".json").write_text("{}")


def test_swings_and_second_half_drops_against_a_hand_computation(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rounds = [5, 10, 15, 20]
    # client 0: 0.5 -> 0.7 -> 0.6 -> 0.8 (steps after the first evaluation: 0.1, 0.2; drops in the
    # second half, from round 10 on: 0.1); client 1: flat 0.9 (0, 0; no drop)
    write_run(tmp_path / "s" / "a" / "seed0", {0: [0.5, 0.7, 0.6, 0.8], 1: [0.9] * 4}, rounds)
    (tmp_path / "s" / "a" / "seed1").mkdir()  # unfinished: no seed1.json, not counted
    swing, drop = client_stability.stability([tmp_path / "s" / "a" / "seed0"])
    assert swing == pytest.approx(100 * (0.15 + 0.0) / 2)
    assert drop == pytest.approx(100 * (0.1 + 0.0) / 2)
    monkeypatch.setattr(client_stability, "RESULTS", tmp_path)
    md = client_stability.table("s", ["a", "missing"])
    assert "| a | 1 | 7.50 | 5.00 |" in md and "| missing | 0 | n/a | n/a |" in md
