"""One client trained by itself: the quickest look at what a method's local update does.

A client of a federated setting runs R rounds alone, in-process, without Flower or Ray (client
algorithms are plain PyTorch): each round it trains on the arrays it uploaded last round (there
is no server and no other client) and evaluates the model it uses every `--every` rounds. Two
variants that differ only in their local update therefore differ only by that update, e.g.
MH-pFLID's gradient clip against plain local training:

    .venv/bin/python bench/one_client.py configs/experiment/std-mnist-mhpflid.yaml --client 1 \\
        --variant local method.name=local --variant clip1 method.name=mhpflid method.max_grad_norm=1 \\
        --variant noclip method.name=mhpflid

Prints each variant's accuracy per evaluation round; writes nothing.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator

from fedkd.clients.base import Arrays
from fedkd.config import load_config
from fedkd.runtime import ClientRuntime
from fedkd.wire import ClientOutcome


def train_alone(config: str, overrides: list[str], client: int,
                rounds: int) -> Iterator[tuple[int, float, Callable[[], float]]]:
    """After each of `rounds` rounds of `client` training alone: (round, seconds of its train
    call, a function giving the test accuracy of the model the client now uses).

    Each call goes through `ClientRuntime.run`, the path a ClientApp takes: the same seeds, the
    state store's round trip and the move of received arrays onto `device.type`."""
    cfg = load_config(config, overrides)
    runtime = ClientRuntime(cfg, tempfile.mkdtemp(prefix="fedkd-one-client-"))  # sets threads

    def call(phase: str, arrays: Arrays, rnd: int) -> ClientOutcome:
        out = runtime.run(phase, client, arrays, rnd, {"server-round": rnd})
        if out.error is not None:
            raise RuntimeError(out.error)
        return out

    arrays = runtime.algorithm.initial_arrays()
    for rnd in range(1, rounds + 1):
        out = call("train", arrays, rnd)
        arrays = out.arrays or arrays
        # call it before the next round: the state moves on with every round
        yield rnd, out.metrics["seconds"], \
            lambda a=arrays, r=rnd: call("evaluate", a, r).metrics["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--variant", nargs="+", action="append", required=True,
                        metavar=("LABEL", "KEY=VALUE"), help="a label and its overrides; repeatable")
    args = parser.parse_args()
    for label, *overrides in args.variant:
        curve = [(rnd, accuracy()) for rnd, _, accuracy in
                 train_alone(args.config, overrides, args.client, args.rounds)
                 if rnd % args.every == 0 or rnd == args.rounds]
        print(f"client {args.client} {label}: " + ", ".join(f"r{r} {a:.4f}" for r, a in curve),
              flush=True)


if __name__ == "__main__":
    main()
