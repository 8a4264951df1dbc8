"""Least privilege in etcd: which identity may read and write which key prefix, as etcd users and roles.

etcd runs with `--client-cert-auth` and auth enabled, so the Common Name of the verified client certificate is
the etcd user (no password, no token). The CA writes `<kind>:<name>` there (`etcd_user`); the control plane
connects as `controlplane`, a user holding etcd's `root` role, and creates a workload's user and role when it
signs the workload's certificate (`ensure_workload_user`). Roles are unions of prefix ranges (etcd has no
deny), so the key layout keeps what a workload may not read (grants, join tokens) outside what it may:

=====================  ==================================  =========================================
prefix                 read                                write
=====================  ==================================  =========================================
agents/                every workload (the registry)       agent X: only agents/X/ (its instances)
policies/              every workload                      control plane
grants/                control plane                       control plane
grants-file            control plane                       control plane
trust/                 every workload                      control plane
revoked/               every workload                      control plane
join/                  control plane                       control plane
status/                operators                           K:X only status/K/X/ (its own status)
escalations/           operators                           control plane
workflows/K-X/         K:X (its own runs), operators       K:X (its own runs), operators
workflow-index/K-X/    K:X (its own runs), operators       K:X (its own runs), operators
queue/K-X/             K:X (its own held calls)            K:X (its own held calls)
budgets/spend/         agents, operators                   agent X: only budgets/spend/X/ (its own spend)
rollouts/              control plane                       control plane (the leader's rollout progress)
controlplanes/         every workload (failover targets)   control plane
controlplane-leader    every workload (who leads)          control plane
controlplane-keys      control plane (signing keys)        control plane
state/                 control plane (State service)       control plane (State service)
audit-log/, -tail      control plane (the mesh-wide log)   control plane
audit-checkpoints/     control plane                       control plane (the leader, fenced)
audit-applied/         control plane                       control plane (each replica's progress)
audit-checkpoint-key   control plane (signing key)         control plane
=====================  ==================================  =========================================

Shared state (`state/`) has no workload role: its readers and writers are per namespace, named by `state`
policies, and etcd roles are per key range per user, so the control plane serves it and checks the policies.

A run's id starts with its owner (`hivemesh.mesh.run_ids`: `<kind>-<name>/<local>`), so its keys fall in its
owner's two prefixes and no other workload's. tests/integration/test_etcd_auth.py tries every row with each
kind's own certificate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import grpc
from aetcd import rpc

from hivemesh.mesh.etcd import EtcdTls, is_permission_denied
from hivemesh.mesh.keyspace import (
    AGENTS,
    CONTROLPLANE_LEADER,
    CONTROLPLANES,
    ESCALATIONS,
    POLICIES,
    QUEUE,
    REVOKED,
    SPEND,
    STATUS,
    TRUST,
    WORKFLOW_INDEX,
    WORKFLOWS,
)
from hivemesh.mesh.run_ids import owner_prefixes, owner_segment

READ: Final = rpc.Permission.READ
WRITE: Final = rpc.Permission.WRITE
READWRITE: Final = rpc.Permission.READWRITE

ROOT_USER: Final = "root"
CONTROLPLANE_USER: Final = "controlplane"
"""The control plane's certificate's Common Name; this user holds etcd's `root` role."""
NODE_ROLE: Final = "hivemesh-node"
OPERATOR_ROLE: Final = "hivemesh-operator"
CLIENT_ROLE: Final = "hivemesh-client"
AGENT_ROLE: Final = "hivemesh-agent"



@dataclass(frozen=True)
class Grant:
    """One permission of a role: perm on every key starting with prefix."""

    perm: int
    prefix: str

    def message(self) -> Any:
        key = self.prefix.encode()
        return rpc.Permission(permType=self.perm, key=key, range_end=prefix_end(key))


def prefix_end(key: bytes) -> bytes:
    """etcd's range end for "every key starting with key" (the key with its last byte incremented)."""
    k = bytearray(key)
    while k:
        if k[-1] < 0xFF:
            k[-1] += 1
            return bytes(k)
        k.pop()
    return b"\0"


STATIC_ROLES: Final[dict[str, tuple[Grant, ...]]] = {
    # What every node's data plane mirrors: the registry, the policies, the trust documents, the revocations.
    NODE_ROLE: (Grant(READ, AGENTS), Grant(READ, POLICIES), Grant(READ, TRUST), Grant(READ, REVOKED),
                Grant(READ, CONTROLPLANES), Grant(READ, CONTROLPLANE_LEADER)),
    AGENT_ROLE: (Grant(READ, SPEND),),  # every agent adds up all spend; it writes only its own (workload_grants)
    CLIENT_ROLE: (),  # a client's runs are its own role's (workload_grants), never a shared one
    OPERATOR_ROLE: (
        Grant(READ, STATUS), Grant(READ, ESCALATIONS), Grant(READ, SPEND),
        Grant(READWRITE, WORKFLOWS), Grant(READWRITE, WORKFLOW_INDEX),
    ),
}
_KIND_ROLE: Final = {"agent": AGENT_ROLE, "client": CLIENT_ROLE, "operator": OPERATOR_ROLE}


MAX_COMMON_NAME: Final = 64
"""X.509's bound on a Common Name (RFC 5280 ub-common-name): etcd takes a client certificate's CN as its user."""
_DIGEST_HEX: Final = 20  # 80 bits of SHA-256: no name can be chosen to share another's


def etcd_user(kind: str, name: str) -> str:
    """The etcd user (and the Common Name of the certificate) of workload kind/name: `<kind>:<name>`.

    A name too long for that to fit a Common Name keeps the prefix that fits and ends in `~` and 80 bits of its
    SHA-256. Cut short instead, two names sharing their first 58 characters got one certificate CN, so one
    workload logged into etcd as the other; `~` is in no name, so a hashed user is never another's plain one."""
    user = f"{kind}:{name}"
    if len(user) <= MAX_COMMON_NAME:
        return user
    digest = hashlib.sha256(name.encode()).hexdigest()[:_DIGEST_HEX]
    return f"{user[:MAX_COMMON_NAME - _DIGEST_HEX - 1]}~{digest}"


def workload_grants(kind: str, name: str) -> tuple[Grant, ...]:
    """The permissions only this workload holds: its own registration and token-budget spend (agents), its own
    status and its own workflow runs (every kind may orchestrate)."""
    own = (Grant(READWRITE, f"{STATUS}{kind}/{name}/"), *(Grant(READWRITE, p) for p in owner_prefixes(kind, name)),
           Grant(READWRITE, f"{QUEUE}{owner_segment(kind, name)}/"))
    if kind != "agent":
        return own
    return (Grant(READWRITE, f"{AGENTS}{name}/"), Grant(READWRITE, f"{SPEND}{name}/"), *own)


def workload_roles(kind: str) -> tuple[str, ...]:
    """The static roles a workload of this kind holds besides its own."""
    return (NODE_ROLE, _KIND_ROLE[kind]) if kind in _KIND_ROLE else (NODE_ROLE,)


# --- the requests, shared by the synchronous bootstrap and the control plane's asynchronous calls -------------
def _role(name: str, grants: tuple[Grant, ...]) -> Iterator[tuple[str, Any]]:
    yield "RoleAdd", rpc.AuthRoleAddRequest(name=name)
    for g in grants:
        yield "RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(name=name, perm=g.message())


def _user(name: str, roles: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    yield "UserAdd", rpc.AuthUserAddRequest(name=name, options=rpc.UserAddOptions(no_password=True))
    for r in roles:
        yield "UserGrantRole", rpc.AuthUserGrantRoleRequest(user=name, role=r)


def bootstrap_requests() -> Iterator[tuple[str, Any]]:
    """root and controlplane users (etcd's root role), the static roles, then auth on."""
    for name, grants in STATIC_ROLES.items():
        yield from _role(name, grants)
    yield from _user(ROOT_USER, ("root",))
    yield from _user(CONTROLPLANE_USER, ("root",))
    yield "AuthEnable", rpc.AuthEnableRequest()


def workload_requests(kind: str, name: str) -> Iterator[tuple[str, Any]]:
    user = etcd_user(kind, name)
    yield from _role(user, workload_grants(kind, name))
    yield from _user(user, (user, *workload_roles(kind)))


def _already(exc: grpc.RpcError) -> bool:
    """etcd's answer to creating what exists (idempotent re-runs: a restarted member, a renewed workload)."""
    details = (exc.details() or "") if hasattr(exc, "details") else str(exc)
    return bool(exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "already exist" in details)


def bootstrap_auth(endpoint: str, admin: EtcdTls, timeout: float = 5.0) -> None:
    """Create the static roles and the root users and enable auth, as the bootstrap identity (CN `root`).

    Synchronous gRPC on its own channel: it runs from `EtcdServer.start()`, which may be inside or outside an
    event loop. Idempotent: a member restarted on the same data finds everything in place.
    """
    with grpc.secure_channel(endpoint, admin.credentials()) as ch:
        stub = rpc.AuthStub(ch)
        status = stub.AuthStatus(rpc.AuthStatusRequest(), timeout=timeout)
        if status.enabled:
            return
        for method, request in bootstrap_requests():
            try:
                getattr(stub, method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                if not _already(exc):
                    raise


async def ensure_workload_user(etcd: Any, kind: str, name: str, timeout: float = 5.0) -> None:
    """Create (idempotently) etcd user `<kind>:<name>` with its own role and its kind's static roles.

    etcd is a connected aetcd client holding the root role (the control plane's); called when the control plane
    signs a workload's certificate, before the workload can use it against etcd.
    """
    stub = rpc.AuthStub(etcd.channel)
    for method, request in workload_requests(kind, name):
        try:
            await getattr(stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if not _already(exc):
                if is_permission_denied(exc):
                    raise PermissionError(f"etcd refused to create user {etcd_user(kind, name)}: "
                                          "the control plane's etcd identity lacks the root role") from exc
                raise


async def reconcile_static_roles(etcd: Any, timeout: float = 5.0) -> list[str]:
    """Make the shared roles hold exactly STATIC_ROLES' permissions; what changed, for the log.

    `bootstrap_auth` creates them once, when auth is first enabled, so a store bootstrapped by an earlier version
    keeps its roles' old grants (CLIENT_ROLE's read-write on every workflow run, before runs were owned) until
    something revokes them: the control plane does, here, at every start, as etcd root.
    """
    stub = rpc.AuthStub(etcd.channel)
    changed: list[str] = []
    for name, grants in STATIC_ROLES.items():
        try:
            have = list((await stub.RoleGet(rpc.AuthRoleGetRequest(role=name), timeout=timeout)).perm)
        except grpc.aio.AioRpcError as exc:
            if "not found" not in (exc.details() or ""):
                raise
            await stub.RoleAdd(rpc.AuthRoleAddRequest(name=name), timeout=timeout)
            have = []
        current = {(int(p.permType), bytes(p.key), bytes(p.range_end)) for p in have}
        wanted = {(int(g.perm), g.prefix.encode(), prefix_end(g.prefix.encode())): g for g in grants}
        for perm, key, end in sorted(current - wanted.keys()):
            await stub.RoleRevokePermission(rpc.AuthRoleRevokePermissionRequest(role=name, key=key, range_end=end),
                                            timeout=timeout)
            changed.append(f"{name}: revoked {rpc.Permission.Type.Name(perm)} on {key.decode(errors='replace')}")
        for spec, g in wanted.items():
            if spec not in current:
                await stub.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name=name, perm=g.message()),
                                               timeout=timeout)
                changed.append(f"{name}: granted {rpc.Permission.Type.Name(g.perm)} on {g.prefix}")
    return changed
