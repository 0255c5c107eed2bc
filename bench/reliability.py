"""Reliability benchmark: injected faults per strategy family, kill -9 at random points then
--resume, and the one-line message of every bad input (issue 19; results in bench/reliability.md).

    .venv/bin/python bench/reliability.py                 # all three parts
    .venv/bin/python bench/reliability.py --parts faults --out bench/results/reliability.json

- faults: a small real run (sklearn digits, 6 clients, MLP, 5 rounds) per (strategy, fault kind),
  clients 0 and 1 faulty in every round, through the real ClientApp and strategy stack in this
  process (`fedkd.testing.InProcessGrid`), plus `kill` on Flower + Ray (it needs Ray workers).
  Reported: status, rounds skipped, updates rejected, failed client calls, final accuracy and its
  difference to the fault-free run of the same strategy.
- kills: a 20-round run (digits, Ditto: client state on disk) killed with SIGKILL at random
  times (seeded), resumed with `fedkd run --resume` until complete, compared record by record
  (timings aside) with an uninterrupted run: identical or not.
- bad_inputs: each input the issue lists, through the CLI: exit code and the one stderr line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs/experiment/quickstart.yaml")
SMALL = ["data.dataset=digits", "data.num_clients=6", "model.name=mlp", "train.rounds=5",
         "train.lr=0.05", "train.batch_size=20", "data.partitioner.name=iid", "evaluation.central=false"]
STRATEGIES = {"fedavg": [], "fedmedian": ["strategy.name=fedmedian"],
              "fedtrimmedavg": ["strategy.name=fedtrimmedavg", "strategy.beta=0.34"],
              "krum": ["strategy.name=krum", "strategy.num_malicious_nodes=2"]}
KINDS = {"none": [], "raise": ["faults.kind=raise"], "nan": ["faults.kind=nan"],
         "inf": ["faults.kind=inf"], "shape": ["faults.kind=shape"],
         "missing_key": ["faults.kind=missing_key"], "scale -10": ["faults.kind=scale"],
         "scale -10, norm check": ["faults.kind=scale", "validation.norm_check=true"]}


def _outcome(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"status": summary["status"], "accuracy": summary["accuracy"],
            "skipped_rounds": len(summary.get("skipped_rounds", [])),
            "rejected": summary.get("rejected", 0), "failures": summary["failures"]}


def fault_table(tmp: Path) -> list[dict]:
    """Every (strategy, kind) in-process, then `kill` under Ray."""
    from fedkd.config import load_config
    from fedkd.testing import InProcessGrid, run_in_process

    rows = []
    for strategy, s_over in STRATEGIES.items():
        clean = None
        for kind, k_over in KINDS.items():
            faulty = ["faults.clients=[0,1]"] if k_over else []
            cfg = load_config(QUICKSTART, [*SMALL, *s_over, *faulty, *k_over])
            run_dir = tmp / f"{strategy}-{kind.replace(' ', '_').replace(',', '')}"
            try:
                run_in_process(cfg, run_dir, InProcessGrid(3))
            except Exception as exc:  # a crash is a finding: record it (the report is written)
                print(f"{strategy} {kind}: {type(exc).__name__}: {exc}", file=sys.stderr)
            row = {"strategy": strategy, "fault": kind, **_outcome(run_dir)}
            clean = row["accuracy"] if kind == "none" else clean
            row["vs_fault_free"] = (None if row["accuracy"] is None or clean is None
                                    else row["accuracy"] - clean)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    rows += _kill_rows(tmp)
    return rows


def _kill_rows(tmp: Path) -> list[dict]:
    from fedkd.config import load_config
    from fedkd.ray_cluster import warm_ray
    from fedkd.simulation import run_experiment

    rows = []
    with warm_ray() as address:
        clean = None
        for kind, extra in (("none", []), ("kill", ["faults.clients=[0]", "faults.kind=kill",
                                                     "faults.rounds=[2]"])):
            cfg = load_config(QUICKSTART, [*SMALL, *extra, f"simulation.ray_address={address}"])
            run_dir = run_experiment(cfg, tmp / f"ray-fedavg-{kind}", quiet=True)
            row = {"strategy": "fedavg (Ray)", "fault": kind, **_outcome(run_dir)}
            clean = row["accuracy"] if kind == "none" else clean
            row["vs_fault_free"] = None if row["accuracy"] is None else row["accuracy"] - clean
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def _fedkd(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedkd.cli", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_resume(tmp: Path, kills: int, seed: int = 0) -> dict:
    """`kills` runs killed with SIGKILL at seeded random times, each resumed until complete."""
    from fedkd.ray_cluster import warm_ray
    from fedkd.testing import comparable_records as _records

    rng = random.Random(seed)
    with warm_ray() as address:
        over = [*SMALL, "train.rounds=20", "method.name=ditto", f"simulation.ray_address={address}"]
        started = time.perf_counter()
        ref = _fedkd("run", QUICKSTART, *over, "--quiet", "--run-dir", str(tmp / "reference"))
        ref.communicate()
        whole_s = time.perf_counter() - started
        reference = _records(tmp / "reference")
        trials = []
        for i in range(kills):
            run_dir, at = tmp / f"killed-{i}", rng.uniform(0.1, 0.95) * whole_s
            proc = _fedkd("run", QUICKSTART, *over, "--quiet", "--run-dir", str(run_dir))
            try:
                proc.wait(timeout=at)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            from fedkd.checkpoint import checkpoint_round
            killed_after = checkpoint_round(run_dir) if run_dir.exists() else None
            resumes = 0
            while json.loads((run_dir / "run.json").read_text())["status"] != "complete" and resumes < 3:
                _fedkd("run", "--resume", str(run_dir), "--quiet").communicate()
                resumes += 1
            same = _records(run_dir) == reference
            trials.append({"kill_at_s": round(at, 1), "last_checkpoint": killed_after,
                           "resumes": resumes, "identical": same})
            print(json.dumps(trials[-1]), file=sys.stderr)
    return {"uninterrupted_s": round(whole_s, 1), "trials": trials,
            "identical": sum(t["identical"] for t in trials)}


BAD_INPUTS = [
    ("malformed YAML", "bad.yaml", "experiment: {name: x\n"),
    ("YAML whose top level is a list", "list.yaml", "- a\n- b\n"),
    ("unknown key", None, "trian.rounds=3"),
    ("unknown strategy", None, "strategy.name=fedprx"),
    ("lr=inf", None, "train.lr=inf"),
    ("lr=1e30", None, "train.lr=1e30"),
    ("experiment.name with ..", None, "experiment.name=../../x"),
    ("output_dir is a file", None, "experiment.output_dir={tmp}/afile"),
    ("client_cpus larger than the machine", None, "simulation.client_cpus=64"),
    ("hf: dataset without network", None, "data.dataset=hf:ylecun/mnist"),
]


def bad_inputs(tmp: Path) -> list[dict]:
    (tmp / "afile").write_text("x")
    rows = []
    for what, filename, content in BAD_INPUTS:
        if filename:
            (tmp / filename).write_text(content)
            argv = ["run", str(tmp / filename)]
        else:
            argv = ["run", QUICKSTART, f"experiment.output_dir={tmp}/runs", content.format(tmp=tmp)]
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fedkd.cli", *argv], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"})
        lines = proc.stderr.strip().splitlines()
        rows.append({"input": what, "exit": proc.returncode, "lines": len(lines),
                     "message": lines[-1] if lines else "", "seconds": round(time.perf_counter() - started, 1),
                     "run_dirs_left": len(list((tmp / "runs").glob("*"))) if (tmp / "runs").exists() else 0})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def markdown(results: dict) -> str:
    """The tables of bench/reliability.md from the results file."""
    def table(head: list[str], rows: list[list]) -> list[str]:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]

    def acc(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    out: list[str] = []
    if "faults" in results:
        out += ["### Faults injected (clients 0 and 1 of 6, every round)", ""]
        out += table(["strategy", "fault", "status", "rounds skipped", "updates rejected",
                      "failed calls", "final accuracy", "vs fault-free"],
                     [[r["strategy"], r["fault"], r["status"], r["skipped_rounds"], r["rejected"],
                       r["failures"], acc(r["accuracy"]),
                       "n/a" if r["vs_fault_free"] is None else f"{r['vs_fault_free']:+.4f}"]
                      for r in results["faults"]]) + [""]
    if "kills" in results:
        k = results["kills"]
        out += [f"### kill -9 at random points, then `--resume` ({k['identical']}/{len(k['trials'])} "
                f"identical; uninterrupted run {k['uninterrupted_s']} s)", ""]
        out += table(["trial", "killed at (s)", "last checkpoint", "resumes", "identical"],
                     [[i, t["kill_at_s"], t["last_checkpoint"], t["resumes"], t["identical"]]
                      for i, t in enumerate(k["trials"])]) + [""]
    if "bad_inputs" in results:
        out += ["### Bad inputs", ""]
        out += table(["input", "exit", "stderr lines", "run dirs left", "message"],
                     [[r["input"], r["exit"], r["lines"], r["run_dirs_left"],
                       "`" + r["message"].replace("|", "\\|") + "`"] for r in results["bad_inputs"]])
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="faults,kills,bad_inputs")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench/results/reliability.json"))
    parser.add_argument("--markdown", action="store_true", help="print the tables of --out and stop")
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.markdown:
        print(markdown(results), end="")
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        parts = args.parts.split(",")
        if "bad_inputs" in parts:
            results["bad_inputs"] = bad_inputs(tmp)
        if "faults" in parts:
            results["faults"] = fault_table(tmp)
        if "kills" in parts:
            results["kills"] = kill_resume(tmp, args.kills)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
