"""Agent registration (a leased etcd key per live instance) and the registry view the router reads.

An instance lives at `/hivemesh/agents/<agent>/<instance-id>` as a serialized `AgentInstance`, bound to a
lease that `Registration` keeps alive. A crashed process stops refreshing, so its entry disappears within the
TTL; `stop()` revokes the lease so a clean shutdown disappears at once. The entry is created only if the key
does not exist (one transaction), so a second process with the same instance id is refused, not clobbered.

`RegistryView` mirrors the prefix through a `PrefixCache` and precomputes a capability -> instances index on
each change, so routing is a dict lookup that never waits on etcd. A node's view also applies the providers policy
(`hivemesh.mesh.providers`): what it lists for a capability is only the instances allowed to serve it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import os
import random
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import aetcd

from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError, RegistryUnavailableError
from hivemesh.mesh.etcd import PREFIX, Endpoints, parse_endpoints
from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.lease_rescue import refresh_on_members
from hivemesh.mesh.providers import ProvidersTable, Restriction
from hivemesh.mesh.watch import PrefixCache, WatchOptions, cancel_and_wait
from hivemesh.v1.agent_pb2 import Capability
from hivemesh.v1.mesh_pb2 import AgentInstance

log = logging.getLogger(__name__)

AGENTS_PREFIX = PREFIX + "agents/"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PACKAGINGS = frozenset({"sidecar", "in-process"})


# --- keys, ids and validation -------------------------------------------------------------------------------
def agent_key(agent: str, instance_id: str) -> str:
    """The etcd key of one instance."""
    return f"{AGENTS_PREFIX}{agent}/{instance_id}"


def default_instance_id() -> str:
    """`<hostname>-<pid>-<6 hex>`: readable in listings, unique across restarts and hosts."""
    host = re.sub(r"[^a-z0-9.-]+", "-", socket.gethostname().lower()).strip(".-")[:80] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _endpoint_problem(endpoint: str) -> str | None:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        return "must be host:port"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return "port must be a number in 1..65535"
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            return "an IPv6 host must be written [addr]"
    elif not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        return "host must be a DNS name or an IP address"
    return None


def instance_violations(instance: AgentInstance) -> dict[str, str]:
    """Every problem with instance, as field path -> description (empty when it may be registered)."""
    bad: dict[str, str] = {}
    name = instance.card.name
    if not NAME_RE.fullmatch(name):
        bad["card.name"] = f"agent name {name!r} must match [a-z0-9][a-z0-9._-]{{0,62}}"
    version = instance.card.version  # shown to operators (`hivemesh agents`): printable and short, or empty
    if not re.fullmatch(r"[0-9A-Za-z.+_-]{0,64}", version):
        bad["card.version"] = (f"version {version[:80]!r} must match [0-9A-Za-z.+_-]{{0,64}} "
                               "(e.g. 1.2.0 or 2.0.0-rc.1+build.5)")
    if not INSTANCE_ID_RE.fullmatch(instance.instance_id):
        bad["instance_id"] = (
            f"instance id {instance.instance_id!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
        )
    problem = _endpoint_problem(instance.endpoint)
    if problem:
        bad["endpoint"] = f"endpoint {instance.endpoint!r}: {problem}"
    if not instance.card.capabilities:
        bad["card.capabilities"] = "an agent must offer at least one capability"
    seen: set[str] = set()
    for i, cap in enumerate(instance.card.capabilities):
        if not NAME_RE.fullmatch(cap.name):
            bad[f"card.capabilities[{i}].name"] = (
                f"capability name {cap.name!r} must match [a-z0-9][a-z0-9._-]{{0,62}}"
            )
        elif cap.name in seen:
            bad[f"card.capabilities[{i}].name"] = f"capability {cap.name!r} is listed twice"
        seen.add(cap.name)
    if instance.identity and not instance.identity.startswith("spiffe://"):
        bad["identity"] = f"identity {instance.identity!r} must be a spiffe:// URI"
    if instance.packaging and instance.packaging not in PACKAGINGS:
        bad["packaging"] = f"packaging {instance.packaging!r} must be one of {sorted(PACKAGINGS)}"
    return bad


def validate_instance(instance: AgentInstance) -> None:
    """Raise InvalidInputError naming every bad field (nothing is written for an invalid instance)."""
    bad = instance_violations(instance)
    if bad:
        raise InvalidInputError(
            "invalid agent instance: " + "; ".join(f"{f}: {d}" for f, d in bad.items()),
            field_violations=bad,
        )


class ImpostorEntryError(ValueError):
    """A registry entry whose identity is not the identity of the agent it is filed under."""


def expected_identity(trust_domain: str, agent: str) -> str:
    """The only identity an instance of agent may present: derived from the name, never read from an entry."""
    return f"spiffe://{trust_domain}/agent/{agent}"


def decode_instance(
    key: bytes, value: bytes, trust_domain: str | None = None, *, create_revision: int = 0
) -> AgentInstance:
    """Parse one registry entry; raise ValueError unless it is a valid instance stored under its own key.

    create_revision is the entry's key's (from etcd, never from the document): it becomes the instance's
    `registration_revision`, the fence its callers send.

    With trust_domain, the entry must also be bound to its key's identity (`spiffe://<td>/agent/<agent>`);
    otherwise ImpostorEntryError. A caller then dials and pins exactly the identity of the agent it asked for:
    a workload holding any other certificate cannot attract that agent's calls (or its tokens) by writing an
    entry under its name.
    """
    rest = key[len(AGENTS_PREFIX) :].decode("utf-8", "replace")
    agent, sep, instance_id = rest.partition("/")
    if not sep or "/" in instance_id:
        raise ValueError(f"not an <agent>/<instance> key: {rest!r}")
    inst = AgentInstance.FromString(value)
    if inst.card.name != agent or inst.instance_id != instance_id:
        raise ValueError(f"entry names {inst.card.name}/{inst.instance_id}, but is stored under {rest}")
    bad = instance_violations(inst)
    if bad:
        raise ValueError(f"invalid instance: {bad}")
    if trust_domain is not None and inst.identity != expected_identity(trust_domain, agent):
        raise ImpostorEntryError(
            f"entry {rest} claims identity {inst.identity!r}, but only {expected_identity(trust_domain, agent)!r} "
            "may serve that agent"
        )
    inst.registration_revision = create_revision
    return inst


async def read_instances(etcd_endpoints: Endpoints, timeout: float = 5.0) -> list[AgentInstance]:
    """One-shot read of every valid instance, sorted by (agent, instance id): for CLIs, not for routing.

    Raises RegistryUnavailableError when etcd cannot be read within timeout.
    """
    c = etcd_client(etcd_endpoints, timeout=max(1, round(timeout)))
    try:
        async with asyncio.timeout(timeout):
            result = await c.get_prefix(AGENTS_PREFIX.encode())
    except Exception as exc:
        raise RegistryUnavailableError(
            f"cannot read the registry from etcd at {etcd_endpoints}: {exc!r}"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await c.close()
    out: list[AgentInstance] = []
    for kv in result:
        try:
            out.append(decode_instance(kv.key, kv.value, create_revision=kv.create_revision))
        except Exception as exc:  # noqa: BLE001 - one bad entry must not hide the others
            log.warning("skipping undecodable registry entry %r: %r", kv.key, exc)
    return sorted(out, key=lambda i: (i.card.name, i.instance_id))


# --- registration -------------------------------------------------------------------------------------------
class _ConflictError(Exception):
    """Another live instance holds the key."""


class Registration:
    """Keep one AgentInstance registered under a lease for as long as this object runs.

    The instance is validated at construction (InvalidInputError names the field). A background task
    refreshes the lease every ttl/3; a keepalive that fails while the lease may still be alive is sent again to
    every member at once within the time the lease has left (`lease_rescue`); if etcd says the lease is gone (a
    pause or outage past the TTL, or an operator revoked it) it grants a new lease and registers again; while
    etcd is unreachable it retries with bounded backoff.
    """

    def __init__(
        self,
        etcd_endpoints: Endpoints,
        instance: AgentInstance,
        *,
        ttl_s: int = 10,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
    ) -> None:
        if not isinstance(ttl_s, int) or ttl_s < 2:
            raise InvalidInputError("ttl_s must be an integer >= 2 (etcd's minimum lease TTL)",
                                    field_violations={"ttl_s": "must be an integer >= 2"})
        parse_endpoints(etcd_endpoints)
        inst = AgentInstance()
        inst.CopyFrom(instance)
        if not inst.instance_id:
            inst.instance_id = default_instance_id()
        if not inst.registered_at_unix_ms:
            inst.registered_at_unix_ms = int(time.time() * 1000)
        inst.ClearField("registration_revision")  # the registry's to say (decode_instance), not the document's
        validate_instance(inst)
        self._endpoints = etcd_endpoints
        self._instance = inst
        self._value = inst.SerializeToString()
        self._key = agent_key(inst.card.name, inst.instance_id).encode()
        self._ttl = ttl_s
        self._interval = ttl_s / 3
        self._op_timeout = min(2.0, max(0.5, ttl_s / 3))
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._client: aetcd.Client | None = None
        self._lease_id: int | None = None
        self._granted: set[int] = set()  # leases this object granted and may still hold our key
        self._revision = 0
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._failures = 0
        self._alive_until = 0.0  # monotonic: the lease expires no earlier than this (TTL from the last send)
        self._renewing_since: float | None = None  # when the keepalive in flight was sent (None: none is)
        self.registrations = 0
        self.leases_lost = 0
        self.keepalive_rescues = 0
        """Keepalives that failed on the shared channel and went through on another member in time."""
        self.keepalives = 0
        """Keepalives answered with the lease alive (rescued ones included)."""
        self.last_error: BaseException | None = None

    @property
    def instance(self) -> AgentInstance:
        """The registered document (instance_id and registered_at filled in). Do not mutate."""
        return self._instance

    @property
    def key(self) -> str:
        return self._key.decode()

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    @property
    def registered(self) -> bool:
        """True while this object believes it holds a live lease on its key."""
        return self._lease_id is not None

    @property
    def revision(self) -> int:
        """The etcd revision that created the current registration's entry (its callers' fence, see
        `AgentInstance.registration_revision`); 0 before the first. Kept once the lease is known lost, until the
        next registration: `fence_problem` refuses calls fenced by it from then on."""
        return self._revision

    def fence_problem(self, fence: int) -> str | None:
        """Why a call routed by the registration created at revision fence is not for this one (None: it is).

        A call is for this registration only while the lease is held and fence is its revision: one routed by an
        entry whose lease was lost (a pause past the TTL, an outage, a revoke), or by an earlier process with the
        same instance id, was decided on a registration that is gone, and the callers that see the current one may
        already have sent the same work elsewhere. Once stopped (deregistered on purpose, draining), calls routed by
        the last registration are still its: no other registration of this instance took their work."""
        if self._stopped and self._revision:
            return None if fence == self._revision else (
                f"the call was routed by the registration created at revision {fence}; this instance's last one was "
                f"revision {self._revision} and it is shutting down")
        if self._lease_id is None:
            if self._revision and fence == self._revision:
                return (f"the registration created at revision {fence} lost its lease; this instance is registering "
                        "again")
            return f"this instance holds no registration now (the call was routed by revision {fence})"
        if fence != self._revision:
            return (f"the call was routed by the registration created at revision {fence}; this instance's is "
                    f"revision {self._revision} (the caller's view of the registry is stale)")
        return self._paused_problem()

    def _paused_problem(self) -> str | None:
        """Why the lease may have expired unnoticed (None: it may not have).

        Its known life ran out, and not because etcd failed to answer: no keepalive failed, and none sent while the
        lease was known alive is still out. So this process stood still past the TTL (SIGSTOP, a stalled loop, a
        suspended VM): the calls it finds waiting on resume were routed by a registration that has most likely
        expired, and it cannot know before etcd answers the keepalive now due. While etcd is unreachable the
        failures are known and calls keep flowing: only etcd's answer ends a registration then."""
        now = time.monotonic()
        if now <= self._alive_until or self._failures:
            return None
        since = self._renewing_since
        if since is not None and since < self._alive_until:
            return None  # a keepalive sent in time is out: its answer (or failure) decides
        return (f"this instance's lease (revision {self._revision}) was known alive only until "
                f"{now - self._alive_until:.1f} s ago and no keepalive failed since: this process stood still past the "
                "lease's TTL, so the lease has likely expired; refusing calls routed by it until etcd answers")

    @property
    def alive_until(self) -> float:
        """`time.monotonic()` until which the lease is known to live (its TTL from the last keepalive or grant
        sent); a keepalive that fails before then is sent to every member."""
        return self._alive_until

    async def update(self, instance: AgentInstance) -> None:
        """Replace the registered document under the same key and lease (e.g. after a certificate renewal);
        a later re-registration uses it too. Raises if etcd refuses (the next renewal tries again)."""
        inst = AgentInstance()
        inst.CopyFrom(instance)
        inst.instance_id, inst.registered_at_unix_ms = self._instance.instance_id, self._instance.registered_at_unix_ms
        inst.ClearField("registration_revision")
        if agent_key(inst.card.name, inst.instance_id).encode() != self._key:
            raise InvalidInputError("an update must keep the agent name and instance id")
        validate_instance(inst)
        self._instance, self._value = inst, inst.SerializeToString()
        lease = self._lease_id
        if lease is None or self._stopped:
            return
        c = await self._get_client()
        async with asyncio.timeout(self._op_timeout):
            await c.put(self._key, self._value, lease=lease)

    async def start(self, timeout: float = 10.0, *, wait: bool = True) -> None:
        """Register, then keep the lease alive in the background.

        With wait=True: return once registered; raise FailedPreconditionError if another live instance holds
        the key, RegistryUnavailableError if etcd cannot be reached within timeout (nothing left behind in
        either case). With wait=False: return at once and register in the background when etcd allows.
        """
        if self._stopped:
            raise RuntimeError("a stopped Registration cannot be restarted; create a new one")
        if self._task is not None:
            return
        if wait:
            await self._register_until(time.monotonic() + timeout)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._maintain(), name=f"hivemesh-lease:{self.key}")

    async def _register_until(self, deadline: float) -> None:
        backoff = self._backoff_initial
        while True:
            try:
                async with asyncio.timeout(max(0.05, deadline - time.monotonic())):
                    await self._register_once()
                return
            except _ConflictError as exc:
                await self._drop_client()
                raise FailedPreconditionError(
                    str(exc), metadata={"key": self.key}, field_violations={"instance_id": str(exc)}
                ) from None
            except Exception as exc:  # noqa: BLE001 - etcd down or slow: retry until the deadline
                self.last_error = exc
                await self._drop_client()
            if time.monotonic() + backoff >= deadline:
                raise RegistryUnavailableError(
                    f"could not register {self.key} in etcd at {self._endpoints}: {self.last_error!r}",
                    metadata={"key": self.key},
                ) from self.last_error
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self._backoff_max)

    async def stop(self, timeout: float = 3.0) -> None:
        """Revoke the lease (the entry disappears at once) and stop. Idempotent, bounded by timeout even if
        etcd is down (the entry then expires within the TTL)."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        lease, self._lease_id = self._lease_id, None
        if lease is not None:
            try:
                async with asyncio.timeout(timeout):
                    c = await self._get_client()
                    await c.revoke_lease(lease)
            except Exception as exc:  # noqa: BLE001 - best effort: the lease expires on its own
                log.warning(
                    "could not revoke lease of %s (%r); it expires within %d s", self.key, exc, self._ttl
                )
        self._granted.clear()
        await self._drop_client()

    async def __aenter__(self) -> Registration:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- internals ------------------------------------------------------------------------------------------
    async def _get_client(self) -> aetcd.Client:
        if self._client is None:
            self._client = etcd_client(self._endpoints, timeout=max(1, round(self._op_timeout)))
            await self._client.connect()
        return self._client

    async def _drop_client(self) -> None:
        """Close the client so the next attempt gets a fresh channel (reliable after an outage)."""
        c, self._client = self._client, None
        if c is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await c.close()

    async def _register_once(self) -> None:
        c = await self._get_client()
        asked = time.monotonic()  # etcd grants the lease after this: it lives at least until asked + TTL
        async with asyncio.timeout(self._op_timeout):
            lease = await c.lease(self._ttl)
        self._granted.add(lease.id)
        try:
            async with asyncio.timeout(self._op_timeout):
                ok, responses = await c.transaction(
                    compare=[c.transactions.version(self._key) == 0],
                    success=[c.transactions.put(self._key, self._value, lease=lease.id)],
                    failure=[c.transactions.get(self._key)],
                )
        except BaseException:
            # Unknown outcome: revoke so no entry outlives this attempt (the lease would expire anyway).
            await self._revoke_quietly(c, lease.id)
            raise
        if ok:
            self._adopt(lease.id, int(responses[0].response_put.header.revision), alive_until=asked + self._ttl)
            return
        existing = responses[0][0][1] if responses and responses[0] else None
        await self._revoke_quietly(c, lease.id)
        if existing is None:
            raise RuntimeError(f"{self.key} vanished between compare and read; retrying")
        if existing.lease in self._granted and existing.value == self._value:
            # Our own entry from an attempt whose reply was lost: keep it rather than fight it.
            self._adopt(existing.lease, int(existing.create_revision))
            return
        raise _ConflictError(
            f"{self.key} is already registered by another live instance (lease {existing.lease:x})"
        )

    def _adopt(self, lease_id: int, revision: int, *, alive_until: float | None = None) -> None:
        """Take lease_id as this registration's, created at revision. alive_until: when a lease granted by this
        attempt expires at the earliest (from the time it was asked for); an entry adopted from an earlier attempt
        gets an estimate.

        The estimate used to hold for fresh leases too, and it cost the first keepalive its rescue: that one is
        sent an interval (ttl/3) after registering, and if it goes to a member that cannot answer it fails an
        operation timeout (ttl/3) later, when the estimate (ttl - ttl/3 from registering) has no time left, so it
        was not sent to the other members and the lease lapsed (`tests/integration/test_lease_rescue.py`)."""
        if alive_until is None:
            alive_until = time.monotonic() + self._ttl - self._op_timeout  # granted at most op_timeout ago
        self._alive_until = alive_until
        self._lease_id = lease_id
        self._granted = {lease_id}
        self._revision = revision
        self.registrations += 1
        self._failures = 0
        self.last_error = None
        log.info("registered %s (lease %x, revision %d)", self.key, lease_id, revision)

    async def _revoke_quietly(self, c: aetcd.Client, lease_id: int) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await c.revoke_lease(lease_id)
            self._granted.discard(lease_id)

    async def _maintain(self) -> None:
        backoff = self._backoff_initial
        delay = self._interval if self._lease_id is not None else 0.0
        while not self._stopped:
            await asyncio.sleep(delay)
            try:
                if self._lease_id is None:
                    async with asyncio.timeout(self._op_timeout * 3):
                        await self._register_once()
                    delay, backoff = self._interval, self._backoff_initial
                    continue
                started = time.monotonic()
                ttl = await self._keepalive(self._lease_id)
                if ttl <= 0:
                    log.warning("lease of %s is gone (expired or revoked); registering again", self.key)
                    self.leases_lost += 1
                    self._lease_id = None
                    self._granted.clear()
                    delay = 0.0
                    continue
                self.keepalives += 1
                # Every ttl/3 from one send to the next, whatever the round trip took: counted from the answer,
                # a round trip jittering by up to 200 ms stretched it to 0.40 of the TTL (tests/e2e/test_registry.py).
                delay = max(0.0, started + self._interval - time.monotonic())
                backoff = self._backoff_initial
                if self._failures:
                    log.warning("keepalive of %s works again after %d failures", self.key, self._failures)
                self._failures = 0
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except _ConflictError as exc:
                self.last_error = exc
                log.error("%s; retrying in %.0f s", exc, self._backoff_max)
                delay = self._backoff_max
            except Exception as exc:  # noqa: BLE001 - etcd down or slow: keep state, back off, retry
                self.last_error = exc
                level = logging.WARNING if self._failures == 0 else logging.DEBUG  # once per outage
                log.log(level, "keepalive of %s failed (%r); retrying", self.key, exc)
                self._failures += 1
                await self._drop_client()
                delay = backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, self._backoff_max)

    async def _keepalive(self, lease_id: int) -> int:
        """One keepalive; the lease's TTL after it (<= 0: gone). On the shared channel first; if that fails while
        the lease may still be alive and there are other members, on every member at once until it would expire."""
        sent = self._renewing_since = time.monotonic()
        try:
            return await self._refresh(lease_id, sent)
        finally:
            self._renewing_since = None  # the caller counts a failure before anything else runs (no await between)

    async def _refresh(self, lease_id: int, sent: float) -> int:
        try:
            c = await self._get_client()
            async with asyncio.timeout(self._op_timeout):
                reply = await c.refresh_lease(lease_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            left = self._alive_until - time.monotonic()
            if left < 0.1 or len(parse_endpoints(self._endpoints)) < 2:
                raise
            log.warning("keepalive of %s failed (%r); sending it to every etcd member (%.1f s left)", self.key, exc,
                        left)
            await self._drop_client()
            sent = time.monotonic()
            ttl = await refresh_on_members(self._endpoints, lease_id, left)
            if ttl > 0:
                self.keepalive_rescues += 1
                self._alive_until = sent + ttl
            return ttl
        ttl = int(reply.TTL) if reply is not None else 0
        if ttl > 0:
            self._alive_until = sent + ttl
        return ttl


async def drain_after_deregistration(node: object, key: str, *, timeout_s: float = 0.5, margin_s: float = 0.05) -> None:
    """Wait, bounded, until callers have heard that the instance at key is gone, before its server stops.

    A caller that still picks the instance once its server began to shut down gets CANCELLED, not a chance to
    fail over. Callers hear the deletion from etcd's watch when this process does (node's own registry view),
    plus a small margin for a busy caller.
    """
    registry = getattr(node, "registry", None)
    if not isinstance(registry, RegistryView) or not registry.cache.loaded:
        return
    await registry.cache.wait_for(lambda snap: key not in snap, timeout_s)
    await asyncio.sleep(margin_s)


# --- the view -----------------------------------------------------------------------------------------------
class CapabilityInfo(NamedTuple):
    """One capability as the mesh offers it now."""

    capability: Capability  # as declared by the first serving instance (sorted by agent, then instance id)
    agents: tuple[str, ...]  # agent names serving it, sorted
    instances: int  # live instances serving it


class _Index(NamedTuple):
    by_capability: Mapping[str, tuple[AgentInstance, ...]]
    all: tuple[AgentInstance, ...]
    capabilities: tuple[CapabilityInfo, ...]


_EMPTY_INDEX = _Index({}, (), ())


def _order(inst: AgentInstance) -> tuple[str, str]:
    return inst.card.name, inst.instance_id


class _IndexBuilder:
    """Keeps the index up to date from successive snapshots, redoing only the capabilities whose instances
    changed: with 10,000 instances a full rebuild took ~200 ms per watch event on a loaded 2-core machine,
    which every node paid for every registration (bench/scale.py registry)."""

    def __init__(self) -> None:
        self._seen: Mapping[str, AgentInstance] = {}
        self._groups: dict[str, dict[str, AgentInstance]] = {}  # capability -> {key: instance}
        self._by_cap: dict[str, tuple[AgentInstance, ...]] = {}
        self._infos: dict[str, CapabilityInfo] = {}
        self._keys: list[tuple[str, str]] = []  # (agent, instance id) of every instance, sorted
        self._all: list[AgentInstance] = []  # the instances, in the order of _keys
        self.emptied: list[str] = []
        """The capabilities the last update left with no instance (served before it, not after)."""

    def update(self, snapshot: Mapping[str, AgentInstance]) -> _Index:
        old, new = self._seen, snapshot  # a published snapshot is never mutated: keeping it is safe
        self._seen = new
        changed = list(old.keys() - new.keys())
        changed += [k for k, inst in new.items() if old.get(k) is not inst]
        self.emptied = []
        rebuilt = len(changed) * 8 > len(new)
        if rebuilt:  # a first list or a large change: build from scratch
            self.emptied = list(self._by_cap)  # those still served are taken out again below
            self._groups, self._keys, self._all = {}, [], []
            self._by_cap, self._infos = {}, {}
            old, changed = {}, list(new)
            for inst in sorted(new.values(), key=_order):
                self._keys.append(_order(inst))
                self._all.append(inst)
        affected: set[str] = set()
        for key in changed:
            before, after = old.get(key), new.get(key)
            if before is not None:
                for cap in before.card.capabilities:
                    self._groups.get(cap.name, {}).pop(key, None)
                    affected.add(cap.name)
                if old:  # incremental: take it out of the ordered listing
                    at = bisect.bisect_left(self._keys, _order(before))
                    del self._keys[at], self._all[at]
            if after is not None:
                for cap in after.card.capabilities:
                    self._groups.setdefault(cap.name, {})[key] = after
                    affected.add(cap.name)
                if old:
                    at = bisect.bisect_left(self._keys, _order(after))
                    self._keys.insert(at, _order(after))
                    self._all.insert(at, after)
        for name in affected:
            group = self._groups.get(name)
            if not group:
                self._groups.pop(name, None)
                if self._by_cap.pop(name, None) is not None:
                    self.emptied.append(name)
                self._infos.pop(name, None)
                continue
            self._by_cap[name] = tuple(sorted(group.values(), key=lambda i: (i.instance_id, i.card.name)))
            first = min(group.values(), key=_order)
            decl = next(c for c in first.card.capabilities if c.name == name)
            self._infos[name] = CapabilityInfo(decl, tuple(sorted({i.card.name for i in group.values()})), len(group))
        if rebuilt and self.emptied:
            self.emptied = [name for name in self.emptied if name not in self._by_cap]
        infos = tuple(self._infos[name] for name in sorted(self._infos))
        return _Index(dict(self._by_cap), tuple(self._all), infos)


DEPARTED_MAX = 10_000
"""Capabilities no longer served that a node still remembers (see Departed)."""


class Departed:
    """The capabilities once served and served no longer, the most recent `limit` of them: a call to one is
    NO_LIVE_INSTANCE (it may come back), to any other UNKNOWN_CAPABILITY. Bounded, because a workload registering
    ever new names would otherwise grow every node's memory for good; one forgotten is only told as unknown."""

    def __init__(self, limit: int = DEPARTED_MAX) -> None:
        self._limit = limit
        self._names: dict[str, None] = {}  # oldest first

    def note(self, emptied: Iterable[str]) -> None:
        for name in emptied:
            self._names.pop(name, None)
            self._names[name] = None
        excess = len(self._names) - self._limit
        if excess > 0:
            for name in list(itertools.islice(self._names, excess)):
                del self._names[name]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)


class LeftOut(NamedTuple):
    """The instances offering a capability that the providers policy does not let serve it, and that policy."""

    instances: tuple[AgentInstance, ...]
    restriction: Restriction


class _Permitted(NamedTuple):
    kept: tuple[AgentInstance, ...]
    left_out: LeftOut | None


class RegistryView:
    """The live registry, indexed by capability; every read is a lookup in a structure swapped atomically.

    Instances returned are shared, immutable by convention: do not mutate them.
    """

    def __init__(
        self,
        etcd_endpoints: Endpoints,
        *,
        trust_domain: str | None = None,
        on_change: Callable[[], None] | None = None,
        options: WatchOptions | None = None,
        providers: Callable[[], ProvidersTable] | None = None,
    ) -> None:
        """trust_domain binds every entry to its key's identity (see decode_instance); a node that routes
        calls always gives it. Without it (listings only) an entry's identity is shown as written.

        providers gives the providers policy in force (a node's compiled `PolicyCache` value): `instances()` then
        lists, for a restricted capability, only the instances whose identity may serve it. It is applied here,
        the one listing every caller reads (selection, fan-out lists, a sidecar's Resolve), so no path can dial
        or send a token to an instance the policy leaves out. Without it (the control plane, `hivemesh up`'s
        wait for registrations) every registered instance is listed."""
        self._on_change = on_change
        self._index = _EMPTY_INDEX
        self._builder = _IndexBuilder()
        self._departed = Departed()
        self._trust_domain = trust_domain
        self._providers = providers
        self._permits: dict[str, _Permitted] = {}
        """capability -> what the providers policy keeps of its instances, for _permits_of (index, table)."""
        self._permits_of: tuple[_Index, ProvidersTable] | None = None
        self.impostors_refused = 0
        """Entries ignored because their identity is not their agent's (each PUT counted once)."""
        self._cache: PrefixCache[AgentInstance] = PrefixCache(
            etcd_endpoints, AGENTS_PREFIX, decode_entry=self._decode, on_change=self._rebuild, options=options
        )

    def _decode(self, key: bytes, value: bytes, create_revision: int) -> AgentInstance:
        try:
            return decode_instance(key, value, self._trust_domain, create_revision=create_revision)
        except ImpostorEntryError:
            self.impostors_refused += 1
            raise

    @property
    def cache(self) -> PrefixCache[AgentInstance]:
        return self._cache

    async def start(self, timeout: float = 10.0, *, wait: bool = True) -> None:
        """See PrefixCache.start (RegistryUnavailableError when etcd is unreachable and wait=True)."""
        await self._cache.start(timeout, wait=wait)

    async def stop(self) -> None:
        await self._cache.stop()

    async def __aenter__(self) -> RegistryView:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- hot path -------------------------------------------------------------------------------------------
    def instances(self, capability: str) -> tuple[AgentInstance, ...]:
        """Live instances that may serve capability, sorted by instance_id (empty tuple when none): every instance
        offering it, less those the providers policy does not let serve it (see `left_out`)."""
        found = self._index.by_capability.get(capability, ())
        if not found or self._providers is None:
            return found
        table = self._providers()
        if table.empty:
            return found
        return self._permitted(capability, found, table).kept

    def offering(self, capability: str) -> tuple[AgentInstance, ...]:
        """Every live instance that registered capability, whether or not the providers policy lets it serve it
        (for what an agent knows of its own instances, and listings; never for choosing whom to call)."""
        return self._index.by_capability.get(capability, ())

    def left_out(self, capability: str) -> LeftOut | None:
        """The live instances offering capability that the providers policy leaves out of `instances()`, with
        the policy that does; None when it leaves none out."""
        found = self._index.by_capability.get(capability, ())
        if not found or self._providers is None:
            return None
        table = self._providers()
        return None if table.empty else self._permitted(capability, found, table).left_out

    def _permitted(self, capability: str, found: tuple[AgentInstance, ...], table: ProvidersTable) -> _Permitted:
        """found split by table, remembered until the index or the table changes (both are swapped as a whole):
        each call's lookup stays a dict read."""
        index = self._index
        of = self._permits_of
        if of is None or of[0] is not index or of[1] is not table:
            self._permits, self._permits_of = {}, (index, table)
        permitted = self._permits.get(capability)
        if permitted is None:
            restriction = table.restriction(capability)
            if restriction is None:
                permitted = _Permitted(found, None)
            else:
                kept = tuple(i for i in found if restriction.allows(self._identity(i)))
                out = tuple(i for i in found if not restriction.allows(self._identity(i)))
                permitted = _Permitted(kept, LeftOut(out, restriction) if out else None)
            self._permits[capability] = permitted  # bounded: only capabilities the index holds get here
        return permitted

    def _identity(self, instance: AgentInstance) -> str:
        """The identity a caller pins when it dials instance: its agent's, derived from the name (decode_instance
        refused any entry claiming another), or the entry's own without a trust domain."""
        td = self._trust_domain
        return expected_identity(td, instance.card.name) if td is not None else instance.identity

    def knows_capability(self, name: str) -> bool:
        """True if an instance offers name now, or did in this process's life (the last DEPARTED_MAX names gone).

        Tells UNKNOWN_CAPABILITY (never seen) from NO_LIVE_INSTANCE (seen, no instance now).
        """
        return name in self._index.by_capability or name in self._departed

    # --- listings -------------------------------------------------------------------------------------------
    def capabilities(self) -> list[CapabilityInfo]:
        """Every capability served now, sorted by name."""
        return list(self._index.capabilities)

    def all_instances(self) -> tuple[AgentInstance, ...]:
        """Every live instance, sorted by (agent name, instance id)."""
        return self._index.all

    async def wait_for_capability(self, name: str, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until at least count instances may serve name (`instances`); False on timeout."""
        def enough(_snap: Mapping[str, AgentInstance]) -> bool:
            return len(self.instances(name)) >= count

        return await self._cache.wait_for(enough, timeout)

    def _rebuild(self) -> None:
        self._index = self._builder.update(self._cache.snapshot())
        if self._builder.emptied:
            self._departed.note(self._builder.emptied)
        if self._on_change is not None:
            self._on_change()
