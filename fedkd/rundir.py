"""A run directory's life: created whole, locked while a process runs it, honest about how it ended.

- Created only after the config and data have passed validation, atomically: its
  files are written into a hidden temporary folder that is then renamed to a
  unique name (two runs started in the same second never share one).
- `run.lock` is held (flock) by the process running it; the kernel drops the lock
  when that process dies, even by kill -9, so "status running, lock free" means a
  run that was killed: `run_status` calls it "incomplete".
- A directory holding a run is never started again: an unfinished one is continued
  with `fedkd run --resume`, a finished one is left alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

from fedkd.checkpoint import checkpoint_round
from fedkd.config import ConfigError, FedkdConfig, first_difference, load_config

RUN_INFO, LOCK = "run.json", "run.lock"
FINISHED = ("complete", "failed")
UNFINISHED = ("incomplete", "interrupted")
#: keys a resumed run may change; any other would make it a different run
RESUMABLE_CHANGES = ("train.rounds",)


class RunDirError(Exception):
    """A run directory cannot be used as asked (one line, names the directory and what to do)."""


def read_run_info(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / RUN_INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_status(run_dir: Path) -> str:
    """complete | failed | interrupted | running | incomplete (killed: no process holds it)."""
    status = read_run_info(run_dir).get("status", "unknown")
    if status == "running" and not RunLock(run_dir).held_elsewhere():
        return "incomplete"
    return status


def resume_hint(run_dir: Path) -> str:
    """'last checkpoint round k; resume with: fedkd run --resume DIR' for an unfinished run."""
    k = checkpoint_round(Path(run_dir))
    where = f"last checkpoint round {k}" if k is not None else "no checkpoint yet (restarts at round 1)"
    return f"{where}; resume with: fedkd run --resume {run_dir}"


class RunLock:
    """An exclusive lock on the run directory for as long as this process runs it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def held_elsewhere(self) -> bool:
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we took
        return False

    def __enter__(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(f"{self.path.parent}: another fedkd process is running this run") from None
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_unused(run_dir: Path) -> None:
    """Refuse a directory that already holds a run (or anything else) for a fresh start."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if (run_dir / RUN_INFO).exists():
        status = run_status(run_dir)
        if status in FINISHED:
            raise RunDirError(f"{run_dir} holds a finished run ({status}); choose another --run-dir")
        raise RunDirError(f"{run_dir} holds an unfinished run ({status}): {resume_hint(run_dir)}")
    raise RunDirError(f"{run_dir} is not empty and holds no fedkd run; choose another --run-dir")


def create_run_dir(cfg: FedkdConfig, files: dict[str, str], run_dir: Path | None = None) -> Path:
    """The new run's directory holding `files` (name -> text), created whole (module docstring)."""
    parent = Path(run_dir).parent if run_dir else Path(cfg.experiment.output_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fedkd-new-", dir=parent))
    except OSError as exc:
        key, value = ("--run-dir", str(run_dir)) if run_dir else ("experiment.output_dir", str(parent))
        raise ConfigError(key, value, f"cannot create a run directory there ({exc.strerror})") from None
    try:
        for name, text in files.items():
            (staging / name).write_text(text)
        staging.chmod(0o755)
        return _claim(staging, cfg, run_dir)
    except BaseException:
        if staging.exists():
            for f in staging.iterdir():
                f.unlink()
            staging.rmdir()
        raise


def _claim(staging: Path, cfg: FedkdConfig, run_dir: Path | None) -> Path:
    """Rename `staging` to the run's name: `run_dir`, else a unique `<name>-<time>[-n]`."""
    if run_dir is not None:
        check_unused(run_dir)
        if run_dir.exists():
            run_dir.rmdir()  # empty (checked): the rename puts the whole run in its place
        os.rename(staging, run_dir)
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        candidate = staging.parent / (f"{cfg.experiment.name}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            os.mkdir(candidate)  # the claim: fails if another run took the name first
        except FileExistsError:
            continue
        os.rename(staging, candidate)  # onto our own empty directory
        return candidate
    raise RunDirError(f"{staging.parent}: no free run directory name for {cfg.experiment.name}-{stamp}")


def resume_config(run_dir: Path, overrides: Iterable[str]) -> FedkdConfig:
    """The run's own config plus `overrides`, which may only extend `train.rounds`."""
    saved_path = run_dir / "config.yaml"
    if not (run_dir / RUN_INFO).exists() or not saved_path.exists():
        raise RunDirError(f"{run_dir}: not a fedkd run directory (no run.json/config.yaml)")
    saved = load_config(saved_path)
    cfg = load_config(saved_path, overrides)
    changed = first_difference(cfg, saved, lambda key: key not in RESUMABLE_CHANGES)
    if changed:
        key, value, was = changed
        raise ConfigError(key, value, f"a resumed run keeps its config (was {was!r}); "
                          f"only {', '.join(RESUMABLE_CHANGES)} may change")
    return cfg

