"""Why FedProto's prediction wins or loses: one trained run's clients scored under five rules.

FedProto predicts the class of the nearest global prototype. Where that loses to local training
while the client's own head wins (fmnist-mild), the loss can come from the rule (nearest class mean
instead of a trained head), from the global prototypes (other clients' features, far from this
client's), or from classes the client never trained on. Each client's final model (the run's
`model/` folder, `fedkd.saved_model.load_model`) is scored on its test split under:

- `nearest global`: the run's own rule (it reproduces the run's last-round accuracy);
- `nearest global, held classes`: the same, restricted to the classes in the client's training split;
- `nearest own`: the nearest of the client's own class means of its training features (its local
  prototypes): the rule without the other clients;
- `own head`: the client's classifier head (FedProto's second model);
- `own head, held classes`: the head restricted to the held classes.

Example-weighted accuracy over the clients, per seed and the mean over seeds, plus the share of
test samples whose class the client holds fewer than 10 training samples of.

    FEDKD_DATA_DIR=../shared/data .venv/bin/python bench/fedproto_prediction.py fmnist-mild [LABEL]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from fedkd.clients.class_tables import NearestPrototype, prototype_logits
from fedkd.clients.mixclap import embed_all
from fedkd.config import from_yaml
from fedkd.data import ClientSplit, load_federated
from fedkd.kd import class_means
from fedkd.render import to_markdown
from fedkd.saved_model import load_model

RESULTS = Path(__file__).resolve().parent / "results"
RULES = ("nearest global", "nearest global, held classes", "nearest own", "own head", "own head, held classes")
RARE = 10  # a class with fewer training samples than this counts as rare for the client


@torch.no_grad()
def client_scores(model: NearestPrototype, split: ClientSplit, num_classes: int) -> dict[str, int]:
    """Correct test predictions under each rule, the test count, and the test samples of rare classes."""
    x_test, y_test = torch.from_numpy(split.x_test), torch.from_numpy(split.y_test)
    own_means, counts = class_means(embed_all(model.model.features, torch.from_numpy(split.x_train)),
                                    torch.from_numpy(split.y_train), num_classes)
    held = counts > 0
    feats = embed_all(model.model.features, x_test)
    head = model.model.head(feats)
    nearest = prototype_logits(feats, model.prototypes, model.present)
    logits = {"nearest global": nearest,
              "nearest global, held classes": nearest.masked_fill(~held, float("-inf")),
              "nearest own": prototype_logits(feats, own_means, held),
              "own head": head,
              "own head, held classes": head.masked_fill(~held, float("-inf"))}
    scores = {rule: int((logits[rule].argmax(1) == y_test).sum()) for rule in RULES}
    return {**scores, "n": len(y_test), "rare": int((counts[y_test] < RARE).sum())}


def run_scores(run_dir: Path) -> dict[str, float]:
    """Example-weighted accuracy under each rule over a run's clients, and the rare-class share."""
    cfg = from_yaml((run_dir / "config.yaml").read_text())
    data = load_federated(cfg.data, cfg.experiment.seed)
    totals: dict[str, int] = {}
    for pid, split in enumerate(data.clients):
        model = load_model(run_dir, client=pid)
        if not isinstance(model, NearestPrototype):
            raise SystemExit(f"{run_dir}: not a FedProto run ({type(model).__name__})")
        for key, value in client_scores(model, split, data.num_classes).items():
            totals[key] = totals.get(key, 0) + value
    return {key: value / totals["n"] for key, value in totals.items() if key != "n"}


def main(argv: list[str]) -> None:
    if not 1 <= len(argv) <= 2:
        raise SystemExit(__doc__)
    setting, label = argv[0], argv[1] if len(argv) > 1 else "fedproto"
    run_dirs = sorted(p for p in (RESULTS / setting / label).glob("seed*") if (p / "model").is_dir())
    if not run_dirs:
        raise SystemExit(f"no finished run with a saved model under {RESULTS / setting / label}")
    per_seed = {run_dir.name: run_scores(run_dir) for run_dir in run_dirs}
    columns = [*RULES, "rare"]
    head = ["seed", *columns[:-1], f"test share of classes with < {RARE} training samples"]
    body = [[seed, *(f"{scores[c]:.4f}" for c in columns)] for seed, scores in per_seed.items()]
    body.append(["mean", *(f"{statistics.mean(s[c] for s in per_seed.values()):.4f}" for c in columns)])
    print(f"{setting} {label}: example-weighted test accuracy of each client's final model\n")
    print(to_markdown([("table", head, body)]))


if __name__ == "__main__":
    main(sys.argv[1:])
