"""Run Flower's Simulation Engine so that Ctrl-C, SIGTERM and a failed start end the run cleanly.

`flwr.simulation.run_simulation` alone does not: it runs the ServerApp in a thread that
nothing stops (it polls the grid until `simulation.timeout`), a signal lands in the middle
of Ray calls (tracebacks, a segfault), and a backend that cannot place one actor fails
while the ServerApp thread goes on waiting. Here the simulation runs in a worker thread
and the main thread only waits, so a signal is handled where Python can handle it. A
stop then (1) makes the ServerApp's next grid call raise `EngineStopped`, which ends its
strategy loop, (2) kills the client actors, so no one waits for a round to finish, and
(3) shuts Ray down; Flower's log is muted from then on (its errors are the stop's echo).
When Ray itself is gone (SIGTERM to the process group kills the raylet) a thread can stay
blocked in a Ray call: then the local Ray's processes are ended by pid, and once the report
is written the process leaves with `os._exit` (a watchdog does the same after 45 s).

`exit_on_signals` is the command line's half: it turns SIGINT/SIGTERM into `Interrupted`
in the main thread (the run's `finally` writes the report on the way out) and maps it to
exit 130/143 with one line naming the run directory.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedkd.config import ConfigError

#: seconds a stop waits for the ServerApp to reach its next grid call (it may be saving a round)
GRACE_S = 20.0
#: seconds a stop waits for Flower's engine threads once the actors are dead
SETTLE_S = 10.0
#: seconds after a signal when the process ends whatever it is doing
HARD_EXIT_S = 45.0
#: the signals a run ends on: Ctrl-C (also sent to the whole process group) and `kill`
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread; `run_dir` is set by the run it ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir: Path | None = None


class EngineError(RuntimeError):
    """The Simulation Engine could not start or run (one line, for the user)."""


class EngineStopped(BaseException):
    """Raised inside the ServerApp thread by its grid once a stop was asked for.

    A BaseException, so a strategy's `except Exception` does not swallow it.
    """


def mark_interrupted(exc: BaseException, run_dir: Path) -> None:
    """Tell `exit_on_signals` which run directory the interrupt left behind."""
    with contextlib.suppress(AttributeError):
        exc.run_dir = run_dir  # type: ignore[attr-defined]


# -- capacity: fail before anything starts -----------------------------------------------------


def _local_capacity(init_args: dict[str, Any]) -> tuple[float, float]:
    """CPUs and GPUs a fresh local Ray will see."""
    cpus = init_args.get("num_cpus")
    if cpus is None:
        try:  # what Ray itself detects (it honours cgroup limits)
            from ray._private.utils import get_num_cpus

            cpus = get_num_cpus()
        except Exception:  # noqa: BLE001 -- a private API; the plain count is close enough
            cpus = os.cpu_count() or 1
    gpus = init_args.get("num_gpus")
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return float(cpus), float(gpus)


def _cluster_capacity() -> tuple[float, float]:
    """The largest node of the joined cluster: one actor must fit on one node."""
    import ray

    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive", True)]
    cpus = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    gpus = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    return float(cpus), float(gpus)


def check_capacity(backend_config: dict[str, Any]) -> None:
    """ConfigError unless one client actor fits: `simulation.client_cpus`/`client_gpus` vs the machine.

    A local Ray is judged before it starts; a cluster only if this process has joined it
    already (otherwise the run-time check in the backend catches it).
    """
    import ray

    init_args = backend_config.get("init_args") or {}
    resources = backend_config.get("client_resources") or {}
    address = init_args.get("address")
    if ray.is_initialized():
        (cpus, gpus), where = _cluster_capacity(), "the largest node of the Ray cluster"
    elif address in (None, "", "local"):
        (cpus, gpus), where = _local_capacity(init_args), "this machine"
    else:
        return
    need_cpus = float(resources.get("num_cpus", 1))
    need_gpus = float(resources.get("num_gpus", 0))
    if need_cpus > cpus:
        raise ConfigError("simulation.client_cpus", need_cpus,
                          f"at most {cpus:g}, the CPUs of {where}")
    if need_gpus > 0 and gpus == 0:
        raise ConfigError("simulation.client_gpus", need_gpus,
                          f"0 here: {where} has no GPU")
    if need_gpus > gpus:
        raise ConfigError("simulation.client_gpus", need_gpus,
                          f"at most {gpus:g}, the GPUs of {where}")


# -- the engine ----------------------------------------------------------------------------------


class _Engine:
    """One simulation's stop switch, its backend (once built) and its ServerApp's end."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.mute = threading.Event()  # drop Flower's log records (set by a stop, too)
        # Events, not Thread.join: a signal that interrupts a join (3.11) marks the thread as
        # ended though it still runs (CPython's bpo-45274 clean-up releases its lock)
        self.server_started = threading.Event()
        self.server_done = threading.Event()
        self.simulation_done = threading.Event()
        self.backend: Any = None
        self.starts_ray = False  # a local Ray, whose processes are this process's descendants
        self.ray_processes: dict[int, Any] = {}  # psutil.Process of that Ray, as seen so far
        self.lock = threading.Lock()

    def track_ray(self) -> list[Any]:
        """Remember the local Ray's processes: a raylet that dies first (a signal to the
        group) orphans its workers and agents, which are then no longer our descendants."""
        if self.starts_ray:
            for proc in _ray_descendants():
                self.ray_processes.setdefault(proc.pid, proc)
        return list(self.ray_processes.values())

    def cluster_lost(self) -> bool:
        """Whether the local Ray's GCS or raylet died (SIGTERM to the process group kills them):
        calls into Ray may then block for a minute, so nobody waits for them."""
        return any(proc.info["name"] in ("gcs_server", "raylet") and not _running(proc)
                   for proc in self.ray_processes.values())

    def stop(self) -> None:
        """Ask everything to end now: the ServerApp at its next grid call, the actors at once."""
        self.stopping.set()
        self.mute.set()
        self.track_ray()
        with self.lock:
            backend = self.backend
        if backend is not None:
            backend.kill_actors()


#: starts of a local Ray: on a loaded machine its raylet can miss Ray's fixed 30 s registration wait
RAY_START_ATTEMPTS = 3
#: environment for a local Ray this process starts: no idle Python workers started ahead of the
#: actors (Ray prestarts one per CPU, ~43 MiB each, which fedkd's actors do not use)
LEAN_RAY_ENV = {"RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0"}


@contextlib.contextmanager
def lean_local_ray() -> Iterator[None]:
    """Start a local Ray (inside this block) without the processes a simulation does not use.

    `ray.init` on a fresh machine also starts the autoscaler's monitor (~46 MiB PSS), a log
    monitor that streams worker output to the driver (~45 MiB; fedkd's clients report through
    their replies and metrics.jsonl, errors through Ray's exceptions) and prestarted idle workers
    (~43 MiB each). `ray.init` has no switch for the first two, `ray start` has
    (`--no-monitor`, `--include-log-monitor=false`): the same parameters are set here on the
    `RayParams` that `ray.init` builds. A joined cluster is untouched (its processes are its own).
    The dashboard agent, runtime-env agent and minimal API server stay: Ray needs them."""
    import ray._private.parameter as parameter

    original = parameter.RayParams

    class LeanRayParams(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("no_monitor", True)
            kwargs.setdefault("include_log_monitor", False)
            super().__init__(*args, **kwargs)

    saved = {k: os.environ.get(k) for k in LEAN_RAY_ENV}
    os.environ.update({k: v for k, v in LEAN_RAY_ENV.items() if saved[k] is None})
    parameter.RayParams = LeanRayParams
    try:
        yield
    finally:
        parameter.RayParams = original
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def _backend_class(engine: _Engine) -> type:
    """Flower's RayBackend, plus: a one-line start failure, actors killed on stop, quiet end."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    class StoppableRayBackend(RayBackend):  # type: ignore[misc]
        def __init__(self, backend_config: dict[str, Any]) -> None:
            if engine.stopping.is_set():
                raise EngineStopped
            if engine.starts_ray:
                for attempt in range(RAY_START_ATTEMPTS):
                    try:
                        with lean_local_ray():
                            super().__init__(backend_config)
                        break
                    except Exception as exc:  # noqa: BLE001 -- only Ray's start time-out is retried
                        if "timed out during startup" not in str(exc) or attempt + 1 == RAY_START_ATTEMPTS:
                            raise
                        _shutdown_ray()  # what the failed start left; then once more
                        _kill([p for p in engine.track_ray() if _running(p)])
                        engine.ray_processes.clear()
            else:
                super().__init__(backend_config)
            with engine.lock:
                engine.backend = self
            engine.track_ray()
            if engine.stopping.is_set():
                raise EngineStopped

        def build(self, app_fn: Callable[[], Any]) -> None:
            engine.mute.set()  # Flower warns, then raises; the error below says it in one line
            try:
                super().build(app_fn)
                if not engine.stopping.is_set():
                    engine.mute.clear()
            except ValueError as exc:  # Flower's "ActorPool is empty"
                cpus = ray.cluster_resources().get("CPU", 0)
                engine.stop()  # ends the ServerApp's wait, mutes Flower's traceback of this
                raise EngineError(f"no client actor fits in the Ray cluster ({cpus:g} CPUs, "
                                  f"{ray.cluster_resources().get('GPU', 0):g} GPUs) with "
                                  f"{self.client_resources}: lower simulation.client_cpus / "
                                  f"simulation.client_gpus") from exc
            if engine.stopping.is_set():
                self.kill_actors()

        def _actors(self) -> list[Any]:
            pool = self.pool
            if pool is None:
                return []
            return [*pool.pool, *pool._future_to_actor.values()]  # idle and busy ones

        def kill_actors(self) -> None:
            """Kill every actor now: a worker waiting on one gets an error at once."""
            from fedkd.actors import STOPPING

            if self.pool is not None:
                setattr(self.pool, STOPPING, True)  # fedkd.actors: replace none of them
            if not ray.is_initialized():
                return
            for actor in self._actors():
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)

        def terminate(self) -> None:
            # Flower's asks each idle actor to exit, which logs "Manually terminating
            # ClientAppActor" once per actor; a kill ends them without a word
            self.kill_actors()
            ray.shutdown()

    return StoppableRayBackend


def _running(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _ray_descendants() -> list[Any]:
    """This process's descendants that run Ray (GCS, raylet, agents, workers, monitors)."""
    import psutil

    procs = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            name, cmdline = proc.name(), proc.cmdline()
            if (name in ("gcs_server", "raylet") or name.startswith("ray::")
                    or any(part.startswith("ray::") or f"{os.sep}ray{os.sep}" in part
                           for part in cmdline)):
                proc.info = {"name": name}
                procs.append(proc)
    return procs


def _kill(procs: list[Any]) -> None:
    """End a local Ray by its processes, not through Ray (whose calls may block)."""
    import psutil

    victims = [proc for proc in procs if _running(proc)]
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(victims, timeout=3)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _guard_grid(grid: Any, engine: _Engine) -> None:
    """Make the grid refuse to push or pull once the engine is stopping.

    `send_and_receive` polls `pull_messages` every 0.1 s, so a waiting round ends at once.
    """
    for name in ("push_messages", "pull_messages"):
        original = getattr(grid, name)

        def guarded(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            if engine.stopping.is_set():
                raise EngineStopped
            return _original(*args, **kwargs)

        setattr(grid, name, guarded)


def _stoppable_server_app(server_app: Any, engine: _Engine) -> Any:
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        engine.server_started.set()
        _guard_grid(grid, engine)
        try:
            server_app(grid=grid, context=context)
        except EngineStopped:
            pass
        finally:
            engine.server_done.set()

    return app


class _MuteWhileStopping(logging.Filter):
    """Drop Flower's log records once a stop began (errors of killed actors, torn-down queues)."""

    def __init__(self, engine: _Engine) -> None:
        super().__init__()
        self.engine = engine

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.engine.mute.is_set()


class _DropNotMainThread(logging.Filter):
    """Ray warns that a driver started outside the main thread leaves SIGTERM alone: intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


@contextlib.contextmanager
def _patched(engine: _Engine) -> Iterator[None]:
    """Flower's vce builds its backend by name from this module: let it build ours."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    flwr_log, ray_log = logging.getLogger("flwr"), logging.getLogger("ray._private.worker")
    mute, drop = _MuteWhileStopping(engine), _DropNotMainThread()
    raybackend.RayBackend = _backend_class(engine)
    flwr_log.addFilter(mute)
    ray_log.addFilter(drop)
    try:
        yield
    finally:
        raybackend.RayBackend = original
        flwr_log.removeFilter(mute)
        ray_log.removeFilter(drop)


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` in `exc`'s chain (Flower wraps what the backend raised)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _ray_in_its_own_process_group() -> None:
    """Start the local Ray's processes (GCS, raylet; the raylet's workers follow it) in a
    process group of their own.

    A signal to the whole process group (systemd, Slurm, `kill -- -PGID`) then reaches only
    this process, which stops Ray in order. Ray keeps terminal Ctrl-C away from them (it
    blocks SIGINT there) but not SIGTERM: a raylet killed by it first made Ray's core worker
    end this process (exit 1, "connection to the plasma store is failed") before the report
    was written. Ray has no option for it, so its Popen class gets `process_group=0`
    (blocking SIGTERM instead would cost each shutdown ~4 s: Ray's terminate() is a SIGTERM).
    Still fate-shared: the raylet dies with its parent.
    """
    from ray._private import services

    if getattr(services.ConsolePopen, "own_process_group", False):
        return

    class OwnGroupPopen(services.ConsolePopen):  # type: ignore[misc,valid-type]
        own_process_group = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("process_group", 0)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnGroupPopen


def _shutdown_ray() -> None:
    import ray

    with contextlib.suppress(Exception):
        if ray.is_initialized():
            ray.shutdown()


def run_engine(server_app: Any, client_app: Any, num_supernodes: int,
               backend_config: dict[str, Any], grace_s: float = GRACE_S) -> None:
    """`run_simulation` that a signal (any exception in the main thread) stops promptly.

    Raises ConfigError when no client actor can fit (before Ray starts), EngineError when
    the engine cannot place one (at run time: a cluster that changed), what the simulation
    raised otherwise, and re-raises the main thread's interrupt after
    the simulation has stopped and Ray is down. Returns when the run ended by itself.
    """
    from flwr.simulation import run_simulation

    check_capacity(backend_config)
    _ray_in_its_own_process_group()
    _reinstall_signal_handler()  # joining a cluster (ray.init here) replaced our SIGTERM handler
    engine = _Engine()
    engine.starts_ray = (backend_config.get("init_args") or {}).get("address") in (None, "", "local")
    app = _stoppable_server_app(server_app, engine)
    failure: list[BaseException] = []

    def simulate() -> None:
        try:
            run_simulation(server_app=app, client_app=client_app, num_supernodes=num_supernodes,
                           backend_config=backend_config)
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread
            failure.append(exc)
            # run_simulation does not wait for its ServerApp thread, which would poll the
            # grid until `simulation.timeout` after a backend failure: end it
            engine.stop()
        finally:
            engine.simulation_done.set()

    with _patched(engine):
        # a daemon thread: every thread Flower starts from it is one too, so none can keep
        # the process alive
        thread = threading.Thread(target=simulate, name="fedkd-simulation", daemon=True)
        try:
            thread.start()
            reclaimed = False
            while not engine.simulation_done.wait(0.1 if not reclaimed else 0.5):
                if not reclaimed and engine.backend is not None:
                    # Ray's core worker installs its own SIGTERM handler (it aborts the
                    # process, rc 134): take SIGTERM back once Ray is up
                    _reinstall_signal_handler()
                    reclaimed = True
        except BaseException:
            engine.stop()
            raise
        finally:
            if engine.server_started.is_set():  # it may still be recording a round: let it end
                engine.server_done.wait(grace_s)
            # Flower's threads end once their actors are dead (the backend then shuts Ray down)
            deadline = time.monotonic() + SETTLE_S
            while not engine.simulation_done.wait(0.2):
                if time.monotonic() > deadline or engine.cluster_lost():
                    break
            if engine.simulation_done.is_set():
                _shutdown_ray()
            else:  # a thread is stuck in a Ray call: shutting Ray down under it can crash
                _STATE.abandoned = True
            if engine.stopping.is_set():  # what a dead raylet left, or all of it when stuck
                _kill(engine.track_ray())
            if engine.server_started.is_set() and not engine.server_done.is_set():
                _STATE.abandoned = True
    if failure:
        exc = failure[0]
        for kind in (EngineError, ConfigError):
            cause = _cause(exc, kind)
            if cause is not None:
                raise cause.with_traceback(None) from None
        if _cause(exc, EngineStopped) is not None:
            return
        raise exc  # anything else (a bug in a strategy, ...) keeps its traceback


# -- the command line's half ---------------------------------------------------------------------


@dataclass
class _SignalState:
    handler: Callable[[int, Any], None] | None = None
    abandoned: bool = False  # a stop left threads behind: only os._exit ends the process


_STATE = _SignalState()


def _reinstall_signal_handler() -> None:
    if _STATE.handler is not None and threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _STATE.handler)


@dataclass
class Outcome:
    """What `exit_on_signals` saw: the exit code to return (None: no signal ended the run)."""

    code: int | None = None


def _word(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else "terminated"


def _arm_watchdog(signum: int) -> threading.Timer:
    """End the process even if stopping hangs after all (a Ray call that never returns)."""
    def expire() -> None:
        print(f"{_word(signum)}: the run did not stop within {HARD_EXIT_S:g} s; exiting anyway",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)

    timer = threading.Timer(HARD_EXIT_S, expire)
    timer.daemon = True
    timer.start()
    # and if Python itself is stuck (a thread holding the GIL in C): a thread dump, exit 1
    faulthandler.dump_traceback_later(HARD_EXIT_S + 15, exit=True)
    return timer


def _where(run_dir: Path | None) -> str:
    if run_dir is None:
        return ""
    checkpoint = None
    with contextlib.suppress(Exception):  # checkpoint.json holds the round of a complete one
        for name in ("checkpoint", "checkpoint.old"):
            index = run_dir / name / "checkpoint.json"
            if index.is_file():
                checkpoint = int(json.loads(index.read_text())["round"])
                break
    if checkpoint is None:
        return f": run directory {run_dir} (no checkpoint yet)"
    return (f": run directory {run_dir}, last checkpoint round {checkpoint} "
            f"(resume with: fedkd run --resume {run_dir})")


@contextlib.contextmanager
def exit_on_signals() -> Iterator[Outcome]:
    """SIGINT/SIGTERM -> `Interrupted` in the main thread; on the way out one line and 128+signum.

    Only the first signal interrupts; later ones are ignored while the run writes its
    report and stops Ray (a second Ctrl-C used to cut that short with tracebacks).
    Use as `with exit_on_signals() as outcome: return work()` then `return outcome.code`.
    """
    outcome = Outcome()
    seen: list[int] = []
    watchdog: list[threading.Timer] = []

    def handler(signum: int, frame: Any) -> None:
        if seen:
            return
        seen.append(signum)
        watchdog.append(_arm_watchdog(signum))
        raise Interrupted(signum)

    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, handler)
    _STATE.handler, _STATE.abandoned = handler, False
    try:
        yield outcome
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        if not seen:
            seen.append(signum)  # a plain KeyboardInterrupt: ignore repeats from here on too
        print(f"{_word(signum)}{_where(getattr(exc, 'run_dir', None))}", file=sys.stderr, flush=True)
        outcome.code = 128 + int(signum)
        if _STATE.abandoned:  # threads that would block the interpreter's exit: leave now
            sys.stdout.flush()
            os._exit(outcome.code)
    finally:
        for timer in watchdog:
            timer.cancel()
            faulthandler.cancel_dump_traceback_later()
        _STATE.handler = None
        for signum, old in previous.items():
            signal.signal(signum, old)
