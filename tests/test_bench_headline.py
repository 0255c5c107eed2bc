"""bench/protocol_v2.py: the v2 headline tables and the claims the setting pages and the index carry."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fedkd.recorder import TIMING_BASIS

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
            row["second_model"] = {"name": "meme", "accuracy": second[seed], "accuracy_last3": second[seed]}
        path = bench / "results" / setting / label / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row))


@pytest.fixture
def bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(headline, "BENCH", tmp_path)
    return tmp_path


def test_reference_is_the_local_or_fedavg_label_of_the_same_model_or_variant() -> None:
    labels = ["local-cnn", "local-resnet8", "fedavg-cnn", "local", "local-hetero", "fedavg-cnn_bn", "fedavg"]
    assert headline.reference("pse-cnn-amax0.2", labels, "local") == "local-cnn"
    assert headline.reference("pse-resnet8-amax0.2", labels, "local") == "local-resnet8"
    assert headline.reference("mhpflid-hetero-lambda_l1", labels, "local") == "local-hetero"
    assert headline.reference("fedbn-cnn_bn", labels, "fedavg") == "fedavg-cnn_bn"
    assert headline.reference("fedbn-cnn_bn", labels, "local") == "local"
    assert headline.reference("ditto-resnet8", ["local-cnn"], "local") is None


def test_rows_meet_their_references_first() -> None:
    labels = ["ditto-cnn", "fedavg-cnn", "fedavg-resnet8", "local-cnn", "local-resnet8", "pse-cnn-amax0.2"]
    assert headline.row_order(labels) == ["local-cnn", "fedavg-cnn", "ditto-cnn", "pse-cnn-amax0.2",
                                          "local-resnet8", "fedavg-resnet8"]
    shift = ["fedavg", "fedavg-cnn_bn", "fedbn-cnn_bn", "local", "local-hetero", "mhpflid-hetero"]
    assert headline.row_order(shift) == ["local", "fedavg", "fedavg-cnn_bn", "fedbn-cnn_bn",
                                         "local-hetero", "mhpflid-hetero"]


def test_headline_table_pairs_each_label_by_seed(bench: Path) -> None:
    write_results(bench, "cifar10-long", "local-cnn", [0.80, 0.82, 0.81], [0.79, 0.81, 0.80],
                  seconds_per_round=[10.0, 9.0, 12.0])
    write_results(bench, "cifar10-long", "fedavg-cnn", [0.50, 0.52, 0.51], [0.50, 0.52, 0.51],
                  seconds_per_round=[6.0, 5.0, 7.0])
    # +2 points on every seed and both numbers: beats local; noisy around local's: a tie
    write_results(bench, "cifar10-long", "ditto-cnn", [0.82, 0.84, 0.83], [0.81, 0.83, 0.82],
                  second=[0.5, 0.6, 0.7])
    write_results(bench, "cifar10-long", "fedrep-cnn", [0.83, 0.80, 0.82], [0.80, 0.80, 0.81])
    write_results(bench, "cifar10-long", "pse-cnn-amax0.2", [0.70, 0.72], [0.70, 0.71])  # seeds 0-1 so far
    rows = {line.split(" | ")[0].strip("| "): line for line in headline.headline_table("cifar10-long").splitlines()}
    assert "| 0.8300 ± 0.0100 | 0.8200 ± 0.0100 | meme: 0.6000 ± 0.1000 / 0.6000 ± 0.1000 |" in rows["ditto-cnn"]
    assert "| **beats** +2.00 ± 0.00 (+ + +) / +2.00 ± 0.00 (+ + +) (local-cnn) |" in rows["ditto-cnn"]
    # per seed: +3 −2 +1 (mean +0.67, std 2.52) and +1 −1 +1: |mean| < std on both
    assert "| tie +0.67 ± 2.52 (+ − +) / +0.33 ± 1.15 (+ − +) (local-cnn) |" in rows["fedrep-cnn"]
    assert "| **loses** -10.00 ± 0.00 (− −) / -9.50 ± 0.71 (− −) (seeds 0,1 only) (local-cnn) |" \
        in rows["pse-cnn-amax0.2"]
    # no second model, no reference of its own; the fastest seed's s/round against FedAvg's fastest
    assert rows["local-cnn"].endswith("| — | — | **beats** +30.00 ± 0.00 (+ + +) / +29.00 ± 0.00 (+ + +) "
                                      "(fedavg-cnn) | 9.0 (1.8×) (basis 1) | 3 |")  # no timing basis recorded: 1
    assert rows["ditto-cnn"].endswith("| — | 3 |")  # no timing recorded
    assert headline.headline_table("mnist-scarce") == "No result yet.\n"


def test_a_seed_missing_one_headline_number_is_left_out_of_both(bench: Path) -> None:
    write_results(bench, "fmnist-mild", "local", [0.80, 0.82], [0.80, 0.82])
    write_results(bench, "fmnist-mild", "fml", [0.81, 0.83], [0.81, None])  # seed 1: no last-3 number
    (fml,) = [line for line in headline.headline_table("fmnist-mild").splitlines() if line.startswith("| fml ")]
    assert "+1.00 (+) / +1.00 (+) (seed 0 only) (local)" in fml


def claim(method: str, setting: str):  # noqa: ANN201
    return next(c for c in headline.CLAIMS if (c.method, c.setting) == (method, setting))


def test_a_claim_holds_ties_is_mixed_fails_or_waits_for_its_runs(bench: Path) -> None:
    write_results(bench, "mnist-scarce", "local", [0.80, 0.82, 0.81], [0.80, 0.82, 0.81])
    write_results(bench, "mnist-scarce", "fedkd_mentor", [0.90, 0.91, 0.92], [0.90, 0.91, 0.92])
    # ">=": beats on the last round, ties on the mean of the last 3 (a 'mixed' comparison): holds
    write_results(bench, "mnist-scarce", "fedkd_mentor-mentee_cnn_narrow", [0.92, 0.93, 0.94],
                  [0.91, 0.90, 0.93])
    write_results(bench, "mnist-scarce", "fml", [0.78, 0.80, 0.79], [0.78, 0.80, 0.79])
    # beats local on the last round, loses on the last 3: mixed
    write_results(bench, "mnist-scarce", "feddistill-exclude_self", [0.85, 0.86, 0.87], [0.70, 0.71, 0.72])
    write_results(bench, "mnist-scarce", "fedproto", [0.85, 0.86, 0.87], [0.85, 0.86, 0.87])
    groups = headline.results("mnist-scarce")
    outcome, cells = headline.judge(claim("FedKD", "mnist-scarce"), groups)
    assert outcome == "holds" and cells[0].startswith(">= fedkd_mentor: mixed +2.00 ± 0.00 (+ + +) / +0.33")
    assert headline.judge(claim("FML", "mnist-scarce"), groups)[0] == "fails"
    assert headline.judge(claim("FedDistill", "mnist-scarce"), groups)[0] == "mixed"
    outcome, cells = headline.judge(claim("FedProto", "mnist-scarce"), groups)  # no FedAvg run yet
    assert outcome == "pending" and cells[1] == "> fedavg: pending"
    write_results(bench, "mnist-scarce", "fedavg", [0.86, 0.85, 0.88], [0.86, 0.85, 0.88])
    outcome, _ = headline.judge(claim("FedProto", "mnist-scarce"), headline.results("mnist-scarce"))
    assert outcome == "tie"  # beats local, ties FedAvg: ">" is not met and nothing loses
    table = headline.claims_table(headline.verdicts(["mnist-scarce"]))
    assert "| FedKD | mnist-scarce |" in table and "| **holds** |" in table and "| **fails** |" in table
    assert "fmnist-mild" not in table


def test_a_claim_is_open_until_it_has_tier_1s_seeds(bench: Path) -> None:
    write_results(bench, "fmnist-mild", "fedavg", [0.80], [0.80])
    write_results(bench, "fmnist-mild", "fedntd", [0.85], [0.84])
    outcome, cells = headline.judge(claim("FedNTD", "fmnist-mild"), headline.results("fmnist-mild"))
    assert outcome == "open (1 of 3 seeds; so far: holds)"
    assert cells == ["> fedavg: beats +5.00 (+) / +4.00 (+) (seed 0 only)"]


def test_claims_at_a_glance_give_each_methods_verdict_per_setting(bench: Path) -> None:
    write_results(bench, "cifar10-long", "fedavg-cnn", [0.50, 0.52, 0.51], [0.50, 0.52, 0.51])
    write_results(bench, "cifar10-long", "fedrep-cnn", [0.80, 0.81, 0.82], [0.80, 0.81, 0.82])
    write_results(bench, "cifar10-long", "ditto-cnn", [0.80, 0.81, 0.82], [0.80, 0.81, 0.82])
    write_results(bench, "cifar10-long", "pse-cnn-amax0.2", [0.70, 0.71, 0.72], [0.70, 0.71, 0.72])
    write_results(bench, "mnist-scarce", "local", [0.80, 0.82, 0.81], [0.80, 0.82, 0.81])
    write_results(bench, "mnist-scarce", "fml", [0.78, 0.80, 0.79], [0.78, 0.80, 0.79])
    settings = ["cifar10-long", "mnist-scarce"]
    lines = headline.claims_at_a_glance(headline.verdicts(settings), settings).splitlines()
    assert lines[0] == "| method | cifar10-long | mnist-scarce |"
    # PSE has one claim per model: loses to FedRep and Ditto on cnn, no resnet8 runs yet
    assert lines[2] == "| PSE | **fails** (cnn), pending (resnet8) | — |"
    assert "| FML | — | **fails** |" in lines
    assert not any(line.startswith("| FedNTD |") for line in lines)  # judged on fmnist-mild only


def test_pse_claim_on_fmnist_mild_reads_the_unsuffixed_labels(bench: Path) -> None:
    for label, acc in (("fedavg", 0.80), ("fedrep", 0.87), ("ditto", 0.87), ("pse-amax0.2", 0.89)):
        write_results(bench, "fmnist-mild", label, [acc, acc + 0.01, acc - 0.01], [acc, acc + 0.01, acc - 0.01])
    outcome, cells = headline.judge(claim("PSE", "fmnist-mild"), headline.results("fmnist-mild"))
    assert outcome == "holds"
    assert [c.split(":")[0] for c in cells] == ["> fedavg", ">= fedrep", ">= ditto"]
    lines = headline.claims_at_a_glance(headline.verdicts(["fmnist-mild"]), ["fmnist-mild"]).splitlines()
    assert "| PSE | **holds** |" in lines


def test_claims_carry_the_specs_diagnostics(bench: Path) -> None:
    factors = lambda *accs: [{f"x{f}": {"accuracy": a} for f, a in zip((1, 2, 4, 8), accs)}]  # noqa: E731
    write_results(bench, "resolution-shift", "local-hetero", [0.5], [0.5], per_factor=factors(0.6, 0.5, 0.4, 0.3))
    write_results(bench, "resolution-shift", "mhpflid-hetero", [0.52], [0.51], second=[0.45],
                  per_factor=factors(0.6, 0.52, 0.43, 0.35))
    write_results(bench, "cifar10-long", "local-cnn", [0.75], [0.75])
    write_results(bench, "cifar10-long", "pse-cnn-amax0.2", [0.8], [0.8],
                  extra_metrics=[{"post_minus_pre_excitation_accuracy": -0.031,
                                  "post_minus_pre_excitation_local_accuracy": 0.002}])
    write_results(bench, "cifar10-long", "pse-cnn-attention_only", [0.82], [0.79])
    write_results(bench, "cifar10-long", "pse-cnn-excitation_only-amax0.2", [0.74], [0.74])
    write_results(bench, "fmnist-mild", "fedkd_mentor", [0.8], [0.8], bytes_sent_per_client_round=[4000])
    write_results(bench, "fmnist-mild", "fedkd_mentor-mentee_cnn_narrow", [0.8], [0.8],
                  bytes_sent_per_client_round=[1000])
    lines = headline.claims_table(headline.verdicts()).splitlines()
    (mhpflid,) = [line for line in lines if line.startswith("| MH-pFLID |")]
    assert mhpflid.endswith("| meme: 0.4500 / 0.4500; Δ vs local-hetero per factor: x1 +0.00, x2 +2.00, "
                            "x4 +3.00, x8 +5.00 |")
    (pse_cnn,) = [line for line in lines if "PSE v2 (cnn)" in line]
    assert pse_cnn.endswith("| vs local-cnn: beats +5.00 (+) / +5.00 (+) (seed 0 only); excitation post − pre "
                            "(fused) -3.10 points; (local head) +0.20 points; vs pse-cnn-attention_only: "
                            "mixed -2.00 (−) / +1.00 (+) (seed 0 only); excitation only vs local-cnn: "
                            "loses -1.00 (−) / -1.00 (−) (seed 0 only) |")
    (fedkd,) = [line for line in lines if line.startswith("| FedKD | fmnist-mild |")]
    assert "bytes/client/round 0.25× fedkd_mentor's" in fedkd
    (fedntd,) = [line for line in lines if line.startswith("| FedNTD |")]
    assert fedntd.endswith("| pending | — |")  # no run, no diagnostic


def test_write_fills_the_markers_of_every_page_and_the_index(bench: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    index = bench / "README.md"
    index.write_text("".join(f"<!-- headline:{s} -->\nold\n<!-- /headline:{s} -->\n" for s in headline.SETTINGS)
                     + "<!-- claims -->\nold\n<!-- /claims -->\n"
                     + "<!-- claims-at-a-glance -->\nold\n<!-- /claims-at-a-glance -->\n")
    for setting in headline.SETTINGS:
        page = bench / "results" / setting / "README.md"
        page.parent.mkdir(parents=True)
        page.write_text(f"# {setting}\n\n<!-- headline -->\nold\n<!-- /headline -->\n\nafter\n")
    write_results(bench, "mnist-scarce", "local", [0.8], [0.8])
    monkeypatch.setattr(sys, "argv", ["protocol_v2.py", "--write"])
    headline.main()
    assert "old" not in index.read_text() and "| FedNTD | fmnist-mild |" in index.read_text()
    assert "| FedNTD | — | — | — | pending |" in index.read_text()
    page = (bench / "results/mnist-scarce/README.md").read_text()
    assert page.startswith("# mnist-scarce\n\n<!-- headline -->\n| run |") and page.endswith(
        "<!-- /headline -->\n\nafter\n")
    assert "No result yet." in (bench / "results/fmnist-mild/README.md").read_text()
    assert "claims: wrote" in capsys.readouterr().out
    # one setting: its page and its index table, not the claims (they span every setting)
    index.write_text(index.read_text().replace("| FedNTD |", "| FedNTD-kept |"))
    monkeypatch.setattr(sys, "argv", ["protocol_v2.py", "--write", "mnist-scarce"])
    headline.main()
    assert "FedNTD-kept" in index.read_text()
    with pytest.raises(SystemExit, match="^no <!-- headline --> .* markers to write between$"):
        headline.replace_between("no markers here\n", "headline", "x")


def test_near_best_names_the_seed_0_rows_within_a_point_of_the_best(bench: Path) -> None:
    write_results(bench, "cifar10-long", "pse-cnn-amax0.2", [0.860, 0.85, 0.87], [0.850, 0.84, 0.86])
    write_results(bench, "cifar10-long", "pse-cnn", [0.851], [0.830])  # within 1 point on the last round
    write_results(bench, "cifar10-long", "pse-cnn-topk0.1", [0.840], [0.845])  # ... on the mean of last 3
    write_results(bench, "cifar10-long", "pse-cnn-gate-amax0.2", [0.849], [0.838])  # 1.1 / 1.2 points off
    write_results(bench, "cifar10-long", "pse-cnn_bn", [0.99], [0.99])  # another model: not a pse-cnn row
    assert headline.near_best("cifar10-long", "pse-cnn") == ["pse-cnn", "pse-cnn-topk0.1"]
    assert headline.near_best("cifar10-long", "pse-cnn_bn") == ["pse-cnn_bn"]  # the best row itself
    assert headline.near_best("mnist-scarce", "pse-cnn") == []


def test_time_takes_the_fastest_seed_that_had_the_machine_to_itself() -> None:
    def seeds(*runs: tuple[float, bool], basis: int = TIMING_BASIS) -> list[dict]:
        return [{"seconds_per_round": t, "machine_load": {"median_load": 4.0 if busy else 2.5, "cpus": 2,
                                                          "loaded": busy, "timing": basis}} for t, busy in runs]
    fedavg = seeds((5.0, False), (4.0, True))  # 4.0 shared the machine: 5.0 is FedAvg's figure
    assert headline.time_cell(seeds((9.0, True), (10.0, False)), fedavg) == "10.0 (2.0×)"
    assert headline.time_cell(seeds((9.0, True), (12.0, True)), fedavg) == "9.0 (1.8×) loaded"
    assert headline.time_cell([{"seconds_per_round": 8.0}], None) == "8.0 (basis 1)"  # recorded before loads


def test_time_ratio_takes_fedavg_of_the_same_timing_basis_only() -> None:
    """A run timed under fedkd's old allocator setting (basis 1, ~1.9x slower) is not divided by a
    FedAvg timed under the new one, nor the other way round."""
    def seed(t: float, basis: int) -> dict:
        return {"seconds_per_round": t, "machine_load": {"median_load": 2.5, "cpus": 2, "loaded": False,
                                                         "timing": basis}}
    fedavg = [seed(12.0, 1), seed(6.0, TIMING_BASIS)]
    assert headline.time_cell([seed(24.0, 1)], fedavg) == "24.0 (2.0×) (basis 1)"
    assert headline.time_cell([seed(12.0, TIMING_BASIS)], fedavg) == "12.0 (2.0×)"
    assert headline.time_cell([seed(12.0, TIMING_BASIS)], [seed(12.0, 1)]) == "12.0"  # no FedAvg on its basis
    assert headline.time_cell([seed(24.0, 1), seed(13.0, TIMING_BASIS)], fedavg) == "13.0 (2.2×)"


def test_time_ratio_takes_fedavg_on_a_machine_of_the_same_speed_only() -> None:
    """Sessions' machines differ (one FedAvg run: 12.5 and 4.7 s/round): a FedAvg seed from a machine
    whose speed probe differs by more than 1.25x does not divide a run's s/round."""
    def seed(t: float, probe: float) -> dict:
        return {"seconds_per_round": t, "machine_load": {"median_load": 2.5, "cpus": 2, "loaded": False,
                                                         "timing": TIMING_BASIS, "probe_ms": probe}}
    fedavg = [seed(2.5, 0.8), seed(6.5, 2.1)]  # fast machine, slow machine
    assert headline.time_cell([seed(13.0, 2.0)], fedavg) == "13.0 (2.0×)"  # against the slow one
    assert headline.time_cell([seed(5.0, 0.9)], fedavg) == "5.0 (2.0×)"  # against the fast one
    assert headline.time_cell([seed(5.0, 1.4)], fedavg) == "5.0"  # neither
