"""An SDK agent or `MeshClient` started in another folder finds the mesh `hivemesh up` runs, as the CLI does (the
notes of `hivemesh.mesh.local_meshes`): it said "mesh location unknown" with a traceback while `hivemesh agents` in
the same folder worked. Where no mesh can be found, `run` and `run_main` say how to point at one, exit code 2, no
traceback. A real control plane and etcd; `up` itself is a stand-in process whose command line says hivemesh."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemesh.mesh import settings as settings_module
from hivemesh.mesh.local_meshes import STATE_FILE, LocalMesh, register
from hivemesh.mesh.settings import MeshLocationError, MeshSettings, state_dir
from hivemesh.sdk import MeshClient
from tests.support.meshenv import MeshEnv
from tests.support.spawn import stop
from tests.support.waiting import until

AGENT = '''\
from hivemesh.sdk import Agent, capability, run


class Finder(Agent):
    """Joins from a folder that holds no mesh."""
    name = "finder"
    version = "1.0.0"

    @capability()
    async def find(self, req: dict[str, str]) -> dict[str, str]:
        """Echo."""
        return req


run(Finder())
'''
CLIENT = '''\
from hivemesh.sdk import MeshClient, run_main


async def main() -> None:
    async with MeshClient.connect(name="reporter"):
        pass


run_main(main())
'''
READY_S = 30.0


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder with no mesh, no HIVEMESH_* variables, this user's state folder under tmp_path, and the settings
    module's memory of a found mesh put back afterwards."""
    for var in [v for v in os.environ if v.startswith("HIVEMESH_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(settings_module, "_located", None)
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    yield folder


def _child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    return {**env, "XDG_STATE_HOME": str(tmp_path / "xdg"), **extra}


def _stand_in_up(tmp_path: Path, name: str, mesh: MeshEnv | None = None) -> tuple[subprocess.Popen[bytes], LocalMesh]:
    """A live process whose command line says hivemesh (as `up`'s does), its home's mesh.json (mesh's location,
    when given) and the note `up` leaves for it."""
    proc = subprocess.Popen(["hivemesh-up-stand-in", "60"], executable="sleep")
    deadline = time.monotonic() + 10
    while b"hivemesh" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():  # until the exec is done
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.01)
    home = tmp_path / name / ".hivemesh"
    home.mkdir(parents=True)
    where = mesh.base_settings().to_json() if mesh is not None else {}
    (home / STATE_FILE).write_text(json.dumps({**where, "pid": proc.pid}))
    local = LocalMesh(home=home, certs_dir=tmp_path / name / "certs", pid=proc.pid, started_at=time.time(),
                      controlplane=where.get("controlplane", "127.0.0.1:7443"), etcd=where.get("etcd", "127.0.0.1:1"))
    register(local)
    return proc, local


async def test_an_agent_and_a_client_in_another_folder_find_the_mesh_up_runs(
        mesh_env: MeshEnv, tmp_path: Path, elsewhere: Path) -> None:
    up, local = _stand_in_up(tmp_path, "meshdir", mesh_env)
    agent: asyncio.subprocess.Process | None = None
    try:
        settings = MeshSettings.resolve()
        base = mesh_env.base_settings()
        assert (settings.etcd, settings.controlplane, settings.join, settings.ca_bundle) == (
            base.etcd, base.controlplane, base.join, base.ca_bundle)
        assert settings.identity_dir == local.home / "identity" and state_dir() == local.home

        token = (await mesh_env.operator.create_join_token("reporter", "client", 120)).token
        async with MeshClient.connect(name="reporter", join_token=token) as mesh:
            assert mesh.node.workload.spiffe_id == "spiffe://hivemesh.local/client/reporter"
        assert (local.home / "identity" / "client-reporter" / "cert.pem").is_file()  # kept with its mesh

        # The reviewer's case: `python agent.py` with a join token, `run()` and nothing else.
        (elsewhere / "agent.py").write_text(AGENT)
        log = tmp_path / "agent.log"
        token = (await mesh_env.operator.create_join_token("finder", "agent", 120)).token
        with log.open("wb") as out:
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "agent.py", cwd=elsewhere, env=_child_env(tmp_path, HIVEMESH_JOIN_TOKEN=token),
                stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        serving = "agent finder serving on "
        await until(lambda: agent.returncode is not None or serving in log.read_text(errors="replace"), READY_S)
        assert serving in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), 15) == 0, log.read_text(errors="replace")[-3000:]
        assert (local.home / "identity" / "agent-finder" / "cert.pem").is_file()
        assert not (elsewhere / ".hivemesh").exists()  # no identity or audit spool left in the folder it ran in
    finally:
        if agent is not None:
            await stop(agent, kill=True)
        up.kill()
        up.wait(10)


def test_several_meshes_are_listed_and_none_is_guessed(tmp_path: Path, elsewhere: Path) -> None:
    started = []
    try:
        for name in ("a", "b"):
            proc, local = _stand_in_up(tmp_path, name)
            started.append((proc, local))
        with pytest.raises(MeshLocationError) as raised:
            MeshSettings.resolve()
        said = str(raised.value)
        assert said.startswith("mesh location unknown (etcd, controlplane, join, ca_bundle): 2 local meshes run, "
                               "none is guessed: ")
        assert all(f"{local.home} (`hivemesh up` pid {local.pid}" in said for _, local in started)
        assert "HIVEMESH_HOME" in said and "HIVEMESH_ETCD, HIVEMESH_CONTROLPLANE, HIVEMESH_JOIN, HIVEMESH_CA" in said
    finally:
        for proc, _ in started:
            proc.kill()
            proc.wait(10)


def test_a_location_given_in_part_is_never_completed_from_a_running_mesh(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HIVEMESH_ETCD and HIVEMESH_CONTROLPLANE of another mesh, the rest forgotten: filled from the mesh `up` runs
    here, the workload would join it with the other mesh's token; the error names what is missing instead."""
    proc, _local = _stand_in_up(tmp_path, "a")
    try:
        monkeypatch.setenv("HIVEMESH_ETCD", "meshb.example:2379")
        monkeypatch.setenv("HIVEMESH_CONTROLPLANE", "meshb.example:7000")
        with pytest.raises(MeshLocationError) as raised:
            MeshSettings.resolve()
        assert str(raised.value).startswith("mesh location unknown (join, ca_bundle)"), str(raised.value)
        assert settings_module._located is None, "nothing was taken from the running mesh"
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("program", [AGENT, CLIENT], ids=["run", "run_main"])
async def test_no_mesh_anywhere_is_one_line_naming_every_way_and_exit_2(
        tmp_path: Path, elsewhere: Path, program: str) -> None:
    (elsewhere / "prog.py").write_text(program)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "prog.py", cwd=elsewhere, env=_child_env(tmp_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), READY_S)
    finally:
        await stop(proc, kill=True)
    said = err.decode()
    assert proc.returncode == 2, said
    assert "Traceback" not in said and len(said.splitlines()) == 1, said
    assert said.startswith("prog.py: error: mesh location unknown (etcd, controlplane, join, ca_bundle): no "
                           f"mesh.json in the state folder {elsewhere / '.hivemesh'}, and no `hivemesh up` runs for "
                           f"this user (none noted in {tmp_path / 'xdg' / 'hivemesh' / 'running'})"), said
    for way in ("`hivemesh up`", "HIVEMESH_HOME", "HIVEMESH_ETCD", "HIVEMESH_CONTROLPLANE", "HIVEMESH_JOIN,",
                "HIVEMESH_CA"):
        assert way in said, (way, said)
    assert not (elsewhere / ".hivemesh").exists()
