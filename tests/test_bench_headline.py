"""bench/protocol_v2.py: the v2 headline tables the setting pages and the bench index carry."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("protocol_v2", ROOT / "bench/protocol_v2.py")
headline = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
sys.modules["protocol_v2"] = headline  # its dataclasses look their module up there
spec.loader.exec_module(headline)  # type: ignore[union-attr]


def write_results(bench: Path, setting: str, label: str, last: list[float], last3: list[float],
                  second: list[float] | None = None, **fields: list) -> None:
    for seed, (a, b) in enumerate(zip(last, last3)):
        row = {"seed": seed, "status": "complete", "accuracy": a, "accuracy_last3": b,
               **{k: v[seed] for k, v in fields.items()}}
        if second:
            row["second_model"] = {"name": "global", "accuracy": second[seed], "accuracy_last3": second[seed]}
        path = bench / "results" / setting / label / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row))


def test_reference_is_the_local_or_fedavg_label_of_the_same_model_or_variant() -> None:
    labels = ["local-cnn", "local-resnet8", "fedavg-cnn", "local", "local-hetero", "fedavg-cnn_bn", "fedavg"]
    assert headline.reference("pse-cnn-amax0.2", labels, "local") == "local-cnn"
    assert headline.reference("pse-resnet8-amax0.2", labels, "local") == "local-resnet8"
    assert headline.reference("mhpflid-hetero", labels, "local") == "local-hetero"
    assert headline.reference("fedbn-cnn_bn", labels, "fedavg") == "fedavg-cnn_bn"
    assert headline.reference("fedbn-cnn_bn", labels, "local") == "local"
    assert headline.reference("ditto-resnet8", ["local-cnn"], "local") is None


def test_headline_table_pairs_each_label_by_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headline, "BENCH", tmp_path)
    write_results(tmp_path, "cifar10-long", "local-cnn", [0.80, 0.82, 0.81], [0.79, 0.81, 0.80])
    write_results(tmp_path, "cifar10-long", "fedavg-cnn", [0.50, 0.52, 0.51], [0.50, 0.52, 0.51])
    # +2 points on every seed and both numbers: beats local; noisy around local's: a tie
    write_results(tmp_path, "cifar10-long", "ditto-cnn", [0.82, 0.84, 0.83], [0.81, 0.83, 0.82],
                  second=[0.5, 0.6, 0.7])
    write_results(tmp_path, "cifar10-long", "fedrep-cnn", [0.83, 0.80, 0.82], [0.80, 0.80, 0.81])
    write_results(tmp_path, "cifar10-long", "pse-cnn-amax0.2", [0.70], [0.70])  # seed 0 so far
    rows = {line.split(" | ")[0].strip("| "): line for line in headline.headline_table("cifar10-long").splitlines()}
    assert "| 0.8300 ± 0.0100 | 0.8200 ± 0.0100 | global 0.6000 ± 0.1000 |" in rows["ditto-cnn"]
    assert "**beats** +2.00 / +2.00 (local-cnn)" in rows["ditto-cnn"]
    assert "**beats** +32.00 / +31.00 (fedavg-cnn)" in rows["ditto-cnn"]
    assert "tie +0.67 / +0.33 (local-cnn)" in rows["fedrep-cnn"]
    assert "**loses** -10.00 / -9.00 (seed 0 only) (local-cnn)" in rows["pse-cnn-amax0.2"]
    assert rows["local-cnn"].endswith("| — | — | **beats** +30.00 / +29.00 (fedavg-cnn) | 3 |")  # no second model


def test_write_replaces_only_between_the_markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "intro\n<!-- headline -->\nold\n<!-- /headline -->\nafter\n"
    assert headline.replace_between(text, "headline", "| new |\n") == \
        "intro\n<!-- headline -->\n| new |\n<!-- /headline -->\nafter\n"
    with pytest.raises(SystemExit, match="^no <!-- headline:fmnist-mild --> .* markers to write between$"):
        headline.replace_between(text, "headline:fmnist-mild", "x")
    monkeypatch.setattr(headline, "BENCH", tmp_path)
    assert headline.headline_table("mnist-scarce") == "No result yet.\n"


def test_a_claim_holds_ties_fails_or_waits_for_its_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headline, "BENCH", tmp_path)
    write_results(tmp_path, "mnist-scarce", "local", [0.80, 0.82, 0.81], [0.80, 0.82, 0.81])
    write_results(tmp_path, "mnist-scarce", "fedkd_mentor", [0.90, 0.91, 0.92], [0.90, 0.91, 0.92])
    write_results(tmp_path, "mnist-scarce", "fedkd_mentor-mentee_cnn_narrow", [0.91, 0.90, 0.92], [0.90, 0.91, 0.93])
    write_results(tmp_path, "mnist-scarce", "fml", [0.78, 0.80, 0.79], [0.78, 0.80, 0.79])
    write_results(tmp_path, "mnist-scarce", "fedproto", [0.85, 0.86, 0.87], [0.85, 0.86, 0.87])
    groups = headline.results("mnist-scarce")
    claim = {(c.method, c.setting): c for c in headline.CLAIMS}
    # ">=": a tie with the full-size mentee is the claim
    assert headline.judge(claim["FedKD", "mnist-scarce"], groups) == \
        ("holds", [">= fedkd_mentor: tie +0.00 / +0.33"])
    assert headline.judge(claim["FML", "mnist-scarce"], groups) == \
        ("fails", ["> local: loses -2.00 / -2.00"])
    outcome, cells = headline.judge(claim["FedProto", "mnist-scarce"], groups)  # no FedAvg run yet
    assert outcome == "pending" and cells == ["> local: beats +5.00 / +5.00", "> fedavg: pending"]
    write_results(tmp_path, "mnist-scarce", "fedavg", [0.86, 0.85, 0.88], [0.86, 0.85, 0.88])
    outcome, _ = headline.judge(claim["FedProto", "mnist-scarce"], headline.results("mnist-scarce"))
    assert outcome == "tie"  # beats local, ties FedAvg: ">" is not met, nothing loses
    table = headline.claims_table(["mnist-scarce"])
    assert "| FedKD | mnist-scarce |" in table and "| **holds** |" in table and "fmnist-mild" not in table


def test_claims_carry_the_specs_diagnostics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headline, "BENCH", tmp_path)
    factors = lambda *accs: [{f"x{f}": {"accuracy": a} for f, a in zip((1, 2, 4, 8), accs)}]  # noqa: E731
    write_results(tmp_path, "resolution-shift", "local-hetero", [0.5], [0.5], per_factor=factors(0.6, 0.5, 0.4, 0.3))
    write_results(tmp_path, "resolution-shift", "mhpflid-hetero", [0.52], [0.51], second=[0.45],
                  per_factor=factors(0.6, 0.52, 0.43, 0.35))
    write_results(tmp_path, "cifar10-long", "pse-cnn-amax0.2", [0.8], [0.8],
                  extra_metrics=[{"post-minus-pre-excitation-accuracy": -0.031,
                                  "post-minus-pre-excitation-local-accuracy": 0.002}])
    write_results(tmp_path, "fmnist-mild", "fedkd_mentor", [0.8], [0.8], bytes_sent_per_client_round=[4000])
    write_results(tmp_path, "fmnist-mild", "fedkd_mentor-mentee_cnn_narrow", [0.8], [0.8],
                  bytes_sent_per_client_round=[1000])
    rows = {tuple(line.split(" | ")[:2]): line for line in headline.claims_table().splitlines()}
    assert rows["| MH-pFLID", "resolution-shift"].endswith(
        "| global 0.4500; Δ vs local-hetero per factor: x1 +0.00, x2 +2.00, x4 +3.00, x8 +5.00 |")
    (pse_cnn,) = [line for line in headline.claims_table().splitlines() if "PSE v2 (cnn)" in line]
    assert pse_cnn.endswith("| excitation post − pre (fused) -3.10 points; (local head) +0.20 points |")
    assert "bytes/client/round 0.25× fedkd_mentor's" in rows["| FedKD", "fmnist-mild"]
    assert rows["| FedNTD", "fmnist-mild"].endswith("| pending | — |")  # no run, no diagnostic
