"""Where the control-plane replicas are: an address list from settings, and the replicas' own adverts in etcd.

Every replica keeps a leased advert under `keyspace.CONTROLPLANES` naming its mTLS and join addresses; a node that
can read etcd learns replicas it was not configured with, and a replica that dies leaves the list within its TTL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hivemesh.mesh import json_depth
from hivemesh.mesh.keyspace import CONTROLPLANES


def parse_addresses(text: str, what: str = "control plane") -> tuple[str, ...]:
    """'host:port[,host:port...]' as a tuple, in order, without duplicates; ValueError names a bad one."""
    out: list[str] = []
    for part in text.split(","):
        addr = part.strip()
        if not addr:
            continue
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"{what} address {addr!r} must be host:port")
        if addr not in out:
            out.append(addr)
    if not out:
        raise ValueError(f"no {what} address given (host:port[,host:port...])")
    return tuple(out)


@dataclass(frozen=True)
class Advert:
    """One live replica, as it advertises itself."""

    replica: str
    controlplane: str
    join: str

    def to_json(self) -> bytes:
        return json.dumps({"replica": self.replica, "controlplane": self.controlplane, "join": self.join},
                          sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Advert | None:
        """The advert in raw, or None when it is not one (a newer format, a damaged value)."""
        try:
            doc = json_depth.loads(raw)
            advert = cls(str(doc["replica"]), str(doc["controlplane"]), str(doc["join"]))
            parse_addresses(advert.controlplane)
            parse_addresses(advert.join)
        except (ValueError, KeyError, TypeError, RecursionError):
            return None
        return advert


def advert_key(replica: str) -> bytes:
    return (CONTROLPLANES + replica).encode()


async def discover(etcd: Any) -> list[Advert]:
    """The adverts of the live replicas, sorted by replica id (etcd: any client that may read CONTROLPLANES)."""
    found = [Advert.from_json(kv.value) for kv in await etcd.get_prefix(CONTROLPLANES.encode())]
    return sorted((a for a in found if a is not None), key=lambda a: a.replica)
