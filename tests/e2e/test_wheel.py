"""The wheel users install, built from the checkout's files and installed outside it, runs the main job.

The suite imports hivemesh through the editable install's hook, which maps the checkout's folders onto
`hivemesh.*`. A module or data file the wheel leaves out, or code that finds a file beside the checkout, passes
there and fails for everyone who installs the package. Here the wheel is built from a copy of the files git would
commit (tracked, or new and not ignored), installed into a virtual environment of its own, and run from a folder
outside the checkout, so every process imports the wheel's code alone. Its dependencies come from the suite's own
environment, named by path in a .pth file: no package index is needed, and that environment's own .pth files, the
editable hook among them, are not run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.support.up_process import Up

ROOT = Path(__file__).resolve().parents[2]
# The installed wheel's processes: none of the suite's import path, and byte code cached beside the wheel's own
# modules (the suite's cache folder is the checkout's venv).
ENVIRON = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}

# Every hivemesh module a program can import, listed in the interpreter that runs this (as
# tests/unit/test_import_order.py walks them).
_MODULES = r"""
import importlib, json, pkgutil, sys
import hivemesh
names, failed = [], []
for top in ("hivemesh.mesh", "hivemesh.sdk", "hivemesh.controlplane", "hivemesh.agents", "hivemesh.v1"):
    names.append(top)
    names += [m.name for m in pkgutil.walk_packages(importlib.import_module(top).__path__, top + ".",
                                                    onerror=failed.append)]
print(json.dumps({"file": hivemesh.__file__, "names": sorted(names), "failed": failed}))
"""


def _copy_checkout(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True, timeout=60).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is not part of what would be committed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtual environment holding the wheel built from the checkout's files, and nothing else of hivemesh."""
    work = tmp_path_factory.mktemp("wheel")
    _copy_checkout(work / "src")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(work / "dist"), str(work / "src"))
    (wheel,) = (work / "dist").glob("hivemesh-*.whl")
    env = work / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(env))
    python = env / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))
    site = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (Path(site) / "hivemesh-suite-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    yield env


def _modules(python: str, cwd: Path, environ: Mapping[str, str]) -> dict[str, object]:
    done = subprocess.run([python, "-c", _MODULES], capture_output=True, text=True, timeout=120, cwd=cwd,
                          check=False, env=environ)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wheel_holds_every_module_of_the_checkout(venv: Path, tmp_path: Path) -> None:
    installed = _modules(str(venv / "bin" / "python"), tmp_path, ENVIRON)
    assert str(installed["file"]).startswith(str(venv)), f"hivemesh came from {installed['file']}, not the wheel"
    checkout = _modules(sys.executable, tmp_path, {k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert str(checkout["file"]).startswith(str(ROOT)), checkout["file"]
    assert isinstance(installed["names"], list) and isinstance(checkout["names"], list)
    assert len(checkout["names"]) > 200, checkout["names"][:10]
    assert checkout["failed"] == [], checkout["failed"]
    missing = sorted(set(checkout["names"]) - set(installed["names"]))
    assert not missing, f"modules the wheel leaves out (pyproject.toml's [tool.setuptools] packages): {missing}"
    assert installed["failed"] == [], f"packages that fail to import from the wheel: {installed['failed']}"


@pytest.mark.slow
@pytest.mark.timeout(300)  # its own waits allow `up` 240 s (the suite's default is 120 s)
def test_up_once_runs_every_demo_from_the_installed_wheel(venv: Path, tmp_path: Path, up_runs: list[Up]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    up = Up(tmp_path, "--once", "--json", program=[str(venv / "bin" / "hivemesh")], cwd=elsewhere,
            environ=ENVIRON)
    up_runs.append(up)
    code = up.wait(240)
    assert code == 0, up.text[-3000:]
    records = [json.loads(line) for line in up.lines if line.startswith("{")]
    documents = {r["source"]: r["status"] for r in records if "source" in r}  # as agents/README.md lists them
    assert documents == {"invoice-001": "stored", "receipt-002": "stored", "invoice-003": "stored",
                         "invoice-004": "rejected", "receipt-005": "rejected"}, documents
    demos = {r["demo"]: r["state"] for r in records if "demo" in r}
    assert demos == dict.fromkeys(["research", "helpdesk", "support", "content", "contract"], "COMPLETED"), demos
    assert "stopped: agents, sidecar, control plane and etcd" in up.text
    # Nothing was written into the checkout: `up` keeps its state under --home and --certs-dir.
    assert sorted(p.name for p in elsewhere.iterdir()) == []
