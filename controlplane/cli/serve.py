"""`hivemesh controlplane` and `hivemesh sidecar`: the long-running processes, in the foreground."""

from __future__ import annotations

from pathlib import Path

import click

from hivemesh.controlplane.cli.context import CliContext, friendly_errors, pass_cli, run_async
from hivemesh.mesh.settings import DEFAULT_TRUST_DOMAIN, MeshSettings


@click.command()
@click.option("--etcd", "etcd_endpoints", envvar="HIVEMESH_ETCD", required=True, help="etcd endpoints host:port[,...]")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Private state (token signing keys). Default: <home>/controlplane.")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address both ports bind (0.0.0.0: every interface; then give --advertise).")
@click.option("--advertise", envvar="HIVEMESH_ADVERTISE", default=None, metavar="HOST",
              help="Host name or IP others dial (printed addresses, certificate SAN) [default: --host].")
@click.option("--port", default=0, show_default=True, help="mTLS port (0: any free port).")
@click.option("--join-port", default=0, show_default=True, help="Join port, server-TLS only (0: any free port).")
@click.option("--grants", "grants_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Grant file (YAML) written to etcd at start: the grants it names (grants it does not name, from "
                   "hivemesh allow or policy apply, stay; one removed from the file is deleted while still as "
                   "the file wrote it).")
@click.option("--cert-ttl", default=3600, show_default=True, help="Workload certificate lifetime, seconds.")
@click.option("--retention", envvar="HIVEMESH_RETENTION", default="", metavar="NAME=DURATION,...",
              help="What etcd keeps how long, e.g. 'workflows=1d,escalations=30d,history=10m'; 'off' disables "
                   "(defaults: docs/resilience.md).")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT",
              help="Plaintext Prometheus /metrics port, or 'off' [default: $HIVEMESH_METRICS_LISTEN, else "
                   "127.0.0.1:0].")
@click.option("--health-listen", default=None, metavar="HOST:PORT",
              help="Plaintext grpc.health.v1 port for probes (health only: no TLS, no audit), or 'off' "
                   "[default: $HIVEMESH_HEALTH_LISTEN, else off].")
@click.option("--leader-ttl", default=10, show_default=True, envvar="HIVEMESH_LEADER_TTL",
              help="Lease TTL (s) of the leader key and this replica's advert: with several replicas against one "
                   "etcd, a lost leader is replaced within it (docs/controlplane.md).")
@pass_cli
@friendly_errors
def controlplane(obj: CliContext, etcd_endpoints: str, state_dir: Path | None, trust_domain: str, host: str,
                 advertise: str | None, port: int, join_port: int, grants_file: Path | None, cert_ttl: int,
                 retention: str, metrics_listen: str | None, health_listen: str | None, leader_ttl: int) -> None:
    """Run the control plane: CA, token issuer, join service. Several may run against one etcd (replicas
    sharing certs dir and etcd; one leads the once-per-mesh duties)."""
    from hivemesh.controlplane.retention_config import RetentionConfig
    from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
    from hivemesh.controlplane.server import main as serve_controlplane
    from hivemesh.mesh.audit.handshake.switch import enable

    enable()  # consent to the handshake audit (the package's main turned the tracer on before gRPC loaded)
    try:
        kept = RetentionConfig.parse(retention)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--retention") from None

    try:
        config = ControlPlaneConfig(
            etcd_endpoints=etcd_endpoints, certs_dir=obj.certs_dir, state_dir=state_dir or obj.home / "controlplane",
            trust_domain=trust_domain, host=host, advertise=advertise, port=port, join_port=join_port,
            grants_file=grants_file, cert_ttl_s=cert_ttl, retention=kept, metrics_listen=metrics_listen,
            health_listen=health_listen, leader_ttl_s=leader_ttl,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None

    def ready(server: ControlPlaneServer) -> None:
        metrics = server.metrics.address if server.metrics is not None else "off"
        health = f" health={server.health_address}" if server.health_address is not None else ""
        click.echo(f"ready controlplane={server.address} join={server.join_address} metrics={metrics}{health}")

    run_async(serve_controlplane(config, on_started=ready))


@click.command()
@click.option("--agent", default=None, metavar="ADDRESS",
              help="The agent's plaintext address: loopback, e.g. 127.0.0.1:7001, or unix:PATH.")
@click.option("--client", default=None, metavar="NAME",
              help="Caller only, instead of --agent: join as client NAME and serve only Mesh for local callers "
                   "(no inbound port, no registration).")
@click.option("--listen", default="127.0.0.1:0", show_default=True,
              help="Inbound mutual-TLS listener, where the mesh calls the agent (ready line: inbound=).")
@click.option("--advertise", envvar="HIVEMESH_ADVERTISE", default=None, metavar="HOST",
              help="Host name or IP the registry tells callers to dial [default: the --listen host; required "
                   "when that is a wildcard such as 0.0.0.0].")
@click.option("--mesh-socket", default=None, metavar="PATH",
              help="Unix socket (0600, folder 0700) serving Mesh for local callers, the agent's own outbound "
                   "calls (ready line: mesh=) [default: <home>/run/sidecar-<pid>.sock].")
@click.option("--mesh-listen", default=None, metavar="HOST:PORT",
              help="Serve Mesh on loopback TCP instead of the socket. Unsafe on a shared host: any local "
                   "process can then call the mesh as this sidecar's identity.")
@click.option("--name", default=None, help="Agent name (default: from the agent card).")
@click.option("--lease-ttl", default=10, show_default=True, help="Registry lease TTL, seconds.")
@click.option("--max-input-bytes", default=4 * 1024 * 1024, show_default=True)
@click.option("--max-call-depth", default=8, show_default=True, type=click.IntRange(min=1),
              help="Most agents one call chain may pass through before this agent refuses it (DEPTH_EXCEEDED); "
                   "a capability declaring recursion keeps its own bound.")
@click.option("--max-held-calls", default=100, show_default=True, type=click.IntRange(min=1),
              help="Most calls this identity may hold queued at once (Mesh.Call with queue_for_ms, Enqueue); "
                   "one more is refused QUEUE_FULL.")
@click.option("--limit", "limits", multiple=True, metavar="CAP=BYTES",
              help="Input size limit of one capability (repeatable).")
@click.option("--no-content-screen", is_flag=True, help="Do not screen text fields for prompt-injection patterns.")
@click.option("--screen-exempt", multiple=True, metavar="CAP", help="A capability the content screen skips.")
@click.option("--output-classifier", default=None, metavar="MODULE:CALLABLE",
              help="What the output screens of the agent's capabilities act on, by name, e.g. "
                   "mypkg.dlp:classify [default: the pattern classifier].")
@click.option("--audit-dir", default=None, help="Audit spool directory (default: <home>/audit).")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT",
              help="Plaintext Prometheus /metrics port, or 'off' [default: $HIVEMESH_METRICS_LISTEN, else "
                   "127.0.0.1:0].")
@click.option("--health-listen", default=None, metavar="HOST:PORT",
              help="Plaintext grpc.health.v1 port for probes (health only: no TLS, no audit), or 'off' "
                   "[default: $HIVEMESH_HEALTH_LISTEN, else off].")
@friendly_errors
def sidecar(agent: str | None, client: str | None, listen: str, advertise: str | None, mesh_socket: str | None,
            mesh_listen: str | None, name: str | None, lease_ttl: int, max_input_bytes: int, max_call_depth: int,
            max_held_calls: int, limits: tuple[str, ...], no_content_screen: bool, screen_exempt: tuple[str, ...],
            audit_dir: str | None, metrics_listen: str | None, health_listen: str | None,
            output_classifier: str | None) -> None:
    """Front an agent written in any language (--agent), or serve a caller in any language (--client):
    mTLS, tokens, authz, audit, registry, routing.

    Prints `sidecar ready inbound=HOST:PORT mesh=unix:PATH metrics=HOST:PORT` once serving (a caller-only sidecar
    has no inbound=; with --health-listen, health=HOST:PORT follows; link=HOST:PORT last, its direct-link port).

    The mesh location and the one-time join token come from HIVEMESH_* variables (or the `up` state file). The
    identity it joins with is kept in <home>/identity/, so a restart needs no new join token.
    """
    from hivemesh.mesh.audit.handshake.switch import enable
    from hivemesh.mesh.sidecar import SidecarConfig, run_sidecar

    per_cap: list[tuple[str, int]] = []
    for item in limits:
        cap, sep, size = item.partition("=")
        if not sep or not cap or not size.isdigit() or int(size) <= 0:
            raise click.BadParameter(f"{item!r}: expected CAPABILITY=BYTES", param_hint="--limit")
        per_cap.append((cap, int(size)))
    if (agent is None) == (client is None):
        raise click.UsageError("give --agent ADDRESS (front an agent) or --client NAME (caller only), exactly one")
    if client is not None:
        inbound_only = [flag for flag, given in (("--listen", listen != "127.0.0.1:0"), ("--name", name is not None),
                                                 ("--limit", bool(limits)), ("--screen-exempt", bool(screen_exempt)),
                                                 ("--max-call-depth", max_call_depth != 8),
                                                 ("--output-classifier", output_classifier is not None))
                        if given]
        if inbound_only:
            raise click.UsageError(f"{', '.join(inbound_only)}: only with --agent (a caller-only sidecar serves "
                                   "nothing inbound)")
    if mesh_socket is not None and mesh_listen is not None:
        raise click.UsageError("give --mesh-socket or --mesh-listen, not both")
    enable()  # consent to the handshake audit (the package's main turned the tracer on before gRPC loaded)
    try:
        config = SidecarConfig(agent=agent, client=client, listen=listen, advertise=advertise, mesh_socket=mesh_socket,
                               mesh_listen=mesh_listen, name=name, lease_ttl_s=lease_ttl,
                               max_input_bytes=max_input_bytes, max_call_depth=max_call_depth,
                               max_held_calls=max_held_calls, limits=tuple(per_cap),
                               content_screen=not no_content_screen, screen_exempt=screen_exempt,
                               audit_dir=audit_dir, metrics_listen=metrics_listen, health_listen=health_listen,
                               output_classifier=output_classifier)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    run_async(run_sidecar(config, MeshSettings.resolve()))
