"""Every client's metrics for every round, written as they arrive (metrics.jsonl).

The grouped strategy calls it before anything is averaged, so per-client results
survive aggregation, and lines are flushed at once, so a run that stops early
keeps everything recorded so far.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from fedkd.sinks import Sink

_STANDARD = {"num-examples", "loss", "accuracy", "seconds", "bytes-received", "bytes-sent",
             "worker-pid"}
Listener = Callable[[str, int, int, int], None]  # phase, round, done, expected

#: what a round's wall time was measured under, recorded with each round; s/round figures are
#: compared only within one basis. 1 (older rounds carry none): glibc's mmap threshold fixed at
#: 128 KiB, up to 2026-12-06; 2: left dynamic (`fedkd.runtime.tame_malloc`), ~1.9x faster on a
#: CIFAR-10 ResNet-8 round. Raise it with any change that moves s/round for the same config.
TIMING_BASIS = 2


def speed_probe_ms(repeats: int = 5) -> float:
    """How fast this machine is now: the median milliseconds of one fixed workload (a 3x3
    convolution's forward and backward on a 4x16x32x32 batch, one thread; ~10 ms in all). Each
    round records it after its wall time is taken, while the clients are idle, because sessions'
    machines differ (one FedAvg run took 12.5 and 4.7 s/round on two of them): s/round figures
    are divided by each other only when their probes agree."""
    import torch  # the driver has it loaded already; the recorder itself needs no torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, 16, 32, 32, generator=gen, requires_grad=True)
        w = torch.randn(16, 16, 3, 3, generator=gen, requires_grad=True)
        times = []
        for _ in range(repeats + 1):  # the first call also builds the kernel: left out
            started = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1).square().sum().backward()
            times.append(time.perf_counter() - started)
        return round(1000 * statistics.median(times[1:]), 3)
    finally:
        torch.set_num_threads(threads)


def finite_json(record: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: a NaN or infinite metric (a diverged client) becomes null, and the record
    names those keys under `non_finite`, so the file stays valid JSON and nothing is hidden."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "non_finite": bad}


class Recorder:
    """Appends one JSON line per client x round x phase to `metrics.jsonl`, and hands each record
    to the run's sinks (`fedkd.sinks`: TensorBoard when `logging.tensorboard` is on)."""

    def __init__(self, run_dir: str | Path, listener: Listener | None = None,
                 sinks: Sequence[Sink] | None = None) -> None:
        from fedkd.sinks import sinks_for_run

        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # None: what the run's config.yaml asks for (read before this run appends to the file)
        self.sinks = list(sinks_for_run(self.path.parent) if sinks is None else sinks)
        self._file = self.path.open("a", encoding="utf-8")
        self.listener = listener
        self.failures: list[dict[str, Any]] = []
        self._expected: dict[tuple[str, int], int] = {}
        self._done: dict[tuple[str, int], int] = {}

    def write(self, record: dict[str, Any]) -> None:
        record = finite_json(record)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        for sink in list(self.sinks):
            try:
                sink.record(record)
            except Exception as exc:  # a tracker must not stop the run; metrics.jsonl has it all
                self.sinks.remove(sink)
                print(f"warning: {type(sink).__name__} stopped: {exc}", file=sys.stderr)

    def position(self) -> int:
        """Bytes written so far: where a resumed run cuts metrics.jsonl back to."""
        return self._file.tell()

    def expect(self, phase: str, server_round: int, clients: int) -> None:
        """How many client records this round's phase should produce (for progress display)."""
        self._expected[(phase, server_round)] = clients
        self._done[(phase, server_round)] = 0
        if self.listener:
            self.listener(phase, server_round, 0, clients)

    def client(self, server_round: int, phase: str, partition_id: int,
               metrics: dict[str, Any] | None, error: str | None) -> None:
        """One client's outcome: its metrics, or the error (with traceback) it raised."""
        m = metrics or {}
        record = {
            "round": server_round, "phase": phase, "partition_id": partition_id,
            "status": "ok" if error is None else "failed",
            "num_examples": int(m.get("num-examples", 0)),
            "loss": m.get("loss"), "accuracy": m.get("accuracy"),
            "seconds": float(m.get("seconds", 0.0)),
            "bytes_received": int(m.get("bytes-received", 0)),
            "bytes_sent": int(m.get("bytes-sent", 0)),
            "worker_pid": int(m["worker-pid"]) if "worker-pid" in m else None,
            "error": error,
        }
        record.update({k.replace("-", "_"): v for k, v in m.items() if k not in _STANDARD})
        self.write(record)
        if error is not None:
            self.failures.append(record)
        key = (phase, server_round)
        self._done[key] = self._done.get(key, 0) + 1
        if self.listener:
            self.listener(phase, server_round, self._done[key], self._expected.get(key, 0))

    def rejected(self, server_round: int, phase: str, partition_id: int,
                 metrics: dict[str, Any] | None, reason: str) -> None:
        """A client whose update validation refused: status "rejected", the reason under "error",
        and the metrics of the training that produced it."""
        m = metrics or {}
        record = {
            "round": server_round, "phase": phase, "partition_id": partition_id,
            "status": "rejected", "num_examples": int(m.get("num-examples", 0)),
            "loss": m.get("loss"), "accuracy": m.get("accuracy"),
            "seconds": float(m.get("seconds", 0.0)),
            "bytes_received": int(m.get("bytes-received", 0)), "bytes_sent": int(m.get("bytes-sent", 0)),
            "worker_pid": int(m["worker-pid"]) if "worker-pid" in m else None, "error": reason,
        }
        record.update({k.replace("-", "_"): v for k, v in m.items() if k not in _STANDARD})
        self.write(record)
        key = (phase, server_round)
        self._done[key] = self._done.get(key, 0) + 1
        if self.listener:
            self.listener(phase, server_round, self._done[key], self._expected.get(key, 0))

    def skipped(self, server_round: int, phase: str, valid: int, required: int) -> None:
        """A round whose aggregation did not happen: too few valid updates (the previous global
        model is kept). One record without a partition id."""
        self.write({"round": server_round, "phase": phase, "partition_id": None, "status": "skipped",
                    "valid_updates": valid, "min_clients": required,
                    "error": f"{valid} valid update(s), fewer than validation.min_clients={required}: "
                             "the previous global model is kept"})

    def central(self, server_round: int, loss: float, accuracy: float, num_examples: int) -> None:
        self.write({"round": server_round, "phase": "central", "loss": loss,
                    "accuracy": accuracy, "num_examples": num_examples})

    def round_time(self, server_round: int, seconds: float) -> None:
        """The round's wall time, with the driver machine's 1-minute load average and CPU count
        at its end (the report marks a run whose rounds shared the machine as loaded), the timing
        basis it was measured under (`TIMING_BASIS`) and how fast the machine was (`speed_probe_ms`)."""
        self.write({"round": server_round, "phase": "round", "seconds": seconds,
                    "load": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "timing": TIMING_BASIS,
                    "probe_ms": speed_probe_ms()})

    def close(self) -> None:
        self._file.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
