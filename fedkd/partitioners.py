"""Partitioners that hand each client its train and test samples directly (no test_fraction split).

`scarce_draw` is the benchmark protocol's "mnist-scarce, exact draw" (FedProto's data-scarce
regime): every client gets a few classes and a fixed number of samples per class. flwr-datasets
has no partitioner for it: its PathologicalPartitioner splits *all* samples of a class among the
clients holding it (no fixed shots, no separate test draw), and its random class assignment
does not give every class the same number of clients.
"""

from __future__ import annotations

import numpy as np

from fedkd.config import ConfigError

#: (train indices, test indices) into the pooled arrays, one pair per client
ClientIndices = tuple[np.ndarray, np.ndarray]


def balanced_class_assignment(num_clients: int, num_classes: int, classes_per_client: int,
                              rng: np.random.Generator) -> np.ndarray:
    """(num_clients, classes_per_client) class ids, distinct per row, each class in exactly
    num_clients * classes_per_client / num_classes rows; random but always feasible.

    Clients are filled in order; a class whose remaining quota equals the clients left must be
    taken now (otherwise it could not be placed), the rest are drawn with probability
    proportional to their remaining quota. That keeps every class's quota <= clients left, which
    with sum(quota) = clients left * classes_per_client always leaves enough classes to draw from.
    The caller checks divisibility and classes_per_client <= num_classes.
    """
    quota = np.full(num_classes, num_clients * classes_per_client // num_classes, dtype=np.int64)
    rows = np.empty((num_clients, classes_per_client), dtype=np.int64)
    for i in range(num_clients):
        left = num_clients - i
        forced = np.flatnonzero(quota == left)
        free = np.flatnonzero((quota > 0) & (quota < left))
        k = classes_per_client - len(forced)
        drawn = rng.choice(free, size=k, replace=False, p=quota[free] / quota[free].sum()) if k else free[:0]
        row = np.sort(np.concatenate([forced, drawn]))
        quota[row] -= 1
        rows[i] = row
    return rows


def check_balance(num_clients: int, classes_per_client: int, num_classes: int) -> None:
    """ConfigError unless every class can go to the same number of clients (cheap: also a pre-flight check)."""
    if classes_per_client > num_classes:
        raise ConfigError("data.partitioner.classes_per_client", classes_per_client,
                          f"at most the {num_classes} classes of the dataset")
    if (num_clients * classes_per_client) % num_classes:
        raise ConfigError("data.partitioner.classes_per_client", classes_per_client,
                          f"data.num_clients x classes_per_client = {num_clients} x {classes_per_client} = "
                          f"{num_clients * classes_per_client} must be a multiple of the {num_classes} classes, so "
                          f"that every class goes to the same number of clients (e.g. 20 x 3 = 60: 6 per class)")


def scarce_draw(y: np.ndarray, num_clients: int, classes_per_client: int, train_per_class: int,
                test_per_client: int, seed: int) -> list[ClientIndices]:
    """Per client: `classes_per_client` distinct classes, `train_per_class` training samples of each
    and `test_per_client` test samples spread over its classes as evenly as possible (100 over 3
    classes: 34/33/33, the extra ones on seeded random classes). Classes are assigned so that each
    goes to exactly the same number of clients (see `balanced_class_assignment`); all draws are
    without replacement and disjoint across clients and between a client's train and test parts.

    ASSUMED (benchmark protocol v2, "mnist-scarce, exact draw"): FedProto's paper varies the
    classes per client and the shots; fixing 3 x 100 (+100 test) and balancing the classes is a
    project choice. The classes are the labels present in `y`. Seeded by `seed` alone.

    Raises ConfigError naming the key when the classes cannot be balanced or a class has too
    few samples for its clients.
    """
    y = np.asarray(y)
    classes = np.unique(y)
    n_cls = len(classes)
    check_balance(num_clients, classes_per_client, n_cls)
    rng = np.random.default_rng(seed)
    assigned = classes[balanced_class_assignment(num_clients, n_cls, classes_per_client, rng)]

    # test samples per (client, class slot): as even as possible, the remainder on random slots
    base, extra = divmod(test_per_client, classes_per_client)
    test_share = np.full((num_clients, classes_per_client), base, dtype=np.int64)
    for i in range(num_clients):
        test_share[i, rng.choice(classes_per_client, size=extra, replace=False)] += 1

    train: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    test: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:  # each class's pool is shuffled once and cut into consecutive, disjoint pieces
        pool = np.flatnonzero(y == c)
        holders, slots = np.nonzero(assigned == c)  # clients in ascending order
        need = len(holders) * train_per_class + int(test_share[holders, slots].sum())
        if need > len(pool):
            raise ConfigError("data.partitioner.train_per_class", train_per_class,
                              f"class {c} has {len(pool)} samples but its {len(holders)} clients need {need} "
                              f"({train_per_class} train each + test_per_client shares); lower "
                              f"train_per_class, data.partitioner.test_per_client or data.num_clients")
        pool = rng.permutation(pool)
        start = 0
        for i, s in zip(holders, slots):
            train[i].append(pool[start:start + train_per_class])
            start += train_per_class
            test[i].append(pool[start:start + test_share[i, s]])
            start += int(test_share[i, s])
    # shuffle within each client so its samples are not grouped by class
    return [(rng.permutation(np.concatenate(tr)), rng.permutation(np.concatenate(te)))
            for tr, te in zip(train, test)]
