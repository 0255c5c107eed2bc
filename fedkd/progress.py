"""A rich progress display: rounds done, and clients done in the current round's phase."""

from __future__ import annotations

from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedkd.console import err


class RunProgress:
    """Fed by the recorder's listener; `disabled` for --quiet and scripts."""

    def __init__(self, rounds: int, disabled: bool = False) -> None:
        self.rounds = rounds
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, disable=disabled, transient=False)
        self.round_task = self.progress.add_task("rounds", total=rounds)
        self.client_task = self.progress.add_task("clients", total=1)

    def update(self, phase: str, server_round: int, done: int, expected: int) -> None:
        self.progress.update(self.client_task, description=f"round {server_round} {phase:<8}",
                             completed=done, total=max(expected, 1))
        if phase == "train" and done == 0:
            self.progress.update(self.round_task, completed=server_round - 1)
        if done == expected and phase == "evaluate" or (phase == "train" and done == expected
                                                          and server_round == self.rounds):
            self.progress.update(self.round_task, completed=server_round)

    def __enter__(self) -> "RunProgress":
        self.progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.update(self.round_task, completed=self.rounds if exc is None else None)
        self.progress.stop()
