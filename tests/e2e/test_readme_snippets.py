"""The README's Python examples run as written: its `Shouter` agent ("## Writing an agent") and its caller
("## Calling the mesh from Python") are cut from README.md by their headings, written verbatim to files and run
as a user runs them, each its own `python FILE` process, against a real mesh (TLS etcd, control plane, the
reference extractor agent started as `hivemesh up` starts it). Nothing else ran them, and the caller example once
streamed `shout-words`, which no agent offered, unnoticed. The FanOut fragment ("## Orchestration patterns": a
top-level `await` on a `mesh` it does not make) runs verbatim inside the caller's `async with` against the
reference search agents. The `hivemesh` commands the README gives before them (`allow`, `join-token`) are the
only leave and tokens the callers get: the README once left out the grants, and followed literally its callers
failed GRANT_DENIED."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import aetcd

from hivemesh.mesh.etcd import EtcdServer
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, run_cli, start_mesh_env, stop_mesh_env
from tests.support.spawn import REPO, child_env, stop
from tests.support.waiting import until

README = REPO / "README.md"
AGENT_HEADING = "## Writing an agent"
CALLER_HEADING = "## Calling the mesh from Python"
FANOUT_HEADING = "## Orchestration patterns"
SEARCHERS = ("papers", "news", "wiki")
OPERATORS_ONLY: dict[str, object] = {
    "grants": [{"name": "operators", "subjects": [f"spiffe://{TRUST_DOMAIN}/operator/*"], "capabilities": ["*"]}]}
"""No grant for the caller and no authz rule (default deny): it may call only what `hivemesh allow` lets it."""
FANOUT_PROGRAM = """\
import json
from hivemesh.sdk import MeshClient, run_main

async def main() -> None:
    async with MeshClient.connect(name="reporter") as mesh:
{fragment}
        print(json.dumps({{"failed": result.details["failed"], "output": result.output}}))

run_main(main())
"""
"""The smallest program around the FanOut fragment: the README caller's own `async with`."""
READY_S = 30.0


def python_block(readme: Path, heading: str) -> str:
    """The first ```python block of the README section under `heading` (up to the next `## `), verbatim."""
    lines = readme.read_text().splitlines()
    assert heading in lines, f"{readme} has no heading {heading!r}: the test runs the example under it"
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = lines[start:end]
    assert "```python" in section, f"{readme}: no ```python block under {heading!r}"
    first = section.index("```python") + 1
    assert "```" in section[first:], f"{readme}: the ```python block under {heading!r} is not closed"
    return "\n".join(section[first:section.index("```", first)]) + "\n"


def hivemesh_commands(readme: Path, heading: str) -> list[list[str]]:
    """The `hivemesh` commands of the ```sh blocks before the first ```python block under `heading`, each as
    the CLI's arguments: a whole line (`hivemesh allow ...`) or one in `$(...)` (`export X=$(hivemesh ...)`)."""
    lines = readme.read_text().splitlines()
    start = lines.index(heading) + 1
    end = next(i for i in range(start, len(lines)) if lines[i] == "```python")
    commands, in_sh = [], False
    for line in lines[start:end]:
        if line.startswith("```"):
            in_sh = line == "```sh"
        elif in_sh and (m := re.search(r"\$\((hivemesh [^)]*)\)", line) or re.match(r"(hivemesh .*)", line)):
            commands.append(shlex.split(m.group(1), comments=True)[1:])
    return commands


async def _spawn(args: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> asyncio.subprocess.Process:
    """A child process in its own session, stdout and stderr into log."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(sys.executable, *args, cwd=cwd, env=dict(env), stdout=out,
                                                    stderr=asyncio.subprocess.STDOUT, start_new_session=True)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _wait_said(proc: asyncio.subprocess.Process, log: Path, *lines: str) -> None:
    """Until log holds each of lines (an agent saying it serves, after its registration is in etcd); fails at
    once if the process exits first."""
    def said() -> bool:
        text = log.read_text(errors="replace")
        return all(line in text for line in lines)

    await until(lambda: proc.returncode is not None or said(), READY_S)
    assert said(), (f"{log.stem} did not say {lines} within {READY_S:.0f} s (exit {proc.returncode}); "
                    f"log {log}:\n{_tail(log)}")


async def _run(program: Path, env: Mapping[str, str]) -> tuple[int, str, str]:
    """`python PROGRAM` to its end: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, program.name, cwd=program.parent, env=dict(env),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), READY_S)
    finally:
        await stop(proc, kill=True)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_readme_agent_and_callers_run_as_written(etcd: aetcd.Client, etcd_server: EtcdServer,
                                                       tmp_path: Path) -> None:
    """The agent joins with its token and serves `shout` and `shout-words`; the caller, joined as client
    "reporter" and let in by `hivemesh allow`, calls the extractor, prints the streamed words and exits 0; the
    FanOut fragment hears all three searches; the agent exits 0 on SIGTERM."""
    agent_py, caller_py, fanout_py = tmp_path / "shouter.py", tmp_path / "reporter.py", tmp_path / "fanout.py"
    agent_py.write_text(python_block(README, AGENT_HEADING))
    caller_py.write_text(python_block(README, CALLER_HEADING))
    fanout_py.write_text(FANOUT_PROGRAM.format(fragment=textwrap.indent(python_block(README, FANOUT_HEADING), " " * 8)))
    caller_steps, fanout_steps = (hivemesh_commands(README, h) for h in (CALLER_HEADING, FANOUT_HEADING))
    joins = [argv for argv in caller_steps if argv[0] == "join-token"]
    allows = [argv for argv in caller_steps + fanout_steps if argv[0] == "allow"]
    assert len(joins) == 1 and [argv for argv in fanout_steps if argv[0] == "allow"], (
        f"the README tells a caller how to get a join token and each snippet's `hivemesh allow`: {caller_steps}, "
        f"{fanout_steps}")
    env: MeshEnv = await start_mesh_env(tmp_path / "mesh", etcd_server.endpoint, OPERATORS_ONLY, authz=None)
    procs: list[asyncio.subprocess.Process] = []

    async def caller_env(home: Path) -> dict[str, str]:
        """A caller's environment with the token of the README's own `hivemesh join-token` command."""
        code, token, err = await run_cli(env, *joins[0])
        assert code == 0, token + err
        return {**await child_env(env, "reporter", home, "client"), "HIVEMESH_JOIN_TOKEN": token.strip()}

    try:
        # Before the agents start, so they load the authz rule with their first view of the policies.
        for argv in allows:
            code, out, err = await run_cli(env, *argv)
            assert code == 0, out + err
        # The reference agents as `hivemesh up` runs them (its pipeline's extractor; its research demo's
        # searchers, one process), then the README's agent as its author runs it.
        logs = {name: tmp_path / f"{name}.log" for name in ("extractor", "searchers", "shouter")}
        extractor = await _spawn(["-m", "hivemesh.agents.run", "extractor"], await child_env(
            env, "extractor", tmp_path / "extractor-home", HIVEMESH_PARENT_PID=str(os.getpid())), REPO,
            logs["extractor"])
        procs.append(extractor)
        tokens = {name: (await env.operator.create_join_token(name, "agent", 120)).token for name in SEARCHERS}
        searchers_env = await child_env(env, "papers", tmp_path / "searchers-home", HIVEMESH_JOIN_TOKENS=json.dumps(
            tokens), HIVEMESH_PARENT_PID=str(os.getpid()))
        del searchers_env["HIVEMESH_JOIN_TOKEN"]  # each agent joins with its own token from HIVEMESH_JOIN_TOKENS
        searchers = await _spawn(["-m", "hivemesh.agents.run", *SEARCHERS], searchers_env, REPO, logs["searchers"])
        procs.append(searchers)
        agent = await _spawn([agent_py.name], await child_env(env, "shouter", tmp_path / "shouter-home"),
                             tmp_path, logs["shouter"])
        procs.append(agent)
        await _wait_said(extractor, logs["extractor"], "agent extractor serving on ")
        await _wait_said(searchers, logs["searchers"], *(f"serving {name} on " for name in SEARCHERS))
        await _wait_said(agent, logs["shouter"], "agent shouter serving on ")

        (code, said, complained), (fan_code, fan_said, fan_complained) = await asyncio.gather(
            _run(caller_py, await caller_env(tmp_path / "reporter-home")),
            _run(fanout_py, await caller_env(tmp_path / "fanout-home")))
        assert code == 0, f"the README's caller exited {code}:\n{complained[-3000:]}"
        assert said.split() == ["A", "B"], (said, complained[-3000:])
        assert fan_code == 0, f"the README's FanOut exited {fan_code}:\n{fan_complained[-3000:]}"
        fanned = json.loads(fan_said)
        assert fanned["failed"] == {}, fanned
        assert sorted(fanned["output"]) == sorted(f"search-{name}" for name in SEARCHERS), fanned
        assert all(fanned["output"][f"search-{name}"]["source"] == name for name in SEARCHERS), fanned

        agent.send_signal(signal.SIGTERM)  # "stops cleanly on SIGTERM"
        await asyncio.wait_for(agent.wait(), 15)
        assert agent.returncode == 0, f"exit {agent.returncode}; log:\n{_tail(logs['shouter'])}"
    finally:
        for proc in procs:
            await stop(proc)
        await stop_mesh_env(env)
