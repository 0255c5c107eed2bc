"""Centralized methods as the degenerate case of the federated machinery.

One client holds all the data (`data.num_clients: 1`), a round is one epoch, and a
method declares its stages (e.g. train the teacher for k rounds, then distill);
`stage_of` maps a round to its stage. Teachers, experts and students live in the
client state store, so the round that starts a stage finds the models of the
stages before it. The server (the `passthrough` strategy) keeps what the client
sends: the model trained in the current stage. No second code path exists: the
same ClientApp, runtime and state store run it, and `fedkd.direct.run_direct`
(a plain loop over the same client algorithm) must give identical metrics.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Sequence

from fedkd.clients.base import (Arrays, ClientAlgorithm, ClientData, ExpectedArrays, RoundInfo,
                                TrainResult)

Stages = list[tuple[str, int]]


def stage_of(stages: Sequence[tuple[str, int]], server_round: int) -> tuple[int, str]:
    """(index, name) of the stage that 1-based `server_round` falls in (rounds past the end: last)."""
    end = 0
    for index, (name, rounds) in enumerate(stages):
        end += rounds
        if server_round <= end:
            return index, name
    return len(stages) - 1, stages[-1][0]


class StagedMethod(ClientAlgorithm):
    """A centralized method: per-stage training, models kept in the client state."""

    evaluates = "personalized"
    uses_model_config = False

    @classmethod
    @abstractmethod
    def stages(cls, settings: Any) -> Stages:
        """[(stage name, rounds), ...]; `train.rounds` must equal the total (checked up front)."""

    def initial_arrays(self) -> Arrays:
        return {}

    def stage_at(self, server_round: int | None) -> str:
        """The stage `server_round` falls in (None: the last stage, whose model a run ends with)."""
        stages = self.stages(self.settings)
        return stages[-1][0] if server_round is None else stage_of(stages, server_round)[1]

    def expected_arrays(self, info: RoundInfo) -> ExpectedArrays | None:
        """The keys change per stage (the stage's model is what travels): `stage_arrays`."""
        return self.stage_arrays(stage_of(self.stages(self.settings), info.server_round)[1])

    def stage_arrays(self, stage: str) -> ExpectedArrays | None:
        """What a round of `stage` sends (None, the default: not declared, so only the values of
        the update are validated; a method may declare its stage models here)."""
        return None

    def train(self, received: Arrays, state: dict[str, Any], data: ClientData,
              info: RoundInfo) -> TrainResult:
        index, name = stage_of(self.stages(self.settings), info.server_round)
        metrics, arrays = self.train_stage(name, state, data, info)
        return TrainResult(arrays, {**metrics, "stage": index}, len(data.y_train))

    @abstractmethod
    def train_stage(self, stage: str, state: dict[str, Any], data: ClientData,
                    info: RoundInfo) -> tuple[dict[str, float], Arrays]:
        """One epoch of `stage`: (metrics, the arrays of the model it trained, for the server)."""
