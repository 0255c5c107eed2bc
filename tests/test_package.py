"""fedkd as a package: the wheel holds everything a run needs, and runs outside the repository.

The e2e test builds the wheel and installs it (`--no-deps`) into a fresh virtual environment
whose only link to this project is one `.pth` line naming the project environment's
site-packages, so the heavy dependencies (torch, flwr, ray) are shared instead of downloaded.
A plain path line in a `.pth` file does not run the `.pth` files of that directory, so the
project's editable install of fedkd (a finder hooked in by its own `.pth`) is not active there:
`fedkd` can only come from the wheel, which the test asserts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_on_disk() -> set[str]:
    """Every folder of Python modules under fedkd/, strategies/ and clients/, as a package name."""
    found = set()
    for top, name in (("fedkd", "fedkd"), ("strategies", "fedkd.strategies"), ("clients", "fedkd.clients")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            if "__pycache__" not in rel:
                found.add(".".join((name, *rel)))
    return found


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    missing = _packages_on_disk() - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def test_metadata_a_package_index_expects() -> None:
    project = PYPROJECT["project"]
    assert {"Homepage", "Source", "Issues"} <= set(project["urls"])
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in project["classifiers"])
    assert "Typing :: Typed" in project["classifiers"] and (ROOT / "fedkd/py.typed").is_file()
    import fedkd

    assert fedkd.__version__ == project["version"]  # one source: pyproject, read back at import


def _wheel(tmp: Path) -> Path:
    out = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("fedkd-*.whl")
    return wheel


def _fresh_env(tmp: Path, wheel: Path) -> Path:
    """A venv with only the wheel installed, sharing the project's heavy dependencies."""
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_fedkd_shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, text=True)
    return env_dir


@pytest.mark.e2e
@pytest.mark.process
def test_wheel_installs_and_runs_outside_the_repository(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("fedkd/taskdata/__init__.py", "fedkd/strategies/grouped.py", "fedkd/clients/base.py",
                   "fedkd/configs/defaults.yaml", "fedkd/configs/experiment/quickstart.yaml",
                   "fedkd/py.typed", "fedkd/api.py"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "strategies/", "clients/", "configs/")) for n in names)

    env_dir = _fresh_env(tmp_path, wheel)
    work = tmp_path / "elsewhere"  # the current directory: outside the checkout
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)

    where = run(str(env_dir / "bin/python"), "-c",
                "import fedkd, fedkd.config as c; print(fedkd.__file__); print(c.CONFIG_DIR); "
                "print(fedkd.__version__)")
    assert where.returncode == 0, where.stderr
    module, configs, version = where.stdout.split()
    for path in (module, configs):
        assert Path(path).is_relative_to(env_dir) and not Path(path).is_relative_to(ROOT), path
    assert version == PYPROJECT["project"]["version"]

    assert run(str(env_dir / "bin/fedkd"), "--version").stdout.strip() == f"fedkd {version}"
    listing = run(str(env_dir / "bin/fedkd"), "list")
    assert listing.returncode == 0, listing.stderr
    assert "quickstart" in listing.stdout and "fedavg" in listing.stdout

    # a 1-round quickstart by name; options anywhere on the line. Its own Ray (a running cluster
    # would start workers with the project's interpreter, i.e. the checkout's fedkd)
    done = run(str(env_dir / "bin/fedkd"), "run", "quickstart", "train.rounds=1", "--quiet",
               "data.num_clients=2", "model.name=mlp", "experiment.output_dir=out")
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (work / "out").glob("quickstart-*")
    assert (run_dir / "report.html").is_file() and (run_dir / "model").is_dir()
    # nothing but fedkd's own output: no Ray/Flower log lines, no colour codes in a pipe
    for stream in (done.stdout, done.stderr):
        assert "\x1b[" not in stream and "ClientAppActor" not in stream, stream[-2000:]
    assert not re.search(r"WARNING|Traceback", done.stderr), done.stderr[-2000:]
    assert "last-round accuracy" in done.stdout
