"""Where the mesh is: etcd, the control plane, the trust anchor. Typed, immutable, validated once.

Resolved from explicit arguments, then HIVEMESH_* environment variables, then the state file that
`hivemesh up` writes (`.hivemesh/mesh.json`), so `hivemesh agents` just works next to a running `up`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from hivemesh.mesh.controlplane_endpoints import parse_addresses
from hivemesh.mesh.etcd import EtcdAccess, EtcdTls, parse_endpoints
from hivemesh.mesh.pki import validate_trust_domain

DEFAULT_TRUST_DOMAIN = "hivemesh.local"
STATE_FILE = "mesh.json"
IDENTITY_DIR = "identity"
"""Where resolved settings keep joined identities, inside the state folder (see hivemesh.mesh.identity_store)."""


def check_whole(name: str, value: object, low: int, high: int, unit: str = "") -> None:
    """ValueError unless value is a whole number (an int, not a bool) in low..high: a config field read as a
    count or a size. NaN passes every `<` check (a NaN input limit turned the size check off: `size > nan` is
    never true), and 2.5 seconds of lease does not go into etcd."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number in {low}..{high}{' ' + unit if unit else ''}: {value!r}")


def check_seconds(name: str, value: object, low: float, high: float) -> None:
    """ValueError unless value is a number of seconds in low..high (NaN and infinity are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name} must be in {low:g}..{high:g} seconds: {value!r}")


def state_dir() -> Path:
    """The state folder: $HIVEMESH_HOME, else ./.hivemesh."""
    return Path(os.environ.get("HIVEMESH_HOME") or ".hivemesh").resolve()


def user_state_dir() -> Path:
    """This user's hivemesh state, whatever the folder: $XDG_STATE_HOME/hivemesh, else ~/.local/state/hivemesh
    (the XDG base directory rule). `hivemesh up` records there which local meshes run, so the CLI finds one
    from any folder."""
    base = os.environ.get("XDG_STATE_HOME")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "hivemesh"


@dataclass(frozen=True)
class MeshSettings:
    """How a process reaches the mesh."""

    etcd: str
    """etcd client endpoints, 'host:port[,host:port...]'."""
    controlplane: str
    """Control plane mTLS address, host:port, or several replicas' as host:port,host:port (failover order)."""
    join: str
    """Control plane join address (server-TLS only), host:port[,host:port...]."""
    ca_bundle: Path
    """Trust bundle file (PEM): the CA(s) that sign mesh certificates."""
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    join_token: str | None = None
    """One-time join token; needed unless cert_file/key_file give an existing identity."""
    cert_file: Path | None = None
    key_file: Path | None = None
    identity_dir: Path | None = None
    """Where a joined workload keeps its key and certificate across restarts (`<state folder>/identity` when
    resolved); None: nowhere, every start needs a join token or cert_file/key_file."""

    def __post_init__(self) -> None:
        parse_endpoints(self.etcd)
        for name in ("controlplane", "join"):
            parse_addresses(getattr(self, name), name)  # one replica or several: "host:port[,host:port...]"
        validate_trust_domain(self.trust_domain)
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file, or neither")

    @classmethod
    def resolve(cls, **overrides: Any) -> MeshSettings:
        """Settings from overrides (None = unset), then HIVEMESH_* variables, then the state file."""
        values: dict[str, Any] = {}
        path = state_dir() / STATE_FILE
        if path.is_file():
            try:
                values.update(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read mesh state file {path}: {exc}") from exc
        env = {
            "etcd": "HIVEMESH_ETCD",
            "controlplane": "HIVEMESH_CONTROLPLANE",
            "join": "HIVEMESH_JOIN",
            "ca_bundle": "HIVEMESH_CA",
            "trust_domain": "HIVEMESH_TRUST_DOMAIN",
            "join_token": "HIVEMESH_JOIN_TOKEN",
            "cert_file": "HIVEMESH_CERT",
            "key_file": "HIVEMESH_KEY",
        }
        for field_name, var in env.items():
            if os.environ.get(var):
                values[field_name] = os.environ[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        missing = [n for n in ("etcd", "controlplane", "join", "ca_bundle") if not values.get(n)]
        if missing:
            hints = ", ".join(f"{env[m]}" for m in missing)
            raise ValueError(
                f"mesh location unknown ({', '.join(missing)}): run `hivemesh up`, or set {hints}"
            )
        for p in ("ca_bundle", "cert_file", "key_file", "identity_dir"):
            if values.get(p) is not None:
                values[p] = Path(values[p])
        values.setdefault("identity_dir", state_dir() / IDENTITY_DIR)
        return cls(**values)

    def etcd_access(self) -> EtcdAccess:
        """etcd as this identity (cert_file/key_file; their Common Name is the etcd user), verifying etcd with
        the trust bundle. Without an identity the handshake carries no certificate and etcd refuses it."""
        def material() -> EtcdTls:
            return EtcdTls.from_files(self.ca_bundle, self.cert_file, self.key_file)

        return EtcdAccess(self.etcd, material)

    def with_identity(self, cert_file: Path, key_file: Path) -> MeshSettings:
        return replace(self, cert_file=cert_file, key_file=key_file, join_token=None)

    def to_json(self) -> dict[str, str]:
        """The public part, as `hivemesh up` writes it to the state file (never a token or key)."""
        return {
            "etcd": self.etcd,
            "controlplane": self.controlplane,
            "join": self.join,
            "ca_bundle": str(self.ca_bundle),
            "trust_domain": self.trust_domain,
        }
