"""Continue a run after a checkpointed round, and write the checkpoints.

Flower's `Strategy.start` counts rounds from 1, so a run resumed after round k runs
`start(num_rounds=R - k)` with this wrapper adding k to every round number it passes
on: the grouped strategy, the wrapped Flower strategy (FedAdam's bias correction
uses the round), client sampling, seeds and records all see the run's real rounds.

The end of a round is the central evaluation call (`evaluate_fn`), which Flower
makes after every round with the round's final arrays; `evaluation_hook` wraps
it to close the round's timing and, when due, write the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedkd.checkpoint import write_checkpoint
from fedkd.recorder import Recorder
from fedkd.strategies.grouped import GroupedClients

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class Resumable(Strategy):
    """Round offset + checkpoints around fedkd's `GroupedClients` (see the module docstring)."""

    def __init__(self, grouped: GroupedClients, run_dir: Path, recorder: Recorder,
                 checkpoint_every: int, offset: int = 0) -> None:
        self.grouped, self.run_dir, self.recorder = grouped, run_dir, recorder
        self.checkpoint_every, self.offset = checkpoint_every, offset

    def strategies(self) -> dict[str, object]:
        """The objects whose cross-round state a checkpoint holds."""
        return {"inner": self.grouped.inner, "grouped": self.grouped}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.grouped.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.grouped.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.grouped.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.grouped.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.grouped.summary()

    def checkpoint_due(self, server_round: int) -> bool:
        """At every evaluation round (the last one included) and every `checkpoint.every` rounds."""
        every = self.checkpoint_every
        return self.grouped.plan.evaluates(server_round) or bool(every and server_round % every == 0)

    def evaluation_hook(self, central: EvaluateFn | None) -> EvaluateFn:
        """Flower's `evaluate_fn`: central evaluation, then the round's end (timing, checkpoint)."""

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:  # before round 1; a resumed run evaluated its start already
                return central(0, arrays) if central and not self.offset else None
            real = server_round + self.offset
            result = central(real, arrays) if central else None
            self.grouped.finish_round()
            if self.checkpoint_due(real):
                write_checkpoint(self.run_dir, real, arrays, self.strategies(),
                                 self.recorder.position())
            return result

        return evaluate_fn
