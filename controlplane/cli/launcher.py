"""The dev launcher behind `hivemesh up`: a whole mesh on this machine, then a demo workflow over it.

Starts an embedded etcd, the control plane, and the reference document pipeline (OCR → extraction →
validation → storage): three SDK agents with in-process mesh layers and one plain gRPC agent behind a
`hivemesh sidecar` process, the way an agent in another language joins. Then it runs the shipped sample
documents through the pipeline over the mesh and prints each result and the hops it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from hivemesh.controlplane.ca import CA_PENDING, CaBusyError, CaFiles, Unfinished, init_ca, load_ca
from hivemesh.controlplane.ca_rotation import STATE_FILE as ROTATION_STATE
from hivemesh.controlplane.ca_rotation import CaRotation
from hivemesh.controlplane.cli import localmesh
from hivemesh.controlplane.cli.context import run_async
from hivemesh.controlplane.cli.procs import Child, Supervisor
from hivemesh.controlplane.cli.restarts import Restartable, Say, describe_exit
from hivemesh.controlplane.cli.uplock import UpLock
from hivemesh.controlplane.etcd_certs import (
    follow_signing_root,
    issue_etcd_certs,
    issuer_of,
    roots_in,
    write_etcd_trust,
)
from hivemesh.controlplane.metrics_sd import JOB_CONTROLPLANE, JOB_NODES, SD_DIR, ScrapeTarget, write_file_sd
from hivemesh.mesh import json_depth
from hivemesh.mesh.advertise import ADVERTISE_ENV, LISTEN_ENV, advertised_host, check_host, join_host_port
from hivemesh.mesh.audit.handshake.switch import child_environment
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import FailedPreconditionError
from hivemesh.mesh.etcd import EtcdServer, EtcdStartError
from hivemesh.mesh.node_metrics import METRICS_LISTEN_ENV, OWNED_DEFAULT, metrics_listen
from hivemesh.mesh.registry import RegistryView
from hivemesh.mesh.settings import STATE_FILE, MeshSettings
from hivemesh.mesh.tls import load_workload_files
from hivemesh.mesh.trustdoc import fingerprint

DEMO_GRANTS = Path(__file__).with_name("demo-grants.yaml")
DEMO_PATTERNS_AUTHZ = Path(__file__).with_name("demo-patterns-authz.yaml")
DEMO_AUTHZ = Path(__file__).with_name("demo-authz.yaml")
DEMO_PROVIDERS = Path(__file__).with_name("demo-providers.yaml")
PIPELINE = ("ocr", "extract", "validate", "store")
_READY_S = 60.0


@dataclass(frozen=True)
class UpOptions:
    """What `hivemesh up` runs with."""

    home: Path
    certs_dir: Path
    trust_domain: str = "hivemesh.local"
    once: bool = False
    grants_file: Path = DEMO_GRANTS
    demo: str = "default"
    """'default' (the document pipeline, then a tour of the other five patterns), 'tour', 'none' (only etcd and
    the control plane), or one demo's name (see hivemesh.agents.demos.DEMOS)."""
    listen: str = "127.0.0.1"
    """The host etcd, the control plane, the sidecar and the SDK agents bind (a wildcard needs advertise)."""
    advertise: str | None = None
    """The host they tell others (mesh.json, the registry, certificates); default: listen."""

    @property
    def advertised(self) -> str:
        """advertise, else listen; ValueError for a wildcard (no remote caller can dial it)."""
        return advertised_host(check_host(self.listen, what="--listen"), self.advertise)


def _python(*module_args: str) -> list[str]:
    return [sys.executable, "-m", *module_args]


def _ensure_ca(certs_dir: Path, trust_domain: str, say: Say) -> None:
    """A whole development CA in certs_dir, made when there is none, or again when an `up` or a `certs init` was
    killed while making it (`init_ca`'s CA_PENDING marker). Keys written then, without ca.pem, made every later `up`
    refuse ("already holds CA material ... use --force", an option `up` has not); ca.pem without operator.pem
    failed later, in the control plane."""
    files = CaFiles.in_dir(certs_dir)
    if files.ca_cert.exists() and not (certs_dir / CA_PENDING).exists():
        return
    if _init_ca_whole(certs_dir, trust_domain, say):
        say(f"created a development CA in {certs_dir} (private keys stay there, never committed)")


def _init_ca_whole(certs_dir: Path, trust_domain: str, say: Say) -> bool:
    """`init_ca` (whole or nothing), its errors worded for `up`; False when another `up` made the CA between our
    look and init_ca's claim of the folder."""

    def unfinished(left: Unfinished) -> None:
        say(f"a previous `{left.maker}` was stopped while it made the development CA in {certs_dir}: removed what "
            f"it left ({', '.join(left.removed) or 'no files'}); making it again")

    try:
        init_ca(certs_dir, trust_domain, maker="hivemesh up", on_unfinished=unfinished)
    except CaBusyError as exc:
        raise RuntimeError(
            f"another `{exc.maker}` is making the development CA in {certs_dir} right now: run this one again once "
            "that one says it created it") from None
    except FailedPreconditionError:
        if CaFiles.in_dir(certs_dir).ca_cert.exists():
            return False  # made meanwhile: it is whole (init_ca removes its marker only then)
        names = [p.name for p in CaFiles.in_dir(certs_dir).all() if p.exists()]
        raise FailedPreconditionError(
            f"{certs_dir} holds part of a CA ({', '.join(names)}) but no ca.pem, and no marker says an `up` was "
            f"stopped while making it, so `up` leaves it alone. If nothing uses these keys, remove them (cd "
            f"{certs_dir} && rm {' '.join(names)}) and run `hivemesh up` again, or make a new CA over them: "
            f"hivemesh --certs-dir {certs_dir} certs init --force") from None
    except OSError as exc:
        raise OSError(f"could not create a development CA in {certs_dir}: {exc.strerror or exc}") from exc
    return True


class MeshUp:
    """Brings the local mesh up, runs the demo, and takes everything down again."""

    def __init__(self, opts: UpOptions, say: Say, show_result: Callable[[Mapping[str, Any]], None],
                 started_at: float | None = None) -> None:
        self.opts = opts
        self.started_at = time.time() if started_at is None else started_at
        self.say = say
        self.show_result = show_result
        self.etcd: EtcdServer | None = None
        self.sup = Supervisor(opts.home / "logs")
        self.settings: MeshSettings | None = None
        self.operator: ControlPlaneClient | None = None
        self.stop_requested = asyncio.Event()
        self.signalled: int | None = None
        """The first SIGINT, SIGTERM or SIGHUP received, if any."""
        # The demo's client and workflow engine live as long as `up`: a run waiting for a person resumes when
        # someone approves it from another terminal.
        self._demo_stack = contextlib.AsyncExitStack()
        self.scrape_targets: list[ScrapeTarget] = []
        """The /metrics port of every node started, written for Prometheus's file-based discovery."""
        self._etcd_started = False
        self._announced: list[_Ports] = []
        """The children whose ready lines (their metrics addresses) are read once every child is up."""
        # What etcd and the control plane trust and present, as `_follow_ca` keeps them through a CA rotation.
        self._ca_lock = asyncio.Lock()
        """Held while etcd is restarted (a crash or a rotation step), so the two never restart it at once."""
        self._cp: Child | None = None
        self._etcd_roots: frozenset[str] = frozenset()
        """The roots the running etcd accepts client certificates from (its copy of the bundle when it started)."""
        self._follower: asyncio.Task[None] | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # SIGHUP: the terminal was closed. Left to its default, `up` died on the spot: its children went down
        # unordered (parent-death signal), mesh.json, the note for the CLI and the Prometheus targets stayed.
        # Ignored (`nohup hivemesh up &`), it stays ignored: that mesh is meant to outlive the terminal.
        hangup = [] if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else [signal.SIGHUP]
        for sig in (signal.SIGINT, signal.SIGTERM, *hangup):
            loop.add_signal_handler(sig, self._on_signal, sig)
        main = asyncio.ensure_future(self._run())
        stopper = asyncio.ensure_future(self.stop_requested.wait())
        try:
            done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                return main.result()
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await main
            if not self.opts.once:
                self.say("stopping (signal received)")
                return 0  # Ctrl-C is how a running mesh is meant to stop
            # --once promises the demo's verdict: one cut short is no success (a CI job's timeout must not pass)
            assert self.signalled is not None
            self.say(f"stopping ({signal.Signals(self.signalled).name} received before the demo finished)")
            return 128 + self.signalled
        finally:
            stopper.cancel()
            await self.shutdown()

    def _on_signal(self, sig: int) -> None:
        """Stop: the first signal decides `--once`'s exit code."""
        if self.signalled is None:
            self.signalled = sig
        self.stop_requested.set()

    async def _run(self) -> int:
        await self.start_infrastructure()
        await self.start_agents()
        await self.write_scrape_targets()
        self.supervise()
        code = await self.demo()
        if self.opts.once:
            return code
        self.say(
            "mesh is up. Try, in another terminal (any folder):  hivemesh agents   |   hivemesh workflows list   |   "
            "hivemesh escalations list   |   "
            "hivemesh call extract --data '{\"text\": \"INVOICE #1 TOTAL: $5.00\"}'   — Ctrl-C stops everything"
        )
        if hint := path_hint():
            self.say(hint)
        await self.stop_requested.wait()
        return code

    def supervise(self) -> None:
        """From here on a child that dies is reported and restarted (etcd too); see restarts.py."""
        self.sup.supervise(self.say)
        if self.etcd is not None:
            self.sup.watch(EtcdUnit(self.etcd, self.opts.home / "logs" / "etcd.log", lock=self._ca_lock,
                                    before_start=self._etcd_certs_usable))
            self._follower = asyncio.get_running_loop().create_task(self._follow_ca())

    # --- infrastructure ------------------------------------------------------------------------------------
    async def start_infrastructure(self) -> None:
        opts = self.opts
        opts.home.mkdir(parents=True, exist_ok=True)
        files = CaFiles.in_dir(opts.certs_dir)
        _ensure_ca(opts.certs_dir, opts.trust_domain, self.say)
        # Mutual TLS with auth on: certificates from the mesh CA (renewed at every `up`), roles bootstrapped.
        # etcd trusts its own copy of the bundle, so `up` knows which roots it accepts (`_follow_ca`).
        etcd_tls = issue_etcd_certs(load_ca(opts.certs_dir), opts.certs_dir, host=opts.advertised, own_trust=True)
        self._etcd_roots = roots_in(etcd_tls.trusted_ca_file)
        self.etcd = EtcdServer(data_dir=opts.home / "etcd", log_path=opts.home / "logs" / "etcd.log", tls=etcd_tls,
                               host=opts.advertised, listen_host=opts.listen)
        (opts.home / "logs").mkdir(parents=True, exist_ok=True)
        start_etcd(self.etcd)  # from the main thread: etcd's parent-death signal is tied to the spawning thread
        self._etcd_started = True
        self.say(f"etcd {self.etcd.endpoint} (pid {self.etcd.pid}, data in {opts.home / 'etcd'})")
        cp = await self.sup.spawn(
            "controlplane",
            _python(
                "hivemesh.controlplane.cli", "--certs-dir", str(opts.certs_dir), "--home", str(opts.home),
                "controlplane",
                "--etcd", self.etcd.endpoint,
                "--state-dir", str(opts.home / "controlplane"),
                "--trust-domain", opts.trust_domain,
                "--grants", str(opts.grants_file),
                "--host", opts.listen, "--advertise", opts.advertised,
            ),
            child_environment({}, inherit=os.environ),  # the handshaker tracer from the start
        )
        m = await cp.wait_for_line(r"ready controlplane=(\S+) join=(\S+) metrics=(\S+)", _READY_S)
        self._cp = cp
        # A restart keeps the ports the first start chose: mesh.json and every node's settings stay right.
        cp.args += ["--port", _port(m.group(1)), "--join-port", _port(m.group(2))]
        if m.group(3) != "off":
            cp.args += ["--metrics-listen", m.group(3)]
        self._target(m.group(3), JOB_CONTROLPLANE, "controlplane")
        self.settings = MeshSettings(
            etcd=self.etcd.endpoint,
            controlplane=m.group(1),
            join=m.group(2),
            ca_bundle=files.ca_cert,
            trust_domain=opts.trust_domain,
        )
        state = opts.home / STATE_FILE
        up = {"pid": os.getpid(), "started_at": self.started_at, "certs_dir": str(opts.certs_dir)}
        state.write_text(json.dumps({**self.settings.to_json(), **up}, indent=2))
        try:
            localmesh.register(localmesh.LocalMesh(
                home=opts.home, certs_dir=opts.certs_dir, pid=os.getpid(), started_at=self.started_at,
                controlplane=self.settings.controlplane, etcd=self.settings.etcd))
        except OSError as exc:  # e.g. a read-only home folder: the mesh runs, only other folders cannot see it
            self.say(f"could not note this mesh for the CLI in other folders ({exc}): there, set HIVEMESH_HOME="
                     f"{opts.home} HIVEMESH_CERTS={opts.certs_dir}")
        self.say(f"control plane {m.group(1)} (joins on {m.group(2)}, pid {cp.pid})")
        self.operator = ControlPlaneClient.from_certs_dir(self.settings.controlplane, opts.certs_dir)
        await self._apply_policies(DEMO_AUTHZ)  # authorization is default deny: the demo's own rules

    async def _apply_policies(self, path: Path, *, only: set[str] | None = None) -> None:
        """Apply the policy documents in path (only those named in `only`, when given: each must be there)."""
        from hivemesh.controlplane.policies import apply_policies, parse_documents, validate_documents
        from hivemesh.mesh.etcd import client as etcd_client
        from hivemesh.mesh.etcd import wait_connected

        assert self.settings is not None
        text = await asyncio.to_thread(path.read_text)
        raws = parse_documents(text, source=str(path))
        if only is not None:
            raws = [r for r in raws if isinstance(r, dict) and r.get("name") in only]
            missing = only - {r["name"] for r in raws}
            if missing:
                raise RuntimeError(f"{path} has no document named {', '.join(sorted(missing))}")
        items = validate_documents(raws)
        assert self.etcd is not None
        etcd = etcd_client(self.etcd.access)  # as root: `up` started this etcd with the mesh CA it holds
        try:
            await wait_connected(etcd)
            await apply_policies(etcd, items)
        finally:
            await etcd.close()

    def _env(self, token: str) -> dict[str, str]:
        assert self.settings is not None
        s = self.settings
        # The handshaker tracer on from the start, so each front door audits the TLS handshakes it refuses.
        return child_environment({
            "HIVEMESH_HOME": str(self.opts.home),
            "HIVEMESH_ETCD": s.etcd,
            "HIVEMESH_CONTROLPLANE": s.controlplane,
            "HIVEMESH_JOIN": s.join,
            "HIVEMESH_CA": str(s.ca_bundle),
            "HIVEMESH_TRUST_DOMAIN": s.trust_domain,
            "HIVEMESH_JOIN_TOKEN": token,
            LISTEN_ENV: self.opts.listen,
            ADVERTISE_ENV: self.opts.advertised,
        }, inherit=os.environ)

    async def _join_token(self, name: str, kind: str = "agent") -> str:
        assert self.operator is not None
        return (await self.operator.create_join_token(name, kind, 300)).token

    def _demos(self) -> list[str]:
        from hivemesh.agents.demos import demos_for

        return [] if self.opts.demo == NO_DEMO else demos_for(self.opts.demo)

    async def start_agents(self) -> None:
        demos = self._demos()
        if demos:
            # Only the agents started here may serve the demos' capabilities (kind `providers`): another agent
            # registering `extract` draws none of the demo's calls. Other demos' capabilities stay open.
            await self._apply_policies(DEMO_PROVIDERS, only={f"demo-{d}" for d in demos})
        if "pipeline" in demos:
            await self.start_pipeline_agents()
        await self.start_demo_agents([d for d in demos if d != "pipeline"])

    async def start_demo_agents(self, demos: list[str]) -> None:
        """Each example's agents in one process per example (each agent its own identity and registration)."""
        from hivemesh.agents.demos import DEMOS
        from hivemesh.controlplane.policies import apply_text
        from hivemesh.mesh.etcd import client as etcd_client
        from hivemesh.mesh.etcd import wait_connected

        if not demos:
            return
        assert self.settings is not None
        # Authorization is default deny: allow the tour's calls (the policy store validates the document).
        assert self.etcd is not None
        etcd = etcd_client(self.etcd.access)
        try:
            await wait_connected(etcd)
            await apply_text(etcd, DEMO_PATTERNS_AUTHZ.read_text(), source=str(DEMO_PATTERNS_AUTHZ))
        finally:
            await etcd.close()
        wanted: list[str] = []
        for name in demos:
            demo = DEMOS[name]
            tokens = {agent: await self._join_token(agent) for agent in demo.agents}
            env = {**self._env(""), "HIVEMESH_JOIN_TOKENS": json.dumps(tokens)}
            child = await self.sup.spawn(f"demo-{name}", _python("hivemesh.agents.run", *demo.agents), env)
            # pid first: a long line wraps on a narrow terminal, and tools look for "pid N"
            self.say(f"{name} demo (pid {child.pid}): SDK agents {', '.join(demo.agents)} in one process")
            # One metrics port per agent, from one environment: a restart cannot ask for them again, so the
            # Prometheus targets follow the new ones (after_restart).
            self._announced.append(_Ports(self, child, [
                _Ready(rf"serving {agent} on \S+ metrics=(?P<metrics>\S+)", agent) for agent in demo.agents]))
            wanted.extend(demo.capabilities)
        await self._wait_registered(wanted)
        self.say(f"all {len(wanted)} demo capabilities are registered in etcd")

    async def _wait_registered(self, capabilities: list[str]) -> None:
        assert self.settings is not None and self.etcd is not None
        view = RegistryView(self.etcd.access, trust_domain=self.settings.trust_domain)
        await view.start()
        registered = asyncio.ensure_future(self._registered(view, capabilities))
        # Nothing restarts a child before `supervise`: one that died (a crash, a kill) never registers, and
        # waiting out _READY_S for it left `up` silent for a minute before saying so.
        units: list[Restartable] = [*self.sup.children, EtcdUnit(self.etcd, self.opts.home / "logs" / "etcd.log")]
        exits = {asyncio.ensure_future(u.wait_exit()): u for u in units}
        try:
            done, _ = await asyncio.wait({registered, *exits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (registered, *exits):
                task.cancel()
            await asyncio.gather(registered, *exits, return_exceptions=True)
            await view.stop()
        if registered in done:
            registered.result()
            return
        died = next(task for task in exits if task in done)
        unit = exits[died]
        tail = "\n    ".join(unit.tail(8)) or "(no output)"
        raise RuntimeError(f"{unit.name} (pid {unit.pid}) {describe_exit(died.result())} while the mesh was "
                           f"starting (log: {unit.log_path}); last output:\n    {tail}")

    async def _registered(self, view: RegistryView, capabilities: list[str]) -> None:
        deadline = time.monotonic() + _READY_S
        for capability in capabilities:
            remaining = max(deadline - time.monotonic(), 0.1)
            if not await view.wait_for_capability(capability, 1, timeout=remaining):
                raise TimeoutError(f"capability {capability!r} did not register within {_READY_S:.0f} s")

    async def start_pipeline_agents(self) -> None:
        assert self.settings is not None
        for agent in ("ocr", "extractor", "storage"):
            token = await self._join_token(agent)
            child = await self.sup.spawn(agent, _python("hivemesh.agents.run", agent), self._env(token))
            self.say(f"agent {agent}: SDK, in-process mesh layers (pid {child.pid})")
            announced = rf"agent {agent} serving on (?P<endpoint>\S+) as \S+ \(metrics (?P<metrics>[^,)\s]+)"
            self._announced.append(_Ports(self, child, [_Ready(announced, agent, _agent_pins)]))  # then ", health"
        plain = await self.sup.spawn("validator", _python("hivemesh.agents.run", "validator", "--port", "0"))
        m = await plain.wait_for_line(r"listening (127\.0\.0\.1:\d+)", _READY_S)
        plain.args[-1] = _port(m.group(1))  # restarted on the same port: its sidecar keeps calling it there
        sidecar = await self.sup.spawn(
            "validator-sidecar",
            _python("hivemesh.controlplane.cli", "sidecar", "--agent", m.group(1),
                    "--listen", join_host_port(self.opts.listen, 0), "--advertise", self.opts.advertised),
            self._env(await self._join_token("validator")),
        )
        self.say(f"agent validator: plain gRPC on {m.group(1)} (pid {plain.pid}), behind a sidecar (pid {sidecar.pid})")
        listen = self.opts.listen
        ports = _Ports(self, sidecar, [_Ready(
            r"sidecar ready inbound=(?P<inbound>\S+) mesh=(?P<mesh>\S+) metrics=(?P<metrics>\S+)", "validator",
            lambda ready: _sidecar_pins(ready, listen))])
        (ready,) = await ports.read()
        # A Unix socket only this user can open: no other local process can call the mesh as the validator.
        self.say(f"  its Mesh service (for the agent's own calls): {ready.group('mesh')}")
        await self._wait_registered(list(PIPELINE))
        self.say("all four pipeline capabilities are registered in etcd")

    # --- Prometheus discovery ---------------------------------------------------------------------------------
    def _target(self, address: str, job: str, node: str) -> None:
        """Note node's /metrics address, in place of the one it had (a restart on another port)."""
        if address == "off":
            return
        target = ScrapeTarget(address, job, node)
        for i, had in enumerate(self.scrape_targets):
            if (had.job, had.node) == (job, node):
                self.scrape_targets[i] = target
                return
        self.scrape_targets.append(target)

    async def write_scrape_targets(self) -> None:
        for ports in self._announced:
            await ports.read()
        self._announced.clear()
        paths = write_file_sd(self.opts.home / SD_DIR, self.scrape_targets)
        self.say(f"Prometheus targets ({len(self.scrape_targets)} nodes, file_sd): {', '.join(map(str, paths))}")

    # --- the demo --------------------------------------------------------------------------------------------
    async def demo(self) -> int:
        from hivemesh.agents.pipeline import list_samples, process_document
        from hivemesh.sdk import MeshClient

        assert self.settings is not None
        s = self.settings
        settings = MeshSettings(
            etcd=s.etcd, controlplane=s.controlplane, join=s.join, ca_bundle=s.ca_bundle,
            trust_domain=s.trust_domain, join_token=await self._join_token("demo", "client"),
        )
        failures = 0
        demos = self._demos()
        if not demos:
            return 0
        # With a metrics port of its own, like every node `up` starts: its calls are the mesh's caller-side view
        # (the dashboard's caller-side p99, the outbound error ratios), which no agent's port shows.
        mesh = await self._demo_stack.enter_async_context(MeshClient.connect(
            name="demo", settings=settings, metrics_listen=metrics_listen(None, OWNED_DEFAULT)))
        if mesh.node.metrics is not None:
            self._target(mesh.node.metrics.address, JOB_NODES, "demo")
            write_file_sd(self.opts.home / SD_DIR, self.scrape_targets)
            self.say(f"demo client: metrics on {mesh.node.metrics.address} (a Prometheus target too)")
        if "pipeline" in demos:
            failures += await self._pipeline_demo(mesh, list_samples, process_document)
        tour = [d for d in demos if d != "pipeline"]
        if tour:
            failures += await self._tour(mesh, tour)
        return 1 if failures else 0

    async def _tour(self, mesh: Any, names: list[str]) -> int:
        """Each pattern demo as durable workflows, with progress as it goes and a summary row per demo."""
        from hivemesh.agents.demos import DemoContext, run_demo
        from hivemesh.sdk.escalation import EscalationClient
        from hivemesh.sdk.workflow import WorkflowEngine

        assert self.operator is not None
        failures = 0
        rows: list[dict[str, Any]] = []
        engine = await self._demo_stack.enter_async_context(WorkflowEngine(mesh))
        dc = DemoContext(engine, EscalationClient(self.operator), self.say, self.opts.once)
        for name in names:
            try:
                row = await run_demo(name, dc)
            except Exception as exc:  # noqa: BLE001 - the demo reports every failure and goes on
                row = {"demo": name, "state": "FAILED", "error": f"{type(exc).__name__}: {exc}"}
            if row.get("state") not in ("COMPLETED", "INPUT_REQUIRED"):
                failures += 1
            rows.append(row)
            self.show_result(row)
        self.show_result({"summary": rows})
        return failures

    async def _pipeline_demo(self, mesh: Any, list_samples: Any, process_document: Any) -> int:
        failures = 0
        for sample in list_samples():
            try:
                result = await process_document(mesh, sample)
            except Exception as exc:  # noqa: BLE001 - the demo reports every failure and goes on
                failures += 1
                self.show_result({"sample": sample, "error": f"{type(exc).__name__}: {exc}"})
                continue
            self.show_result(result)
        return failures

    # --- CA rotation -----------------------------------------------------------------------------------------
    async def _follow_ca(self) -> None:
        """Keep etcd and the control plane in step with a CA rotation run while `up` runs (`hivemesh ca rotate`),
        checked whenever a step changes the bundle (`ca.pem`) or the phase (`rotation.json`). Left as they started,
        etcd went on accepting client certificates from the first root only (workloads renewed at `activate` were
        refused) and, after `finish`, presented a certificate from the dropped root: no client could verify it,
        and a restarted control plane or etcd never came back."""
        watched = (CaFiles.in_dir(self.opts.certs_dir).ca_cert, self.opts.certs_dir / ROTATION_STATE)
        seen: tuple[bytes, ...] = ()
        while True:
            await asyncio.sleep(_FOLLOW_S)
            now = await asyncio.to_thread(_contents, watched)
            if now == seen:
                continue
            await asyncio.sleep(_FOLLOW_S)  # a step writes the bundle, then its phase: act once both are written
            if await asyncio.to_thread(_contents, watched) != now:
                continue
            try:
                await self._etcd_follows_ca()
            except Exception as exc:  # noqa: BLE001 - said, then tried again: etcd or the control plane may recover
                self.say(f"etcd could not follow the CA in {self.opts.certs_dir} ({type(exc).__name__}: {exc}); "
                         f"trying again in {_FOLLOW_RETRY_S:g} s")
                await asyncio.sleep(_FOLLOW_RETRY_S)
                continue
            seen = now

    async def _etcd_follows_ca(self) -> None:
        """Bring etcd in line with the CA in the certs folder, in the order that refuses no one at any step:
        - the bundle's roots changed (`prepare` adds one, `finish` drops one): etcd is restarted on a copy of the
          new bundle (it reads its trusted CAs only at start). The control plane carries on, the same process: its
          etcd client reads its credentials from the certs folder again when it reconnects (`_TlsClient` in
          mesh/etcd.py), so it verifies etcd with the new bundle and presents its current certificate (from the
          new root since `activate`, so etcd accepts it once `finish` dropped the old one). `up` waits until it
          answers through etcd again (`_controlplane_answers`);
        - the signing root changed (`activate`): etcd's certificate and root identity are re-issued from it in
          place (etcd reads them at each handshake), as every client trusts it by then (the control plane from
          its first reconnect after `prepare`), so after `finish` every client still verifies etcd.
        The control plane is restarted only when no root of the bundle issued the certificate in the folder it
        would present (it did not follow the steps, e.g. it was down: its start re-issues it, which rereading
        cannot), or when it does not answer within _CP_BACK_S of etcd's return (the old way, as a safety net)."""
        etcd, cp = self.etcd, self._cp
        assert etcd is not None and etcd.tls is not None
        tls, certs = etcd.tls, self.opts.certs_dir
        async with self._ca_lock:
            ca = await asyncio.to_thread(load_ca, certs)
            roots = frozenset(fingerprint(c) for c in x509.load_pem_x509_certificates(ca.bundle_pem()))
            signer = fingerprint(ca.certificate)
            stale = any(issuer_of(p, [ca.certificate]) is None for p in (tls.cert_file, tls.admin_cert_file))
            retrust = roots != self._etcd_roots
            bounce = cp is not None and self._issuer(CaFiles.in_dir(certs).controlplane_cert) is None
            if not (stale or retrust or bounce):
                return
            rotation = CaRotation(certs).state
            phase = "finished" if rotation.phase == "steady" and rotation.generation > 1 else rotation.phase
            plan = [what for what, due in (
                ("re-issuing etcd's certificate from the new signing root", stale),
                (f"restarting etcd to trust {_roots_text(roots)}", retrust),
                ("restarting the control plane, whose certificate no root of the bundle issued", bounce)) if due]
            self.say(f"CA rotation {phase} (generation {rotation.generation}): {'; '.join(plan)}")
            held = [name for name, due in (("controlplane", bounce), ("etcd", retrust)) if due]
            async with self.sup.planned.hold(*held):
                if bounce and cp is not None:
                    await self.sup.stop_child(cp)
                if stale:
                    await asyncio.to_thread(follow_signing_root, ca, tls.cert_file.parent)
                if retrust:
                    await stop_etcd(etcd)
                    self._etcd_roots = await asyncio.to_thread(write_etcd_trust, certs, tls.trusted_ca_file)
                    await start_etcd_async(etcd, _READY_S)
                if bounce and cp is not None:
                    await cp.restart()
                    await cp.wait_for_line(r"ready controlplane=", _READY_S)
            self._refresh_operator()
            if retrust and not bounce and cp is not None and not await self._controlplane_answers(_CP_BACK_S):
                self.say(f"the control plane (pid {cp.pid}) did not answer through etcd within {_CP_BACK_S:g} s "
                         f"of etcd's restart: restarting it")
                async with self.sup.planned.hold("controlplane"):
                    await self.sup.stop_child(cp)
                    await cp.restart()
                    await cp.wait_for_line(r"ready controlplane=", _READY_S)
                bounce = True
            cp_note = ""
            if cp is not None and (bounce or retrust):
                cp_note = f"; control plane restarted (pid {cp.pid})" if bounce else \
                    f"; control plane carried on (pid {cp.pid})"
            self.say(f"etcd follows the CA rotation (generation {rotation.generation}): it trusts "
                     f"{_roots_text(self._etcd_roots)}; its certificate is from the signing root {signer[:16]}"
                     + cp_note)

    async def _controlplane_answers(self, limit_s: float) -> bool:
        """Whether the control plane answers a call that reads etcd (the agent list) within limit_s: its etcd
        client is back, on the credentials the new etcd accepts."""
        if self.operator is None:
            return True
        deadline = time.monotonic() + limit_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(Exception):  # etcd, or the control plane's client of it, not back yet
                async with asyncio.timeout(left):
                    await self.operator.list_agents()
                return True
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _issuer(self, cert: Path) -> str | None:
        """The root of the bundle now in the certs folder that issued cert (None: none did)."""
        try:
            bundle = x509.load_pem_x509_certificates(CaFiles.in_dir(self.opts.certs_dir).ca_cert.read_bytes())
        except (OSError, ValueError):
            return None
        return issuer_of(cert, bundle)

    def _etcd_certs_usable(self) -> None:
        """Before etcd starts again after a crash: its certificate and root identity re-issued from the signing
        root when no root of the bundle issued them any more (no client, nor `up`'s health check, could verify
        it). The roots it trusts stay as they were: `_follow_ca` changes them, the control plane with them."""
        assert self.etcd is not None and self.etcd.tls is not None
        tls = self.etcd.tls
        if any(self._issuer(p) is None for p in (tls.cert_file, tls.admin_cert_file)):
            follow_signing_root(load_ca(self.opts.certs_dir), tls.cert_file.parent)

    def _refresh_operator(self) -> None:
        """`up`'s own operator client (join tokens, the tour's escalations) presents the operator certificate a
        step re-issued and trusts the bundle now in force."""
        if self.operator is None:
            return
        files = CaFiles.in_dir(self.opts.certs_dir)
        try:
            self.operator.update_workload(load_workload_files(files.operator_cert, files.operator_key, files.ca_cert))
        except (OSError, ValueError) as exc:
            self.say(f"could not reload the operator certificate in {self.opts.certs_dir}: {exc}")

    async def shutdown(self) -> None:
        self.sup.stopping.set()  # no restart from here on, and a restart's wait (a restarted etcd's health) ends
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._follower
        with contextlib.suppress(Exception):
            await self._demo_stack.aclose()
        if self.operator is not None:
            with contextlib.suppress(Exception):
                await self.operator.close()
        stopped = self._started()
        await self.sup.stop_all()
        if self.etcd is not None:
            self.etcd.stop()
        localmesh.unregister(self.opts.home, os.getpid())
        with contextlib.suppress(FileNotFoundError):
            (self.opts.home / STATE_FILE).unlink()
        if self.scrape_targets:
            with contextlib.suppress(OSError):
                write_file_sd(self.opts.home / SD_DIR, [])  # Prometheus drops the targets that are gone
        if stopped:  # up failing before anything started (its CA, etcd's data) stopped nothing
            self.say(f"stopped: {stopped}")

    def _started(self) -> str:
        """What this `up` started and `shutdown` stops, as "agents, sidecar, control plane and etcd" says it when all
        of it ran ("" for nothing): naming what never ran sent the reader looking for it."""
        names = {child.name for child in self.sup.children}
        sidecars = {name for name in names if name.endswith("-sidecar")}
        parts = [part for part, ran in (
            ("agents", bool(names - sidecars - {"controlplane"})),
            ("sidecar", bool(sidecars)),
            ("control plane", "controlplane" in names),
            ("etcd", self.etcd is not None and (self._etcd_started or self.etcd.running)),
        ) if ran]
        return ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else "".join(parts)


@dataclass(frozen=True)
class _Pin:
    """A port (or socket) a child told others at its first start, asked for again when `up` restarts it."""

    key: str
    """The option (`--port`) or, with env, the environment variable that sets it."""
    value: str
    """What key is given: the port, HOST:PORT, or a socket's path."""
    address: str | None = None
    """HOST:PORT whose port must be free for the restart to ask for it (None: no port, nothing to check)."""
    what: str = "port"
    env: bool = False


@dataclass(frozen=True)
class _Ready:
    """A line a child prints once one of its nodes serves: its group `metrics` is the node's Prometheus target;
    pins, given the match, what a restart asks for again."""

    pattern: str
    node: str
    pins: Callable[[re.Match[str]], list[_Pin]] | None = None


class _Ports:
    """Keeps one child's ports across `up`'s restarts of it: the restart asks for the ports its first start bound
    (Prometheus's file_sd targets, the Mesh socket printed, registry entries a caller still holds stay right);
    one another process took meanwhile is left to the child's default (a free one), and the targets file is
    written again with what its ready line then reports. Restarted on new ports, a node stayed a dead target (down,
    "connection refused") in Prometheus and `hivemesh top` for the rest of the run, and no alert said so."""

    def __init__(self, up: MeshUp, child: Child, readies: list[_Ready]) -> None:
        self.up = up
        self.child = child
        self.readies = readies
        self.args = list(child.args)
        self.env = dict(child.env)
        """How the first start ran: each restart starts from it, adding the pins still free."""
        self.pins: list[_Pin] = []
        child.before_restart = self._pin
        child.after_restart = self._reread

    async def read(self) -> list[re.Match[str]]:
        """Wait (bounded) for each ready line; note each node's target and what a restart pins."""
        matches: list[re.Match[str]] = []
        pins: list[_Pin] = []
        for ready in self.readies:
            m = await self.child.wait_for_line(ready.pattern, _READY_S)
            self.up._target(m.group("metrics"), JOB_NODES, ready.node)
            if ready.pins is not None:
                pins += ready.pins(m)
            matches.append(m)
        self.pins = pins
        return matches

    def _pin(self, child: Child) -> None:
        args, env = list(self.args), dict(self.env)
        for pin in self.pins:
            if pin.address is not None and not _port_free(pin.address):
                self.up.say(f"{child.name}: its {pin.what} {_port(pin.address)} is taken by another process now: it "
                            f"starts on a free one" + (" (the Prometheus targets follow)" if pin.key in _METRICS_KEYS
                                                       else " (its registry entry says which)"))
                continue
            if pin.env:
                env[pin.key] = pin.value
            else:
                _set_option(args, pin.key, pin.value)
        child.args, child.env = args, env

    async def _reread(self, child: Child) -> None:
        before = list(self.up.scrape_targets)
        await self.read()
        if self.up.scrape_targets == before:
            return
        moved = ", ".join(f"{t.node} {t.address}" for t in self.up.scrape_targets if t not in before)
        try:
            write_file_sd(self.up.opts.home / SD_DIR, self.up.scrape_targets)
        except OSError as exc:
            self.up.say(f"could not write the Prometheus targets in {self.up.opts.home / SD_DIR} ({exc}): "
                        f"Prometheus goes on scraping {child.name}'s old port (now: {moved})")
            return
        self.up.say(f"Prometheus targets rewritten: {child.name} restarted with metrics on {moved}")


def _agent_pins(ready: re.Match[str]) -> list[_Pin]:
    """An SDK agent's mutual-TLS port (`--port` of hivemesh.agents.run) and metrics port (its environment)."""
    endpoint, metrics = ready.group("endpoint"), ready.group("metrics")
    pins = [_Pin("--port", _port(endpoint), endpoint, "mutual-TLS port")]
    if metrics != "off":
        pins.append(_Pin(METRICS_LISTEN_ENV, metrics, metrics, "metrics port", env=True))
    return pins


def _sidecar_pins(ready: re.Match[str], listen: str) -> list[_Pin]:
    """A sidecar's inbound port (on the host it listens on), Mesh socket and metrics port."""
    inbound, mesh, metrics = ready.group("inbound"), ready.group("mesh"), ready.group("metrics")
    pins = [_Pin("--listen", join_host_port(listen, int(_port(inbound))), inbound, "inbound port")]
    if mesh.startswith("unix:"):
        pins.append(_Pin("--mesh-socket", mesh.removeprefix("unix:")))
    if metrics != "off":
        pins.append(_Pin("--metrics-listen", metrics, metrics, "metrics port"))
    return pins


_METRICS_KEYS = frozenset({METRICS_LISTEN_ENV, "--metrics-listen"})


def _set_option(args: list[str], option: str, value: str) -> None:
    """Give option value in args: in place of the value it has there, else added at the end."""
    if option in args[:-1]:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]


def _port_free(address: str) -> bool:
    """Whether no socket listens on address's port, on any interface of its family (bound with SO_REUSEADDR, as
    the children bind: a connection the dead child left in TIME_WAIT does not count)."""
    host, _, port = address.rpartition(":")
    family, anywhere = (socket.AF_INET6, "::") if host.startswith("[") else (socket.AF_INET, "0.0.0.0")
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((anywhere, int(port)))
        except (OSError, ValueError):
            return False
    return True


class EtcdUnit:
    """The embedded etcd as something `Supervisor.watch` keeps alive: restarted on its ports and data (under lock,
    after before_start, when given)."""

    def __init__(self, etcd: EtcdServer, log_path: Path, *, lock: asyncio.Lock | None = None,
                 before_start: Callable[[], None] | None = None) -> None:
        self.etcd = etcd
        self.name = "etcd"
        self.log_path = log_path
        self.lock = lock
        self.before_start = before_start

    @property
    def pid(self) -> int | None:
        return self.etcd.pid

    async def wait_exit(self) -> int | None:
        await _etcd_exited(self.etcd)
        return self.etcd.returncode

    def tail(self, n: int) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []

    async def restart(self) -> None:
        async with self.lock or contextlib.nullcontext():
            if self.before_start is not None:
                await asyncio.to_thread(self.before_start)
            await start_etcd_async(self.etcd, _READY_S)


async def _etcd_exited(etcd: EtcdServer) -> None:
    """Wait until the member running now (if any) has exited."""
    pid = etcd.pid
    if pid is not None and etcd.running:
        # A pidfd turns readable when the process exits (it stays our unreaped child until then).
        fd = os.pidfd_open(pid)
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, exited.set)
        try:
            await exited.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)


def start_etcd(etcd: EtcdServer, timeout: float = 30.0) -> None:
    """`etcd.start`, failing with the reason etcd gave for exiting: EtcdStartError's own message ends with the
    log's last lines, which after a panic are Go stack frames (where it stopped, not why)."""
    log_path = etcd.log_path
    mark = _file_size(log_path)
    try:
        etcd.start(timeout)
    except EtcdStartError as exc:
        reason = etcd_failure_reason(_read_from(log_path, mark))
        if reason is None:
            raise
        raise EtcdStartError(f"etcd could not start: {reason} (it {describe_exit(etcd.returncode)}; data in "
                             f"{etcd.data_dir}, log: {log_path})") from exc


async def start_etcd_async(etcd: EtcdServer, timeout: float) -> None:
    """Start etcd again (ports and data as before) without blocking the event loop: launched from the loop's
    thread (etcd's parent-death signal follows the thread that spawned it), then its health polled from a worker
    thread, at most 0.5 s a probe. Blocking the loop for it, as `start_etcd` does, `up` heard no SIGTERM until a
    member that never became healthy had had its whole timeout (60 s). Cancelled (a stop request), it returns at
    once; `up` stops the member it launched with the rest. Fails with the reason etcd gave when it exits."""
    tls = etcd.tls
    assert tls is not None, "`up` runs etcd with TLS"
    mark = _file_size(etcd.log_path)
    etcd.start(wait=False)
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(etcd._healthy_tls, tls):
        if (code := etcd.returncode) is not None:
            reason = etcd_failure_reason(_read_from(etcd.log_path, mark)) or "see its log"
            raise EtcdStartError(f"etcd could not start: {reason} (it {describe_exit(code)}; data in "
                                 f"{etcd.data_dir}, log: {etcd.log_path})")
        if time.monotonic() >= deadline:
            await stop_etcd(etcd)
            raise TimeoutError(f"etcd did not become healthy within {timeout:.0f} s (log: {etcd.log_path})")
        await asyncio.sleep(0.1)
    await asyncio.to_thread(etcd.bootstrap_auth)


async def stop_etcd(etcd: EtcdServer, timeout: float = 10.0) -> None:
    """`etcd.stop` without blocking the event loop while etcd shuts down: SIGTERM, SIGKILL after timeout."""
    pid = etcd.pid
    if pid is not None and etcd.running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_etcd_exited(etcd), timeout)
    if etcd.running:
        etcd.kill()
    else:
        etcd.stop()  # reaps it


def _contents(paths: tuple[Path, ...]) -> tuple[bytes, ...]:
    """What each file holds (b"" when it cannot be read)."""
    out: list[bytes] = []
    for path in paths:
        try:
            out.append(path.read_bytes())
        except OSError:
            out.append(b"")
    return tuple(out)


def _roots_text(roots: frozenset[str]) -> str:
    return f"{len(roots)} root{'s' if len(roots) != 1 else ''} ({', '.join(sorted(r[:16] for r in roots))})"


_FOLLOW_S = 0.25
"""How often `up` looks whether a CA rotation step changed the bundle."""
_CP_BACK_S = 20.0
"""How long the control plane has, once etcd is back from a rotation step's restart, to answer through it again
(it does within a second or two: the first request after etcd left rereads its credentials)."""
_FOLLOW_RETRY_S = 5.0


_GO_CRASH = re.compile(r"^(?:panic|fatal error): \S.*")
_ZAP_KNOWN = frozenset({"level", "ts", "caller", "msg", "error", "stacktrace", "logger"})


def etcd_failure_reason(log: str) -> str | None:
    """Why etcd stopped, from its log: the last fatal or panic JSON line ("msg: error" and a few short fields such
    as the path) or Go's own "panic: ..." / "fatal error: ..." line, whichever came last (a JSON panic's own Go
    panic line, just after it, says less), else the last error-level JSON line; None when there is none."""
    fatal: dict[str, Any] | None = None
    crash: str | None = None
    error: dict[str, Any] | None = None
    for raw in log.splitlines():
        line = raw.strip()
        if line.startswith("{"):
            try:
                entry = json_depth.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            level = entry.get("level")
            if level in ("fatal", "panic", "dpanic"):
                fatal, crash = entry, None
            elif level == "error":
                error = entry
        elif _GO_CRASH.match(line):
            if fatal is not None and fatal.get("level") != "fatal" and line == f"panic: {fatal.get('msg')}":
                continue  # the panic the JSON line above reported
            fatal, crash = None, line
    if fatal is not None:
        return _describe_log_entry(fatal)
    if crash is not None:
        return crash[:600]
    return _describe_log_entry(error) if error is not None else None


def _describe_log_entry(entry: dict[str, Any]) -> str:
    text = str(entry.get("msg") or "")
    if why := entry.get("error"):
        text = f"{text}: {why}" if text else str(why)
    extra = [f"{key} {value}" for key, value in entry.items()
             if key not in _ZAP_KNOWN and isinstance(value, str | int | float) and len(str(value)) <= 200][:3]
    if extra:
        text += f" ({', '.join(extra)})"
    return text[:600]


def _file_size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def _read_from(path: Path | None, offset: int, limit: int = 1 << 20) -> str:
    """At most the last `limit` bytes of path past offset ("" when it cannot be read)."""
    if path is None:
        return ""
    try:
        with path.open("rb") as f:
            f.seek(max(offset, _file_size(path) - limit))
            return f.read(limit).decode(errors="replace")
    except OSError:
        return ""


NO_DEMO = "none"


def _port(address: str) -> str:
    return address.rpartition(":")[2]


def path_hint() -> str | None:
    """How to get `hivemesh` on PATH when it is not (`./run up` runs it from the venv without activating it)."""
    here = Path(sys.executable).parent
    if not (here / "hivemesh").exists() or shutil.which("hivemesh") == str(here / "hivemesh"):
        return None
    return (f"`hivemesh` is not on your PATH: run `source {here / 'activate'}` in your shell (or call "
            f"{here / 'hivemesh'}); it finds this mesh from any folder")


def run_up(opts: UpOptions, say: Say, show_result: Callable[[Mapping[str, Any]], None]) -> int:
    """Blocking entry point used by the CLI: claims the state folder first (one `up` per folder)."""
    os.environ.setdefault("HIVEMESH_HOME", str(opts.home))
    lock = UpLock(opts.home)
    note = lock.acquire()  # MeshAlreadyRunningError: another `up` runs here; nothing was touched
    try:
        if note:
            say(note)
        return run_async(MeshUp(opts, say, show_result, started_at=lock.started_at).run(), spawns=True)
    finally:
        lock.release()
