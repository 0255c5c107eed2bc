"""fedkd from Python: run two strategies on the quickstart experiment and compare them.

    python examples/api_quickstart.py                 # 3 rounds each, a few minutes on 2 cores
    python examples/api_quickstart.py train.rounds=1  # any key=value override

Bad input raises (e.g. `fedkd.ConfigError` with the CLI's one-line message); nothing here exits.
"""

from __future__ import annotations

import sys

import fedkd


def main(overrides: list[str]) -> dict[str, float | None]:
    base = ["train.rounds=3", "data.num_clients=4", *overrides]
    try:
        fedkd.load_config("quickstart", [*base, "strategy.name=fedavgg"])
    except fedkd.ConfigError as exc:  # a typo is caught before anything runs
        print(f"caught: {exc}")
    results = {}
    for strategy in ("fedavg", "fedprox"):
        result = fedkd.run("quickstart", overrides=[*base, f"strategy.name={strategy}"])
        worst = min(row["accuracy"] for row in result.clients)
        print(f"{strategy}: {result.status}, accuracy {result.accuracy:.4f} "
              f"(worst client {worst:.4f}), report {result.report}")
        results[strategy] = result.accuracy
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
