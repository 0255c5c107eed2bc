"""Runs a method's client algorithm for one client: data, state, device, timing, failure capture.

Both execution paths use it: the ClientApp inside a Ray worker (one runtime per
process, cached by config) and a plain in-process loop (`run_direct`, the
reference that the one-client simulation must reproduce). Threads per client
are set here, so every path trains under the same torch thread count.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fedkd import registry
from fedkd.clients.base import Arrays, ClientAlgorithm, ClientData, RoundInfo
from fedkd.config import FedkdConfig, from_yaml
from fedkd.data import FederatedData, load_federated
from fedkd.faults import corrupt, fires, in_ray_worker, kill_this_process
from fedkd.state import ClientStateStore, open_store
from fedkd.validation import NORM_KEY, UPDATE_NORM, validate_update
from fedkd.wire import NUM_EXAMPLES, ClientOutcome, as_tensor_dict, nbytes


def resolve_device(kind: str) -> torch.device:
    """`cpu`, `cuda`, or `auto` (cuda when available)."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(kind)


#: glibc mallopt parameter (malloc.h): M_ARENA_MAX
_M_ARENA_MAX = -8
_MALLOC: list[Any] = []  # the loaded libc, once tamed ([None] where it is not glibc)


def _libc() -> Any:
    if not _MALLOC:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 -- glibc only
            _MALLOC.append(libc)
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tame
            _MALLOC.append(None)
    return _MALLOC[0]


def tame_malloc() -> None:
    """Two glibc arenas in this process and in the processes it starts (glibc only; idempotent).

    A worker's many threads (gRPC, Ray) would otherwise each get an arena that keeps its freed
    pages. The freed model-sized buffers of each client (the update, its float64 copy, the
    compensated sum's temporaries) go back to the system with `release_memory` after each group.
    glibc's mmap threshold is left dynamic on purpose: fixing it at 128 KiB (as fedkd did from
    issue 21 to 2026-12-06) mmapped and unmapped every activation tensor of every batch, a page-
    fault storm that took ~40% of a worker's CPU in the kernel and made a ResNet-8 round on
    CIFAR-10 1.9x slower (bench/scale.md, "Allocator"); it saved 5% of peak memory at N=500.
    Rounds timed since carry `fedkd.recorder.TIMING_BASIS` 2."""
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    libc = _libc()
    if libc is not None and len(_MALLOC) == 1:
        libc.mallopt(_M_ARENA_MAX, 2)
        _MALLOC.append(True)  # tamed


def release_memory() -> None:
    """Give freed heap pages back to the system (after a group of clients; a few ms)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


#: clients whose tensors a process keeps (CPU tensors share the loaded arrays' memory, but a
#: client built on demand from index arrays, or moved to a GPU, is a copy)
CACHED_CLIENTS = 256
TRAIN_CALLS = "fedkd.train_calls"  # completed train calls of this client, kept in its state


class InjectedFailure(RuntimeError):
    """Raised for clients listed in the `faults` config section."""


class ClientRuntime:
    """Everything one process needs to run any client of one run."""

    def __init__(self, cfg: FedkdConfig, state_dir: str | Path) -> None:
        tame_malloc()
        self.cfg = cfg
        torch.set_num_threads(cfg.device.threads_per_client)
        self.device = resolve_device(cfg.device.type)
        self.data: FederatedData = load_federated(cfg.data, cfg.experiment.seed)
        spec = registry.METHODS[cfg.method["name"]]
        self.algorithm: ClientAlgorithm = spec.client(
            cfg, registry.method_settings(cfg), self.data.input_shape, self.data.num_classes,
            self.device)
        self.store: ClientStateStore = open_store(state_dir)  # a directory or a state server
        self._tensors: OrderedDict[int, ClientData] = OrderedDict()

    def client_data(self, pid: int) -> ClientData:
        """A client's split as tensors on the device (the last CACHED_CLIENTS are kept: a large
        population's clients are built on demand, and must not pile up in every worker)."""
        if pid in self._tensors:
            self._tensors.move_to_end(pid)
        else:
            while len(self._tensors) >= CACHED_CLIENTS:
                self._tensors.popitem(last=False)
            split = self.data.clients[pid]
            def as_t(a: Any) -> torch.Tensor:  # labels -> int64; regression targets stay float
                t = torch.as_tensor(a)
                return (t if t.is_floating_point() else t.long()).to(self.device)

            self._tensors[pid] = ClientData(as_t(split.x_train), as_t(split.y_train),
                                            as_t(split.x_test), as_t(split.y_test))
        return self._tensors[pid]

    def _inject(self, pid: int, server_round: int, phase: str) -> str | None:
        """Apply the `faults` section before the client's work: raise, kill (inside a Ray worker
        only; elsewhere it raises, so an in-process run or pytest survives) or slow. Returns the
        kind that corrupts the update after training, if that is the fault (see `FaultConfig`)."""
        f = self.cfg.faults
        if not fires(f, self.cfg.experiment.seed, pid, server_round, phase):
            return None
        where = f"client {pid}, round {server_round}, {phase}"
        if f.kind == "kill":
            if in_ray_worker():
                kill_this_process()
            raise InjectedFailure(f"injected kill outside a Ray worker (raised instead): {where}")
        if f.kind == "slow":
            time.sleep(f.seconds)
            return None
        if f.kind == "raise":
            raise InjectedFailure(f"injected failure: {where}")
        return f.kind

    def _validate(self, arrays: Arrays, received: Arrays, info: RoundInfo
                  ) -> tuple[str | None, float | None]:
        """(why this train update is rejected or None, its norm when the norm check is on)."""
        median = info.server_config.get(NORM_KEY)
        return validate_update(arrays, received, self.algorithm.expected_arrays(info),
                               self.cfg.validation, None if median is None else float(median))

    def _wire_bytes(self, arrays: Arrays | None, info: RoundInfo) -> int:
        if not arrays:
            return 0
        compressed = self.algorithm.wire_bytes(arrays, info)
        return nbytes(arrays) if compressed is None else compressed

    def run(self, phase: str, pid: int, received: Arrays, server_round: int,
            server_config: dict[str, Any]) -> ClientOutcome:
        """One client's train or evaluate call; an exception becomes a failed outcome with traceback."""
        started = time.perf_counter()
        try:
            fault = self._inject(pid, server_round, phase)
            info = RoundInfo(pid, server_round, self.cfg.experiment.seed, server_config)
            # global RNG too (dropout, noise): the same in a Ray worker and in a direct loop
            torch.manual_seed(int(info.generator(salt=7 if phase == "train" else 8).initial_seed()))
            data = self.client_data(pid)
            on_device = {k: v.to(self.device) for k, v in received.items()}
            state = self.store.load(pid)
            metrics: dict[str, float]
            arrays = None
            rejected = None
            if phase == "train":
                result = self.algorithm.train(on_device, state, data, info)
                arrays = as_tensor_dict(result.arrays)
                if fault is not None:
                    arrays = corrupt(fault, arrays, received, self.cfg.faults.factor)
                rejected, norm = self._validate(arrays, received, info)
                weight = result.num_examples if result.weight is None else result.weight
                # num-examples is what strategies weigh by; train-examples what was trained on
                metrics = {**result.metrics, NUM_EXAMPLES: weight, "train-examples": result.num_examples}
                if state:  # stateless clients (plain FedAvg) cost no file I/O
                    state[TRAIN_CALLS] = state.get(TRAIN_CALLS, 0) + 1
                    metrics["train-calls"] = state[TRAIN_CALLS]
                    self.store.save(pid, state)
                if norm is not None:
                    metrics[UPDATE_NORM] = norm
            else:
                ev = self.algorithm.evaluate(on_device, state, data, info)
                metrics = {**ev.metrics, "loss": ev.loss, "accuracy": ev.accuracy,
                           NUM_EXAMPLES: ev.num_examples}
            metrics.update({"seconds": time.perf_counter() - started,
                            "bytes-received": self._wire_bytes(received, info),
                            "bytes-sent": self._wire_bytes(arrays, info),
                            "worker-pid": os.getpid()})
            if rejected is not None:
                return ClientOutcome(pid, metrics, None, rejected=rejected)
            return ClientOutcome(pid, metrics, arrays)
        except Exception:  # a failing client must not take its group down
            return ClientOutcome(pid, {}, None, f"client {pid} (round {server_round}, {phase}):\n"
                                               f"{traceback.format_exc()}")


@lru_cache(maxsize=2)
def runtime_for(config_yaml: str, state_dir: str) -> ClientRuntime:
    """One runtime per process and run: the data and model are built once, not per message."""
    return ClientRuntime(from_yaml(config_yaml), state_dir)
