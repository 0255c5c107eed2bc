"""Where fedkd's per-client time goes, against bench/overhead.py's floor, in one process.

Runs the floor (way a: one model, one thread, plain loop) and then fedkd's real strategy loop and
ClientApp in-process (`fedkd.testing.InProcessGrid`, no Ray, one thread) on the same clients,
back to back, and prints both s/round and a `cProfile` of fedkd's own modules. Used for issue
21's "what remains" (bench/scale.md). Both sides see the same machine load, so read the ratio.

    FEDKD_DATA_DIR=../shared/data .venv/bin/python bench/profile_clients.py --clients 300
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=30, help="profile lines to print")
    args = ap.parse_args()
    sys.path.insert(0, str(BENCH))
    import overhead

    floor = overhead.run_floor(args.clients, args.rounds, 0)
    print("floor s/round", [round(x, 2) for x in floor["round_seconds"]])

    from fedkd.apps import run_server
    from fedkd.config import load_config
    from fedkd.recorder import Recorder
    from fedkd.runtime import tame_malloc
    from fedkd.simulation import prepare_run_dir, write_run_info
    from fedkd.testing import InProcessGrid

    tame_malloc()  # as in a run's processes
    cfg = load_config("quickstart", [
        f"data.num_clients={args.clients}", "data.partitioner.name=iid", "model.name=cnn",
        f"train.rounds={args.rounds}", "train.lr=0.01", "train.batch_size=10", "evaluation.every=1",
        "evaluation.fraction_clients=1.0", "device.threads_per_client=1"])  # overhead.py's way c
    run_dir = Path(tempfile.mkdtemp(prefix="fedkd-profile-"))
    prepare_run_dir(cfg, run_dir)
    write_run_info(run_dir, cfg, "running", None)
    recorder = Recorder(run_dir)
    profile = cProfile.Profile()
    profile.enable()
    try:
        run_server(InProcessGrid(1), cfg, run_dir, recorder)
    finally:
        profile.disable()
        recorder.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print("fedkd s/round (profiled)", [round(r["seconds"], 2) for r in records if r["phase"] == "round"])
    pstats.Stats(profile).sort_stats("cumulative").print_stats(r"fedkd|clients|strategies", args.top)


if __name__ == "__main__":
    main()
