"""Where records go besides metrics.jsonl: experiment trackers behind one small seam.

The recorder hands every record it writes (one per client x round x phase, plus round times,
central evaluations, skipped rounds) to each sink of the run. A sink is anything with
`record(dict)` and `close()`; `TensorBoardSink` is the one that ships. An MLflow or W&B sink is
the same two methods (log the per-client scalars as they come and the round aggregates when a
round's time record arrives), plus a line in `sinks_for_run`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import yaml

#: per-client scalars written for every ok client record (record key -> tag leaf)
CLIENT_SCALARS = {"accuracy": "accuracy", "loss": "loss", "num_examples": "examples",
                  "bytes_sent": "bytes_sent", "bytes_received": "bytes_received"}


class Sink(Protocol):
    """Receives every record the run's recorder writes, in order."""

    def record(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """TensorBoard event files under RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`).

    Step = round. Per client: `client_<id>/<phase>_<accuracy|loss|examples|bytes_sent|
    bytes_received>`. Per round, once the round's time is recorded: `round/accuracy`
    (example-weighted, the headline's definition), `round/accuracy_unweighted`, `round/accuracy_std`,
    `round/accuracy_worst10`, `round/clients_evaluated`, `round/failures`, `round/bytes_sent`,
    `round/seconds`, and `central/accuracy`, `central/loss`. A resumed run purges the events of the
    rounds it redoes (SummaryWriter's purge_step), so each round appears once."""

    def __init__(self, log_dir: Path, resume_after: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from fedkd.config import ConfigError

            raise ConfigError("logging.tensorboard", True, "needs the tensorboard package: "
                              "pip install 'fedkd[tensorboard]'") from None

        self.writer = SummaryWriter(str(log_dir), purge_step=resume_after + 1 if resume_after else None)
        self._evals: dict[int, dict[Any, dict]] = defaultdict(dict)
        self._failures: dict[int, int] = defaultdict(int)
        self._sent: dict[int, int] = defaultdict(int)

    def record(self, record: dict[str, Any]) -> None:
        rnd, phase = record["round"], record["phase"]
        if phase == "round":
            self._finish_round(rnd, record.get("seconds"))
        elif phase == "central":
            for key in ("accuracy", "loss"):
                if record.get(key) is not None:
                    self.writer.add_scalar(f"central/{key}", record[key], rnd)
        elif record.get("partition_id") is not None and phase in ("train", "evaluate"):
            if record.get("status") == "failed":
                self._failures[rnd] += 1
                return
            if record.get("status") != "ok":
                return
            pid = record["partition_id"]
            for key, leaf in CLIENT_SCALARS.items():
                if isinstance(record.get(key), (int, float)):
                    self.writer.add_scalar(f"client_{pid:05d}/{phase}_{leaf}", record[key], rnd)
            self._sent[rnd] += int(record.get("bytes_sent") or 0)
            if phase == "evaluate" and record.get("accuracy") is not None:
                self._evals[rnd][pid] = record

    def _finish_round(self, rnd: int, seconds: float | None) -> None:
        from fedkd.report import round_stats

        evals = self._evals.pop(rnd, {})
        if evals:
            stats = round_stats([evals[pid] for pid in sorted(evals)])
            for key in ("accuracy", "accuracy_unweighted", "accuracy_std", "accuracy_worst10"):
                self.writer.add_scalar(f"round/{key}", stats[key], rnd)
            self.writer.add_scalar("round/clients_evaluated", stats["clients"], rnd)
        self.writer.add_scalar("round/failures", self._failures.pop(rnd, 0), rnd)
        self.writer.add_scalar("round/bytes_sent", self._sent.pop(rnd, 0), rnd)
        if seconds is not None:
            self.writer.add_scalar("round/seconds", seconds, rnd)
        self.writer.flush()

    def close(self) -> None:
        for rnd in sorted(set(self._evals) | set(self._failures)):  # a run cut before its round time
            self._finish_round(rnd, None)
        self.writer.close()


def _logging_settings(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    section = cfg.get("logging") if isinstance(cfg, dict) else None
    return section if isinstance(section, dict) else {}


def _last_round(metrics: Path) -> int:
    """The last round metrics.jsonl holds (a resumed run's file is already cut back to its
    checkpoint when the recorder opens it)."""
    import json

    last = 0
    if metrics.exists():
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                last = max(last, int(json.loads(line).get("round") or 0))
            except (ValueError, TypeError, AttributeError):
                continue
    return last


def sinks_for_run(run_dir: Path) -> list[Sink]:
    """The sinks the run's config.yaml asks for (`logging.tensorboard: true`); none by default."""
    run_dir = Path(run_dir)
    settings = _logging_settings(run_dir)
    sinks: list[Sink] = []
    if settings.get("tensorboard"):
        sinks.append(TensorBoardSink(run_dir / "tensorboard", _last_round(run_dir / "metrics.jsonl")))
    return sinks
