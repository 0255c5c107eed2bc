"""Overhead of fedkd against a plain PyTorch loop and a plain Flower simulation.

One FedAvg workload (N clients, IID split of `mnist5k` with test fraction 0.25, PFLlib's CNN,
1 local epoch, batch 10, SGD lr 0.01, every client trains every round, then every client evaluates
the global model on its test part; 5 rounds, 1 torch thread per client, seed 0) run three ways,
each in its own subprocess so imports, Ray start-up and memory count per way:
  (a) floor:  one process, a plain loop over clients, one model object, FedAvg = example-weighted
              mean of state_dicts (data from fedkd's `load_federated`, init from `build_model`);
  (b) Flower: a ClientApp written as Flower's examples do (model rebuilt per call, dataset cached
              per worker by `load_federated`), one node per client, FedAvg, 1 CPU per Ray actor;
  (c) fedkd:  `fedkd.simulation.run_experiment` on quickstart.yaml with the benchmark's overrides.
Per way and N: wall time of the subprocess (imports, Ray start and stop included; for (c) minus the
time in `fedkd.report.write_outputs`, i.e. report rendering, kept as `report_s`), round 1 and the
median s/round after it ((a) timed in the loop; (b) between `configure_train` calls, the last
round ending when `start` returns; (c) metrics.jsonl "round" records, same definition), peak PSS
and RSS sums every 0.5 s over the process tree plus every process started after the run began
that carries the run's tag in its environment (Ray's gcs_server, raylet and workers detach from
the tree), and the final example-weighted accuracy. Children get RAY_ADDRESS=local so they never
join another Ray cluster on the machine.

Run on a quiet machine (Ray workers run at nice 15 and starve next to any busy process):
    .venv/bin/python bench/overhead.py --sizes 10,100,500,1000
Results merge into bench/results/overhead.json per (way, N): pairs already there (same --rounds)
are skipped unless --force, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedkd.config import DataConfig, PartitionerConfig
from fedkd.data import ClientSplit, FederatedData, load_federated
from fedkd.models import build_model

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PREFIX = "OVERHEAD_RESULT "
TAG_ENV, FLOWER_ENV = "FEDKD_OVERHEAD_TAG", "FEDKD_OVERHEAD_FLOWER"
WAYS = {"a": "floor", "b": "Flower", "c": "fedkd"}
LR, BATCH, MIB = 0.01, 10, 2**20


# -- the workload, shared by (a) and (b) -----------------------------------------------------------
def federated(n: int, seed: int) -> FederatedData:
    """fedkd's own IID split (cached per process by `load_federated`)."""
    return load_federated(DataConfig(dataset="mnist5k", num_clients=n, test_fraction=0.25,
                                     partitioner=PartitionerConfig(name="iid")), seed)


def new_model(data: FederatedData, seed: int) -> torch.nn.Module:
    return build_model("cnn", data.input_shape, data.num_classes, seed)


def local_train(model: torch.nn.Module, split: ClientSplit, rnd: int, pid: int, seed: int) -> int:
    """One epoch of SGD; batch order seeded like fedkd's clients, so all ways see the same order."""
    x, y = torch.as_tensor(split.x_train), torch.as_tensor(split.y_train)
    gen = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, rnd, pid, 0]).generate_state(1)[0]))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    order = torch.randperm(len(y), generator=gen)
    for start in range(0, len(y), BATCH):
        idx = order[start:start + BATCH]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return len(y)


@torch.no_grad()
def correct(model: torch.nn.Module, split: ClientSplit) -> int:
    model.eval()
    x, y = torch.as_tensor(split.x_test), torch.as_tensor(split.y_test)
    return int((model(x).argmax(1) == y).sum()) if len(y) else 0


# -- (a) floor ------------------------------------------------------------------------------------
def run_floor(n: int, rounds: int, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = federated(n, seed)
    model = new_model(data, seed)
    global_sd = {k: v.clone() for k, v in model.state_dict().items()}
    total = sum(len(c.y_train) for c in data.clients)
    tested = sum(len(c.y_test) for c in data.clients)
    times, acc = [], 0.0
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        acc_sd = {k: torch.zeros_like(v) for k, v in global_sd.items()}
        for pid, split in enumerate(data.clients):
            model.load_state_dict(global_sd)
            weight = local_train(model, split, rnd, pid, seed) / total
            for k, v in model.state_dict().items():
                acc_sd[k] += v * weight
        global_sd = acc_sd
        model.load_state_dict(global_sd)
        acc = sum(correct(model, c) for c in data.clients) / tested
        times.append(time.perf_counter() - t0)
    return {"round_seconds": times, "accuracy": acc}


# -- (b) plain Flower: module-level ClientApp, defined only where Flower is used (not in (a)) ------
if os.environ.get(FLOWER_ENV):
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    client_app = ClientApp()

    def _client(msg: Message, context: Context) -> tuple[int, int, ClientSplit, torch.nn.Module]:
        """Partition looked up and model rebuilt per call, as Flower's examples do."""
        torch.set_num_threads(1)
        pid, seed = int(context.node_config["partition-id"]), int(msg.content["config"]["seed"])
        data = federated(int(context.node_config["num-partitions"]), seed)
        model = new_model(data, seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return pid, seed, data.clients[pid], model

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        pid, seed, split, model = _client(msg, context)
        n = local_train(model, split, int(msg.content["config"]["server-round"]), pid, seed)
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": n})})
        return Message(content=content, reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _, _, split, model = _client(msg, context)
        n = len(split.y_test)
        metrics = MetricRecord({"accuracy": correct(model, split) / max(n, 1), "num-examples": n})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def run_flower(n: int, rounds: int, seed: int) -> dict[str, Any]:
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    stamps: list[float] = []
    out: dict[str, float] = {}

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Any:
            stamps.append(time.perf_counter())
            return super().configure_train(server_round, arrays, config, grid)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n,
                               min_evaluate_nodes=n, min_available_nodes=n)
        initial = ArrayRecord(build_model("cnn", (1, 28, 28), 10, seed).state_dict())  # no data here
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                                train_config=ConfigRecord({"seed": seed}),
                                evaluate_config=ConfigRecord({"seed": seed}))
        stamps.append(time.perf_counter())
        out["accuracy"] = float(result.evaluate_metrics_clientapp[rounds]["accuracy"])

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return {"round_seconds": [float(d) for d in np.diff(stamps)], "accuracy": out["accuracy"]}


# -- (c) fedkd -------------------------------------------------------------------------------------
def run_fedkd(n: int, rounds: int, seed: int) -> dict[str, Any]:
    import fedkd.report
    from fedkd.config import load_config
    from fedkd.simulation import run_experiment

    spent, render = [0.0], fedkd.report.write_outputs

    def timed_render(run_dir: Path, records: Any = None) -> dict:  # run_experiment imports it at call time
        t0 = time.perf_counter()
        try:
            return render(run_dir, records)
        except Exception as exc:  # noqa: BLE001 -- the report's own bug must not lose the figures
            print(f"report failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None
        finally:
            spent[0] += time.perf_counter() - t0

    fedkd.report.write_outputs = timed_render  # type: ignore[assignment]
    overrides = [f"data.num_clients={n}", "data.partitioner.name=iid", "model.name=cnn",
                 f"train.rounds={rounds}", "train.lr=0.01", "train.batch_size=10",
                 "train.local_epochs=1", "evaluation.every=1", "evaluation.fraction_clients=1.0",
                 "device.threads_per_client=1", f"experiment.seed={seed}"]
    run_dir = Path(tempfile.mkdtemp(prefix=f"fedkd-overhead-c{n}-"))
    cfg = load_config(ROOT / "configs/experiment/quickstart.yaml", overrides)
    run_experiment(cfg, run_dir, quiet=True)
    with (run_dir / "metrics.jsonl").open() as f:
        recs = [r for r in map(json.loads, f) if r.get("phase") == "round"]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"accuracy": None}
    return {"round_seconds": [r["seconds"] for r in sorted(recs, key=lambda r: r["round"])],
            "accuracy": summary["accuracy"], "report_s": spent[0], "run_dir": str(run_dir)}


RUNNERS = {"a": run_floor, "b": run_flower, "c": run_fedkd}


# -- the parent: one subprocess per (way, N), memory sampled from outside ------------------------
def _tagged(pid: int, tag: str) -> bool | None:
    """Whether a process carries the run's tag (None: no environment readable yet, ask again)."""
    import psutil

    try:
        env = psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return False
    return (env.get(TAG_ENV) == tag) if env else None


def _kind(proc: Any, root: int) -> str:
    """driver, actor, raylet, gcs, or ray-aux (dashboard, agents, monitors, other workers)."""
    if proc.pid == root:
        return "driver"
    try:
        name, cmd = proc.name(), " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 -- gone meanwhile
        return "ray-aux"
    if "ClientAppActor" in name or "ClientAppActor" in cmd:
        return "actor"
    if name in ("raylet", "gcs_server"):
        return "raylet" if name == "raylet" else "gcs"
    parts = proc.cmdline() if hasattr(proc, "cmdline") else []
    script = next((Path(p).stem for p in parts if p.endswith(".py")), None)
    module = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "-m"), None)
    return f"ray-aux:{script or module or (parts[0] if parts else name)}"


def _sample(root: int, before: set[int], seen: dict[int, bool | None], tag: str,
            per_pid: dict[int, tuple[str, int]] | None = None) -> tuple[int, int, int]:
    """(PSS sum, RSS sum, processes) of the child's tree plus new processes carrying its tag;
    `per_pid` collects each process's (kind, peak PSS)."""
    import psutil

    pids = {root}
    with contextlib.suppress(psutil.Error):
        pids |= {c.pid for c in psutil.Process(root).children(recursive=True)}
    for pid in psutil.pids():
        if pid not in before and seen.get(pid) is None:
            seen[pid] = _tagged(pid, tag)
    pids |= {pid for pid, ok in seen.items() if ok}
    pss = rss = count = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            mem = proc.memory_full_info()
            pss, rss, count = pss + mem.pss, rss + mem.rss, count + 1
            if per_pid is not None:
                known = per_pid.get(pid, ("ray-aux", 0))[0]  # an idle worker becomes an actor
                kind = known if known.startswith(("driver", "actor", "raylet", "gcs")) else _kind(proc, root)
                per_pid[pid] = (kind, max(mem.pss, per_pid.get(pid, (kind, 0))[1]))
    return pss, rss, count


def measure(way: str, n: int, rounds: int, seed: int) -> dict[str, Any]:
    import psutil

    tag = uuid.uuid4().hex
    env = {**os.environ, TAG_ENV: tag, "RAY_ADDRESS": "local",
           "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)}
    if way == "b":
        env[FLOWER_ENV] = "1"
    cmd = [sys.executable, __file__, "--child", way, "--sizes", str(n), "--rounds", str(rounds),
           "--seed", str(seed)]
    before, seen = set(psutil.pids()), {}  # seen: new pid -> carries our tag (None: ask again)
    peak_pss = peak_rss = procs = 0
    per_pid: dict[int, tuple[str, int]] = {}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        while proc.poll() is None:
            pss, rss, count = _sample(proc.pid, before, seen, tag, per_pid)
            peak_pss, peak_rss, procs = max(peak_pss, pss), max(peak_rss, rss), max(procs, count)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)  # returns at exit, so the wall time is not rounded to 0.5 s
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        lines = [ln for ln in out.read().decode(errors="replace").splitlines() if ln.startswith(PREFIX)]
        if proc.returncode != 0 or not lines:
            tail = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"way {way}, N={n}: exit {proc.returncode}\n{tail}")
    time.sleep(3)  # Ray's detached processes should be gone by now; stop any left (ours by tag)
    for pid in [pid for pid, ok in seen.items() if ok and _tagged(pid, tag)]:
        print(f"     warning: process {pid} of way {way} outlived the run; terminating it")
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).terminate()
    res = json.loads(lines[-1][len(PREFIX):])
    times = res.pop("round_seconds")
    report = res.get("report_s", 0.0)
    return {"way": way, "n": n, "rounds": rounds, "seed": seed, "wall_s": wall - report,
            "wall_total_s": wall, "round1_s": times[0] if times else None,
            "s_per_round": statistics.median(times[1:]) if len(times) > 1 else None,
            "round_seconds": times, "peak_pss_mib": peak_pss / MIB, "peak_rss_mib": peak_rss / MIB,
            "max_processes": procs, "peak_pss_by_process_mib": _by_kind(per_pid), **res, "cpus": os.cpu_count(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _by_kind(per_pid: dict[int, tuple[str, int]]) -> dict[str, list[float]]:
    """kind -> each of its processes' peak PSS (MiB, largest first)."""
    out: dict[str, list[float]] = {}
    for kind, peak in per_pid.values():
        out.setdefault(kind, []).append(round(peak / MIB, 1))
    return {k: sorted(v, reverse=True) for k, v in sorted(out.items())}


def _f(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(res: dict[str, dict], sizes: list[int]) -> str:
    keys = [("wall_s", 2), ("round1_s", 2), ("s_per_round", 2), ("peak_pss_mib", 0),
            ("peak_rss_mib", 0)]
    lines = ["| way | N | wall (s) | round 1 (s) | s/round after 1st | peak PSS (MiB) | "
             "peak RSS (MiB) | final acc |", "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        a = res.get(f"a:{n}")
        for w in (w for w in WAYS if f"{w}:{n}" in res):
            r = res[f"{w}:{n}"]
            cells = [_f(r[k], d) for k, d in keys] + [_f(r["accuracy"], 4)]
            lines.append(f"| ({w}) {WAYS[w]} | {n} | " + " | ".join(cells) + " |")
        for w in (w for w in "bc" if a and f"{w}:{n}" in res):
            r = res[f"{w}:{n}"]
            cells = [f"**{r[k] / a[k]:.2f}x**" if r[k] is not None and a[k] else "-" for k, _ in keys]
            lines.append(f"| ratio {w}/a | {n} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def targets(res: dict[str, dict]) -> str:
    """The targets for fedkd (c), PASS/FAIL where the N they need were measured."""
    def v(w: str, n: int, k: str) -> float | None:
        return (res.get(f"{w}:{n}") or {}).get(k)

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y else None

    grow = {w: ratio(v(w, 1000, "s_per_round"), v(w, 100, "s_per_round")) for w in "ac"}
    checks = [(f"fedkd s/round after the first <= 0.8x floor at N={n}",
               ratio(v("c", n, "s_per_round"), v("a", n, "s_per_round")), 0.8, "x") for n in (100, 500)]
    checks += [("fedkd whole run <= 1.8x floor at N=100", ratio(v("c", 100, "wall_s"), v("a", 100, "wall_s")), 1.8, "x"),
               ("fedkd peak PSS at N=500 <= 1.8 GiB", v("c", 500, "peak_pss_mib"), 1.8 * 1024, " MiB"),
               ("fedkd s/round growth N=100->1000 <= the floor's", grow["c"], grow["a"], "x")]
    lines = ["Targets (fedkd = way c, floor = way a):"]
    for name, val, limit, unit in checks:
        ok = "n/a (not measured)" if val is None or limit is None else "PASS" if val <= limit else "FAIL"
        lines.append(f"  {ok:<19} {name}: {_f(val)}{unit} (limit {_f(limit)}{unit})")
    return "\n".join(lines)


def measure_cached(store: dict, results: dict, key: str, label: str, rounds: int, force: bool,
                   out: Path, measure_one: Callable[[], dict]) -> dict | None:
    """Measure one cell unless `results` holds it for these rounds; save `store` after each.

    Returns the new figures; None when skipped or failed (a failure is printed and the other
    cells still run: each is worth having). Shared with bench/scale.py.
    """
    if key in results and results[key].get("rounds") == rounds and not force:
        print(f"skip {label}: already in {out}")
        return None
    print(f"run  {label} ...", flush=True)
    try:
        results[key] = measure_one()
    except RuntimeError as exc:
        print(f"     FAILED: {exc}", flush=True)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(store, indent=1))
    return results[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,500,1000", help="client counts N, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ways", default="a,b,c", help="a = floor, b = plain Flower, c = fedkd")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "overhead.json")
    ap.add_argument("--force", action="store_true", help="re-run (way, N) pairs already in --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=list(WAYS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:  # run via the importable module, so Ray workers unpickle the ClientApp by name
        sys.path.insert(0, str(BENCH))
        import overhead

        res = overhead.RUNNERS[args.child](sizes[0], args.rounds, args.seed)
        print(PREFIX + json.dumps(res), flush=True)
        return
    store = json.loads(args.out.read_text()) if args.out.exists() else {"results": {}}
    results: dict[str, dict] = store["results"]
    for n in sizes:
        for way in args.ways.split(","):
            key = f"{way}:{n}"
            if measure_cached(store, results, key, f"({way}) {WAYS[way]} N={n}", args.rounds,
                              args.force, args.out,
                              lambda: measure(way, n, args.rounds, args.seed)) is None:
                continue
            print(f"     wall {results[key]['wall_s']:.1f} s, acc {_f(results[key]['accuracy'], 4)}")
    print(f"\n{args.rounds} rounds; wall of (c) excludes report rendering (report_s in the JSON)\n")
    print(table(results, sizes) + "\n\n" + targets(results))


if __name__ == "__main__":
    main()
