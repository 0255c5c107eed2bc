"""Scale: populations of 1,000 / 10,000 / 100,000 clients with cohorts of 100 / 1,000 per round.

Each cell is one `fedkd.simulation.run_experiment` in its own subprocess (FedAvg, PFLlib's CNN,
pooled `pfllib-mnist`: `iid` partitioner where every client can get >= 2 samples, else `sample`,
clients drawn with replacement; 1 local epoch, batch 10, SGD 0.01; the cohort trains and the
same fraction evaluates every round; 1 torch thread per client; seed 0). Per cell:
  setup_s    process start -> the first round's configure_train, minus Ray's own start
             (`ray_start_s`, the time inside `ray.init`); imports, data, partition, run dir
  s_per_round  median round time after the first (metrics.jsonl "round" records)
  report_s   time in `fedkd.report.write_outputs` (the report; its code is another issue's)
  peak_pss_mib  peak PSS sum over the process tree and Ray's processes (bench/overhead.py's
             sampler, with the per-process peaks)
Then one 2-CPU node against two 1-CPU nodes (--nodes, both local clusters) and bench/overhead.py's
table (floor vs fedkd, every client training) for --overhead-sizes.

    .venv/bin/python bench/scale.py            # the whole grid (long)
    .venv/bin/python bench/scale.py --quick    # 2 rounds, cohorts of 100 only, no overhead table
Results: bench/results/scale.json (merged per cell; --force re-runs cells already there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PREFIX = "SCALE_RESULT "
POOL = 70_000  # pfllib-mnist's pooled images
MIB = 2**20


def overrides(population: int, cohort: int, rounds: int, seed: int) -> list[str]:
    fraction = cohort / population
    partitioner = "iid" if population * 2 <= POOL else "sample"
    return ["data.dataset=pfllib-mnist", f"data.partitioner.name={partitioner}",
            f"data.num_clients={population}", "model.name=cnn", f"train.rounds={rounds}",
            "train.lr=0.01", "train.batch_size=10", "train.local_epochs=1",
            f"train.fraction_clients={fraction}", f"evaluation.fraction_clients={fraction}",
            "evaluation.every=1", "device.threads_per_client=1", f"experiment.seed={seed}"]


def child(population: int, cohort: int, rounds: int, seed: int) -> dict[str, Any]:
    """One run in this process, with its phases timed (see the module docstring)."""
    started = time.perf_counter()
    import ray

    import fedkd.report
    from fedkd.config import load_config
    from fedkd.simulation import run_experiment
    from fedkd.strategies.grouped import GroupedClients

    stamps: dict[str, float] = {"ray": 0.0, "report": 0.0}
    init, render, configure = ray.init, fedkd.report.write_outputs, GroupedClients.configure_train

    def timed_init(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return init(*args, **kwargs)
        finally:
            stamps["ray"] += time.perf_counter() - t0

    def timed_render(run_dir: Path) -> Any:
        t0 = time.perf_counter()
        try:
            return render(run_dir)
        except Exception as exc:  # noqa: BLE001 -- the report is another issue's code: measure on
            stamps["report_error"] = f"{type(exc).__name__}: {exc}"[:300]  # type: ignore[assignment]
            return None
        finally:
            stamps["report"] += time.perf_counter() - t0

    def first_round(self: Any, server_round: int, *args: Any, **kwargs: Any) -> Any:
        stamps.setdefault("round1", time.perf_counter())
        return configure(self, server_round, *args, **kwargs)

    ray.init = timed_init  # type: ignore[assignment]
    fedkd.report.write_outputs = timed_render  # type: ignore[assignment]
    GroupedClients.configure_train = first_round  # type: ignore[method-assign]
    run_dir = Path(tempfile.mkdtemp(prefix=f"fedkd-scale-{population}-{cohort}-"))
    cfg = load_config(ROOT / "configs/experiment/quickstart.yaml",
                      overrides(population, cohort, rounds, seed))
    run_experiment(cfg, run_dir, quiet=True)
    with (run_dir / "metrics.jsonl").open() as f:
        rounds_s = [r["seconds"] for r in sorted((r for r in map(json.loads, f) if r.get("phase") == "round"),
                                                  key=lambda r: r["round"])]
    summary_path = run_dir / "summary.json"  # written by the report
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"setup_s": stamps["round1"] - started - stamps["ray"], "ray_start_s": stamps["ray"],
            "round_seconds": rounds_s, "report_s": stamps["report"],
            "report_error": stamps.get("report_error"),
            "accuracy": summary.get("accuracy"), "run_dir": str(run_dir),
            "run_dir_mib": sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()) / MIB}


def measure(population: int, cohort: int, rounds: int, seed: int) -> dict[str, Any]:
    """The cell in a subprocess, memory sampled from outside (bench/overhead.py's sampler)."""
    import contextlib

    import psutil

    sys.path.insert(0, str(BENCH))
    from overhead import TAG_ENV, _by_kind, _sample, _tagged

    tag = uuid.uuid4().hex
    env = {**os.environ, TAG_ENV: tag, "RAY_ADDRESS": "local"}
    cmd = [sys.executable, __file__, "--child", f"{population},{cohort}", "--rounds", str(rounds),
           "--seed", str(seed)]
    before, seen, per_pid = set(psutil.pids()), {}, {}
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        while proc.poll() is None:
            pss, _, _ = _sample(proc.pid, before, seen, tag, per_pid)
            peak = max(peak, pss)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        lines = [ln for ln in out.read().decode(errors="replace").splitlines() if ln.startswith(PREFIX)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"population {population}, cohort {cohort}: exit {proc.returncode}\n"
                               + err.read().decode(errors="replace")[-3000:])
    time.sleep(3)
    for pid in [pid for pid, ok in seen.items() if ok and _tagged(pid, tag)]:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).terminate()
    res = json.loads(lines[-1][len(PREFIX):])
    times = res["round_seconds"]
    return {"population": population, "cohort": cohort, "rounds": rounds, "seed": seed,
            "wall_s": wall, "s_per_round": statistics.median(times[1:]) if len(times) > 1 else None,
            "round1_s": times[0] if times else None, "peak_pss_mib": peak / MIB,
            "peak_pss_by_process_mib": _by_kind(per_pid), **res, "cpus": os.cpu_count(),
            "load_avg_1m_at_end": os.getloadavg()[0], "when": time.strftime("%Y-%m-%dT%H:%M:%S")}


def nodes_compare(clients: int, rounds: int, seed: int) -> dict[str, Any]:
    """s/round of one run on a one-node cluster with 2 CPUs against two 1-CPU nodes (both on
    this machine, `fedkd.ray_cluster.local_cluster`): mnist5k iid, every client trains."""
    from fedkd.config import load_config
    from fedkd.ray_cluster import local_cluster
    from fedkd.simulation import run_experiment

    out: dict[str, Any] = {"clients": clients, "rounds": rounds}
    for label, layout in (("one 2-CPU node", [2]), ("two 1-CPU nodes", [1, 1])):
        with local_cluster(layout) as cluster:
            cfg = load_config(ROOT / "configs/experiment/quickstart.yaml", [
                "data.partitioner.name=iid", f"data.num_clients={clients}", "model.name=cnn",
                f"train.rounds={rounds}", "train.lr=0.01", "train.batch_size=10",
                "device.threads_per_client=1", f"experiment.seed={seed}",
                f"simulation.ray_address={cluster.address}"])
            run_dir = run_experiment(cfg, Path(tempfile.mkdtemp(prefix="fedkd-nodes-")), quiet=True)
            import ray

            if ray.is_initialized():
                ray.shutdown()
        with (run_dir / "metrics.jsonl").open() as f:
            recs = [r for r in map(json.loads, f)]
        times = [r["seconds"] for r in sorted((r for r in recs if r.get("phase") == "round"),
                                              key=lambda r: r["round"])]
        out[label] = {"round_seconds": times, "s_per_round": statistics.median(times[1:]),
                      "workers": len({r["worker_pid"] for r in recs if r.get("worker_pid")}),
                      "load_avg_1m": os.getloadavg()[0]}
        print(f"     {label}: s/round {out[label]['s_per_round']:.2f} (rounds {times})", flush=True)
    return out


def _f(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(cells: dict[str, dict]) -> str:
    lines = ["| population | cohort | partitioner | set-up (s, beyond Ray) | Ray start (s) | round 1 (s) | "
             "s/round after 1st | report (s) | wall (s) | peak PSS (MiB) | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(cells, key=lambda k: tuple(map(int, k.split(":")))):
        c = cells[key]
        part = "iid" if c["population"] * 2 <= POOL else "sample"
        lines.append(f"| {c['population']:,} | {c['cohort']:,} | {part} | {_f(c['setup_s'])} | "
                     f"{_f(c['ray_start_s'])} | {_f(c['round1_s'])} | {_f(c['s_per_round'], 2)} | "
                     f"{_f(c['report_s'])} | {_f(c['wall_s'])} | {_f(c['peak_pss_mib'], 0)} | "
                     f"{_f(c.get('load_avg_1m_at_end'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="1000:100,1000:1000,10000:100,10000:1000,100000:100,100000:1000",
                    help="population:cohort pairs, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds; cells 1000:100, 10000:100, 100000:100; 40 clients for --nodes; "
                         "no overhead table")
    ap.add_argument("--overhead-sizes", default="100,500,1000",
                    help="bench/overhead.py's floor-vs-fedkd table for these N ('' to skip)")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "scale.json")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=100, metavar="N",
                    help="also compare one 2-CPU node with two 1-CPU nodes on N clients (0: skip)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        population, cohort = map(int, args.child.split(","))
        print(PREFIX + json.dumps(child(population, cohort, args.rounds, args.seed)), flush=True)
        return
    if args.quick:
        args.rounds, args.cells = 2, "1000:100,10000:100,100000:100"
        if args.overhead_sizes == "100,500,1000":
            args.overhead_sizes = ""  # bench/overhead.py on its own (it takes longer than the rest)
        args.nodes = min(args.nodes, 40)
    sys.path.insert(0, str(BENCH))
    from overhead import measure_cached

    store = json.loads(args.out.read_text()) if args.out.exists() else {}
    cells: dict[str, dict] = store.setdefault("cells", {})
    for pair in args.cells.split(","):
        population, cohort = map(int, pair.split(":"))
        key = f"{population}:{cohort}"
        c = measure_cached(store, cells, key, f"population {population:,}, cohort {cohort:,}",
                           args.rounds, args.force, args.out,
                           lambda: measure(population, cohort, args.rounds, args.seed))
        if c is None:
            continue
        print(f"     set-up {c['setup_s']:.1f} s (+ Ray {c['ray_start_s']:.1f} s), "
              f"s/round {_f(c['s_per_round'], 2)}, report {c['report_s']:.1f} s, "
              f"peak PSS {c['peak_pss_mib']:,.0f} MiB", flush=True)
    if args.nodes:
        print(f"run  one 2-CPU node vs two 1-CPU nodes, {args.nodes} clients ...", flush=True)
        try:
            store["nodes"] = nodes_compare(args.nodes, max(args.rounds, 3), args.seed)
            args.out.write_text(json.dumps(store, indent=1))
        except Exception as exc:  # noqa: BLE001 -- keep the rest of the results
            print(f"     FAILED: {exc}", flush=True)
    if args.overhead_sizes:
        ov = BENCH / "results" / "overhead-scale.json"
        cmd = [sys.executable, str(BENCH / "overhead.py"), "--sizes", args.overhead_sizes,
               "--ways", "a,c", "--rounds", str(max(args.rounds, 2) + (0 if args.quick else 2)),
               "--out", str(ov)] + (["--force"] if args.force else [])
        print("run  " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=False)
        if ov.exists():
            store["overhead"] = json.loads(ov.read_text())["results"]
            args.out.write_text(json.dumps(store, indent=1))
    print(f"\n{args.rounds} rounds per cell\n\n" + table(cells))
    if "nodes" in store:
        n = store["nodes"]
        print("\n" + "\n".join(f"{k}: {v['s_per_round']:.2f} s/round ({n['clients']} clients)"
                               for k, v in n.items() if isinstance(v, dict)))


if __name__ == "__main__":
    main()
