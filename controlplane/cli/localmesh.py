"""Finding the local mesh from any folder, for the CLI.

Every running `hivemesh up` leaves a note in this user's state folder (`hivemesh.mesh.local_meshes`, which the
SDK's `MeshSettings.resolve` reads too). A CLI command run elsewhere, with no --home or HIVEMESH_HOME and no mesh
in ./.hivemesh, uses the one mesh running; errors name the meshes found instead of advising `hivemesh certs init`,
which would make a second CA.
"""

from __future__ import annotations

from pathlib import Path

from hivemesh.mesh.local_meshes import (
    RUNNING_DIR,
    STATE_FILE,
    LocalMesh,
    register,
    running,
    unregister,
    up_alive,
    when,
)

__all__ = ["HERE_ONLY", "RUNNING_DIR", "LocalMesh", "locate", "register", "running", "unregister", "up_alive",
           "when", "where_hint"]

HERE_ONLY = frozenset({"up", "certs", "controlplane", "sidecar"})
"""Commands that act on the folder they are given or run in, never on a mesh found elsewhere."""


def locate(command: str | None, home: Path, certs_dir: Path, *, home_given: bool,
           certs_given: bool) -> tuple[Path, Path]:
    """The home and certificates folder a command uses: what it was given, else ./.hivemesh if a mesh runs
    there, else the one local mesh running (several: none is guessed; the errors list them)."""
    if command in HERE_ONLY or home_given or (home / STATE_FILE).is_file():
        return home, certs_dir
    meshes = running()
    if len(meshes) != 1:
        return home, certs_dir
    return meshes[0].home, certs_dir if certs_given else meshes[0].certs_dir


def where_hint() -> str | None:
    """For an error that cannot find the mesh or its operator: the meshes running here and how to use one;
    None when no mesh runs (then `hivemesh up` or `hivemesh certs init` are the right advice)."""
    meshes = running()
    if not meshes:
        return None
    listed = "; ".join(m.describe() for m in meshes)
    newest = meshes[-1]
    there = newest.home.parent
    also = f" or run the command in {there}" if newest.home == there / ".hivemesh" and newest.certs_dir == there / \
        "certs" else ""
    return f"a local mesh is running: {listed}. Point at it with {newest.pointing()}{also}"
