"""Results do not depend on how clients are grouped onto Flower nodes (issue 19 item 9).

Each node sends a compensated float64 sum of its clients' updates; the server combines them in
partition-id order and casts once (`fedkd.wire.CompensatedSum`), so `simulation.num_nodes`, and
with it the machine's core count, leaves every number unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedkd.wire import CompensatedSum
from tests.test_validation import run

#: fields that legitimately differ between runs (timing, process ids)
VOLATILE = {"seconds", "worker_pid"}


def _mean_by_groups(values: list[torch.Tensor], weights: list[int], groups: list[list[int]]
                    ) -> torch.Tensor:
    total = CompensatedSum()
    for group in groups:  # the server: node sums in order
        node = CompensatedSum()
        for i in group:  # a node: its clients in order
            node.add("w", values[i].double() * weights[i])
        total.add("w", node.hi["w"], node.lo["w"])
    return total.mean(float(sum(weights)), {"w": torch.float32})["w"]


def test_compensated_sums_give_one_mean_for_every_grouping() -> None:
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(20000, generator=gen) * 10 ** float(torch.randint(-3, 3, (), generator=gen))
              for _ in range(7)]
    weights = [int(w) for w in torch.randint(1, 900, (7,), generator=gen)]
    groupings = [[[0, 1, 2, 3, 4, 5, 6]], [[0, 2, 4, 6], [1, 3, 5]], [[0], [1, 2], [3, 4, 5], [6]],
                 [[i] for i in range(7)], [[5, 6], [0, 1, 2, 3, 4]]]
    means = [_mean_by_groups(values, weights, g) for g in groupings]
    assert all(torch.equal(means[0], m) for m in means[1:])
    exact = np.array([np.float32(sum(np.float64(v[j]) * w for v, w in zip(values, weights))
                                 / sum(weights)) for j in range(50)])  # spot check vs float64
    assert np.allclose(means[0][:50].numpy(), exact, rtol=1e-6, atol=0)
    # what the grouping changed before: float32 node means, averaged again in float32
    def naive(groups: list[list[int]]) -> torch.Tensor:
        node_means = [(sum(values[i].double() * weights[i] for i in g) / sum(weights[i] for i in g)).float()
                      for g in groups]
        node_w = [sum(weights[i] for i in g) for g in groups]
        return sum(m * (w / sum(node_w)) for m, w in zip(node_means, node_w))  # type: ignore[return-value]
    assert not all(torch.equal(naive(groupings[0]), naive(g)) for g in groupings[1:])


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_every_node_count_gives_the_same_records(tmp_path: Path, strategy: str) -> None:
    runs = {}
    for nodes in (1, 2, 5, 6):  # 6 clients: 6 nodes is one node per client
        grid, result, records = run(tmp_path / str(nodes), "data.num_clients=6", "train.rounds=2",
                                    f"strategy.name={strategy}", nodes=nodes)
        kept = sorted((r["round"], r["phase"], -1 if r.get("partition_id") is None else r["partition_id"],
                       sorted((k, v) for k, v in r.items() if k not in VOLATILE))
                      for r in records if r["phase"] in ("train", "evaluate", "central"))
        runs[nodes] = (kept, result.arrays.to_torch_state_dict())
        assert len({m.metadata.dst_node_id for m in grid.sent}) == nodes
    reference, arrays = runs[1]
    assert len(reference) >= 2 * 6 * 2  # train and evaluate: 2 rounds x 6 clients (+ central)
    for nodes, (kept, final) in runs.items():
        assert kept == reference, f"num_nodes={nodes} differs from num_nodes=1"
        assert all(torch.equal(final[k], arrays[k]) for k in arrays), nodes
