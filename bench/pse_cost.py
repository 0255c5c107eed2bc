"""Where a PSE client round's time goes, beside FedAvg's round on the same client.

PSE does three passes per round (spec c.2-c.5): the global copy's FedAvg epoch, the channel
gradient statistics (a forward and backward of both the frozen global and the local model per
batch, no update) and the personalized epoch (local model forward/backward, global model forward,
cross-model attention and head). This times one client of a protocol setting in-process, without
Flower or Ray (the client algorithm is plain PyTorch), with the config's threads per client:
rounds 1..R of a single client fed its own upload (the global model does not matter for the
cost), PSE's round split into those phases by timing the two module-level functions it calls.

    .venv/bin/python bench/pse_cost.py [--setting std-mnist] [--client 0] [--rounds 3] [override ...]

Overrides go to PSE only (e.g. method.grad_batches=20). Prints the median s/round over rounds
2..R for both methods, their ratio and PSE's phase medians; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import fedkd.clients.pse as pse
from one_client import train_alone  # bench/ is the script's directory

PHASES = {"channel_gradient_norms": "gradient statistics (2 models)",
          "train_epochs": "global copy + personalized epochs"}


def timed(seconds: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
    return wrapper


def client_rounds(setting: str, method: str, overrides: list[str], client: int,
                  rounds: int) -> tuple[list[float], list[dict[str, float]]]:
    """(s per round, per-round phase seconds) of `client` training alone for `rounds` rounds."""
    seconds: dict[str, float] = defaultdict(float)
    originals = {name: getattr(pse, name) for name in PHASES}
    for name, fn in originals.items():
        setattr(pse, name, timed(seconds, PHASES[name], fn))
    totals, phases = [], []
    try:
        for _, total, _ in train_alone(f"configs/experiment/{setting}.yaml",
                                       [f"method.name={method}", *overrides], client, rounds):
            totals.append(total)
            phases.append(dict(seconds))
            seconds.clear()
    finally:
        for name, fn in originals.items():
            setattr(pse, name, fn)
    return totals, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="std-mnist")
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    medians = {}
    for method, overrides in (("fedavg", []), ("pse", args.overrides)):
        totals, phases = client_rounds(args.setting, method, overrides, args.client, args.rounds)
        medians[method] = statistics.median(totals[1:])
        print(f"{method}: s/round {[round(t, 2) for t in totals]}, median r2.. {medians[method]:.2f}")
        for name in PHASES.values():
            if any(name in p for p in phases):
                print(f"  {name}: {statistics.median(p.get(name, 0.0) for p in phases[1:]):.2f} s")
    print(f"pse / fedavg: {medians['pse'] / medians['fedavg']:.2f}")


if __name__ == "__main__":
    main()
