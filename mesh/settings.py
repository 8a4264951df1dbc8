"""Where the mesh is: etcd, the control plane, the trust anchor. Typed, immutable, validated once.

Resolved from explicit arguments, then HIVEMESH_* environment variables, then the state file that
`hivemesh up` writes (`.hivemesh/mesh.json`; from another folder, that of the one `up` this user runs), so an
agent or `MeshClient` finds the mesh wherever the CLI does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from hivemesh.mesh import json_depth
from hivemesh.mesh.controlplane_endpoints import parse_addresses
from hivemesh.mesh.etcd import EtcdAccess, EtcdTls, parse_endpoints
from hivemesh.mesh.local_meshes import RUNNING_DIR, running
from hivemesh.mesh.local_meshes import STATE_FILE as STATE_FILE  # both still importable from here
from hivemesh.mesh.local_meshes import user_state_dir as user_state_dir
from hivemesh.mesh.pki import validate_trust_domain

DEFAULT_TRUST_DOMAIN = "hivemesh.local"
LOCATION = ("etcd", "controlplane", "join", "ca_bundle")
"""The fields that say where the mesh is; the rest have defaults or are optional."""
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


_located: Path | None = None
"""The state folder of the mesh `MeshSettings.resolve` found running elsewhere (`_mesh_home`), once it did."""


def state_dir() -> Path:
    """The state folder: $HIVEMESH_HOME, else ./.hivemesh; but when that holds no mesh and `MeshSettings.resolve`
    found the one `hivemesh up` runs elsewhere, that mesh's, as the CLI points HIVEMESH_HOME at it: the process
    keeps its audit spool with the mesh it joined, not in a new .hivemesh in whatever folder it started in."""
    if given := os.environ.get("HIVEMESH_HOME"):
        return Path(given).resolve()
    here = Path(".hivemesh").resolve()
    return _located if _located is not None and not (here / STATE_FILE).is_file() else here


def _mesh_home(explicit: dict[str, Any]) -> tuple[Path, str]:
    """The state folder whose mesh.json to read, and why it holds none (for the error, should the location stay
    unknown). HIVEMESH_HOME, or ./.hivemesh holding a mesh, wins; else, when explicit settings say nothing of the
    location at all, the one mesh `hivemesh up` runs for this user, as the CLI chooses (`localmesh.locate`;
    several: none is guessed, the error lists them). Settings that name part of a location (HIVEMESH_ETCD of
    another mesh, say) are never completed from a running mesh: a workload would join that mesh with the other's
    token; the error names what is missing instead."""
    global _located
    home = Path(os.environ.get("HIVEMESH_HOME") or ".hivemesh").resolve()
    none_here = f"no {STATE_FILE} in the state folder {home}"
    if os.environ.get("HIVEMESH_HOME") or (home / STATE_FILE).is_file() or any(explicit.get(n) for n in LOCATION):
        return home, none_here
    meshes = running()
    if len(meshes) == 1:
        _located = meshes[0].home
        return _located, none_here
    if meshes:
        return home, f"{len(meshes)} local meshes run, none is guessed: " + "; ".join(m.describe() for m in meshes)
    notes = user_state_dir() / RUNNING_DIR
    return home, f"{none_here}, and no `hivemesh up` runs for this user (none noted in {notes})"


class MeshLocationError(ValueError):
    """Where the mesh is cannot be told: no arguments, variables or `hivemesh up` state say it. The message
    names every way to say it; `hivemesh.sdk.run` prints it without a traceback."""


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
        """Settings from overrides (None = unset), then HIVEMESH_* variables, then the state file (of the mesh
        `_mesh_home` finds). A `MeshLocationError` when none of them says where the mesh is."""
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
        explicit = {name: os.environ[var] for name, var in env.items() if os.environ.get(var)}
        explicit.update({k: v for k, v in overrides.items() if v is not None})
        home, not_here = _mesh_home(explicit)
        values: dict[str, Any] = {}
        path = home / STATE_FILE
        if path.is_file():
            try:
                values.update(json_depth.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read mesh state file {path}: {exc}") from exc
        values.update(explicit)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        missing = [n for n in LOCATION if not values.get(n)]
        if missing:
            why = f"{path} lacks them" if path.is_file() else not_here
            raise MeshLocationError(
                f"mesh location unknown ({', '.join(missing)}): {why}. Run "
                "`hivemesh up`, point HIVEMESH_HOME at the state folder of a running `hivemesh up` (its --home: "
                f".hivemesh in the folder it started in, unless given), or set {', '.join(env[m] for m in missing)}"
            )
        for p in ("ca_bundle", "cert_file", "key_file", "identity_dir"):
            if values.get(p) is not None:
                values[p] = Path(values[p])
        values.setdefault("identity_dir", home / IDENTITY_DIR)
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
