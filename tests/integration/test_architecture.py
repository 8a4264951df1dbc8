"""The architecture contracts ([tool.importlinter] in pyproject.toml) hold, and they catch a wrong-way import.

Each case copies the package tree (the same layout .ci/pkgtree builds from symlinks) into a temporary folder,
adds one deliberate import there, and runs the real `lint-imports` on the copy: the contract it breaks must be
reported and the exit code must say so, which is what makes `./run test` (and CI) fail on a new cycle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
LAYERS = "one way: agents -> sdk -> mesh -> v1 (protos)"
DATA_PLANE = "the data plane imports neither the control plane nor the SDK nor the agents"
CONTROL_PLANE = "the control plane (but its CLI) depends on the mesh only"
CLI_LEAF = "the CLI is a leaf: nothing imports it"


def _only_python(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or (not n.endswith(".py") and not (Path(folder) / n).is_dir())}


def _package_tree(tmp: Path) -> Path:
    """A copy of the hivemesh package tree (Python files only) with the project's pyproject.toml beside it."""
    root = tmp / "hivemesh"
    shutil.copytree(REPO / "protos" / "hivemesh", root, ignore=_only_python)
    for folder in ("mesh", "sdk", "controlplane", "agents"):
        shutil.copytree(REPO / folder, root / folder, ignore=_only_python)
    shutil.copy(REPO / "pyproject.toml", tmp / "pyproject.toml")
    return root


def _lint(tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tmp)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=120)


def _add_import(module: Path, statement: str) -> None:
    module.write_text(module.read_text() + f"\n{statement}  # a deliberate wrong-way import\n")


def test_the_contracts_hold_for_the_package_tree(tmp_path: Path) -> None:
    _package_tree(tmp_path)
    result = _lint(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in (LAYERS, DATA_PLANE, CONTROL_PLANE, CLI_LEAF):
        assert f"{contract} KEPT" in result.stdout
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "statement", "broken"),
    [
        # the mesh's policy framework string-imported the SDK's budgets kind: such a cycle is now caught
        ("mesh/policy.py", "import hivemesh.sdk.client", (LAYERS, DATA_PLANE, CONTROL_PLANE)),
        # the node imported the control plane's client: mesh -> controlplane
        ("mesh/node.py", "import hivemesh.controlplane.ca", (DATA_PLANE,)),
        # the control plane's dev launcher imported the agents and the SDK
        ("controlplane/server.py", "import hivemesh.sdk.workflow", (CONTROL_PLANE,)),
        ("controlplane/policies.py", "import hivemesh.agents.demos", (CONTROL_PLANE,)),
        # a feature module of the CLI imported back from the root group, or the server from the CLI
        ("controlplane/server.py", "import hivemesh.controlplane.cli.context", (CLI_LEAF,)),
        ("sdk/client.py", "import hivemesh.controlplane.cli", (CLI_LEAF,)),
        # the protocol package is the bottom layer
        ("v1/__init__.py", "import hivemesh.mesh.errors", (LAYERS,)),
    ],
)
def test_a_wrong_way_import_breaks_the_build(tmp_path: Path, module: str, statement: str,
                                             broken: tuple[str, ...]) -> None:
    root = _package_tree(tmp_path)
    _add_import(root / module, statement)
    result = _lint(tmp_path)
    assert result.returncode != 0, result.stdout
    for contract in broken:  # at least these (an indirect chain may break another one too)
        assert f"{contract} BROKEN" in result.stdout, result.stdout


def test_the_cli_may_import_everything(tmp_path: Path) -> None:
    """The leaf is allowed what nothing else is: the SDK and the agents (`hivemesh up` runs the demos)."""
    root = _package_tree(tmp_path)
    _add_import(root / "controlplane" / "cli" / "context.py", "import hivemesh.agents.demos, hivemesh.sdk.workflow")
    result = _lint(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
