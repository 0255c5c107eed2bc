"""The CUDA path of client algorithms: one client alone on `cpu` and on `cuda`, side by side.

Client algorithms are plain PyTorch, so the lent GPU machine (torch with CUDA, but no Flower
runtime and no Ray) can run them through `ClientRuntime.run`, the path a ClientApp takes: arrays
received and moved onto the device, state saved to and loaded from the store (on CPU) each round,
uploads detached to CPU. Each variant trains `--rounds` rounds of one client fed its own upload
(bench/one_client.py) on each device, then evaluates. A device mismatch anywhere in a method's
train or evaluate step fails its cuda run; the accuracies show both paths learn alike (they are
not bit-identical: CUDA kernels sum in another order).

    python bench/gpu_check.py configs/experiment/std-cifar10.yaml --rounds 3 \\
        --variant fedavg method.name=fedavg --variant pse method.name=pse [--json out.json]

Prints per variant and device the median s/round over rounds 2..R (a train call's seconds end with
the upload's copy to CPU, which waits for the GPU) and the last accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import traceback

import torch

from one_client import train_alone  # bench/ is the script's directory


def device_run(config: str, overrides: list[str], device: str, client: int,
               rounds: int) -> dict[str, object]:
    """{"s_per_round", "accuracy"} of one variant on one device, or {"error": traceback}."""
    try:
        seconds, accuracy = [], None
        # a GPU simulation's config also gives each client a GPU share; validation asks for it
        device_overrides = [f"device.type={device}"] + (["simulation.client_gpus=1"] if device == "cuda" else [])
        for _, secs, acc in train_alone(config, [*overrides, *device_overrides], client, rounds):
            seconds.append(secs)
            accuracy = acc
        return {"s_per_round": statistics.median(seconds[1:] or seconds), "accuracy": accuracy()}
    except Exception:  # one method failing on cuda is a finding, not the end of the check
        return {"error": traceback.format_exc()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--variant", nargs="+", action="append", required=True,
                        metavar=("LABEL", "KEY=VALUE"), help="a label and its overrides; repeatable")
    args = parser.parse_args()
    devices = args.devices.split(",")
    if "cuda" in devices:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    results: dict[str, dict[str, dict[str, object]]] = {}
    for label, *overrides in args.variant:
        results[label] = {d: device_run(args.config, overrides, d, args.client, args.rounds)
                          for d in devices}
        cells = [f"{d}: " + (f"{r['s_per_round']:.3f} s/round, accuracy {r['accuracy']:.4f}"
                             if "error" not in r else "FAILED")
                 for d, r in results[label].items()]
        print(f"{label}: " + "; ".join(cells), flush=True)
        for d, r in results[label].items():
            if "error" in r:
                print(f"  {d} error:\n{r['error']}", flush=True)
        if args.json:  # after each variant: a run cut off by its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"config": args.config, "client": args.client, "rounds": args.rounds,
                           "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
