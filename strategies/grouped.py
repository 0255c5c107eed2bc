"""Run any Flower strategy over fedkd's clients, several clients per Flower node.

Flower costs ~11-26 ms per message (see the overhead benchmark), so one node per
client makes a round cost grow with N. Here the number of messages per round is
the number of nodes (one per Ray actor by default); each message names the
partition ids its node serves. Every client keeps its identity: fedkd samples
clients (not nodes) from the seed, each client's metrics come back separately
and are recorded before anything is averaged, and a client that raises is
recorded with its own traceback while its group goes on.

What the wrapped strategy sees:
- mean-based strategies (FedAvg, FedProx, FedAvgM, FedAdam, ...): ONE reply
  holding the example-weighted mean over all clients and their total weight.
  Each node sends its group's compensated float64 sum (`fedkd.wire`); they are
  combined here in partition-id order and cast once, so the mean, and with it
  every later round, is the same for any number of nodes. FedAvg's aggregate of
  one reply is that reply (weight factor w / w = 1.0, exactly);
- every other strategy (median, trimmed mean, Krum, ...): one reply per client,
  expanded from the group reply, so robust rules see every client's own update.
Replies reach the wrapped strategy sorted by partition id, not arrival order.

Validation (`validation` section): each update was checked on its node; rejected
clients are recorded `rejected` with the reason. A round with fewer valid
updates than `validation.min_clients` is recorded `skipped` and the wrapped
strategy is not called: Flower's `start` keeps the previous arrays when
`aggregate_train` returns None. With `validation.norm_check`, the median update
norm of the accepted clients goes out with the next round's train config.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedkd.config import ValidationConfig, from_yaml
from fedkd.recorder import Recorder
from fedkd.validation import NORM_KEY, UPDATE_NORM
from fedkd.wire import (CLIENT_METRIC_PREFIX, CONFIG_KEY, MODE_KEY, NUM_EXAMPLES, PIDS_KEY,
                        STATUS_KEY, CompensatedSum, client_arrays_key, group_sums, ok_ids,
                        rejected_ids, reply_message)


@dataclass(frozen=True)
class ClientPlan:
    """Which clients take part when, and which node serves them."""

    num_clients: int
    seed: int
    rounds: int
    train_fraction: float
    eval_fraction: float
    eval_every: int
    work: tuple[int, ...]  # train examples per client, to balance nodes

    def sample(self, server_round: int, phase: str) -> list[int]:
        """Seeded client sampling: a fraction of partition ids, sorted."""
        fraction = self.train_fraction if phase == "train" else self.eval_fraction
        k = max(1, int(round(fraction * self.num_clients)))
        if k >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng([self.seed, server_round, 0 if phase == "train" else 1])
        return sorted(int(p) for p in rng.choice(self.num_clients, size=k, replace=False))

    def evaluates(self, server_round: int) -> bool:
        """Every `eval_every` rounds and after the last."""
        return server_round % self.eval_every == 0 or server_round == self.rounds

    def assign(self, pids: list[int], node_ids: list[int]) -> dict[int, list[int]]:
        """Largest-first greedy balance of train examples over nodes (deterministic)."""
        load = {node: 0 for node in node_ids}
        groups: dict[int, list[int]] = {node: [] for node in node_ids}
        for pid in sorted(pids, key=lambda p: (-self.work[p], p)):
            node = min(node_ids, key=lambda n: (load[n], n))
            groups[node].append(pid)
            load[node] += max(self.work[pid], 1)
        return {node: sorted(g) for node, g in groups.items() if g}


class GroupedClients(Strategy):
    """Wraps a Flower strategy; see the module docstring."""

    def __init__(self, inner: Strategy, plan: ClientPlan, recorder: Recorder, mean_based: bool,
                 shares_arrays: bool, client_config: str,
                 validation: ValidationConfig | None = None) -> None:
        self.inner, self.plan, self.recorder = inner, plan, recorder
        self.mean_based, self.shares_arrays = mean_based, shares_arrays
        self.client_config = client_config  # the resolved run config, sent to every node
        #: the run's `validation` section (read from the run config unless given)
        self.validation = validation or (from_yaml(client_config).validation if client_config
                                         else ValidationConfig())
        #: median update norm of the clients accepted in the last round that had any (norm check)
        self.median_norm: float | None = None
        #: phase -> node id -> partition ids of the messages last sent (replies are matched to it)
        self.groups: dict[str, dict[int, list[int]]] = {}
        self._round_start: tuple[int, float] | None = None

    # -- rounds ---------------------------------------------------------------------------------
    def _round_begins(self, server_round: int) -> None:
        self.finish_round()
        self._round_start = (server_round, time.perf_counter())

    def finish_round(self) -> None:
        """Record the wall time of the round in progress (called at the next round and at the end)."""
        if self._round_start is not None:
            rnd, started = self._round_start
            self.recorder.round_time(rnd, time.perf_counter() - started)
            self._round_start = None
            from fedkd.runtime import release_memory

            release_memory()  # the round's replies are gone: return their pages

    # -- messages out ----------------------------------------------------------------------------
    def _spread(self, template: list[Message], phase: str, server_round: int,
                pids: list[int]) -> list[Message]:
        """One message per node that serves a group of the sampled clients."""
        if not template or not pids:
            return []
        nodes = sorted({m.metadata.dst_node_id for m in template})
        groups = self.plan.assign(pids, nodes)
        self.groups[phase] = groups
        base = template[0].content
        arrays = base["arrays"] if "arrays" in base else ArrayRecord()
        config = dict(base["config"]) if "config" in base else {}
        mode = "mean" if (self.mean_based or phase == "evaluate") else "each"
        messages = []
        if phase == "train" and self.validation.norm_check and self.median_norm is not None:
            config[NORM_KEY] = self.median_norm
        for node, group in groups.items():
            cfg = ConfigRecord({**config, "server-round": server_round, PIDS_KEY: group,
                                MODE_KEY: mode, CONFIG_KEY: self.client_config})
            messages.append(Message(content=RecordDict({"arrays": arrays, "config": cfg}),
                                    message_type=template[0].metadata.message_type,
                                    dst_node_id=node))
        self.recorder.expect(phase, server_round, len(pids))
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round_begins(server_round)
        template = list(self.inner.configure_train(server_round, arrays, config, grid))
        return self._spread(template, "train", server_round, self.plan.sample(server_round, "train"))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.plan.evaluates(server_round):
            return []
        template = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        return self._spread(template, "evaluate", server_round,
                            self.plan.sample(server_round, "evaluate"))

    # -- replies in ------------------------------------------------------------------------------
    def _unpack(self, server_round: int, phase: str,
                replies: Iterable[Message]) -> list[tuple[int, Message]]:
        """Record every client's outcome; return (first pid, reply) for replies that carry content."""
        groups = self.groups.get(phase, {})
        good = []
        for msg in replies:
            group = groups.get(msg.metadata.src_node_id, [])
            if msg.has_error():
                for pid in group:
                    self.recorder.client(server_round, phase, pid, None, msg.error.reason)
                continue
            content = msg.content
            status = content[STATUS_KEY] if STATUS_KEY in content else ConfigRecord()
            rejected = rejected_ids(status)
            for pid in group:
                key = f"{CLIENT_METRIC_PREFIX}{pid}"
                if pid in rejected:
                    self.recorder.rejected(server_round, phase, pid, dict(content[key]) if key in content
                                           else None, rejected[pid])
                elif key in content:
                    self.recorder.client(server_round, phase, pid, dict(content[key]), None)
                else:
                    self.recorder.client(server_round, phase, pid, None,
                                         str(status.get(f"error.{pid}", "no reply for this client")))
            if group:
                good.append((group[0], msg))
        return sorted(good, key=lambda item: item[0])

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self._unpack(server_round, "train", replies)
        clients = sorted(self._ok_clients(good), key=lambda item: item[0])
        full = [msg.content[f"{CLIENT_METRIC_PREFIX}{pid}"] for pid, msg, _ in clients]
        norms = [float(m[UPDATE_NORM]) for m in full if UPDATE_NORM in m]
        if norms:  # what the next round's updates are checked against (norm check)
            self.median_norm = statistics.median(norms)
        if len(clients) < self.validation.min_clients:
            self.recorder.skipped(server_round, "train", len(clients), self.validation.min_clients)
            return None, None  # Flower keeps the previous arrays
        per_client = [RecordDict({"metrics": metrics}) for _, _, metrics in clients]
        if not self.shares_arrays:
            return None, aggregate_metricrecords(per_client, NUM_EXAMPLES)
        if self.mean_based:
            reply = self._combined_mean(good, {pid: metrics for pid, _, metrics in clients},
                                        per_client)
            inner_replies = [reply] if reply is not None else []
        else:
            inner_replies = [self._as_reply(msg.content[client_arrays_key(pid)], metrics, msg)
                             for pid, msg, metrics in clients if client_arrays_key(pid) in msg.content]
        if not inner_replies:
            return None, None
        return self.inner.aggregate_train(server_round, inner_replies)

    def _combined_mean(self, good: list[tuple[int, Message]], metrics: dict[int, MetricRecord],
                       per_client: list[RecordDict]) -> Message | None:
        """One reply: the exact example-weighted mean over every node's clients (module doc)."""
        sums, dtypes, summed = CompensatedSum(), {}, []
        for _, msg in good:  # sorted by each group's smallest partition id
            node = group_sums(msg.content)
            if node is None:
                continue
            pids, hi, lo, node_dtypes = node
            for key, value in hi.items():
                sums.add(key, value, lo[key])
            dtypes.update(node_dtypes)
            summed += pids
        weight = math.fsum(float(metrics[pid][NUM_EXAMPLES]) for pid in sorted(summed) if pid in metrics)
        if not sums.hi or not weight > 0:
            return None
        mean = sums.mean(weight, dtypes)
        core = aggregate_metricrecords(per_client, NUM_EXAMPLES)
        return self._as_reply(ArrayRecord(mean), MetricRecord({**core, NUM_EXAMPLES: weight}), good[0][1])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        per_client = self._client_records(self._unpack(server_round, "evaluate", replies))
        return aggregate_metricrecords(per_client, NUM_EXAMPLES) if per_client else None

    @staticmethod
    def _core_metrics(metrics: MetricRecord) -> MetricRecord:
        return MetricRecord({k: metrics[k] for k in (NUM_EXAMPLES, "loss", "accuracy") if k in metrics})

    @classmethod
    def _ok_clients(cls, good: list[tuple[int, Message]]) -> Iterator[tuple[int, Message, MetricRecord]]:
        """(partition id, its group reply, its core metrics) for every client that succeeded."""
        for _, msg in good:
            for pid in ok_ids(msg.content[STATUS_KEY]):
                yield pid, msg, cls._core_metrics(msg.content[f"{CLIENT_METRIC_PREFIX}{pid}"])

    def _client_records(self, good: list[tuple[int, Message]]) -> list[RecordDict]:
        clients = sorted(self._ok_clients(good), key=lambda item: item[0])
        return [RecordDict({"metrics": metrics}) for _, _, metrics in clients]

    @staticmethod
    def _as_reply(arrays: ArrayRecord, metrics: MetricRecord, origin: Message) -> Message:
        return reply_message(RecordDict({"arrays": arrays, "metrics": metrics}),
                             origin.metadata.src_node_id, MessageType.TRAIN)

    def summary(self) -> None:
        self.inner.summary()

    # -- checkpoints (fedkd.checkpoint calls these on the strategies it saves) -------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """Cross-round state a resumed run needs: the median update norm (norm check)."""
        return {"median_norm": self.median_norm}

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.median_norm = state.get("median_norm")
