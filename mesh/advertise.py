"""Bind versus advertise: the address a component listens on and the address others are told to dial.

A process on a real network binds a wildcard (`0.0.0.0`) or one interface, but what it writes into the
registry, into etcd's cluster membership and into certificate SANs must be an address a remote caller can
dial and check. One set of rules for every listening component (etcd, the control plane, the sidecar, an SDK
agent) lives here, so each says the same thing about the same mistake.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from typing import Final

LISTEN_ENV: Final = "HIVEMESH_LISTEN"
"""The host a node binds its mutual-TLS port to (an SDK agent's default; a sidecar takes `--listen`)."""
ADVERTISE_ENV: Final = "HIVEMESH_ADVERTISE"
"""The host a node advertises (registry, certificates); default: the listen host."""

_WILDCARDS: Final = frozenset({"0.0.0.0", "::", "[::]", "*", ""})


def is_wildcard(host: str) -> bool:
    """True for a bind-everything address, which no remote caller can dial."""
    return host.strip() in _WILDCARDS


def check_host(host: str, *, what: str) -> str:
    """A bare host (name, IPv4, or [IPv6]) without a port; ValueError naming `what` otherwise."""
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    if not bracketed and (not host or ":" in host):
        raise ValueError(f"{what} must be a host name or an IP address without a port (IPv6 as [addr]): {host!r}")
    return host


def advertised_host(listen_host: str, advertise: str | None, *, what: str = "advertise") -> str:
    """The host to tell others: advertise when given, else the listen host, never a wildcard.

    Raises ValueError with the fix when the result would be a wildcard (bound everywhere, advertised nowhere)."""
    chosen = advertise if advertise else listen_host
    if is_wildcard(chosen):
        raise ValueError(
            f"{what} address {chosen or '(empty)'!r} is a wildcard: a remote caller cannot dial it. Bind the "
            f"wildcard with the listen address and give the address others reach this host at with --advertise "
            f"(or ${ADVERTISE_ENV}), e.g. --listen 0.0.0.0:7443 --advertise 10.0.0.5"
        )
    return check_host(chosen, what=what)


def env_listen_host(default: str = "127.0.0.1") -> str:
    """$HIVEMESH_LISTEN (a host, no port), else default."""
    return os.environ.get(LISTEN_ENV) or default


def env_advertise_host() -> str | None:
    """$HIVEMESH_ADVERTISE (a host, no port), else None (advertise the listen host)."""
    return os.environ.get(ADVERTISE_ENV) or None


def join_host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 literal bracketed."""
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def san_entries(hosts: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split advertised hosts into (DNS names, IP addresses) for a certificate's SANs, skipping wildcards and
    duplicates, so a remote caller's host-name check passes for whichever one it dials."""
    dns: list[str] = []
    ips: list[str] = []
    for raw in hosts:
        host = raw.strip().strip("[]")
        if is_wildcard(host):
            continue
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            if host not in dns:
                dns.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return dns, ips



def peer_ip(peer: str) -> str | None:
    """The remote IP of a gRPC peer string (`ipv4:198.18.0.2:5555`, `ipv6:[fd00::2]:5555`), or None for a
    loopback or Unix-socket peer, whose address names no host a remote caller could dial."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return None if ip.is_loopback or ip.is_unspecified else str(ip)
